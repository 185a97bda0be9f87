"""The real DVC pipeline on a tiny image folder: repro, status, metrics, plots, experiments, push."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import sh


@pytest.fixture
def repo(dvc_repo) -> Path:
    return dvc_repo


def changed_stages(repo: Path) -> set[str]:
    return set(json.loads(sh(["dvc", "status", "--json"], repo).stdout))


def test_repro_produces_metrics_and_a_clean_status(repo):
    assert changed_stages(repo) == set()
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.8 and metrics["eval_split"] == "test"
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], repo).stdout)
    flat = json.dumps(shown)
    assert '"accuracy"' in flat and "reports/metrics.json" in flat
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "select", "backbone", "features", "audit", "train", "evaluate", "export",
                                   "report"}
    assert json.loads((repo / "reports" / "parity.json").read_text())["passed"]
    assert "ONNX parity<b class=\"good\">passed" in (repo / "reports" / "index.html").read_text()  # the page, after export


def test_plots_render(repo):
    sh(["dvc", "plots", "show", "-o", "plots_out"], repo)
    html = (repo / "plots_out" / "index.html").read_text()
    assert "confusion" in html and "learning_curve" in html


def test_changing_a_train_param_leaves_data_backbone_and_features_up_to_date(repo):
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["classification"]["epochs"] = params["classification"]["epochs"] + 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        # status names the stages whose own deps changed: train, and the audit (it fits the task's head)
        assert changed_stages(repo) == {"train", "audit"}
        out = sh(["dvc", "repro"], repo).stdout
        assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out, out
        for stage in ("prepare", "backbone", "features"):
            assert f"Stage '{stage}' didn't change, skipping" in out, out
    finally:
        (repo / "params.yaml").write_text(original)
    sh(["dvc", "repro"], repo)  # back to the committed params (from DVC's run cache)
    assert changed_stages(repo) == set()


def test_experiment_reuses_cached_stages(repo):
    r = sh(["dvc", "exp", "run", "-S", "classification.l2=[0.05]"], repo)
    out = r.stdout + r.stderr
    for stage in ("prepare", "backbone", "features"):
        assert f"'{stage}' didn't change, skipping" in out or f"'{stage}' is cached" in out, out
    assert "Running stage 'train'" in out


def test_push_versions_data_and_checkpoints_in_the_local_remote(repo):
    sh(["dvc", "push"], repo)
    storage = repo / ".dvc-storage"
    assert storage.is_dir() and sum(1 for p in storage.rglob("*") if p.is_file()) >= 5
    shutil.rmtree(repo / "models")
    sh(["dvc", "checkout"], repo)
    assert (repo / "models" / "model.pt").exists()


@pytest.mark.parametrize("module, expected", [
    ("tasks/train.py", {"train"}),
    ("tasks/plots.py", {"audit", "evaluate"}),
    ("tasks/network.py", {"select", "backbone", "features", "audit", "train", "evaluate", "export"}),
    ("tasks/classification/evaluate.py", {"prepare", "backbone", "features", "audit", "train", "evaluate", "export"}),
    ("tasks/detection/train.py", set()),  # another task's package: nothing of this classification run
])
def test_editing_a_module_makes_exactly_its_dependants_stale(repo, module, expected):
    path = repo / module
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        assert changed_stages(repo) == expected
    finally:
        path.write_text(original)
    assert changed_stages(repo) == set()


def test_another_tasks_params_make_nothing_stale(repo):
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["segmentation"]["lr"] = params["segmentation"]["lr"] * 2
    params["multilabel"]["features"]["flip"] = not params["multilabel"]["features"]["flip"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert changed_stages(repo) == set()
    finally:
        (repo / "params.yaml").write_text(original)


def test_the_tasks_feature_params_make_backbone_and_features_stale(repo):
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["classification"]["features"]["flip"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert changed_stages(repo) == {"backbone", "features", "audit", "train"}
    finally:
        (repo / "params.yaml").write_text(original)
