"""The serving image: built by deploy/build-image.sh, run on a 127.0.0.1 port, answers like onnxruntime here.

Needs a working container engine (podman or docker) and the offline base image
(deploy/setup-podman.sh, then deploy/make-base-image.sh); skipped with the reason otherwise.
The build installs onnxruntime & co. from PyPI inside the image (~20-60 s). Everything this
module starts (container, image) it removes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
from conftest import ROOT, Workdir, export_, make_imagefolder, tiny_params

BASE_IMAGE = os.environ.get("TLCV_BASE_IMAGE", "localhost/tlcv-base:bookworm")


def _engine() -> str | None:
    """Same choice as deploy/build-image.sh: docker when its daemon answers, else podman when it works."""
    for name in ("docker", "podman"):
        if shutil.which(name):
            try:
                if subprocess.run([name, "info"], check=False, capture_output=True, timeout=60).returncode == 0:
                    return name
            except subprocess.TimeoutExpired:
                pass
    return None


ENGINE = _engine()
pytestmark = [
    pytest.mark.skipif(ENGINE is None, reason="no working container engine (podman or docker); "
                                             "sudo deploy/setup-podman.sh installs podman"),
]
if ENGINE is not None and subprocess.run([ENGINE, "image", "inspect", BASE_IMAGE], check=False, capture_output=True).returncode != 0:
    pytestmark.append(pytest.mark.skip(reason=f"base image {BASE_IMAGE} missing: run deploy/make-base-image.sh (as root)"))

httpx = pytest.importorskip("httpx", reason="test dep: pip install httpx")
triton = pytest.importorskip("tritonclient.http", reason="test dep: pip install 'tritonclient[http]'")

from tasks.preprocess import PreprocessingCard, load_image
from tasks.runtime import open_session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), check=False, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def model(tmp_path_factory, backbone_dir):
    base = tmp_path_factory.mktemp("container")
    images = make_imagefolder(base / "images", per_class=6, seed=3)
    w = Workdir(base / "work", backbone_dir)
    params = tiny_params(images)
    w.run_all(params)
    path = export_(w, params).model_path
    files = {p.name: p.read_bytes() for p in sorted(images.rglob("*")) if p.suffix in (".jpg", ".png")}
    return path, files


@pytest.fixture(scope="module")
def container(model):
    """(base url, container name): the image built from this tree with the tiny model baked in, running."""
    tag = f"localhost/tlcv-serve-test:{os.getpid()}"
    name = f"tlcv-serve-test-{os.getpid()}"
    port = free_port()
    t0 = time.monotonic()
    sh(str(ROOT / "deploy" / "build-image.sh"), "-t", tag, "--model", str(model[0]), "--base", BASE_IMAGE, timeout=900)
    build_s = time.monotonic() - t0
    try:
        # as deploy/k8s.yaml runs it: read-only root filesystem, no capabilities
        sh(ENGINE, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "--read-only", "--tmpfs", "/tmp",
           "--cap-drop", "ALL", "-e", "MAX_WAIT_MS=20", tag)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            state = sh(ENGINE, "inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip()
            if state != "true" or time.monotonic() > deadline:
                raise AssertionError(f"container not ready (running={state}):\n"
                                     + sh(ENGINE, "logs", name, check=False).stderr[-3000:])
            time.sleep(0.3)
        yield url, name, port, build_s  # build_s: how long the image build took (for the log)
    finally:
        sh(ENGINE, "rm", "-f", "-t", "0", name, check=False) if ENGINE == "podman" else sh(ENGINE, "rm", "-f", name, check=False)
        sh(ENGINE, "rmi", "-f", tag, check=False)


def _reference(model, names):
    path, files = model
    session, _ = open_session(path, device="cpu")
    meta = session.get_modelmeta().custom_metadata_map
    card_d = json.loads(meta["preprocessing"])
    card = PreprocessingCard.from_dict({k: v for k, v in card_d.items() if k in PreprocessingCard.__dataclass_fields__})
    pixels = np.stack([load_image(files[n], card) for n in names])
    probs = session.run(["probabilities"], {"images": pixels})[0]
    return pixels, probs, json.loads(meta["labels"])


def test_container_answers_like_onnxruntime_here(container, model):
    url, _, port, _ = container
    names = sorted(model[1])[:6]
    pixels, probs, labels = _reference(model, names)
    c = triton.InferenceServerClient(f"127.0.0.1:{port}")
    assert c.is_server_ready() and c.is_model_ready("classifier")
    meta = c.get_model_metadata("classifier")
    assert meta["inputs"][0] == {"name": "images", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}
    assert meta["parameters"]["labels"] == labels and meta["parameters"]["provider"] == "CPUExecutionProvider"
    inp = triton.InferInput("images", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    r = c.infer("classifier", [inp], outputs=[triton.InferRequestedOutput("probabilities")])
    np.testing.assert_allclose(r.as_numpy("probabilities"), probs, atol=1e-5)
    # encoded files: decoded inside the container by the same tasks.preprocess.load_image
    up = [("files", (n, model[1][n])) for n in names]
    res = httpx.post(url + "/v1/predict", params={"top_k": 3}, files=up, timeout=60)
    assert res.status_code == 200, res.text
    for p, ref in zip(res.json()["predictions"], probs):
        assert [t["label"] for t in p["top_k"]] == [labels[i] for i in np.argsort(-ref, kind="stable")]
        np.testing.assert_allclose(sorted((t["probability"] for t in p["top_k"]), reverse=True), np.sort(ref)[::-1], atol=1e-5)
    bad = httpx.post(url + "/v1/predict", files=[("files", ("x.jpg", b"not a jpeg"))], timeout=30)
    assert bad.status_code == 400 and "cannot decode image" in bad.json()["error"]


def test_image_is_slim_non_root_torch_free_and_healthy(container):
    name = container[1]
    assert sh(ENGINE, "exec", name, "id", "-u").stdout.strip() == "10001"
    r = sh(ENGINE, "exec", name, "python3", "-c", "import importlib.util as u; print(u.find_spec('torch') is None)")
    assert r.stdout.strip() == "True"
    # every task's serving part is in the image and imports there (deploy/predict.py imports it by the model's task)
    r = sh(ENGINE, "exec", name, "python3", "-c", "import importlib, deploy.server; from tasks.contract import TASKS; "
           "print(sorted(importlib.import_module(f'tasks.{t}.serve').__name__ for t in TASKS))")
    assert r.stdout.strip() == str(sorted(f"tasks.{t}.serve" for t in ("classification", "multilabel", "detection",
                                                                        "segmentation"))), r
    r = sh(ENGINE, "exec", name, "python3", "-c", "import sys; print(sys.version_info[:2])")
    assert r.stdout.strip() == "(3, 11)"  # Debian bookworm's python3
    health = sh(ENGINE, "inspect", "--format", "{{json .Config.Healthcheck}}", name).stdout
    assert "/v2/health/ready" in health
    if ENGINE == "podman":  # run the image's HEALTHCHECK now (no systemd timer here)
        assert sh(ENGINE, "healthcheck", "run", name, check=False).returncode == 0


def test_sigterm_stops_it_cleanly_and_fast(container):
    # last in this module: it stops the container the fixture started (the fixture still removes it)
    name = container[1]
    t0 = time.monotonic()
    sh(ENGINE, "stop", "-t", "20", name, timeout=60)  # SIGTERM, then SIGKILL after 20 s
    took = time.monotonic() - t0
    code = sh(ENGINE, "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    logs = sh(ENGINE, "logs", name, check=False)
    assert code == "0" and took < 10, (code, took, logs.stderr[-2000:])
    assert "shut down cleanly" in logs.stdout + logs.stderr
