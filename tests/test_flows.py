"""The Prefect deployment end to end: a real Prefect server on 127.0.0.1, a real worker, real DVC."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import GIT_IDENTITY, ROOT, project_copy
from tasks.config import ConfigError

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """A git + DVC copy of the project on a tiny image folder, and a Prefect server this fixture starts."""
    base = tmp_path_factory.mktemp("prefect")
    repo = project_copy(base / "repo")
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(base / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TQDM_DISABLE": "1", **GIT_IDENTITY}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(base / "server.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                api(env["PREFECT_API_URL"], "/health")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError((base / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield repo, env
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def deployment_run(repo: Path, env: dict, *params: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.deployment_run", *[f"--param={p}" for p in params]],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=900)


def last_flow_run(url: str) -> dict:
    runs = api(url, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 1})
    return runs[0]


def run_logs(url: str, flow_run_id: str) -> str:
    logs = api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in logs)


def test_deployment_runs_the_pipeline_and_dvc_versions_everything(prefect_env):
    repo, env = prefect_env
    url = env["PREFECT_API_URL"]
    r = deployment_run(repo, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = last_flow_run(url)
    assert run["state"]["type"] == "COMPLETED"
    assert (repo / "export" / "model.onnx").exists()
    artifacts = api(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    keys = {a["key"] for a in artifacts}
    assert {"metrics", "model-card", "features-progress", "train-progress"} <= keys
    card = next(a for a in artifacts if a["key"] == "model-card")
    assert "reports/index.html" in card["data"] and (repo / "reports" / "index.html").stat().st_size > 10_000
    table = next(a for a in artifacts if a["key"] == "metrics")
    assert "accuracy" in json.dumps(table["data"])
    status = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}
    assert any((repo / ".dvc-storage").rglob("*"))  # pushed to the local DVC remote

    # Second run: every stage is current in DVC, so every task is skipped.
    r = deployment_run(repo, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run2 = last_flow_run(url)
    assert run2["id"] != run["id"] and run2["state"]["type"] == "COMPLETED"
    logs = run_logs(url, run2["id"])
    for stage in ("prepare", "backbone", "features", "train", "evaluate", "export"):
        assert f"stage {stage} is up to date in DVC: cached, skipped" in logs, logs
    repro = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert "Running stage" not in repro.stdout


def test_a_bad_override_fails_before_any_work_naming_the_key(prefect_env):
    repo, env = prefect_env
    before = (repo / "params.yaml").read_text()
    r = deployment_run(repo, env, 'overrides={"classification.epoch": 3}')
    assert r.returncode != 0
    run = last_flow_run(env["PREFECT_API_URL"])
    assert run["state"]["type"] == "FAILED"
    logs = run_logs(env["PREFECT_API_URL"], run["id"])
    assert "classification.epoch" in logs and "did you mean 'epochs'" in logs
    assert "stage prepare" not in logs  # no stage ran
    assert (repo / "params.yaml").read_text() == before


def test_overrides_are_validated_and_written_with_comments_kept(tmp_path):
    from flows.pipeline import apply_overrides

    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    with pytest.raises(ConfigError, match="unknown param 'data.datset'"):
        apply_overrides({"data.datset": "cifar10"}, params_file)
    with pytest.raises(ConfigError, match="classification.epochs: expected int"):
        apply_overrides({"classification.epochs": "many"}, params_file)
    assert params_file.read_text() == (ROOT / "params.yaml").read_text()
    params = apply_overrides({"classification.l2": [0.05], "data.dataset": "imagefolder"}, params_file)
    assert params.classification.l2 == [0.05] and params.data.dataset == "imagefolder"
    text = params_file.read_text()
    assert "# Every knob of the pipeline" in text and "dataset: imagefolder" in text


def test_the_flow_takes_typed_params_and_writes_only_what_changed(tmp_path):
    """The Prefect UI builds its form from the flow's parameter schema: typed sections, not a free-form dict."""
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import apply_overrides, flatten, transfer_learning
    from tasks.classification.params import ClassificationParams
    from tasks.config import Params

    schema = parameter_schema(transfer_learning).model_dump()
    defs = schema["definitions"]
    assert "params" in schema["properties"]
    assert {"ClassificationParams", "MultilabelParams", "DataParams", "ExportParams"} <= set(defs)
    assert defs["ClassificationParams"]["properties"]["epochs"]["type"] == "integer"
    assert {"digits", "imagefolder", "voc", "masks"} <= set(defs["DataParams"]["properties"]["dataset"]["enum"])

    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    before = params_file.read_text().splitlines()
    typed = Params(classification=ClassificationParams(epochs=7))
    assert apply_overrides(flatten(typed.model_dump(mode="json")), params_file).classification.epochs == 7
    after = params_file.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1 and "epochs: 7" in changed[0][1]
