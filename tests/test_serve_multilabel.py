"""The server with a multi-label model (metadata task=multilabel): V2 outputs and /v1/predict's tags.

A tiny torch module is exported here to the contract (tasks/contract.py: input `images`, outputs
`probabilities` FP32 [N, T] sigmoid, `tags` BOOL [N, T] at per-tag thresholds, `ood_score` FP32 [N];
metadata task, labels, thresholds, preprocessing, ood_threshold), since the pipeline's multilabel export lives
elsewhere: its tags are an image's colours (each channel's mean), and `dark`. It runs in a real server process
(tests/test_serve.py's ServerProcess); expected answers come from onnxruntime here on load_image's pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve import ServerProcess, encode, httpx, triton

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from tasks import contract
from tasks.preprocess import PreprocessingCard, load_image

H = W = 32
TAGS = ["red", "green", "blue", "dark"]
THRESHOLDS = [0.5, 0.3, 0.7, 0.5]
OOD_THRESHOLD = 200.0  # ood_score = the image's mean pixel value: a very bright image is "unlike the training data"
CARD = {"input_size": [H, W], "resize_size": H, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("thresholds", torch.tensor(THRESHOLDS))

    def forward(self, images):
        x = images.float() / 255.0
        rgb = x.mean(dim=(1, 2))  # [N, 3]
        dark = 1.0 - rgb.mean(dim=1, keepdim=True)
        probs = torch.sigmoid(10.0 * (torch.cat([rgb, dark], dim=1) - 0.5))
        return probs, probs >= self.thresholds, images.float().mean(dim=(1, 2, 3))


def tagger_onnx(path: Path, **meta) -> Path:
    import warnings

    outputs = (*contract.OUTPUTS["multilabel"], contract.OOD_SCORE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
        torch.onnx.export(Tagger().eval(), (torch.zeros(2, H, W, 3, dtype=torch.uint8),), str(path),
                          input_names=[contract.INPUT], output_names=list(outputs),
                          dynamic_axes={n: {0: "N"} for n in (contract.INPUT, *outputs)}, opset_version=17, dynamo=False)
    m = onnx.load(str(path))
    props = {contract.TASK: "multilabel", contract.LABELS: json.dumps(TAGS), contract.THRESHOLDS: json.dumps(THRESHOLDS),
             contract.PREPROCESSING: json.dumps(CARD), contract.OOD_THRESHOLD: repr(OOD_THRESHOLD), **meta}
    for k, v in props.items():
        if v is not None:
            m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tagger_onnx(tmp_path_factory.mktemp("multilabel") / "tagger.onnx")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = ServerProcess(model, tmp_path_factory.mktemp("log") / "tagger.log", "--model-name", "tagger",
                      "--max-wait-ms", "2").wait_ready()
    yield s
    assert s.stop() == 0, s.log.read_text()


IMAGES = {  # name -> encoded image; solid colours, so any resize gives the same pixels
    "red.png": encode(Image.new("RGB", (60, 40), (250, 10, 10)), "PNG"),
    "teal.jpg": encode(Image.new("RGB", (50, 70), (10, 120, 200)), "JPEG"),
    "white.png": encode(Image.new("RGB", (40, 40), (252, 252, 252)), "PNG"),
}


def reference(model: Path, names: list[str]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    card = PreprocessingCard.from_dict(CARD)
    pixels = np.stack([load_image(IMAGES[n], card) for n in names])
    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"images": pixels}))) | {"pixels": pixels}


def _error(r, *words: str) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    msg = r.json()["error"]
    assert all(w in msg for w in words), msg
    return msg


def predict(server, params=None, names=tuple(IMAGES)):
    return httpx.post(f"{server.url}/v1/predict", params=params or {}, timeout=30,
                      files=[("file", (n, IMAGES[n], "application/octet-stream")) for n in names])


def test_metadata_says_multilabel_with_each_tags_threshold(server):
    meta = httpx.get(f"{server.url}/v2/models/tagger", timeout=5).json()
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]},
                               {"name": "tags", "datatype": "BOOL", "shape": [-1, 4]},
                               {"name": "ood_score", "datatype": "FP32", "shape": [-1]}]
    p = meta["parameters"]
    assert (p["task"], p["labels"], p["thresholds"], p["ood_threshold"]) == ("multilabel", TAGS, THRESHOLDS, OOD_THRESHOLD)


def test_v2_infer_returns_the_outputs_as_onnxruntime(server, model):
    ref = reference(model, list(IMAGES))
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    x = triton.InferInput("images", list(ref["pixels"].shape), "UINT8")
    x.set_data_from_numpy(ref["pixels"])
    r = c.infer("tagger", [x])
    assert r.as_numpy("tags").dtype == np.bool_
    for name in ("probabilities", "tags", "ood_score"):
        np.testing.assert_array_equal(r.as_numpy(name), ref[name])


def test_v1_predict_answers_the_tags_predicted_and_the_top_k(server, model):
    names = list(IMAGES)
    ref = reference(model, names)
    r = predict(server)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["task"]) == ("tagger", "multilabel")
    preds = body["predictions"]
    assert [(p["filename"], p["width"], p["height"]) for p in preds] == [("red.png", 60, 40), ("teal.jpg", 50, 70),
                                                                         ("white.png", 40, 40)]
    for p, probs, tags, ood in zip(preds, ref["probabilities"], ref["tags"], ref["ood_score"]):
        order = np.argsort(-probs, kind="stable")
        assert [t["index"] for t in p["tags"]] == [int(i) for i in order if tags[i]]  # the model's own tags output
        assert [t["index"] for t in p["top_k"]] == [int(i) for i in order]  # 5 by default: all 4 tags
        for t in p["tags"] + p["top_k"]:
            assert t["label"] == TAGS[t["index"]] and t["probability"] == pytest.approx(float(probs[t["index"]]), abs=1e-6)
        assert (p["ood_score"], p["in_distribution"]) == (pytest.approx(float(ood)), bool(ood <= OOD_THRESHOLD))
    # what the colours mean: the per-tag thresholds decide (green 0.3, blue 0.7)
    assert [[t["label"] for t in p["tags"]] for p in preds] == [["red", "dark"], ["blue", "dark", "green"],
                                                                ["red", "green", "blue"]]
    assert [p["in_distribution"] for p in preds] == [True, True, False]


def test_top_k_and_one_threshold_for_every_tag(server, model):
    ref = reference(model, ["teal.jpg"])
    probs = ref["probabilities"][0]
    p = predict(server, {"top_k": 2}, ["teal.jpg"]).json()["predictions"][0]
    assert [t["label"] for t in p["top_k"]] == ["blue", "dark"] and len(p["tags"]) == 3  # top_k does not cut the tags
    for threshold in ("0.9", "0.55", "0", "1"):
        p = predict(server, {"threshold": threshold}, ["teal.jpg"]).json()["predictions"][0]
        want = [TAGS[i] for i in np.argsort(-probs, kind="stable") if probs[i] >= float(threshold)]
        assert [t["label"] for t in p["tags"]] == want, threshold
    assert [t["label"] for t in predict(server, {"threshold": "0.55"}, ["teal.jpg"]).json()["predictions"][0]["tags"]] \
        == ["blue", "dark"]  # green (0.43) is over its own 0.3, not under one 0.55


@pytest.mark.parametrize(("params", "words"), [
    ({"top_k": "0"}, ["top_k", ">= 1"]),
    ({"top_k": "two"}, ["top_k", "integer"]),
    ({"threshold": "1.5"}, ["threshold", "[0, 1]"]),
    ({"threshold": "nan"}, ["threshold"]),
    ({"format": "overlay"}, ["'overlay'", "multilabel", "json"]),
    ({"iou": "0.5"}, ["'iou'", "multilabel", "top_k, threshold, format"]),
])
def test_options_it_does_not_take_or_bad_values_are_400(server, params, words):
    _error(predict(server, params, ["red.png"]), *words)


def test_a_multilabel_model_without_thresholds_is_refused_in_one_line(tmp_path):
    s = ServerProcess(tagger_onnx(tmp_path / "m.onnx", thresholds=None), tmp_path / "m.log")
    try:
        assert s.proc.wait(60) == 1
    finally:
        s.stop()
    lines = [x for x in s.log.read_text().splitlines() if "cannot serve model" in x]
    assert len(lines) == 1 and "needs metadata thresholds" in lines[0], s.log.read_text()
    assert "Traceback" not in s.log.read_text()
