"""The server with detection and segmentation models (metadata `task`), and a classifier with an OOD score.

Tiny ONNX graphs are built here to the export contract (one uint8 [N, H, W, 3] input `images` at 64x96,
metadata task / labels / preprocessing with resize_mode stretch / score_threshold / max_detections /
palette): the detector returns fixed boxes, the segmenter labels each pixel with its strongest colour
channel. Each runs in a real server process (tests/test_serve.py's ServerProcess), driven by tritonclient and
plain HTTP; expected answers come from onnxruntime here on tasks.preprocess.load_image's pixels.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve import ServerProcess, encode, httpx, triton

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper

from tasks.preprocess import PreprocessingCard, load_image

H, W = 64, 96  # the models' input size: not square, and every test image is another size
MAX_PIXELS = 2_000_000
# detector rows, in input pixels: two real boxes, one that runs off the image, two padding rows
BOXES = [[10, 8, 50, 40], [0, 0, 96, 64], [-5, 60, 100, 70], [0, 0, 0, 0], [0, 0, 0, 0]]
SCORES = [0.9, 0.6, 0.4, 0.0, 0.0]
CLASSES = [1, 0, 2, -1, -1]
DET_LABELS = ["cat", "dog", "car"]
SEG_LABELS = ["red", "green", "blue"]
PALETTE = [[255, 255, 0], [0, 0, 0], [255, 255, 255]]
CARD = {"input_size": [H, W], "resize_size": H, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
        "resize_mode": "stretch", "a_key_from_the_future": 1}  # unknown keys are ignored


# ----------------------------------------------------------------------------------------------- models

def _save(path: Path, nodes, outputs, consts, meta: dict) -> Path:
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", H, W, 3])],
                              outputs, initializer=consts)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for k, v in meta.items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def _zeros(rank: int) -> list:
    """Nodes: images -> z, zeros of shape [N] + [1] * (rank - 1) (so constants broadcast over the batch)."""
    squeeze = helper.make_tensor("sq_axes", TensorProto.INT64, [4 - rank], list(range(rank, 4)))
    return [helper.make_node("Cast", ["images"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["xf"], ["m4"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Mul", ["m4", "zero"], ["z4"]),
            helper.make_node("Squeeze", ["z4", "sq_axes"], [f"z{rank}"])], squeeze


def detector(path: Path, **meta) -> Path:
    """uint8 images -> boxes FP32 [N, K, 4], scores FP32 [N, K], labels INT64 [N, K]: the same rows for every image."""
    k = len(SCORES)
    z3, sq3 = _zeros(3)
    nodes = [*z3,
             helper.make_node("Add", ["z3", "box_rows"], ["boxes"]),
             helper.make_node("Squeeze", ["z3", "ax2"], ["z2"]),
             helper.make_node("Add", ["z2", "score_rows"], ["scores"]),
             helper.make_node("Cast", ["z2"], ["z2i"], to=TensorProto.INT64),
             helper.make_node("Add", ["z2i", "label_rows"], ["labels"])]
    consts = [sq3, helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
              helper.make_tensor("ax2", TensorProto.INT64, [1], [2]),
              helper.make_tensor("box_rows", TensorProto.FLOAT, [1, k, 4], np.array(BOXES, np.float32).ravel()),
              helper.make_tensor("score_rows", TensorProto.FLOAT, [1, k], SCORES),
              helper.make_tensor("label_rows", TensorProto.INT64, [1, k], CLASSES)]
    outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", "K", 4]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", "K"]),
               helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", "K"])]
    return _save(path, nodes, outputs, consts, {
        "task": "detection", "labels": json.dumps(DET_LABELS), "preprocessing": json.dumps(CARD),
        "score_threshold": "0.3", "max_detections": str(k), **meta})


def segmenter(path: Path) -> Path:
    """uint8 images -> mask UINT8 [N, H, W] (the strongest channel: 0 red, 1 green, 2 blue) and probabilities
    FP32 [N, 3, H/2, W/2] (softmax over the channels, 2x2 average pooled)."""
    nodes = [helper.make_node("Cast", ["images"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("ArgMax", ["xf"], ["am"], axis=3, keepdims=0),
             helper.make_node("Cast", ["am"], ["mask"], to=TensorProto.UINT8),
             helper.make_node("Transpose", ["xf"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Mul", ["nchw", "scale"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["sm"], axis=1),
             helper.make_node("AveragePool", ["sm"], ["probabilities"], kernel_shape=[2, 2], strides=[2, 2])]
    consts = [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05])]
    outputs = [helper.make_tensor_value_info("mask", TensorProto.UINT8, ["N", "h", "w"]),
               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", "C", H // 2, W // 2])]
    return _save(path, nodes, outputs, consts, {
        "task": "segmentation", "labels": json.dumps(SEG_LABELS), "preprocessing": json.dumps(CARD),
        "palette": json.dumps(PALETTE)})


def ood_classifier(path: Path) -> Path:
    """uint8 images -> probabilities [N, 2] (fixed), logits [N, 2], ood_score [N] = the image's mean pixel value."""
    z2, sq2 = _zeros(2)
    nodes = [*z2,
             helper.make_node("Add", ["z2", "fixed"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
             helper.make_node("Squeeze", ["m4", "ax123"], ["ood_score"])]
    consts = [sq2, helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
              helper.make_tensor("fixed", TensorProto.FLOAT, [1, 2], [1.0, 2.0]),
              helper.make_tensor("ax123", TensorProto.INT64, [3], [1, 2, 3])]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2]),
               helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N"])]
    card = {**CARD, "resize_mode": "center_crop"}
    return _save(path, nodes, outputs, consts, {"task": "classification", "labels": json.dumps(["a", "b"]),
                                                "preprocessing": json.dumps(card), "ood_threshold": "100"})


# ----------------------------------------------------------------------------------------------- images

def rgb(w: int, h: int, colour=(90, 120, 150)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def regions(w: int = 200, h: int = 150) -> Image.Image:
    """Top half green, bottom left red, bottom right blue: 1/2, 1/4, 1/4 of the pixels."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, :, 1] = 255
    a[h // 2:, : w // 2, 0] = 255
    a[h // 2:, w // 2:, 2] = 255
    return Image.fromarray(a)


def expected_regions(w: int = 200, h: int = 150) -> np.ndarray:
    m = np.full((h, w), 1, np.uint8)
    m[h // 2:, : w // 2] = 0
    m[h // 2:, w // 2:] = 2
    return m


def jpeg(img: Image.Image, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def png_with_late_exif(img: Image.Image, orientation: int) -> bytes:
    """A PNG whose eXIf chunk (orientation) comes after the pixel data, as the PNG extensions allow."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    if payload.startswith(b"Exif\x00\x00"):
        payload = payload[6:]
    data = encode(img, "PNG")
    iend = data.rindex(b"IEND") - 4
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    return data[:iend] + chunk + data[iend:]


def card() -> PreprocessingCard:
    return PreprocessingCard.from_dict({k: v for k, v in CARD.items() if k in PreprocessingCard.__dataclass_fields__})


def upload(*named: tuple[str, bytes]) -> list:
    return [("file", (n, b, "application/octet-stream")) for n, b in named]


def _error(r, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    msg = r.json()["error"]
    assert all(w in msg for w in words), msg
    return msg


# ----------------------------------------------------------------------------------------------- servers

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dense")
    return {"detection": detector(d / "det.onnx"), "segmentation": segmenter(d / "seg.onnx"),
            "ood": ood_classifier(d / "ood.onnx")}


def _serve(model: Path, log: Path, name: str):
    s = ServerProcess(model, log, "--model-name", name, "--max-batch-size", "4", "--max-wait-ms", "2",
                      "--max-image-pixels", str(MAX_PIXELS)).wait_ready()
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def det(models, tmp_path_factory):
    yield from _serve(models["detection"], tmp_path_factory.mktemp("log") / "det.log", "detector")


@pytest.fixture(scope="module")
def seg(models, tmp_path_factory):
    yield from _serve(models["segmentation"], tmp_path_factory.mktemp("log") / "seg.log", "segmenter")


def ort_run(model: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"images": pixels})))


# ----------------------------------------------------------------------------------------------- detection

def test_detection_metadata_names_its_outputs_task_and_k(det):
    c = triton.InferenceServerClient(f"127.0.0.1:{det.port}")
    meta = c.get_model_metadata("detector")
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, H, W, 3]}]
    assert meta["outputs"] == [{"name": "boxes", "datatype": "FP32", "shape": [-1, 5, 4]},
                               {"name": "scores", "datatype": "FP32", "shape": [-1, 5]},
                               {"name": "labels", "datatype": "INT64", "shape": [-1, 5]}]
    p = meta["parameters"]
    assert (p["task"], p["score_threshold"], p["max_detections"], p["labels"]) == ("detection", 0.3, 5, DET_LABELS)
    assert p["preprocessing"]["resize_mode"] == "stretch"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_detection_v2_infer_uint8_pixels_and_bytes_images(det, binary):
    c = triton.InferenceServerClient(f"127.0.0.1:{det.port}")
    pixels = np.stack([load_image(encode(rgb(200, 150), "PNG"), card()), np.zeros((H, W, 3), np.uint8)])
    inp = triton.InferInput("images", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=binary)
    blobs = np.array([encode(rgb(200, 150), "PNG"), jpeg(rgb(30, 50))], dtype=np.object_)
    enc = triton.InferInput("images", [2], "BYTES")
    enc.set_data_from_numpy(blobs, binary_data=True)  # tritonclient sends BYTES as binary only
    for x in (inp, enc):
        r = c.infer("detector", [x], outputs=[triton.InferRequestedOutput(n, binary_data=binary)
                                               for n in ("boxes", "scores", "labels")])
        boxes, scores, labels = (r.as_numpy(n) for n in ("boxes", "scores", "labels"))
        assert (boxes.dtype, scores.dtype, labels.dtype) == (np.float32, np.float32, np.int64)
        assert boxes.shape == (2, 5, 4) and scores.shape == labels.shape == (2, 5)
        np.testing.assert_array_equal(boxes, np.array([BOXES] * 2, np.float32))
        np.testing.assert_array_equal(scores, np.array([SCORES] * 2, np.float32))
        np.testing.assert_array_equal(labels, np.array([CLASSES] * 2))


def _scaled(i: int, w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = BOXES[i]
    sx, sy = w / W, h / H
    return [min(max(x1 * sx, 0.0), w), min(max(y1 * sy, 0.0), h), min(max(x2 * sx, 0.0), w), min(max(y2 * sy, 0.0), h)]


def test_detection_boxes_come_back_in_the_original_images_pixels(det):
    files = [("wide.png", encode(rgb(200, 150), "PNG")),  # 200x150 against the 96x64 input
             ("turned.jpg", jpeg(rgb(120, 160), orientation=6)),  # stored 120x160, shown 160x120 (EXIF)
             ("big.jpg", jpeg(rgb(300, 400), orientation=8)),  # decoded at 1/4 (JPEG draft): still 400x300 boxes
             ("late-exif.png", png_with_late_exif(rgb(90, 70), orientation=6))]  # orientation after the pixels
    r = httpx.post(f"{det.url}/v1/predict", files=upload(*files), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "detector" and body["task"] == "detection"
    preds = body["predictions"]
    assert [(p["filename"], p["width"], p["height"]) for p in preds] == [
        ("wide.png", 200, 150), ("turned.jpg", 160, 120), ("big.jpg", 400, 300), ("late-exif.png", 70, 90)]
    for p in preds:
        w, h = p["width"], p["height"]
        dets = p["detections"]  # padding rows dropped; 0.4 >= the model's score_threshold 0.3
        assert [(d["label"], d["index"], round(d["score"], 6)) for d in dets] == [("dog", 1, 0.9), ("cat", 0, 0.6), ("car", 2, 0.4)]
        for d, i in zip(dets, range(3)):
            assert d["box"] == pytest.approx(_scaled(i, w, h), abs=1e-9), (p["filename"], i)
    wide = preds[0]["detections"]
    assert wide[0]["box"] == pytest.approx([10 * 200 / 96, 8 * 150 / 64, 50 * 200 / 96, 40 * 150 / 64], abs=1e-9)
    assert wide[1]["box"] == pytest.approx([0, 0, 200, 150], abs=1e-9)
    assert wide[2]["box"] == pytest.approx([0, 60 * 150 / 64, 200, 150], abs=1e-9)  # clipped to the image


@pytest.mark.parametrize(("threshold", "kept"), [("0.5", 2), ("0.95", 0), ("0", 3), ("0.4", 3), ("1", 0)])
def test_detection_threshold_filters_further_and_padding_stays_out(det, threshold, kept):
    r = httpx.post(f"{det.url}/v1/predict", params={"threshold": threshold},
                   files=upload(("a.png", encode(rgb(50, 40), "PNG"))), timeout=30)
    assert r.status_code == 200, r.text
    dets = r.json()["predictions"][0]["detections"]
    assert [d["score"] for d in dets] == pytest.approx(SCORES[:kept])


def test_detection_overlay_is_a_png_of_the_original_size_with_the_boxes_drawn(det):
    img = rgb(200, 150, (20, 20, 20))
    r = httpx.post(f"{det.url}/v1/predict", params={"format": "overlay"}, files=upload(("a.png", encode(img, "PNG"))),
                   timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    out = Image.open(io.BytesIO(r.content))
    assert out.format == "PNG" and out.size == (200, 150)
    a = np.asarray(out.convert("RGB")).astype(int)
    changed = np.abs(a - 20).max(axis=2) > 40
    x1, x2, ymid = 10 * 200 / 96, 50 * 200 / 96, round(24 * 150 / 64)  # the best box, in the original's pixels
    assert changed[ymid, round(x1) - 2:round(x1) + 3].any() and changed[ymid, round(x2) - 2:round(x2) + 3].any()
    assert not changed[ymid, round(x1) + 5:round(x2) - 5].any()  # inside it: the image as it was


# ----------------------------------------------------------------------------------------------- segmentation

def test_segmentation_metadata_and_v2_infer_as_onnxruntime_on_load_image(seg, models):
    c = triton.InferenceServerClient(f"127.0.0.1:{seg.port}")
    meta = c.get_model_metadata("segmenter")
    assert meta["outputs"] == [{"name": "mask", "datatype": "UINT8", "shape": [-1, H, W]},
                               {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3, H // 2, W // 2]}]
    assert meta["parameters"]["task"] == "segmentation" and meta["parameters"]["palette"] == PALETTE
    # a big JPEG (decoded through JPEG draft) and a PNG: the pixels must be load_image's, to the bit
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8))
    blobs = [jpeg(noisy, orientation=6), encode(regions(), "PNG")]
    pixels = np.stack([load_image(b, card()) for b in blobs])
    ref = ort_run(models["segmentation"], pixels)
    enc = triton.InferInput("images", [2], "BYTES")
    enc.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    raw = triton.InferInput("images", list(pixels.shape), "UINT8")
    raw.set_data_from_numpy(pixels, binary_data=True)
    for x in (enc, raw):
        r = c.infer("segmenter", [x])
        mask, probs = r.as_numpy("mask"), r.as_numpy("probabilities")
        assert mask.dtype == np.uint8 and mask.shape == (2, H, W)
        assert probs.dtype == np.float32 and probs.shape == (2, 3, H // 2, W // 2)
        np.testing.assert_array_equal(mask, ref["mask"])
        np.testing.assert_array_equal(probs, ref["probabilities"])
    # plain JSON: datatypes and shapes as the metadata says
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(blobs[1]).decode()]}],
            "outputs": [{"name": "mask"}]}
    out = httpx.post(f"{seg.url}/v2/models/segmenter/infer", json=body, timeout=30).json()["outputs"]
    assert [(o["name"], o["datatype"], o["shape"]) for o in out] == [("mask", "UINT8", [1, H, W])]
    np.testing.assert_array_equal(np.array(out[0]["data"], np.uint8).reshape(H, W), ref["mask"][1])


def test_segmentation_mask_png_is_at_the_original_size_with_class_fractions(seg):
    files = [("regions.png", encode(regions(), "PNG")), ("blue.png", encode(rgb(130, 170, (0, 0, 200)), "PNG")),
             ("turned.jpg", jpeg(regions(), orientation=3))]  # turned 180 degrees: same size, regions swapped
    r = httpx.post(f"{seg.url}/v1/predict", files=upload(*files), timeout=30)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert r.json()["task"] == "segmentation"
    assert [(p["filename"], p["width"], p["height"]) for p in preds] == [
        ("regions.png", 200, 150), ("blue.png", 130, 170), ("turned.jpg", 200, 150)]
    masks = [Image.open(io.BytesIO(base64.b64decode(p["mask_png"]))) for p in preds]
    assert all(m.format == "PNG" and m.mode == "P" for m in masks)
    assert masks[0].getpalette()[:9] == [v for c in PALETTE for v in c]
    assert [m.size for m in masks] == [(200, 150), (130, 170), (200, 150)]
    np.testing.assert_array_equal(np.asarray(masks[0]), expected_regions())
    assert preds[0]["class_fractions"] == {"green": 0.5, "red": 0.25, "blue": 0.25}
    assert (np.asarray(masks[1]) == 2).all() and preds[1]["class_fractions"] == {"blue": 1.0}
    turned = np.asarray(masks[2])
    assert (turned[:70] != 1).all() and (turned[80:] == 1).all()  # green is at the bottom now
    assert preds[2]["class_fractions"]["green"] == pytest.approx(0.5, abs=0.02)


def test_segmentation_overlay_blends_the_palette_over_the_original_image(seg):
    r = httpx.post(f"{seg.url}/v1/predict", params={"format": "overlay"},
                   files=upload(("regions.png", encode(regions(), "PNG"))), timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    out = Image.open(io.BytesIO(r.content))
    assert out.format == "PNG" and out.size == (200, 150)
    a = np.asarray(out.convert("RGB")).astype(int)
    # red pixels, class red, painted yellow at alpha 0.5; green ones painted black; blue ones painted white
    np.testing.assert_allclose(a[140, 10], [255, 128, 0], atol=1)
    np.testing.assert_allclose(a[10, 10], [0, 128, 0], atol=1)
    np.testing.assert_allclose(a[140, 190], [128, 128, 255], atol=1)


# ----------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(("params", "n", "status", "words"), [
    ({"threshold": "abc"}, 1, 400, ["threshold", "[0, 1]"]),
    ({"threshold": "1.5"}, 1, 400, ["threshold"]),
    ({"threshold": "-0.1"}, 1, 400, ["threshold"]),
    ({"threshold": "nan"}, 1, 400, ["threshold"]),
    ({"format": "jpeg"}, 1, 400, ["format 'jpeg'", "json", "overlay"]),
    ({"format": "overlay"}, 2, 400, ["one image", "got 2"]),
    ({"top_k": "3"}, 1, 400, ["'top_k'", "detection", "threshold"]),  # an option of another task
    ({"iou": "0.5"}, 1, 400, ["'iou'", "detection", "threshold"]),
    ({"threshold": "0.5", "format": "json", "x": "1"}, 1, 400, ["'x'"]),
])
def test_bad_detection_requests_are_400_naming_the_problem(det, params, n, status, words):
    files = upload(*[(f"{i}.png", encode(rgb(40, 30), "PNG")) for i in range(n)])
    _error(httpx.post(f"{det.url}/v1/predict", params=params, files=files, timeout=30), status, *words)


def test_bad_images_and_limits_hold_on_the_dense_paths(det, seg):
    for server in (det, seg):
        for params in ({}, {"format": "overlay"}):
            r = httpx.post(f"{server.url}/v1/predict", params=params, files=upload(("x.png", b"not an image")), timeout=30)
            _error(r, 400, "x.png", "cannot decode")
            big = encode(rgb(1500, 1500), "PNG")  # 2.25 M pixels, over MAX_IMAGE_PIXELS: refused before decoding
            r = httpx.post(f"{server.url}/v1/predict", params=params, files=upload(("big.png", big)), timeout=30)
            _error(r, 413, "MAX_IMAGE_PIXELS")
    _error(httpx.post(f"{seg.url}/v1/predict", params={"threshold": "0.5"}, files=upload(("a.png", encode(rgb(9, 9), "PNG"))),
                      timeout=30), 400, "'threshold'", "segmentation", "format")
    _error(httpx.post(f"{seg.url}/v1/predict", params={"format": "overlay"},
                      files=upload(*[(f"{i}.png", encode(rgb(9, 9), "PNG")) for i in range(3)]), timeout=30), 400, "one image")
    for server in (det, seg):  # and both still answer
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200


# ----------------------------------------------------------------------------------------------- classification + OOD

def test_a_classifier_with_an_ood_score_says_which_images_are_in_distribution(models, tmp_path):
    s = next(gen := _serve(models["ood"], tmp_path / "ood.log", "classifier"))
    try:
        files = [("dark.png", encode(rgb(50, 40, (10, 10, 10)), "PNG")), ("bright.png", encode(rgb(50, 40, (250, 250, 250)), "PNG"))]
        r = httpx.post(f"{s.url}/v1/predict", params={"top_k": 1}, files=upload(*files), timeout=30)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["top_k"][0]["label"] for p in preds] == ["b", "b"] and r.json()["task"] == "classification"
        assert [(p["filename"], p["width"], p["height"]) for p in preds] == [("dark.png", 50, 40), ("bright.png", 50, 40)]
        assert [(p["ood_score"], p["in_distribution"]) for p in preds] == [(10.0, True), (250.0, False)]
        _error(httpx.post(f"{s.url}/v1/predict", params={"format": "overlay"}, files=upload(files[0]), timeout=30),
               400, "'overlay'", "classification", "json")
        _error(httpx.post(f"{s.url}/v1/predict", params={"threshold": "0.5"}, files=upload(files[0]), timeout=30),
               400, "'threshold'", "classification", "top_k")
        meta = httpx.get(f"{s.url}/v2/models/classifier", timeout=5).json()
        assert meta["parameters"]["task"] == "classification" and meta["parameters"]["ood_threshold"] == 100.0
        assert [o["shape"] for o in meta["outputs"]] == [[-1, 2], [-1, 2], [-1]]
    finally:
        next(gen, None)


# ----------------------------------------------------------------------------------------------- in process

def test_one_decode_gives_load_images_pixels_and_the_original_size():
    """deploy.images decodes once for both: the pixels are load_image's, for either resize mode and through
    JPEG draft; the size is the original's after EXIF orientation, wherever the orientation is stored."""
    from deploy.images import _load_sized, image_size

    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 500, 3), np.uint8))
    cases = [(jpeg(noisy, 6), (300, 500)), (jpeg(noisy), (500, 300)), (encode(noisy, "PNG"), (500, 300)),
             (png_with_late_exif(noisy, 8), (300, 500)), (jpeg(noisy.resize((90, 60)), 5), (60, 90))]
    crop = PreprocessingCard.from_dict({**{k: v for k, v in CARD.items() if k != "a_key_from_the_future"},
                                        "resize_mode": "center_crop"})
    for data, size in cases:
        for c in (card(), crop):
            pixels, got = _load_sized(data, c, image_size(data, 10**8, "x"), "x")
            assert got == size
            np.testing.assert_array_equal(pixels, load_image(data, c))


def test_models_the_server_cannot_serve_as_their_task_says_are_refused():
    from deploy.predict import load_serving

    from tasks.contract import ModelError

    meta = {"task": "detection", "score_threshold": "0.3"}
    outs = ["boxes", "scores", "labels"]
    task, serving = load_serving(meta, outs, (H, W), "stretch")
    assert task == "detection" and serving.score_threshold == 0.3 and type(serving).__module__ == "tasks.detection.serve"
    for m, outs, mode, words in [({}, [], "stretch", "no metadata 'task'"),
                                 ({"task": "pose"}, [], "stretch", "not one this server serves"),
                                 ({"task": "os"}, [], "stretch", "not one this server serves"),  # never imported
                                 (meta, ["boxes", "scores"], "stretch", "missing ['labels']"),
                                 (meta, outs, "center_crop", "resize_mode 'stretch'"),
                                 ({**meta, "score_threshold": "high"}, outs, "stretch", "number"),
                                 ({"task": "segmentation", "palette": "[[1, 2]]"}, ["mask"], "stretch", "palette"),
                                 ({"task": "multilabel"}, ["probabilities", "tags"], "center_crop", "thresholds"),
                                 ({"task": "multilabel", "labels": '["a", "b"]', "thresholds": "[0.5]"},
                                  ["probabilities", "tags"], "center_crop", "1 thresholds for 2 labels"),
                                 ({"task": "classification"}, ["logits"], "center_crop", "missing ['probabilities']")]:
        with pytest.raises(ModelError, match=words.replace("[", r"\[").replace("]", r"\]")):
            load_serving(m, outs, (H, W), mode)
