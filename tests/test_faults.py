"""Failures keep the last good data and model, through real `dvc repro` on a tiny project.

Each test breaks one thing, checks that the previous artifacts are still there (and usable),
then puts the project back and checks that `dvc status` is clean again.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import sh
from tasks.files import sha256_file


def status(repo: Path) -> set[str]:
    return set(json.loads(sh(["dvc", "status", "--json"], repo).stdout))


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def params_changed(repo: Path, edit):
    """params.yaml edited by `edit(dict)` (or replaced by a string) for the block; restored after."""
    original = (repo / "params.yaml").read_text()
    doc = yaml.safe_load(original)
    new = edit(doc)
    (repo / "params.yaml").write_text(new if isinstance(new, str) else yaml.safe_dump(doc, sort_keys=False))
    try:
        yield
    finally:
        (repo / "params.yaml").write_text(original)


@pytest.fixture
def repo(dvc_repo) -> Path:
    assert status(dvc_repo) == set()
    yield dvc_repo
    assert status(dvc_repo) == set(), "the test left the project changed"


def test_a_failing_parity_gate_keeps_the_previous_servable_model(repo):
    from tasks.runtime import open_session

    before = tree_digest(repo / "export")
    with params_changed(repo, lambda d: d["export"].update(parity_tolerance=1.0e-12)):
        r = sh(["dvc", "repro"], repo, check=False)
        assert r.returncode != 0
        assert "parity gate failed" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert tree_digest(repo / "export") == before  # export/ untouched: model, labels, Triton repository
        session, _ = open_session(repo / "export" / "model.onnx", device="cpu")
        probs = session.run(["probabilities"], {"images": np.zeros((1, 224, 224, 3), np.uint8)})[0]
        assert probs.shape[0] == 1 and abs(float(probs.sum()) - 1.0) < 1e-4
        assert not json.loads((repo / "reports" / "parity.json").read_text())["passed"]  # says why
        # still stale: nothing was recorded (and the report page, whose input parity.json now says why)
        assert status(repo) == {"export", "report"}
    sh(["dvc", "repro"], repo)  # restores parity.json


def test_a_misspelt_param_keeps_the_prepared_data(repo):
    before = tree_digest(repo / "data" / "prepared")
    with params_changed(repo, lambda d: d["data"].update(datset="digits")):
        r = sh(["dvc", "repro"], repo, check=False)
        assert r.returncode != 0
        assert "prepare: params.yaml: unknown param 'data.datset' (did you mean 'dataset'?)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert tree_digest(repo / "data" / "prepared") == before


def test_a_failing_train_keeps_the_previous_model(repo):
    models = ("model.pt", "model.safetensors", "head.pt", "labels.json")
    before = {m: sha256_file(repo / "models" / m) for m in models}
    with params_changed(repo, lambda d: d["classification"].update(unfreeze_blocks=99)):
        r = sh(["dvc", "repro"], repo, check=False)
        assert r.returncode != 0 and "train: classification.unfreeze_blocks=99" in r.stderr, r.stderr
        assert {m: sha256_file(repo / "models" / m) for m in models} == before
        assert not list((repo / "models").glob(".staging.*"))
    sh(["dvc", "repro"], repo)  # the audit ran on the bad params before train failed: back to the committed ones


def test_a_corrupted_feature_cache_is_detected_and_recomputed(repo):
    key = json.loads((repo / "features" / "key.json").read_text())
    x = repo / "features" / "x_train.npy"
    good = sha256_file(x)
    x.unlink()  # DVC may hardlink from its cache: replace the file, never write through it
    x.write_bytes(b"\x93NUMPY garbage")
    assert "features" in status(repo)
    r = sh(["dvc", "repro"], repo)
    assert "features: " in r.stdout and "reused" not in r.stdout, r.stdout  # recomputed, not reused
    assert sha256_file(x) == good == key["arrays"]["x_train.npy"]
