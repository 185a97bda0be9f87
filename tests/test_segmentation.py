"""Semantic segmentation end to end on tiny generated data: coloured shapes on noise with their masks.

The stages are the pipeline's own (prepare, backbone, features, train, evaluate, export) on a Layout in a tmp
dir, with the real bundled backbone at a 96x128 input; the images are 160x120 (not the input size, not square).
Every mask marks the shapes' outlines as ignored (value 255) and a corner patch with the label map's `_ignore_`
value; one extra image has a mask of the wrong size and one a value the label map does not name.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import Workdir
from tasks.config import parse_params
from tasks.files import read_json, sha256_file

CLASSES = ["background", "red", "blue"]
VALUES = [0, 1, 2]
IGNORE_VALUE = 3  # `3 _ignore_` in labelmap.txt; 255 is ignore too
SIZE = (160, 120)  # width, height


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch intra-op thread for the module: the tiny heads train several times faster so on a shared
    2-core CI machine (a thread descheduled at every op's barrier stalls the others), and fixed, so every run
    here is reproducible. (The stages themselves keep torch's count, which the machine sets.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def draw_sample(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    w, h = SIZE
    img = Image.fromarray(rng.integers(90, 170, (h, w, 3)).astype(np.uint8))
    mask = Image.new("L", SIZE, 0)
    di, dm = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, 3))
        bw, bh = int(rng.integers(26, 56)), int(rng.integers(26, 56))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        box = (x, y, x + bw, y + bh)
        colour = (220, 30, 30) if cls == 1 else (30, 30, 220)
        if cls == 1:
            di.rectangle(box, fill=colour)
            dm.rectangle(box, fill=cls, outline=255, width=2)
        else:
            di.ellipse(box, fill=colour)
            dm.ellipse(box, fill=cls, outline=255, width=2)
    m = np.asarray(mask).copy()
    m[:6, :6] = IGNORE_VALUE
    return img, m


def make_masks_dataset(root: Path, n_train: int = 36, n_val: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, m = draw_sample(rng)
            ext = "png" if i % 5 == 0 else "jpg"
            img.save(root / split / "images" / f"{split}_{i:03d}.{ext}", **({"quality": 95} if ext == "jpg" else {}))
            Image.fromarray(m, mode="L").save(root / split / "masks" / f"{split}_{i:03d}.png")
    (root / "labelmap.txt").write_text("# value name\n" + "".join(f"{v} {c}\n" for v, c in zip(VALUES, CLASSES))
                                       + f"{IGNORE_VALUE} _ignore_\n")
    # two broken pairs: a mask of the wrong size, a mask with a value not in the label map
    img, m = draw_sample(rng)
    img.save(root / "train" / "images" / "wrong_size.jpg")
    Image.fromarray(m[:, :150], mode="L").save(root / "train" / "masks" / "wrong_size.png")
    img.save(root / "train" / "images" / "bad_value.jpg")
    m = m.copy()
    m[50, 50] = 7
    Image.fromarray(m, mode="L").save(root / "train" / "masks" / "bad_value.png")
    return root


def seg_params(root: Path, **segmentation):
    return parse_params({
        "task": "segmentation", "data": {"dataset": "masks", "root": str(root)}, "features": {"batch_size": 16},
        "segmentation": {"features": {"input_size": [96, 128]}, "epochs": 25, "patience": 0, "batch_size": 8,
                         "lr": 0.01, **segmentation},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """prepare -> backbone (dense, 96x128) -> features -> train -> evaluate -> export, once for the module."""
    base = tmp_path_factory.mktemp("seg")
    root = make_masks_dataset(base / "shapes")
    params = seg_params(root)
    from tasks.layout import Layout

    layout = Layout(base / "work")
    w = Workdir.__new__(Workdir)  # the stages on this layout, with its own (dense) backbone
    w.base, w.layout = base / "work", layout
    results = {stage: w.run(stage, params) for stage in ("data", "backbone", "features", "train", "evaluate", "export")}
    return root, params, layout, results


# ---------------------------------------------------------------- metrics and labels (no pipeline)


def test_confusion_matrix_and_scores_against_a_hand_worked_example():
    from tasks.segmentation.metrics import confusion_matrix, scores

    truth = np.array([[0, 0, 1], [1, 2, 255]], np.uint8)  # 255: ignored, whatever is predicted there
    pred = np.array([[0, 1, 1], [1, 2, 0]], np.uint8)
    cm = confusion_matrix(truth, pred, 4)  # class 3 in neither truth nor prediction: no IoU, not in the mean
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    s = scores(cm)
    # IoU: background 1/(2+1-1) = 1/2, red 2/(2+3-2) = 2/3, blue 1/1; pixel accuracy 4/5;
    # fw-IoU = 2/5 * 1/2 + 2/5 * 2/3 + 1/5 * 1 = 2/3
    np.testing.assert_allclose(s["iou"][:3], [0.5, 2 / 3, 1.0])
    assert np.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert s["pixel_accuracy"] == pytest.approx(0.8) and s["fw_iou"] == pytest.approx(2 / 3)
    assert s["pixels"] == 5
    everything_ignored = confusion_matrix(np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.uint8), 2)
    assert everything_ignored.sum() == 0 and scores(everything_ignored)["miou"] == 0.0


def test_loss_labels_are_the_majority_of_each_cell_and_ignore_only_where_ignore_dominates():
    from tasks.segmentation.data import IGNORE, downsample_labels

    m = np.array([[1, 1, 2, 255],
                  [1, 0, 255, 255],
                  [0, 0, 2, 2],
                  [0, 255, 255, 2]], np.uint8)
    # cells: {1,1,1,0} -> 1; {2,255,255,255} -> ignore; {0,0,0,255} -> 0; {2,2,255,2} -> 2
    assert downsample_labels(m, (2, 2), 3).tolist() == [[1, IGNORE], [0, 2]]
    tie = np.array([[1, 255], [255, 1]], np.uint8)  # a tie between a class and ignore goes to the class
    assert downsample_labels(tie, (1, 1), 3).tolist() == [[1]]


def test_label_maps_name_classes_by_value_and_mark_ignore(tmp_path):
    from tasks.config import UserError
    from tasks.segmentation.data import IGNORE, read_labelmap

    (tmp_path / "labelmap.txt").write_text("# comment\n10 sky\n0 road 128 64 128\n11 _ignore_\n")
    lm = read_labelmap(tmp_path / "labelmap.txt")
    assert lm.classes == ["road", "sky"] and lm.values == [0, 10] and lm.ignore_values == [11, IGNORE]
    assert lm.palette[0] == [128, 64, 128]
    lut = lm.lut()
    assert (lut[0], lut[10], lut[11], lut[255], lut[5]) == (0, 1, IGNORE, IGNORE, -1)
    (tmp_path / "labelmap.txt").write_text("0 road\n0 sky\n")
    with pytest.raises(UserError, match="listed twice"):
        read_labelmap(tmp_path / "labelmap.txt")


def test_voc_segmentation_layout_palette_masks_and_255_ignore(tmp_path):
    from tasks.segmentation.data import VOC_CLASSES, voc_colormap

    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3)).astype(np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    palette = [v for c in voc_colormap() for v in c]
    for name, values in (("a", (0, 15)), ("b", (0, 7)), ("c", (0, 21))):  # 21 is no VOC class
        m = np.zeros((40, 50), np.uint8)
        m[10:30, 10:30] = values[1]
        m[9, 9:31] = 255  # VOC's object border: ignored
        img = Image.fromarray(m, mode="P")
        img.putpalette(palette)
        img.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nc\nd\n")  # d has no mask
    (root / "ImageSets/Segmentation/val.txt").write_text("b\n")
    layout_root = tmp_path / "work"
    params = parse_params({"task": "segmentation", "data": {"dataset": "voc_seg", "root": str(root)}})
    from tasks import data
    from tasks.layout import Layout

    layout = Layout(layout_root)
    r = data.run(params, layout)
    assert r.counts == {"train": 1, "val": 1, "test": 0}
    meta = read_json(layout.prepared / "dataset.json")
    assert meta["classes"] == VOC_CLASSES and meta["per_class"]["person"]["train"] == 400
    reasons = {d["path"]: d["reason"] for d in read_json(layout.prepared / "report.json")["skipped"]}
    assert reasons["JPEGImages/d.jpg"].startswith("no mask") and "[21]" in reasons["JPEGImages/c.jpg"]
    masks = read_json(layout.masks)
    assert masks["palette"][15] == [192, 128, 128] and masks["masks"]["JPEGImages/a.jpg"]["mask"] == "SegmentationClass/a.png"


def test_masks_without_split_folders_are_split_by_hash(tmp_path):
    from tasks import data
    from tasks.layout import Layout

    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(20):
        img, m = draw_sample(rng)
        img.save(root / "images" / f"{i:02d}.png")
        Image.fromarray(m, mode="L").save(root / "masks" / f"{i:02d}.png")
    (root / "labelmap.txt").write_text("0 background\n1 red\n2 blue\n3 _ignore_\n")
    params = parse_params({"task": "segmentation", "data": {"dataset": "masks", "root": str(root), "val_fraction": 0.2,
                                                             "test_fraction": 0.2}})
    r = data.run(params, Layout(tmp_path / "work"))
    assert r.counts == {"train": 12, "val": 4, "test": 4} and r.skipped == 0


# ---------------------------------------------------------------- the pipeline


def test_mismatched_masks_are_reported_and_skipped(trained):
    _, _, layout, results = trained
    report = read_json(layout.prepared / "report.json")
    reasons = {Path(d["path"]).name: d["reason"] for d in report["skipped"]}
    assert set(reasons) == {"wrong_size.jpg", "bad_value.jpg"}
    assert "150x120 but its image is 160x120" in reasons["wrong_size.jpg"]
    assert "values not in the label map: [7]" in reasons["bad_value.jpg"]
    meta = read_json(layout.prepared / "dataset.json")
    assert meta["task"] == "segmentation" and meta["classes"] == CLASSES
    assert meta["counts"] == {"train": 36, "val": 12, "test": 0}
    assert results["features"].counts == {"train": 36, "val": 12}
    cache = layout.feature_cache().load(mmap=True)
    assert cache["y_train"].shape == (36, 24, 32) and cache["p3_train"].shape[2:] == (12, 16)  # stride 4, stride 8
    np.testing.assert_array_equal(cache["y_train_flip"], cache["y_train"][:, :, ::-1])  # flipped with the image
    from tasks import features

    again = features.run(trained[1], layout)  # computed once: the same key reuses the maps and the labels
    assert again.cached and again.key == results["features"].key


def test_the_head_learns_the_shapes_and_ignore_pixels_are_never_scored(trained):
    from tasks.segmentation.data import IGNORE, ground_truth, load_mask

    _, _, layout, _ = trained
    m = read_json(layout.metrics)
    assert m["task"] == "segmentation" and m["miou"] >= 0.9, m
    assert m["eval_split"] == "val" and m["model_selected_on"] == "train-holdout" and m["n"] == 12
    assert set(m["iou_per_class"]) == set(CLASSES) and m["skipped_images"] == 2
    paths, lut = ground_truth(layout, layout.dataset(), "val")
    masks = [load_mask(p, lut) for p in paths]
    ignored = sum(int((t == IGNORE).sum()) for t in masks)
    assert ignored > 12 * 36  # the corner patches at least, and the outlines
    assert m["pixels_ignored"] == ignored and m["pixels_scored"] == 12 * 160 * 120 - ignored
    cm = np.loadtxt(layout.evaluation / "confusion.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
    assert cm.sum() == m["pixels_scored"]
    for f in ("examples.png", "iou.png", "confusion.png"):
        assert (layout.evaluation / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = (layout.reports / "train_history.csv").read_text().splitlines()
    assert history[0].startswith("step,train_loss,select_miou") and len(history) == 26


def test_the_frozen_backbone_is_byte_identical_after_training(trained):
    _, _, layout, _ = trained
    weights = torch.load(layout.weights, weights_only=True)
    assert json.loads(layout.card_json.read_text())["weights_sha256"] == sha256_file(layout.weights)
    ckpt = torch.load(layout.checkpoint, weights_only=True)
    assert ckpt["meta"]["task"] == "segmentation" and ckpt["meta"]["labels"] == CLASSES
    prefix = "backbone."
    saved = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    assert saved.keys() == weights.keys()
    assert all(torch.equal(saved[k], weights[k]) for k in weights)  # BatchNorm running stats included
    assert read_json(layout.models / "labels.json") == CLASSES and layout.head.exists()


def test_export_parity_holds_and_the_graph_follows_the_serving_contract(trained):
    from tasks.preprocess import PreprocessingCard, load_image
    from tasks.runtime import open_session

    root, _, layout, _ = trained
    parity = read_json(layout.parity)
    assert parity["passed"] and parity["n"] == 12 and parity["pixel_agreement"] >= 0.999
    assert parity["pixels_disagreeing"] == 0 and parity["max_prob_diff"] <= parity["prob_tolerance"] == 1e-4
    session, _ = open_session(layout.model_onnx, device="cpu")
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["task"] == "segmentation" and json.loads(meta["labels"]) == CLASSES
    assert len(json.loads(meta["palette"])) == 3
    card = PreprocessingCard.from_dict({k: v for k, v in json.loads(meta["preprocessing"]).items() if k != "input"})
    assert card.resize_mode == "stretch" and card.input_size == (96, 128)
    mask, probs = session.run(["mask", "probabilities"], {"images": load_image(root / "val/images/val_001.jpg", card)[None]})
    assert mask.dtype == np.uint8 and mask.shape == (1, 96, 128)
    assert probs.dtype == np.float32 and probs.shape == (1, 3, 12, 16)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    config = (layout.export / "triton" / "classifier" / "config.pbtxt").read_text()
    assert "TYPE_UINT8" in config and "dims: [ 96, 128 ]" in config


def test_a_failing_parity_gate_keeps_the_previous_export(trained, monkeypatch):
    from tasks import export

    _, params, layout, _ = trained
    before = sha256_file(layout.model_onnx)
    strict = params.model_copy(update={"export": params.export.model_copy(update={"parity_tolerance": 1e-12})})
    with pytest.raises(export.ExportError, match="parity gate failed: .* max probability difference"):
        export.run(strict, layout)  # the gate reads export.parity_tolerance: float noise is over 1e-12
    assert sha256_file(layout.model_onnx) == before
    assert read_json(layout.parity)["passed"] is False
    layout.parity.unlink()


def test_the_server_returns_the_mask_at_the_original_size(trained, tmp_path):
    from test_serve import ServerProcess, httpx

    root, _, layout, _ = trained
    server = ServerProcess(layout.model_onnx, tmp_path / "server.log", "--model-name", "segmenter").wait_ready()
    try:
        image = root / "val" / "images" / "val_001.jpg"
        r = httpx.post(f"{server.url}/v1/predict", files=[("file", ("val_001.jpg", image.read_bytes(), "image/jpeg"))],
                       timeout=60)
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        mask = Image.open(io.BytesIO(base64.b64decode(pred["mask_png"])))
        assert mask.size == SIZE and (pred["width"], pred["height"]) == SIZE
        from tasks.segmentation.data import IGNORE, read_mask

        truth = read_mask(root / "val" / "masks" / "val_001.png")
        scored = (truth != IGNORE_VALUE) & (truth != IGNORE)
        assert (np.asarray(mask)[scored] == truth[scored]).mean() > 0.9  # values == class indices here
        assert set(pred["class_fractions"]) <= set(CLASSES) and "background" in pred["class_fractions"]
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_the_same_params_and_seed_give_the_same_head(trained):
    from tasks.segmentation.train import train_segmenter

    _, params, layout, _ = trained
    p = params.model_copy(update={"segmentation": params.segmentation.model_copy(update={"epochs": 3})})
    (a, history_a, summary_a), (b, history_b, summary_b) = (train_segmenter(p, layout, layout.dataset())
                                                              for _ in range(2))
    assert summary_a == summary_b and [r["select_miou"] for r in history_a] == [r["select_miou"] for r in history_b]
    sa, sb = a.head.state_dict(), b.head.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parity_forgives_a_pixel_only_at_an_argmax_tie():
    from tasks.segmentation.parity import mask_parity

    # one image, 2 classes, 4 pixels: clearly 0, a tie (logits 1e-6 apart), nearly a tie (0.01 apart), clearly 1
    logits = torch.tensor([[[[2.0, 0.0, 0.0, -2.0]], [[0.0, 1e-6, 0.01, 2.0]]]])
    want = logits.argmax(1).numpy().astype(np.uint8)
    assert want.tolist() == [[[0, 1, 1, 1]]]
    assert mask_parity(want.copy(), want, logits, 1e-4) == (0, 0)
    got = np.array([[[0, 0, 1, 1]]], np.uint8)  # the tie decided the other way: forgiven
    assert mask_parity(got, want, logits, 1e-4) == (1, 1)
    got = np.array([[[0, 0, 0, 0]]], np.uint8)  # and two real disagreements
    assert mask_parity(got, want, logits, 1e-4) == (3, 1)
    assert mask_parity(got, want, logits, 0.01) == (3, 2)  # the tolerance is export.parity_tolerance's
