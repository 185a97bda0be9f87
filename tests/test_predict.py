"""Batch prediction (python -m tasks.predict): a real exported classifier over generated images, here and on a real
LocalCluster of 2 single-threaded workers on 127.0.0.1; the tiny detection and segmentation graphs of
tests/test_serve_dense.py for the dense rows.

The evaluation split's labels equal the evaluate stage's own predictions; the cluster's rows equal the local
ones; a killed run resumes from its journal and computes only what is missing; an unreadable image is a row with
its error, not a failed run; bad arguments are one line.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, Workdir, make_imagefolder, tiny_params
from tasks import predict


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, backbone_dir):
    """(the dataset root, export/model.onnx, the evaluate stage's predictions {path: label}) of a tiny classifier."""
    base = tmp_path_factory.mktemp("predict")
    root = make_imagefolder(base / "images", per_class=10)
    w = Workdir(base / "work", backbone_dir)
    params = tiny_params(root)
    w.run_all(params)
    w.export(params)
    with open(w.reports / "evaluation" / "predictions.csv", newline="") as f:
        evaluated = {r["path"]: r["predicted"] for r in csv.DictReader(f)}
    return root, w.layout.model_onnx, evaluated


def run(*args: str, cwd: Path | None = None) -> dict:
    old = os.getcwd()
    os.chdir(cwd or ROOT)  # params.yaml (features.executor: local) is read from the working folder
    try:
        return predict.run([*args, "--params", "no-params.yaml"] if "--params" not in args else list(args))
    finally:
        os.chdir(old)


def rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def eval_csv(listing: Path, evaluated: dict[str, str], repeat: int = 1) -> Path:
    with open(listing, "w", newline="") as f:
        cw = csv.writer(f)
        cw.writerow(["path", "note"])
        for _ in range(repeat):
            cw.writerows([p, "x"] for p in evaluated)
    return listing


def test_labels_equal_the_evaluate_stages_predictions(classifier, tmp_path):
    root, model, evaluated = classifier
    listing = eval_csv(root / "eval.csv", evaluated)  # relative paths are the CSV folder's
    out = tmp_path / "p.csv"
    r = run("--model", str(model), "--images", str(listing), "--out", str(out), "--shard-size", "4")
    got = rows(out)
    assert [g["path"] for g in got] == list(evaluated)  # the CSV's order
    assert {g["path"]: g["label"] for g in got} == evaluated
    assert r["images"] == len(evaluated) and r["unreadable"] == 0 and r["shards"] == -(-len(evaluated) // 4)
    g = got[0]
    top = json.loads(g["top_k"])
    assert top[0]["label"] == g["label"] and abs(top[0]["probability"] - float(g["probability"])) < 1e-6
    assert g["ood_score"] != "" and g["in_distribution"] in ("True", "False")
    assert int(g["width"]) == 72 and int(g["height"]) == 72
    assert not (tmp_path / "p.csv.parts").exists()  # the parts go once the output is in place
    assert predict.describe(r).startswith(f"predict: {len(evaluated)} images -> ")
    listing.unlink()


def test_a_folder_on_the_cluster_gives_the_local_rows(classifier, tmp_path):
    """2 single-threaded workers on 127.0.0.1 against this process on one thread: the same rows, bit for bit."""
    root, model, _ = classifier
    local, remote = tmp_path / "local.jsonl", tmp_path / "cluster.jsonl"
    run("--model", str(model), "--images", str(root), "--out", str(local), "--threads", "1")
    r = run("--model", str(model), "--images", str(root), "--out", str(remote), "--executor", "dask",
            "--workers", "2", "--threads-per-worker", "1", "--shard-size", "5")
    a, b = rows(local), rows(remote)
    assert len(a) == 30 and a == b
    assert [x["path"] for x in a] == sorted(x["path"] for x in a)  # a folder: sorted, relative to it
    assert r["executor"] == "dask" and r["shards"] == 6 and r["shards_computed"] == 6


def test_an_unreadable_image_is_a_row_with_its_error_and_parquet_has_types(classifier, tmp_path):
    root, model, _ = classifier
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, src in enumerate(sorted(root.rglob("*.jpg"))[:3]):
        (folder / f"ok{i}.jpg").write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / ".hidden.jpg").write_bytes(b"dotfiles are skipped")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "p.parquet"
    r = run("--model", str(model), "--images", str(folder), "--out", str(out), "--top-k", "1")
    got = {g["path"]: g for g in rows(out)}
    assert sorted(got) == ["broken.jpg", "ok0.jpg", "ok1.jpg", "ok2.jpg"]
    assert got["broken.jpg"]["error"] and got["broken.jpg"]["label"] is None and got["broken.jpg"]["width"] is None
    assert all(got[f"ok{i}.jpg"]["error"] == "" and isinstance(got[f"ok{i}.jpg"]["probability"], float)
               for i in range(3))
    assert len(json.loads(got["ok0.jpg"]["top_k"])) == 1
    assert r["unreadable"] == 1


def test_a_killed_run_resumes_computing_only_the_missing_shards(classifier, tmp_path):
    root, model, evaluated = classifier
    repeat = 16
    listing = eval_csv(tmp_path / "images.csv", {str(root / p): v for p, v in evaluated.items()}, repeat)  # absolute
    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "tasks.predict", "--model", str(model), "--images", str(listing), "--out", str(out),
           "--shard-size", "2", "--threads", "1", "--params", "none.yaml"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = tmp_path / "p.csv.parts" / "journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = len(journal.read_text().splitlines())
    shards = -(-repeat * len(evaluated) // 2)
    assert 3 <= done < shards
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f", {done} of {shards} shards resumed)" in r.stdout  # the journalled ones, not computed again
    got = rows(out)
    assert len(got) == repeat * len(evaluated)
    assert all(g["label"] == evaluated[str(Path(g["path"]).relative_to(root))] for g in got)
    assert not list(tmp_path.glob(".*tmp")) and not (tmp_path / "p.csv.parts").exists()


def test_other_options_do_not_resume_stale_parts(classifier, tmp_path):
    """Parts of another job (here: another top_k) in <out>.parts are discarded, not mixed in."""
    root, model, _ = classifier
    out = tmp_path / "p.jsonl"
    parts = tmp_path / "p.jsonl.parts"
    parts.mkdir()
    (parts / "job.json").write_text(json.dumps({"version": 1, "other": True}))
    (parts / "part-00000.jsonl").write_text('{"path": "stale"}\n')
    (parts / "journal.jsonl").write_text('{"name": "part-00000", "sha256": "0"}\n')
    r = run("--model", str(model), "--images", str(root), "--out", str(out), "--top-k", "2")
    assert r["shards_resumed"] == 0 and "stale" not in out.read_text()
    assert all(len(json.loads(g["top_k"])) == 2 for g in rows(out))


def test_segmentation_masks_and_detection_boxes(tmp_path):
    from test_serve_dense import detector, expected_regions, regions, segmenter

    seg, det = segmenter(tmp_path / "seg.onnx"), detector(tmp_path / "det.onnx")
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    regions(200, 150).save(folder / "a.png")
    regions(120, 90).save(folder / "b.png")
    out = tmp_path / "seg.csv"
    run("--model", str(seg), "--images", str(tmp_path / "imgs"), "--out", str(out), "--masks", str(tmp_path / "masks"))
    got = {g["path"]: g for g in rows(out)}
    assert sorted(got) == ["sub/a.png", "sub/b.png"]
    for name, (w, h) in (("sub/a.png", (200, 150)), ("sub/b.png", (120, 90))):
        mask = np.asarray(Image.open(got[name]["mask"]))
        assert Path(got[name]["mask"]) == tmp_path / "masks" / f"{name}.png"
        assert mask.shape == (h, w) and (mask == expected_regions(w, h)).mean() > 0.98
        fractions = json.loads(got[name]["class_fractions"])
        assert abs(fractions["green"] - 0.5) < 0.02 and abs(fractions["red"] - 0.25) < 0.02
    out = tmp_path / "det.jsonl"
    run("--model", str(det), "--images", str(tmp_path / "imgs"), "--out", str(out), "--threshold", "0.5")
    got = {g["path"]: g for g in rows(out)}
    dets = json.loads(got["sub/a.png"]["detections"])
    assert got["sub/a.png"]["n_detections"] == 2 and [d["label"] for d in dets] == ["dog", "cat"]
    assert dets[0]["box"] == pytest.approx([10 * 200 / 96, 8 * 150 / 64, 50 * 200 / 96, 40 * 150 / 64], rel=1e-5)


@pytest.mark.parametrize("args, words", [
    (["--model", "nope.onnx", "--images", ".", "--out", "p.csv"], "does not exist"),
    (["--images", ".", "--out", "p.xlsx"], ".csv / .jsonl / .parquet"),
    (["--images", "missing-folder", "--out", "p.csv"], "give a folder of images or a CSV"),
])
def test_bad_arguments_are_one_line(classifier, tmp_path, args, words):
    _, model, _ = classifier
    if "--model" not in args:
        args = ["--model", str(model), *args]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        old = os.getcwd()
        os.chdir(empty)
        try:
            predict.main([*args, "--params", "none.yaml"])
        finally:
            os.chdir(old)
    msg = str(e.value.code)
    assert msg.startswith("predict: ") and words in msg and "\n" not in msg
    assert not list(empty.iterdir())  # nothing written
