"""Object detection end to end on tiny generated data: coloured rectangles on noise, two classes, VOC layout.

The stages are the pipeline's own (prepare, backbone, features, train, evaluate, export), run by `dvc repro`
on a copy of the project, with the real bundled backbone; the dataset is 48 non-square images, so the whole
module runs in about a minute. The parity gate's rule at the cut-offs is checked on constructed outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import project_copy, sh
from tasks.config import parse_params
from tasks.files import read_json, sha256_file

CLASSES = ("blue", "red")
SIZE = (160, 120)  # width, height of the generated images: not the model's input size, not square


def voc_xml(name: str, size: tuple[int, int], objects: list[tuple[str, list[float]]]) -> str:
    objs = "".join(
        f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for c, b in objects)
    return (f"<annotation><filename>{name}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


def make_voc(root: Path, n_train: int = 36, n_val: int = 12, seed: int = 0) -> Path:
    """Each image: noise, then 1-2 filled rectangles (red or blue), boxes in VOC's 1-based inclusive pixels."""
    rng = np.random.default_rng(seed)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    w, h = SIZE
    for split, n in (("train", n_train), ("val", n_val)):
        ids = []
        for i in range(n):
            name = f"{split}_{i:03d}"
            img = rng.integers(90, 170, (h, w, 3)).astype(np.uint8)
            objects = []
            for _ in range(int(rng.integers(1, 3))):
                cls = CLASSES[int(rng.integers(0, 2))]
                bw, bh = int(rng.integers(24, 48)), int(rng.integers(24, 48))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                if any(not (x + bw < b[0] - 1 or b[2] < x or y + bh < b[1] - 1 or b[3] < y) for _, b in objects):
                    continue  # no overlaps: every object fully visible
                img[y:y + bh, x:x + bw] = (220, 30, 30) if cls == "red" else (30, 30, 220)
                objects.append((cls, [x + 1, y + 1, x + bw, y + bh]))
            Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            (root / "Annotations" / f"{name}.xml").write_text(voc_xml(f"{name}.jpg", SIZE, objects))
            ids.append(name)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch intra-op thread for the module: the tiny heads train several times faster so on a shared
    2-core CI machine (a thread descheduled at every op's barrier stalls the others), and fixed, so every run
    here is reproducible (`dvc repro`'s stages get OMP_NUM_THREADS=1). The stages themselves keep torch's
    count, which the machine sets."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DET_TRAIN = {"epochs": 24, "patience": 0, "batch_size": 8, "lr": 0.003}


def det_params(root: Path, **detection):
    return parse_params({"task": "detection", "data": {"dataset": "voc", "root": str(root)},
                         "features": {"batch_size": 16},
                         "detection": {"features": {"input_size": [96, 128]}, **DET_TRAIN, **detection}})


def make_voc_with_a_degenerate_box(root: Path) -> Path:
    make_voc(root)
    # one degenerate box, as published data has them: reported and dropped, the image kept
    xml = root / "Annotations" / "train_000.xml"
    xml.write_text(xml.read_text().replace("</annotation>", "<object><name>red</name><bndbox><xmin>50</xmin>"
                                           "<ymin>40</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object></annotation>"))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The whole pipeline for `task: detection` through real `dvc repro` on a copy of the project (the stages
    with one torch thread too, see one_thread)."""
    from tasks.layout import Layout

    repo = project_copy(tmp_path_factory.mktemp("det") / "repo", make_data=make_voc_with_a_degenerate_box,
                        params_update={"task": "detection", "data": {"dataset": "voc", "root": "data/raw"},
                                       "features": {"batch_size": 16},
                                       "detection": {"features": {"input_size": [96, 128]}, **DET_TRAIN}})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        out = sh(["dvc", "repro"], repo).stdout
    assert "Running stage 'export'" in out and "parity on 12 val images" in out, out
    assert json.loads(sh(["dvc", "status", "--json"], repo).stdout) == {}
    return repo / "data" / "raw", det_params(repo / "data" / "raw"), Layout(repo), out


def test_degenerate_boxes_are_reported_and_classes_come_from_the_data(trained):
    root, params, layout, _ = trained
    report = read_json(layout.prepared / "report.json")
    assert [(Path(d["path"]).name, d["reason"][:15]) for d in report["dropped_boxes"]] == [("train_000.jpg", "degenerate box ")]
    meta = read_json(layout.prepared / "dataset.json")
    assert meta["classes"] == ["blue", "red"] and meta["task"] == "detection"
    assert meta["counts"] == {"train": 36, "val": 12, "test": 0}


def test_the_head_learns_the_rectangles(trained):
    _, _, layout, out = trained
    m = read_json(layout.metrics)
    assert m["ap50"] >= 0.9, m
    assert m["eval_split"] == "val" and m["model_selected_on"] == "train-holdout"
    assert set(m["ap50_per_class"]) == {"blue", "red"}
    for f in ("examples.png", "pr.png"):
        assert (layout.evaluation / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "features: 48 images" in out and "evaluate: val n=12: mAP" in out


def test_the_frozen_backbone_is_byte_identical_after_training(trained):
    _, _, layout, _ = trained
    weights = torch.load(layout.weights, weights_only=True)
    assert json.loads(layout.card_json.read_text())["weights_sha256"] == sha256_file(layout.weights)
    ckpt = torch.load(layout.checkpoint, weights_only=True)["state_dict"]
    prefix = "backbone."
    saved = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
    assert saved.keys() == weights.keys()
    assert all(torch.equal(saved[k], weights[k]) for k in weights)  # BatchNorm running stats included


def test_export_parity_holds_and_boxes_map_back_to_original_pixels(trained):
    from tasks.preprocess import PreprocessingCard, load_image
    from tasks.runtime import open_session

    root, _, layout, _ = trained
    parity = read_json(layout.parity)
    assert parity["passed"] and parity["match_rate"] == 1.0 and parity["n"] == 12
    assert parity["score_tolerance"] == 1e-4 and parity["max_score_diff"] <= 1e-4  # export.parity_tolerance
    session, _ = open_session(layout.model_onnx, device="cpu")
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["task"] == "detection" and json.loads(meta["labels"]) == ["blue", "red"]
    # the cut-offs are the model's, stored once (checkpoint meta["postprocess"]) and read from there
    ckpt = torch.load(layout.checkpoint, weights_only=True)["meta"]
    assert ckpt["postprocess"] == {"score_threshold": 0.05, "nms_threshold": 0.6, "pre_nms_top_k": 1000,
                                   "max_detections": 100}
    assert not set(ckpt["postprocess"]) & set(ckpt["params"])
    assert (float(meta["score_threshold"]), float(meta["nms_threshold"]), int(meta["max_detections"])) == (0.05, 0.6, 100)
    assert json.loads(meta["params"])["score_threshold"] == 0.05
    card = PreprocessingCard.from_dict({k: v for k, v in json.loads(meta["preprocessing"]).items() if k != "input"})
    assert card.resize_mode == "stretch" and card.input_size == (96, 128)

    # A val image at its own size (160x120), not the input's (128x96): each ground-truth box is found
    # again, in the original image's pixels, after the exact inverse of the resize.
    ann = read_json(layout.annotations)
    path = "JPEGImages/val_000.jpg"
    boxes, scores, labels = session.run(["boxes", "scores", "labels"], {"images": load_image(root / path, card)[None]})
    assert boxes.shape == (1, 100, 4) and scores.shape == (1, 100) and labels.dtype == np.int64
    keep = scores[0] > 0.5
    found = boxes[0][keep] * np.array([160 / 128, 120 / 96] * 2)
    from torchvision.ops import box_iou

    gt = np.array(ann[path]["boxes"], np.float32)
    iou = box_iou(torch.from_numpy(gt), torch.from_numpy(found.astype(np.float32))).numpy()
    assert (iou.max(axis=1) > 0.8).all(), (gt, found)
    assert (labels[0][~keep][scores[0][~keep] == 0] == -1).all()  # padding rows


def test_a_mismatched_task_is_a_clear_error(trained, tmp_path):
    from tasks.config import ConfigError

    with pytest.raises(ConfigError, match="not a detection dataset"):
        parse_params({"task": "detection"})


def test_the_server_answers_a_detection_request_in_original_pixels(trained, tmp_path):
    """The exported detector, served by deploy/server.py: tritonclient (V2) and /v1/predict on a real image."""
    import httpx
    import tritonclient.http as http
    from test_serve import ServerProcess

    from tasks.preprocess import PreprocessingCard, load_image

    root, _, layout, _ = trained
    server = ServerProcess(layout.model_onnx, tmp_path / "server.log", "--model-name", "detector").wait_ready()
    try:
        card = PreprocessingCard.from_dict(json.loads(layout.card_json.read_text()))
        path = root / "JPEGImages" / "val_001.jpg"
        x = http.InferInput("images", [1, 96, 128, 3], "UINT8")
        x.set_data_from_numpy(load_image(path, card)[None])
        r = http.InferenceServerClient(server.url.removeprefix("http://")).infer("detector", [x])
        boxes, scores, labels = (r.as_numpy(n) for n in ("boxes", "scores", "labels"))
        assert boxes.shape == (1, 100, 4) and scores.shape == (1, 100) and labels.dtype == np.int64

        with open(path, "rb") as f:
            answer = httpx.post(f"{server.url}/v1/predict", params={"threshold": 0.5},
                                files={"file": ("val_001.jpg", f, "image/jpeg")}, timeout=60).json()
        pred = answer["predictions"][0]
        assert (pred["width"], pred["height"]) == SIZE
        found = sorted((d["label"], *np.round(d["box"])) for d in pred["detections"])
        truth = read_json(layout.annotations)["JPEGImages/val_001.jpg"]
        expected = sorted((CLASSES[k], *b) for k, b in zip(truth["labels"], truth["boxes"]))
        assert len(found) == len(expected)
        for f_, e in zip(found, expected):  # the same objects, in the 160x120 image's own pixels
            assert f_[0] == e[0] and np.abs(np.array(f_[1:]) - np.array(e[1:])).max() <= 6, (found, expected)
    finally:
        server.stop()


def test_coco_json_is_read_with_boxes_in_pixels_and_crowds_marked(tmp_path):
    """COCO layout: annotations/instances_<split>.json + <split>/ images; bbox [x, y, w, h] -> [x1, y1, x2, y2]."""
    from tasks import data
    from tasks.layout import Layout

    root = tmp_path / "coco"
    for split, n in (("train", 3), ("val", 2)):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(root / split / f"{i}.jpg")
            images.append({"id": 10 + i, "file_name": f"{i}.jpg", "width": 80, "height": 60})
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": 7, "bbox": [5, 6, 20, 10], "iscrowd": 0})
        anns.append({"id": 99, "image_id": 10, "category_id": 3, "bbox": [70, 50, 30, 30], "iscrowd": 1})  # clipped
        anns.append({"id": 98, "image_id": 11, "category_id": 3, "bbox": [1, 1, 0, 5]})  # degenerate
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "ant"}]}))
    layout = Layout(tmp_path / "work")
    r = data.run(parse_params({"task": "detection", "data": {"dataset": "coco", "root": str(root)}}), layout)
    assert r.counts == {"train": 3, "val": 2, "test": 0}
    meta = read_json(layout.prepared / "dataset.json")
    assert meta["classes"] == ["ant", "cat"]
    ann = read_json(layout.annotations)["train/0.jpg"]
    assert ann["boxes"] == [[5.0, 6.0, 25.0, 16.0], [70.0, 50.0, 80.0, 60.0]] and ann["labels"] == [1, 0]
    assert ann["difficult"] == [False, True] and (ann["width"], ann["height"]) == (80, 60)
    dropped = read_json(layout.prepared / "report.json")["dropped_boxes"]
    assert [(d["path"], d["reason"][:10]) for d in dropped] == [("train/1.jpg", "degenerate"), ("val/1.jpg", "degenerate")]


def test_jitter_moves_the_boxes_with_the_pixels():
    from tasks.dense import jitter, jitter_boxes

    h, w = 96, 128
    img = np.zeros((1, h, w, 3), np.uint8)
    img[0, 30:60, 40:90] = 255
    box, label = np.array([[40, 30, 90, 60]], np.float32), np.array([1])
    seen = {"flipped": 0, "kept": 0, "dropped": 0}
    for seed in range(40):
        out, moves = jitter(img, np.random.default_rng(seed), (0.5, 1.6), (0, 0, 0))
        assert out.shape == img.shape and out.dtype == np.uint8
        boxes, labels = jitter_boxes(box, label, moves[0], (h, w))
        ys, xs = np.nonzero(out[0, :, :, 0] > 127)
        visible = len(xs) >= 0.3 * 50 * 30 * moves[0][0] * moves[0][1] - 2 * (50 + 30)
        if len(boxes):
            seen["kept"] += 1
            assert labels.tolist() == [1]
            np.testing.assert_allclose(boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.5)
        else:
            seen["dropped"] += 1
            assert not visible or len(xs) < 0.35 * 50 * 30 * moves[0][0] * moves[0][1]
        seen["flipped"] += moves[0][4]
    assert seen["kept"] > 20 and 5 < seen["flipped"] < 35


def test_augmented_training_runs_the_backbone_every_step_and_still_learns(trained, monkeypatch):
    from tasks.dense import DenseExtractor
    from tasks.detection.metrics import coco_eval
    from tasks.detection.predict import detect_cached, ground_truth
    from tasks.detection.train import train_detector

    root, params, layout, _ = trained
    monkeypatch.chdir(root.parents[1])  # the project: the manifest's image paths are relative to it
    calls = []
    forward = DenseExtractor.forward
    monkeypatch.setattr(DenseExtractor, "forward", lambda self, x: calls.append(len(x)) or forward(self, x))
    p = params.model_copy(update={"detection": params.detection.model_copy(update={"augment": True, "epochs": 24, "num_convs": 2})})
    dataset, annotations = layout.dataset(), read_json(layout.annotations)
    detector, history, _ = train_detector(p, layout, dataset, annotations)
    assert sum(calls) == 24 * 32  # every epoch, every training image (36 less the 4 held out), through the backbone
    gt = ground_truth(annotations, dataset, "val")
    dets = detect_cached(detector, layout.feature_cache().load(mmap=True), "val", list(range(len(gt))), layout.card(), gt)
    assert coco_eval(gt, dets, dataset.classes)["ap50"] >= 0.85


def test_the_same_params_and_seed_give_the_same_head(trained):
    from tasks.detection.train import train_detector

    _, params, layout, _ = trained
    p = params.model_copy(update={"detection": params.detection.model_copy(update={"epochs": 3})})
    dataset, annotations = layout.dataset(), read_json(layout.annotations)
    (a, history_a, summary_a), (b, history_b, summary_b) = (train_detector(p, layout, dataset, annotations)
                                                              for _ in range(2))
    assert summary_a == summary_b and [r["select_map"] for r in history_a] == [r["select_map"] for r in history_b]
    sa, sb = a.head.state_dict(), b.head.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- the parity gate at the cut-offs


def dets(*rows, k: int = 4):
    """(boxes [K, 4], scores [K], labels [K]) from (box, score, label) rows, padded to K as the graph pads."""
    boxes, scores, labels = np.zeros((k, 4), np.float32), np.zeros(k, np.float32), np.full(k, -1, np.int64)
    for i, (box, score, label) in enumerate(rows):
        boxes[i], scores[i], labels[i] = box, score, label
    return boxes, scores, labels


def test_parity_forgives_a_detection_that_noise_puts_across_a_cut_off_and_nothing_else():
    from tasks.detection.parity import image_parity

    tol, thr, nms, k = 1e-4, 0.05, 0.5, 4
    a, b = ([0, 0, 10, 10], 0.9, 0), ([40, 40, 60, 60], 0.7, 1)

    def check(onnx_rows, torch_rows, kk=k):
        return image_parity(dets(*onnx_rows, k=kk), dets(*torch_rows, k=kk), thr, nms, kk, tol)

    ok, d = check([a, b], [a, b])
    assert ok and d["unmatched"] == 0 and d["ties"] == {"threshold": 0, "top_k": 0, "nms": 0, "nms_chain": 0}
    ok, d = check([a, (b[0], b[1] + 2e-4, 1)], [a, b])  # a matched pair beyond the tolerance
    assert not ok and d["max_score_diff"] > tol

    # the score threshold: a detection only one side keeps, scoring within the tolerance of it
    near = ([20, 20, 30, 34], thr + 0.4 * tol, 0)
    ok, d = check([a, b], [a, b, near])
    assert ok and d["ties"]["threshold"] == 1 and d["unmatched"] == 0
    ok, d = check([a, b], [a, b, ([20, 20, 30, 34], thr + 50 * tol, 0)])
    assert not ok and d["unmatched"] == 1

    # the K-th score: both outputs full (K = 2), the last row another detection of (nearly) the same score
    c, e = ([20, 20, 30, 34], 0.5, 0), ([70, 5, 90, 25], 0.5 + 0.5 * tol, 1)
    ok, d = check([a, c], [a, e], kk=2)
    assert ok and d["ties"]["top_k"] == 2 and d["unmatched"] == 0
    ok, d = check([a, c], [a, ([70, 5, 90, 25], 0.6, 1)], kk=2)
    assert not ok and d["unmatched"] == 2
    ok, d = check([a, c], [a, e], kk=3)  # not full: the K-th score is no cut-off
    assert not ok

    # NMS: a box overlapping a kept one of its class with IoU at the NMS threshold (suppressed on one side only)
    x = np.float32(10 / 3)  # [x, 0, x + 10, 10] against [0, 0, 10, 10]: IoU (10 - x) / (10 + x) = 0.5
    tied = ([x, 0, x + 10, 10], 0.3, 0)
    ok, d = check([a, b, tied], [a, b])
    assert ok and d["ties"]["nms"] == 1
    x = np.float32(10 * 0.7 / 1.3)  # IoU 0.3: well under the threshold, so no tie
    ok, d = check([a, b, ([x, 0, x + 10, 10], 0.3, 0)], [a, b])
    assert not ok and d["unmatched"] == 1
    # ... or NMS keeping the other of two overlapping boxes whose scores tie
    twin = ([1, 0, 11, 10], 0.9 + 0.5 * tol, 0)
    ok, d = check([a, b], [twin, b])
    assert ok and d["ties"]["nms"] == 2
    ok, d = check([a, b], [([1, 0, 11, 10], 0.95, 0), b])
    assert not ok
    # ... and a chain: the tie kept on one side only suppresses there a box the other side keeps
    x = np.float32(10 / 3)
    tied, behind = ([x, 0, x + 10, 10], 0.3, 0), ([x + 3, 0, x + 13, 10], 0.2, 0)  # behind overlaps tied by 0.6
    ok, d = check([a, b, tied], [a, b, behind])
    assert ok and d["ties"]["nms"] == 1 and d["ties"]["nms_chain"] == 1 and d["lone"] == []
    ok, d = check([a, b], [a, b, behind])  # no tie to start a chain: a real disagreement, listed
    assert not ok and d["unmatched"] == 1 and d["lone"][0]["side"] == "torch"
