"""The inference server: a real process on 127.0.0.1, driven by tritonclient and plain HTTP.

One tiny model is trained and exported per module (real backbone, generated images); every
answer is compared with onnxruntime in this process on the same preprocessed images.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, Workdir, export_, make_imagefolder, tiny_params
from PIL import Image

httpx = pytest.importorskip("httpx", reason="serving test deps: pip install -e '.[dev,serve]'")
pytest.importorskip("fastapi", reason="serving deps: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="serving deps: pip install -e '.[serve]'")
pytest.importorskip("prometheus_client", reason="serving deps: pip install -e '.[serve]'")
triton = pytest.importorskip("tritonclient.http", reason="test dep: pip install 'tritonclient[http]'")
from tritonclient.utils import InferenceServerException

from tasks.preprocess import PreprocessingCard, load_image
from tasks.runtime import open_session

MODEL_NAME = "classifier"
MAX_BATCH = 8
MAX_BODY = 4_000_000
MAX_PIXELS = 1_000_000


# ----------------------------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m deploy.server` in a subprocess on 127.0.0.1; stopped by its PID."""

    def __init__(self, model: Path, log: Path, *args: str, env: dict | None = None, nofile: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_f = open(log, "w")  # noqa: SIM115 - closed in stop(), outlives this method

        def limit_files():  # in the child: what `ulimit -n` does
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.server", "--model-path", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--device", "cpu", "--threads", "2", *args],
            cwd=ROOT, stdout=self._log_f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            preexec_fn=limit_files if nofile else None)

    def wait_ready(self, timeout: float = 60) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_f.close()
        return self.proc.returncode


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model(tmp_path_factory, backbone_dir):
    """(model.onnx path, encoded test images {name: bytes}, card, labels): one tiny trained model."""
    base = tmp_path_factory.mktemp("serve")
    images = make_imagefolder(base / "images")
    w = Workdir(base / "work", backbone_dir)
    params = tiny_params(images)
    w.run_all(params)
    path = export_(w, params).model_path
    files = {p.name: p.read_bytes() for p in sorted(images.rglob("*")) if p.suffix in (".jpg", ".png")}
    # one bigger JPEG, so the server's decode takes the same JPEG draft path that training does
    big = Image.open(io.BytesIO(files["circles_01.jpg"])).convert("RGB").resize((700, 560))
    files["big.jpg"] = encode(big, "JPEG")
    session, _ = open_session(path, device="cpu")
    meta = session.get_modelmeta().custom_metadata_map
    card_d = json.loads(meta["preprocessing"])
    card = PreprocessingCard.from_dict({k: v for k, v in card_d.items() if k in PreprocessingCard.__dataclass_fields__})
    return path, files, card, json.loads(meta["labels"]), session


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    path = model[0]
    s = ServerProcess(path, tmp_path_factory.mktemp("log") / "server.log",
                      "--max-batch-size", str(MAX_BATCH), "--max-wait-ms", "30",
                      "--max-body-bytes", str(MAX_BODY), "--max-image-pixels", str(MAX_PIXELS)).wait_ready()
    yield s
    assert s.stop() == 0, s.log.read_text()


def reference(model, names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixels, probabilities, logits) from onnxruntime in this process, preprocessed by tasks.preprocess."""
    _, files, card, _, session = model
    pixels = np.stack([load_image(files[n], card) for n in names])
    probs, logits = session.run(["probabilities", "logits"], {"images": pixels})
    return pixels, probs, logits


NAMES = ["circles_00.png", "circles_01.jpg", "squares_02.jpg", "stripes_03.png", "big.jpg"]


# ----------------------------------------------------------------------------------------------- protocol

def test_health_and_metadata_through_tritonclient(server, model):
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL_NAME)
    assert not c.is_model_ready("no-such-model")
    meta = c.get_model_metadata(MODEL_NAME)
    assert meta["name"] == MODEL_NAME and meta["platform"] == "onnxruntime_onnx" and "1" in meta["versions"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "logits", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "ood_score", "datatype": "FP32", "shape": [-1]}]
    assert meta["parameters"]["labels"] == model[3] == ["circles", "squares", "stripes"]
    assert c.get_model_metadata(MODEL_NAME, model_version="1")["name"] == MODEL_NAME


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_uint8_infer_equals_onnxruntime(server, model, binary):
    pixels, probs, logits = reference(model, NAMES)
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    inp = triton.InferInput("images", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=binary)
    outs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "logits")]
    r = c.infer(MODEL_NAME, [inp], outputs=outs, request_id="req-7")
    assert r.get_response()["id"] == "req-7" and r.get_response()["model_name"] == MODEL_NAME
    assert r.as_numpy("probabilities").dtype == np.float32 and r.as_numpy("probabilities").shape == (5, 3)
    np.testing.assert_allclose(r.as_numpy("probabilities"), probs, atol=1e-5)
    np.testing.assert_allclose(r.as_numpy("logits"), logits, atol=1e-5)
    # no outputs named: tritonclient asks for all of them in binary
    r = c.infer(MODEL_NAME, [inp])
    np.testing.assert_allclose(r.as_numpy("probabilities"), probs, atol=1e-5)
    assert r.as_numpy("logits") is not None


def test_plain_http_json_with_nested_data(server, model):
    pixels, probs, _ = reference(model, NAMES[:2])
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.tolist()}],
            "outputs": [{"name": "probabilities"}]}
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/versions/1/infer", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    out = r.json()["outputs"]
    assert [o["name"] for o in out] == ["probabilities"] and out[0]["shape"] == [2, 3] and out[0]["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out[0]["data"], np.float32).reshape(2, 3), probs, atol=1e-5)


def test_bytes_input_carries_encoded_images_decoded_like_training(server, model):
    _, files, *_ = model
    _, probs, _ = reference(model, NAMES)
    blobs = np.array([files[n] for n in NAMES], dtype=np.object_)
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    inp = triton.InferInput("images", [len(NAMES)], "BYTES")
    inp.set_data_from_numpy(blobs, binary_data=True)
    r = c.infer(MODEL_NAME, [inp], outputs=[triton.InferRequestedOutput("probabilities", binary_data=True)])
    np.testing.assert_allclose(r.as_numpy("probabilities"), probs, atol=1e-5)
    # JSON: BYTES elements as base64 strings
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2, 1],
                        "data": [[base64.b64encode(files[n]).decode()] for n in NAMES[:2]]}]}
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    got = {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}
    np.testing.assert_allclose(got["probabilities"], probs[:2], atol=1e-5)


def test_v1_predict_multipart_top_k(server, model):
    _, files, _, labels, _ = model
    _, probs, _ = reference(model, NAMES)
    up = [("files", (n, files[n], "image/jpeg" if n.endswith("jpg") else "image/png")) for n in NAMES]
    r = httpx.post(f"{server.url}/v1/predict", params={"top_k": 2}, files=up, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["task"] == "classification"
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == NAMES
    assert (preds[-1]["width"], preds[-1]["height"]) == (700, 560)  # every answer says the original's size
    for p, ref in zip(preds, probs):
        order = np.argsort(-ref, kind="stable")[:2]
        assert [t["label"] for t in p["top_k"]] == [labels[i] for i in order]
        np.testing.assert_allclose([t["probability"] for t in p["top_k"]], ref[order], atol=1e-5)
    # the tiny model learned something: most training-style images get their own class first
    right = sum(p["top_k"][0]["label"] == n.split("_")[0] for p, n in zip(preds, NAMES) if n != "big.jpg")
    assert right >= 3
    # and says whether each image is like its training data (ood_score vs the model's ood_threshold)
    _, _, _, _, session = model
    threshold = float(session.get_modelmeta().custom_metadata_map["ood_threshold"])
    scores = session.run(["ood_score"], {"images": reference(model, NAMES)[0]})[0]
    np.testing.assert_allclose([p["ood_score"] for p in preds], scores, rtol=1e-5)
    assert [p["in_distribution"] for p in preds] == [bool(s <= threshold) for s in scores]
    noise = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)), "PNG")
    r = httpx.post(f"{server.url}/v1/predict", files=[("files", ("noise.png", noise, "image/png"))], timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["in_distribution"] is False


# ----------------------------------------------------------------------------------------------- bad input

def _error(r, status: int, *words: str):
    assert r.status_code == status, (r.status_code, r.text)
    msg = r.json()["error"]
    for w in words:
        assert w in msg, msg
    return msg


def _infer_json(server, inputs, model_name=MODEL_NAME):
    return httpx.post(f"{server.url}/v2/models/{model_name}/infer", json={"inputs": inputs}, timeout=30)


def test_oversized_body_is_413(server):
    big = b"\0" * (MAX_BODY + 1000)
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", content=big,
                   headers={"Inference-Header-Content-Length": "2", "Content-Type": "application/octet-stream"}, timeout=30)
    _error(r, 413, "MAX_BODY_BYTES", str(MAX_BODY))
    r = httpx.post(f"{server.url}/v1/predict", files=[("files", ("a.jpg", big, "image/jpeg"))], timeout=30)
    _error(r, 413, "MAX_BODY_BYTES")

    def chunks():  # no Content-Length: the limit holds on the bytes actually read
        for _ in range(3):
            yield b"\0" * (MAX_BODY // 2)
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", content=chunks(), timeout=30)
    _error(r, 413, "MAX_BODY_BYTES")


def test_too_many_pixels_is_413(server):
    huge = encode(Image.new("RGB", (1200, 1000), (200, 10, 10)), "PNG")  # small file, 1.2 MP
    assert len(huge) < MAX_BODY
    r = httpx.post(f"{server.url}/v1/predict", files=[("files", ("huge.png", huge, "image/png"))], timeout=30)
    _error(r, 413, "1200x1000", "MAX_IMAGE_PIXELS")


def test_undecodable_image_is_400_naming_the_problem(server, model):
    _, files, *_ = model
    r = httpx.post(f"{server.url}/v1/predict", files=[("files", ("ok.png", files[NAMES[0]], "image/png")),
                                                      ("files", ("notes.txt", b"hello, not an image", "text/plain"))], timeout=30)
    _error(r, 400, "notes.txt", "cannot decode image")
    truncated = files["big.jpg"][: len(files["big.jpg"]) // 3]
    r = httpx.post(f"{server.url}/v1/predict", files=[("files", ("cut.jpg", truncated, "image/jpeg"))], timeout=30)
    _error(r, 400, "cut.jpg", "cannot decode image")
    r = _infer_json(server, [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"junk").decode()]}])
    _error(r, 400, "cannot decode image")
    r = _infer_json(server, [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%% not base64"]}])
    _error(r, 400, "base64")
    r = httpx.post(f"{server.url}/v1/predict", files={"note": (None, b"just a text field")}, timeout=30)
    _error(r, 400, "no image files")
    r = httpx.post(f"{server.url}/v1/predict", data={"x": "1"}, timeout=30)
    _error(r, 400, "multipart/form-data")


def test_wrong_shape_datatype_or_name_is_400_naming_what_is_expected(server):
    px = np.zeros((1, 32, 32, 3), np.uint8)
    r = _infer_json(server, [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": px.ravel().tolist()}])
    _error(r, 400, "[1, 32, 32, 3]", "[N, 224, 224, 3]")
    r = _infer_json(server, [{"name": "images", "datatype": "FP32", "shape": [1, 224, 224, 3], "data": [0.0]}])
    _error(r, 400, "FP32", "UINT8", "BYTES")
    r = _infer_json(server, [{"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": [0]}])
    _error(r, 400, "pixels", "'images'")
    r = _infer_json(server, [{"name": "images", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": [1, 2, 3]}])
    _error(r, 400, "150528")
    r = _infer_json(server, [{"name": "images", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": [300] * 150528}])
    _error(r, 400, "0..255")
    n = MAX_BATCH + 1
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", timeout=30,
                   content=json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [n, 224, 224, 3],
                                                    "parameters": {"binary_data_size": 0}}]}).encode(),
                   headers={"Content-Type": "application/json"})
    _error(r, 400, "MAX_BATCH_SIZE", str(MAX_BATCH))
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", content=b"{not json", timeout=30)
    _error(r, 400, "not valid JSON")
    # through tritonclient: a wrong shape surfaces as its exception, with the server's message
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    inp = triton.InferInput("images", [1, 32, 32, 3], "UINT8")
    inp.set_data_from_numpy(px)
    with pytest.raises(InferenceServerException, match=r"\[N, 224, 224, 3\]") as e:
        c.infer(MODEL_NAME, [inp])
    assert e.value.status() == "400"


MALFORMED = [
    b"[]", b"null", b'{"inputs": 5}', b'{"inputs": [5]}', b'{"inputs": [{"name": "images", "parameters": [1]}]}',
    b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": "x"}]}',
    b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": [[1, 2], [3]]}]}',
    b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [0, 224, 224, 3], "data": []}]}',
    b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [1]}]}',
    b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [""]}]}',
    b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 224, 224, 3], "parameters": {"binary_data_size": 7}}]}',
    b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}], "parameters": [1]}',
    b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}], "outputs": [{"name": "nope"}]}',
    b"\xff\xfe", b"",
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_infer_requests_are_400_not_500(server, body):
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", content=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"], (r.status_code, r.text)


def _bomb_png() -> bytes:
    from test_serve_codec import png_header_only

    return png_header_only(60000, 60000)  # declares 3.6 G pixels: over Pillow's own decompression-bomb limit


INFER = f"/v2/models/{MODEL_NAME}/infer"
ONE_IMAGE = [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]
CLIENT_ERRORS = [  # (method, path, httpx keyword arguments, status, words in the error); each was a 405 or a 500
    ("HEAD", "/v2/health/live", {}, 200, ()),
    ("HEAD", "/v2/health/ready", {}, 200, ()),
    ("HEAD", f"/v2/models/{MODEL_NAME}/ready", {}, 200, ()),
    ("POST", INFER, {"content": b"[" * 100_000 + b"]" * 100_000}, 400, ("nested too deeply",)),
    ("POST", INFER, {"content": b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": '
                     + b"[" * 500 + b"1" + b"]" * 500 + b"}]}"}, 400, ("not a regular",)),
    ("POST", INFER, {"json": {"inputs": ONE_IMAGE, "outputs": [{"name": ["probabilities"]}]}}, 400, ("unknown output",)),
    ("POST", INFER, {"json": {"inputs": ONE_IMAGE, "outputs": [{"name": {"probabilities": 1}}]}}, 400, ("unknown output",)),
    ("POST", INFER, {"json": {"inputs": ONE_IMAGE, "id": {"a": [1]}}}, 400, ("'id' must be a string",)),
    ("POST", "/v1/predict", {"files": [("files", ("bomb.png", "BOMB", "image/png"))]}, 413, ("bomb.png", "MAX_IMAGE_PIXELS")),
    ("POST", INFER, {"json": {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["BOMB"]}]}},
     413, ("element 0", "MAX_IMAGE_PIXELS")),
]


@pytest.mark.parametrize("method, path, kw, status, words", CLIENT_ERRORS, ids=range(len(CLIENT_ERRORS)))
def test_every_client_error_is_a_4xx_and_head_answers_like_get(server, method, path, kw, status, words):
    bomb = _bomb_png()
    if "files" in kw:
        kw = {"files": [(f, (n, bomb, t)) for f, (n, _, t) in kw["files"]]}
    if "json" in kw and kw["json"]["inputs"][0].get("data") == ["BOMB"]:
        kw = {"json": {"inputs": [{**kw["json"]["inputs"][0], "data": [base64.b64encode(bomb).decode()]}]}}
    r = httpx.request(method, server.url + path, timeout=30, **kw)
    if method == "HEAD":
        get = httpx.get(server.url + path, timeout=30)
        assert (r.status_code, r.content) == (get.status_code, b"") and r.headers["content-type"] == get.headers["content-type"]
    if status >= 400:
        _error(r, status, *words)
    assert r.status_code == status


def test_unknown_model_or_version_is_404(server):
    _error(httpx.get(f"{server.url}/v2/models/resnet"), 404, "resnet", MODEL_NAME)
    _error(httpx.get(f"{server.url}/v2/models/{MODEL_NAME}/versions/2"), 404, "version")
    _error(_infer_json(server, [], model_name="resnet"), 404, "resnet")
    _error(httpx.get(f"{server.url}/v2/models/resnet/ready"), 404)
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("resnet")
    assert e.value.status() == "404"


def test_bad_input_never_crashes_it_nor_gives_500(server):
    # runs after the bad-input tests (file order): the same process still answers, and nothing was a 5xx
    assert server.proc.poll() is None
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    samples = metric_samples(httpx.get(server.url + "/metrics").text)
    errors = {(dict(k[1])["endpoint"], dict(k[1])["code"]) for k in samples if k[0] == "tlcv_request_errors_total"}
    assert {"400", "404", "413"} <= {code for _, code in errors}, errors
    # the only 5xx allowed: readiness answering 503 while the model was still loading at start
    assert not [e for e in errors if e[1].startswith("5") and e != ("v2_health", "503")], errors


# ----------------------------------------------------------------------------------------------- batching, metrics

def test_concurrent_requests_are_batched_and_all_answers_right(server, model):
    _, files, *_ = model
    names = sorted(files)[:12]
    _, probs, _ = reference(model, names)
    pixels = np.stack([load_image(files[n], model[2]) for n in names])
    before = metric_samples(httpx.get(server.url + "/metrics").text)
    barrier = threading.Barrier(len(names))
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def one(i: int):
        try:
            c = triton.InferenceServerClient(f"127.0.0.1:{server.port}", connection_timeout=30, network_timeout=30)
            inp = triton.InferInput("images", [1, 224, 224, 3], "UINT8")
            inp.set_data_from_numpy(pixels[i:i + 1])
            barrier.wait(10)
            results[i] = c.infer(MODEL_NAME, [inp]).as_numpy("probabilities")[0]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i in range(len(names)):
        np.testing.assert_allclose(results[i], probs[i], atol=1e-5)
    after = metric_samples(httpx.get(server.url + "/metrics").text)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    batches = delta("tlcv_batch_size_count")
    assert delta("tlcv_batch_size_sum") == len(names)
    assert batches < len(names), "no batch held more than one request"
    assert delta("tlcv_batch_size_bucket", le="1.0") < batches  # some batch > 1
    assert delta("tlcv_batch_size_bucket", le=f"{float(MAX_BATCH)}") == batches  # never over the limit
    assert delta("tlcv_requests_total", endpoint="v2_infer") == len(names)


def test_metrics_in_prometheus_text_format(server):
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = metric_samples(r.text)
    assert s[("tlcv_model_ready", ())] == 1.0
    assert s[("tlcv_requests_total", (("endpoint", "v2_health"),))] >= 1
    assert s[("tlcv_request_duration_seconds_count", (("endpoint", "v2_health"),))] >= 1
    assert ("tlcv_request_duration_seconds_bucket", (("endpoint", "v2_health"), ("le", "+Inf"))) in s
    assert ("tlcv_batch_size_count", ()) in s and ("tlcv_inference_duration_seconds_count", ()) in s


# ----------------------------------------------------------------------------------------------- lifecycle

def test_not_ready_is_503_then_ready_then_sigterm_exits_cleanly(model, tmp_path):
    s = ServerProcess(model[0], tmp_path / "slow.log", "--startup-delay-s", "4")
    try:
        deadline = time.monotonic() + 30
        while True:  # live as soon as it listens, while the model is still loading
            try:
                live = httpx.get(s.url + "/v2/health/live", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and s.proc.poll() is None, s.log.read_text()
                time.sleep(0.05)
        assert live.status_code == 200
        r = httpx.get(s.url + "/v2/health/ready")
        assert r.status_code == 503 and r.json() == {"ready": False}
        assert httpx.head(s.url + "/v2/health/ready").status_code == 503
        assert httpx.head(s.url + "/v2/health/live").status_code == 200
        _error(httpx.get(f"{s.url}/v2/models/{MODEL_NAME}/ready"), 503, "not ready")
        _error(_infer_json(s, [{"name": "images", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": [0]}]), 503, "not ready")
        s.wait_ready()
        assert httpx.get(f"{s.url}/v2/models/{MODEL_NAME}/ready").status_code == 200
    finally:
        code = s.stop()
    assert code == 0, s.log.read_text()
    assert "shut down cleanly" in s.log.read_text()


def test_sigterm_finishes_the_request_in_flight(model, tmp_path):
    pixels, probs, _ = reference(model, NAMES[:1])
    s = ServerProcess(model[0], tmp_path / "drain.log", "--max-wait-ms", "1500").wait_ready()
    result = {}

    def send():  # waits ~1.5 s in the batcher for company that never comes
        c = triton.InferenceServerClient(f"127.0.0.1:{s.port}", network_timeout=30)
        inp = triton.InferInput("images", [1, 224, 224, 3], "UINT8")
        inp.set_data_from_numpy(pixels)
        result["probs"] = c.infer(MODEL_NAME, [inp]).as_numpy("probabilities")

    t = threading.Thread(target=send)
    t.start()
    time.sleep(0.5)
    assert "probs" not in result
    code = s.stop()  # SIGTERM while the request waits
    t.join(30)
    assert code == 0, s.log.read_text()
    np.testing.assert_allclose(result["probs"], probs, atol=1e-5)


def test_a_model_that_cannot_load_ends_the_process_non_zero(tmp_path):
    bad_model = tmp_path / "broken.onnx"
    bad_model.write_bytes(b"not an onnx model")
    s = ServerProcess(bad_model, tmp_path / "broken.log")
    try:
        assert s.proc.wait(60) == 1
    finally:
        s.stop()
    assert "cannot load model" in s.log.read_text()
    s = ServerProcess(tmp_path / "missing.onnx", tmp_path / "missing.log")
    assert s.proc.wait(60) == 2 and "does not exist" in s.log.read_text()
    s.stop()


def test_a_model_without_task_metadata_is_refused_in_one_line_naming_the_fix(model, tmp_path):
    """An older export (no metadata `task`) is not taken for a classifier: the server says to re-export it."""
    import onnx

    m = onnx.load(str(model[0]))
    kept = [p for p in m.metadata_props if p.key != "task"]
    assert len(kept) == len(m.metadata_props) - 1
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(m, str(old))
    s = ServerProcess(old, tmp_path / "old.log")
    try:
        assert s.proc.wait(60) == 1
    finally:
        s.stop()
    log = s.log.read_text()
    lines = [x for x in log.splitlines() if "task" in x]
    assert len(lines) == 1 and "no metadata 'task'" in lines[0] and "re-export it with the current tlcv" in lines[0], log
    assert "Traceback" not in log and "loaded" not in log


@pytest.mark.parametrize(("params", "words"), [
    ({"threshold": "0.5"}, ["'threshold'", "classification", "top_k, format"]),
    ({"top_k": "0"}, ["top_k", ">= 1"]),
    ({"top_k": "2.5"}, ["top_k", "integer"]),
    ({"top_k": "2", "format": "overlay"}, ["'overlay'", "classification"]),
])
def test_an_option_the_classifier_does_not_take_is_400(server, model, params, words):
    up = [("files", (NAMES[0], model[1][NAMES[0]], "image/png"))]
    _error(httpx.post(f"{server.url}/v1/predict", params=params, files=up, timeout=30), 400, *words)
    r = httpx.post(f"{server.url}/v1/predict?top_k=1&top_k=2", files=up, timeout=30)
    _error(r, 400, "'top_k'", "twice")


def test_settings_come_from_flags_then_environment_then_defaults():
    from deploy.server import Settings

    s = Settings.from_args(["--port", "9001", "--batching", "0"],
                           env={"PORT": "1", "MAX_WAIT_MS": "7.5", "MODEL_PATH": "/m.onnx", "BATCHING": "1"})
    assert (s.port, s.batching, s.max_wait_ms, s.model_path) == (9001, False, 7.5, "/m.onnx")
    assert Settings.from_args([], env={}).max_batch_size == 32 and Settings.from_args(["--model", "x.onnx"], env={}).model_path == "x.onnx"
    with pytest.raises(SystemExit):
        Settings.from_args([], env={"MAX_BATCH_SIZE": "0"})
    with pytest.raises(SystemExit):
        Settings.from_args([], env={"BATCHING": "maybe"})


def test_the_server_imports_no_torch():
    code = "import sys, deploy.server; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
