"""Multi-label classification (task: multilabel) on tiny generated data: a tags CSV of small images, each showing a
random subset of three shapes (a red disc, a blue square, green stripes); the tag is the shape.

The reader's rules (columns, bad rows and images, stratification) run on the reader alone; one module-scoped run
of the real stages (prepare, features, train, evaluate, export, with the session's backbone) backs the rest.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import Workdir
from tasks.config import parse_params
from tasks.files import read_json
from tasks.imagefiles import DataError
from tasks.layout import Layout

TAGS = ("circle", "square", "stripes")


def draw_tags(tags, rng: np.random.Generator, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(170, 255, 3)))
    d = ImageDraw.Draw(img)
    if "stripes" in tags:
        for k in range(0, size, 10):
            d.line((k, 0, k, size), fill=(20, int(rng.integers(120, 220)), 20), width=3)
    if "circle" in tags:  # in the left half, the square in the right: neither hides the other
        x, y = int(rng.integers(2, size // 2 - 22)), int(rng.integers(2, size - 22))
        d.ellipse((x, y, x + 20, y + 20), fill=(220, 20, 20))
    if "square" in tags:
        x, y = int(rng.integers(size // 2, size - 22)), int(rng.integers(2, size - 22))
        d.rectangle((x, y, x + 20, y + 20), fill=(20, 20, 220))
    return img


def make_tags_csv(root: Path, n: int = 48, seed: int = 0, extra_rows: tuple[str, ...] = ()) -> Path:
    """root/labels.csv (path,labels) over root/img/*.png; every tag on about half the images, some have none."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["path,labels"]
    for i in range(n):
        tags = [t for t in TAGS if rng.random() < 0.45]
        draw_tags(tags, rng).save(root / "img" / f"{i:03d}.png")
        lines.append(f"img/{i:03d}.png,{'|'.join(tags)}")
    (root / "labels.csv").write_text("\n".join([*lines, *extra_rows]) + "\n")
    return root


def ml_params(root: Path, **multilabel):
    return parse_params({"task": "multilabel", "data": {"dataset": "csv", "root": str(root), "val_fraction": 0.3,
                                                         "test_fraction": 0.0},
                         "features": {"batch_size": 16}, "evaluate": {"bootstrap_samples": 200},
                         "multilabel": {"holdout_fraction": 0.3, **multilabel}})


def prepare(root: Path, base: Path, **data):
    from tasks import data as stage

    params = ml_params(root)
    params = params.model_copy(update={"data": params.data.model_copy(update=data)})
    stage.run(params, Layout(base))
    return Layout(base)


# ---------------------------------------------------------------- the CSV reader


def test_tags_come_from_the_csv_with_paths_relative_to_it(tmp_path):
    root = make_tags_csv(tmp_path / "data", n=12)
    by_folder = prepare(root, tmp_path / "a").dataset()
    by_file = prepare(root / "labels.csv", tmp_path / "b").dataset()
    assert by_folder.classes == list(TAGS) and by_folder.manifest_sha256 == by_file.manifest_sha256
    lines = (root / "labels.csv").read_text().splitlines()[1:]
    written = {p: "|".join(sorted(t.split("|"))) if t else "" for p, t in (line.split(",") for line in lines)}
    assert {it.path: it.label for it in by_folder.items} == written
    assert by_folder.resolve(by_folder.items[0]).is_file()
    assert read_json(Layout(tmp_path / "a").prepared / "dataset.json")["task"] == "multilabel"


@pytest.mark.parametrize("header, expected", [
    ("path,labels,weight", "unknown column(s) 'weight'; the columns are path,labels[,split]"),
    ("path,tags", "unknown column(s) 'tags'"),
    ("path", "no 'labels' column in the header path"),
])
def test_a_csv_of_another_form_is_one_line_naming_the_columns(tmp_path, header, expected):
    root = make_tags_csv(tmp_path / "data", n=6)
    (root / "labels.csv").write_text(header + "\nimg/000.png,circle" + ",x" * (header.count(",") - 1) + "\n")
    with pytest.raises(DataError) as e:
        prepare(root, tmp_path / "out")
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_folder_without_labels_csv_and_a_bad_split_are_errors(tmp_path):
    with pytest.raises(DataError, match="no labels.csv in .*: set data.root to the CSV file"):
        prepare(tmp_path, tmp_path / "out")
    root = make_tags_csv(tmp_path / "data", n=6)
    (root / "labels.csv").write_text("path,labels,split\nimg/000.png,circle,train\nimg/001.png,square,valid\n")
    with pytest.raises(DataError, match=r"line 3: split 'valid' is not one of train, val, test"):
        prepare(root, tmp_path / "out")


def test_missing_corrupt_outside_and_repeated_images_are_reported_and_skipped(tmp_path):
    root = make_tags_csv(tmp_path / "data", n=12, extra_rows=(
        "img/missing.png,circle", "img/corrupt.png,square", "../outside.png,circle", "img/000.png,square"))
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    draw_tags(["circle"], np.random.default_rng(1)).save(tmp_path / "outside.png")
    layout = prepare(root, tmp_path / "out")
    reasons = {s["path"]: s["reason"] for s in read_json(layout.prepare_report)["skipped"]}
    assert set(reasons) == {"img/missing.png", "img/corrupt.png", "../outside.png", "img/000.png"}
    assert "No such file" in reasons["img/missing.png"]
    assert "corrupt" in reasons["img/corrupt.png"] or "not an image" in reasons["img/corrupt.png"]
    assert "outside the CSV's folder" in reasons["../outside.png"]
    assert reasons["img/000.png"] == "listed twice (first on line 2)"
    paths = [it.path for it in layout.dataset().items]
    assert len(paths) == 12 and not {"img/missing.png", "img/corrupt.png", "../outside.png"} & set(paths)


def test_stratification_keeps_every_tag_in_every_split_and_is_deterministic():
    from tasks.config import DataParams
    from tasks.multilabel.data import stratify, tag_quota

    assert tag_quota(3, 0.15, 0.15) == {"train": 1, "val": 1, "test": 1}
    assert tag_quota(2, 0.15, 0.15) == {"train": 1, "val": 0, "test": 1}  # the scoring split before val
    assert tag_quota(1, 0.15, 0.15) == {"train": 1, "val": 0, "test": 0}
    assert tag_quota(100, 0.15, 0.0) == {"train": 85, "val": 15, "test": 0}
    rng = np.random.default_rng(0)
    tags = {f"{i:03d}.png": [t for t in ("common", "medium") if rng.random() < (0.8 if t == "common" else 0.3)]
            for i in range(60)}
    for i in (3, 17, 41):  # a rare tag on 3 images: plain hash order would likely leave a split without it
        tags[f"{i:03d}.png"] = tags[f"{i:03d}.png"] + ["rare"]
    p = DataParams(val_fraction=0.15, test_fraction=0.15, seed=0)
    split = stratify(tags, p)
    assert split == stratify(dict(reversed(list(tags.items()))), p)  # the order of the CSV does not matter
    per_tag = {t: Counter(split[r] for r, ts in tags.items() if t in ts) for t in ("common", "medium", "rare")}
    assert per_tag["rare"] == {"train": 1, "val": 1, "test": 1}
    for t in ("common", "medium"):
        n = sum(per_tag[t].values())
        assert all(abs(per_tag[t][s] - n * f) <= 1.5 for s, f in (("val", 0.15), ("test", 0.15))), per_tag[t]
    assert abs(Counter(split.values())["train"] - 42) <= 2
    assert stratify(tags, DataParams(val_fraction=0.15, test_fraction=0.15, seed=1)) != split


# ---------------------------------------------------------------- the scores


def test_average_precision_matches_scikit_learn_with_ties_and_the_thresholds_maximise_f1():
    from sklearn.metrics import average_precision_score, f1_score

    from tasks.multilabel.metrics import average_precision, best_thresholds

    rng = np.random.default_rng(0)
    y = (rng.random((40, 4)) < 0.3).astype(np.uint8)
    y[:, 3] = 0  # a tag without positives: no AP, the default threshold
    y[:2, 2] = 1
    s = np.round(rng.random((40, 4)), 1)  # ten distinct scores: many ties
    ap = average_precision(s, y)
    assert np.allclose(ap[:3], [average_precision_score(y[:, j], s[:, j]) for j in range(3)]) and np.isnan(ap[3])
    idx = rng.integers(0, 40, (3, 40))  # batched (the bootstrap): the same as one resample at a time
    assert np.allclose(average_precision(s[idx], y[idx])[1], average_precision(s[idx[1]], y[idx[1]]), equal_nan=True)
    thresholds, source = best_thresholds(s, y, min_positives=3)
    assert source[3] == "default" and thresholds[3] == 0.5
    for j in range(3):
        best = max(f1_score(y[:, j], s[:, j] >= c) for c in np.unique(s[:, j]))
        assert f1_score(y[:, j], s[:, j] >= thresholds[j]) == pytest.approx(best)
        assert thresholds[j] not in set(s[:, j])  # halfway between two scores, never on one
    few = y.copy()
    few[:, 0] = 0
    few[5, 0] = 1
    assert best_thresholds(s, few, min_positives=3)[1][0] == "default"


# ---------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, backbone_dir):
    """prepare -> features -> train -> evaluate -> export, the real stages, on 60 generated images; no test split,
    so the head and thresholds are chosen on a train holdout and the head refit on all of train."""
    base = tmp_path_factory.mktemp("multilabel")
    root = make_tags_csv(base / "data", n=60)
    w = Workdir(base / "work", backbone_dir)
    params = ml_params(root)
    w.prepare(params)
    w.features_(params)
    train = w.train(params)
    evaluate = w.evaluate(params)
    export = w.export(params)
    return w, params, train, evaluate, export


def test_the_head_learns_the_tags_with_a_threshold_per_tag(pipeline):
    from tasks.checkpoint import load_model

    w, _, train, evaluate, _ = pipeline
    s = read_json(w.reports / "train.json")
    assert s["task"] == "multilabel" and s["solver"] == "lbfgs" and s["selection"] == "train-holdout"
    assert s["l2"] in (0.001, 0.01, 0.1) and s["thresholds_tuned"] >= 2
    ckpt = load_model(w.layout, "multilabel")
    meta = ckpt.meta
    x = w.layout.feature_cache().load()["x_train"]  # refit on all of train: its standardisation is all of train's
    assert np.allclose(ckpt.head_state["0.mean"].numpy(), (np.sign(x) * np.abs(x) ** 0.5).mean(0), atol=1e-5)
    assert len(meta["thresholds"]) == 3 and meta["threshold_source"].count("f1") == s["thresholds_tuned"]
    assert any(t != 0.5 for t in meta["thresholds"]) and all(0 < t < 1 for t in meta["thresholds"])
    m = evaluate.metrics
    assert m["task"] == "multilabel" and m["eval_split"] == "val" and m["n"] == sum(
        1 for it in w.layout.dataset().items if it.split == "val")
    assert m["map"] >= 0.9 and m["macro_f1"] >= 0.8 and m["micro_f1"] >= 0.8, m
    lo, hi = m["map_ci95"]
    assert 0 <= lo <= hi <= 1 and m["macro_f1_ci95"][0] <= m["macro_f1_ci95"][1]
    assert set(m["ap_per_tag"]) == set(TAGS) and "ood_flagged" in m


def test_the_reports_list_every_tag_and_the_worst_images(pipeline):
    import csv

    from tasks.checkpoint import load_model
    from tasks.multilabel.summary import evaluate_line, result_lines, train_line

    w, _, train, evaluate, export = pipeline
    rows = list(csv.DictReader((w.layout.evaluation / "per_tag.csv").open()))
    assert [r["tag"] for r in rows] == list(TAGS)
    assert set(rows[0]) == {"tag", "ap", "precision", "recall", "f1", "threshold", "threshold_source", "support",
                            "predicted"}
    thresholds = load_model(w.layout, "multilabel").meta["thresholds"]  # the CSV's thresholds are the model's
    assert [float(r["threshold"]) for r in rows] == pytest.approx(thresholds, abs=1e-6)
    assert sum(int(r["support"]) for r in rows) == sum(
        len(it.label.split("|")) for it in w.layout.dataset().split("val") if it.label)
    mistakes = read_json(w.layout.evaluation / "mistakes.json")
    losses = [m["loss"] for m in mistakes]
    assert losses == sorted(losses, reverse=True) and all(m["missed"] or m["extra"] for m in mistakes)
    assert (w.layout.evaluation / "mistakes.png").read_bytes()[:4] == b"\x89PNG"
    assert train_line(train.summary).startswith("lbfgs, L2 ")
    assert "mAP" in evaluate_line(evaluate.metrics, w.reports)
    lines = result_lines(evaluate.metrics, export.parity, w.layout)
    assert lines[0].startswith("result    val mAP") and lines[-1].startswith("onnx ")


def test_the_onnx_model_gives_the_tags_pytorch_gives_with_the_thresholds_in_its_metadata(pipeline):
    import torch

    from tasks.checkpoint import load_model
    from tasks.head import load_classifier
    from tasks.multilabel.export import ExportModel
    from tasks.ood import load_ood
    from tasks.preprocess import decoded_batches
    from tasks.runtime import open_session

    w, _, _, _, export = pipeline
    parity = export.parity
    assert parity["passed"] and parity["tag_agreement"] == 1.0 and parity["max_abs_prob_diff"] <= 1e-4
    assert parity["n"] == read_json(w.reports / "metrics.json")["n"]
    session, _ = open_session(w.layout.model_onnx, device="cpu")
    meta = session.get_modelmeta().custom_metadata_map
    ckpt = load_model(w.layout, "multilabel")
    assert meta["task"] == "multilabel" and json.loads(meta["labels"]) == list(TAGS)
    assert json.loads(meta["thresholds"]) == ckpt.meta["thresholds"] and float(meta["ood_threshold"]) > 0
    assert [o.name for o in session.get_outputs()] == ["probabilities", "tags", "ood_score"]
    assert session.get_outputs()[1].type == "tensor(bool)"
    dataset = w.layout.dataset()
    model = ExportModel(load_classifier(ckpt), ckpt.meta["thresholds"], load_ood(ckpt.extra)[0]).eval()
    batch = next(decoded_batches([dataset.resolve(it) for it in dataset.split("val")], ckpt.card, 64, 1))
    probs, tags, ood = session.run(None, {"images": batch})
    with torch.inference_mode():
        ref = [t.numpy() for t in model(torch.from_numpy(batch))]
    assert tags.dtype == np.bool_ and tags.shape == (len(batch), 3)
    assert np.array_equal(tags, ref[1]) and np.array_equal(tags, probs >= np.float32(json.loads(meta["thresholds"])))
    assert np.allclose(probs, ref[0], atol=1e-4) and tags.any() and not tags.all()
    config = (w.layout.export / "triton" / "classifier" / "config.pbtxt").read_text()
    assert "TYPE_BOOL" in config and (w.layout.export / "labels.txt").read_text().split() == list(TAGS)


def test_features_of_another_task_are_refused(pipeline, tmp_path, backbone_dir):
    import shutil

    from tasks.layout import ArtifactError

    w, params, _, _, _ = pipeline
    other = Workdir(tmp_path / "w", backbone_dir)
    shutil.copytree(w.layout.prepared, other.layout.prepared)
    shutil.copytree(w.layout.features, other.layout.features)
    cache = other.layout.feature_cache()
    arrays = cache.load()
    cache.save(read_json(cache.meta)["key"], {**arrays, "y_train": np.zeros(len(arrays["y_train"]), np.int64)},
               {k: v for k, v in read_json(cache.meta).items() if k not in ("key", "arrays")})
    with pytest.raises(ArtifactError, match="does not hold this dataset's tags: re-run the features stage"):
        other.train(params)


def test_the_audit_reads_tags(pipeline):
    """The audit stage on the multi-label features: cleanlab's multi-label ranking, mAP learning curve."""
    from tasks import audit

    w, params, _, _, _ = pipeline
    rep = audit.run(params, w.layout).report
    assert rep["enabled"] and rep["task"] == "multilabel" and rep["learning_curve"]["metric"] == "mAP"
    scores = (w.layout.audit_dir / "label_scores.csv").read_text().splitlines()
    assert len(scores) == 1 + sum(rep["images"].values())
    assert set(rep["balance"]["counts"]) == set(TAGS) and "AP" in rep["balance"]
    for issue in rep["label_issues"]["issues"]:
        assert isinstance(issue["given"], list) and set(issue["given"]) <= set(TAGS)
