"""Serve export/model.onnx over HTTP: the Open Inference Protocol (KServe V2, as Triton does it) and /v1/predict.

    python -m deploy.server --model export/model.onnx --host 127.0.0.1 --port 8000

Every flag has an environment variable (flags win): MODEL_PATH, MODEL_NAME, HOST, PORT, DEVICE
(auto|cpu|cuda), THREADS, MAX_BATCH_SIZE, MAX_WAIT_MS, BATCHING (1|0), MAX_BODY_BYTES,
MAX_IMAGE_PIXELS, ORT_SPINNING (1|0), LOG_LEVEL, STARTUP_DELAY_S.

Endpoints
  GET  /v2                              server metadata
  GET  /v2/health/live                  200 while the process runs
  GET  /v2/health/ready                 200 once the model is loaded and warmed up, else 503
  GET  /v2/models/{name}[/versions/1]   model metadata (inputs/outputs: name, datatype, shape; labels)
  GET  /v2/models/{name}[/versions/1]/ready
  POST /v2/models/{name}[/versions/1]/infer
        input "images": UINT8 [N, H, W, 3] pixels already resized and cropped (tasks.preprocess.load_image),
                        or BYTES [N] (or [N, 1]): encoded JPEG/PNG/... files, preprocessed here by the
                        same load_image that training used. In JSON, BYTES elements are base64 strings.
        JSON `data` flat or nested; or the binary tensor extension (Inference-Header-Content-Length)
        for inputs, and for outputs when asked (`binary_data` per output, `binary_data_output` per request).
  POST /v1/predict?top_k=5               multipart image file(s) (any field name) -> top-k labels, JSON
  GET  /metrics                          Prometheus text format

Dynamic micro-batching: requests queue for one worker thread, which runs onnxruntime on up to
MAX_BATCH_SIZE images at once, waiting at most MAX_WAIT_MS for a batch to fill. The event loop
never runs inference; image decoding runs in a thread pool.

Bad input is a 4xx with {"error": "..."}: body over MAX_BODY_BYTES -> 413, image over
MAX_IMAGE_PIXELS -> 413, undecodable image / wrong name, shape, datatype / too many images -> 400,
unknown model or version -> 404, model not loaded yet -> 503.

No torch here: this module, tasks/preprocess.py and tasks/runtime.py are all the serving image holds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import logging
import os
import queue
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

if __package__ in (None, ""):  # `python deploy/server.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.preprocess import PreprocessingCard, load_image
from tasks.runtime import open_session

log = logging.getLogger("tlcv.serve")

HEADER_LEN = "inference-header-content-length"
ORT_TO_V2 = {"tensor(uint8)": "UINT8", "tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(int32)": "INT32",
             "tensor(double)": "FP64", "tensor(float16)": "FP16", "tensor(int8)": "INT8", "tensor(bool)": "BOOL"}
NUMPY_TO_V2 = {"uint8": "UINT8", "float32": "FP32", "int64": "INT64", "int32": "INT32", "float64": "FP64",
               "float16": "FP16", "int8": "INT8", "bool": "BOOL"}


# ----------------------------------------------------------------------------------------------- settings

@dataclass
class Settings:
    model_path: str = "export/model.onnx"
    model_name: str = "classifier"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    threads: int = 0  # onnxruntime intra-op threads; 0 = all cores
    ort_spinning: bool = False  # let onnxruntime's idle threads spin (lower latency alone, less CPU for the rest)
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    batching: bool = True
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    log_level: str = "info"
    startup_delay_s: float = 0.0  # wait before loading the model (to exercise readiness; 0 in production)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        p = argparse.ArgumentParser(prog="python -m deploy.server", description=__doc__.split("\n\n")[0])
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.type == "bool":
                p.add_argument(flag, type=_parse_bool, default=None, metavar="1|0", help=f"env {f.name.upper()}")
            else:
                p.add_argument(flag, type=_TYPES[f.type], default=None, help=f"env {f.name.upper()} (default {f.default})")
        p.add_argument("--model", dest="model_path_alias", metavar="PATH", default=None, help="same as --model-path")
        a = p.parse_args(argv)
        values: dict[str, Any] = {}
        for f in fields(cls):
            v = getattr(a, f.name)
            if v is None and f.name.upper() in env:
                try:
                    v = (_parse_bool if f.type == "bool" else _TYPES[f.type])(env[f.name.upper()])
                except (ValueError, argparse.ArgumentTypeError) as e:
                    p.error(f"environment {f.name.upper()}={env[f.name.upper()]!r}: {e}")
            if v is not None:
                values[f.name] = v
        if a.model_path_alias:
            values["model_path"] = a.model_path_alias
        s = cls(**values)
        if s.max_batch_size < 1 or s.max_wait_ms < 0 or s.max_body_bytes < 1 or s.max_image_pixels < 1:
            p.error("max_batch_size, max_body_bytes, max_image_pixels must be >= 1 and max_wait_ms >= 0")
        if s.device not in ("auto", "cpu", "cuda"):
            p.error("device must be auto, cpu or cuda")
        return s


def _parse_bool(v: str) -> bool:
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {v!r}")


_TYPES = {"str": str, "int": int, "float": float}


# ----------------------------------------------------------------------------------------------- errors

class ServeError(Exception):
    """A client-visible error: HTTP status and a message that names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def bad(message: str) -> ServeError:
    return ServeError(400, message)


# ----------------------------------------------------------------------------------------------- model

@dataclass
class Model:
    session: Any
    provider: str
    name: str
    labels: list[str]
    card: PreprocessingCard
    input_name: str
    input_shape: list[int]  # [-1, H, W, 3]
    outputs: list[dict]  # [{"name", "datatype", "shape"}]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str, name: str, device: str, threads: int, spinning: bool = False) -> Model:
        import onnxruntime as ort

        if device == "auto":  # the CUDA provider's library error on a CPU-only host is expected under auto
            ort.set_default_logger_severity(4)
        try:
            session, provider = open_session(path, device=device, threads=threads or None)
        finally:
            ort.set_default_logger_severity(2)
        if not spinning:
            # onnxruntime's intra-op threads spin between runs by default: in a server they would burn the
            # cores that HTTP parsing and the next batch's decoding need. Same providers, spinning off.
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads or os.cpu_count() or 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), opts, providers=session.get_providers())
        meta = dict(session.get_modelmeta().custom_metadata_map)
        inp = session.get_inputs()
        if len(inp) != 1 or inp[0].type != "tensor(uint8)" or len(inp[0].shape) != 4:
            raise RuntimeError(f"{path}: expected one uint8 [N, H, W, 3] input, got {[(i.name, i.type, i.shape) for i in inp]}")
        card_d = json.loads(meta["preprocessing"])
        known = {f.name for f in fields(PreprocessingCard)}
        card = PreprocessingCard.from_dict({k: v for k, v in card_d.items() if k in known})
        labels = json.loads(meta["labels"]) if "labels" in meta else []
        shape = [-1] + [int(d) if isinstance(d, int) else -1 for d in inp[0].shape[1:]]
        if shape[1:3] == [-1, -1]:
            shape[1:3] = list(card.input_size)
        outs = [{"name": o.name, "datatype": ORT_TO_V2.get(o.type, o.type),
                 "shape": [-1] + [int(d) if isinstance(d, int) else -1 for d in o.shape[1:]]} for o in session.get_outputs()]
        if labels:
            for o in outs:
                if len(o["shape"]) == 2 and o["shape"][1] == -1:
                    o["shape"][1] = len(labels)
        return cls(session, provider, name, labels, card, inp[0].name, shape, outs, meta)

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        results = self.session.run(None, {self.input_name: pixels})
        return {o["name"]: r for o, r in zip(self.outputs, results)}


# ----------------------------------------------------------------------------------------------- metrics

class Metrics:
    def __init__(self):
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        prometheus_client.disable_created_metrics()  # no *_created series: less noise per scrape

        self.registry = r = CollectorRegistry()
        self.requests = Counter("tlcv_requests", "HTTP requests", ["endpoint"], registry=r)
        self.errors = Counter("tlcv_request_errors", "HTTP responses with status >= 400", ["endpoint", "code"], registry=r)
        self.latency = Histogram("tlcv_request_duration_seconds", "HTTP request latency", ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("tlcv_batch_size", "Images per onnxruntime run", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.inference = Histogram("tlcv_inference_duration_seconds", "onnxruntime run time per batch", registry=r,
                                   buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.images = Counter("tlcv_images", "Images classified", registry=r)
        self.ready = Gauge("tlcv_model_ready", "1 when the model is loaded and warmed up", registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def endpoint_label(path: str) -> str:
    if path.startswith("/v2/models/"):
        for suffix in ("infer", "ready"):
            if path.endswith("/" + suffix):
                return "v2_" + suffix
        return "v2_model_metadata"
    if path.startswith("/v2/health/"):
        return "v2_health"
    return {"/v1/predict": "v1_predict", "/metrics": "metrics", "/v2": "v2_server_metadata"}.get(path, "other")


# ----------------------------------------------------------------------------------------------- batching

class _Job:
    __slots__ = ("future", "loop", "pixels")

    def __init__(self, pixels, loop, future):
        self.pixels, self.loop, self.future = pixels, loop, future


class Batcher:
    """One worker thread: gathers queued requests into batches of <= max_batch_size images, runs them."""

    def __init__(self, model: Model, metrics: Metrics, max_batch_size: int, max_wait_ms: float, batching: bool):
        self.model, self.metrics = model, metrics
        self.max_batch, self.max_wait, self.batching = max_batch_size, max_wait_ms / 1000.0, batching
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self.thread.start()

    async def infer(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put(_Job(pixels, loop, fut))
        return await fut

    def close(self):
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        jobs, n = [first], len(first.pixels)
        if not self.batching:
            return jobs, None, False
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, None, True
            if n + len(job.pixels) > self.max_batch:
                return jobs, job, False  # starts the next batch
            jobs.append(job)
            n += len(job.pixels)
        return jobs, None, False

    def _loop(self):
        carry: _Job | None = None
        stop = False
        while not stop:
            first = carry if carry is not None else self.queue.get()
            carry = None
            if first is None:
                break
            jobs, carry, stop = self._gather(first)
            try:
                pixels = jobs[0].pixels if len(jobs) == 1 else np.concatenate([j.pixels for j in jobs])
                t0 = time.perf_counter()
                out = self.model.run(pixels)
                self.metrics.inference.observe(time.perf_counter() - t0)
                self.metrics.batch_size.observe(len(pixels))
                self.metrics.images.inc(len(pixels))
                start = 0
                for j in jobs:
                    end = start + len(j.pixels)
                    part = {k: v[start:end] for k, v in out.items()}
                    j.loop.call_soon_threadsafe(_resolve, j.future, part, None)
                    start = end
            except Exception as e:
                log.exception("inference failed")
                for j in jobs:
                    j.loop.call_soon_threadsafe(_resolve, j.future, None, e)
        while carry is not None or not self.queue.empty():  # shutting down: fail what is left
            j = carry if carry is not None else self.queue.get_nowait()
            carry = None
            if j is not None:
                j.loop.call_soon_threadsafe(_resolve, j.future, None, ServeError(503, "server is shutting down"))


def _resolve(fut: asyncio.Future, result, error):
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


# ----------------------------------------------------------------------------------------------- images

def decode_image(data: bytes, card: PreprocessingCard, max_pixels: int, what: str) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] by the training pipeline's load_image; 400/413 on bad input."""
    if not data:
        raise bad(f"{what}: empty image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except UnidentifiedImageError:
        raise bad(f"{what}: cannot decode image: not a recognised image format ({len(data)} bytes, starting {data[:8]!r})") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise bad(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None
    if w * h > max_pixels:
        raise ServeError(413, f"{what}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (MAX_IMAGE_PIXELS)")
    try:
        return load_image(img, card)
    except Exception as e:  # noqa: BLE001
        raise bad(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------- V2 protocol

def parse_infer_body(body: bytes, headers) -> tuple[dict, bytes]:
    """(JSON header, binary tail) from a V2 infer request, with or without the binary tensor extension."""
    hl = headers.get(HEADER_LEN)
    if hl is not None:
        try:
            n = int(hl)
        except ValueError:
            raise bad(f"Inference-Header-Content-Length must be an integer, got {hl!r}") from None
        if n < 0 or n > len(body):
            raise bad(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
        head, tail = body[:n], body[n:]
    else:
        head, tail = body, b""
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise bad("request body must be a JSON object with an 'inputs' list")
    return req, tail


def _deserialize_bytes(raw: bytes, what: str) -> list[bytes]:
    """Triton's BYTES binary layout: each element is a 4-byte little-endian length, then the bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise bad(f"{what}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise bad(f"{what}: BYTES element of {n} bytes runs past the end of the data")
        out.append(raw[i:i + n])
        i += n
    return out


def _params(obj: dict, what: str) -> dict:
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise bad(f"{what}: 'parameters' must be a JSON object, got {type(p).__name__}")
    return p


def _shape(inp: dict, what: str) -> list[int]:
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"{what}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.model: Model | None = None
        self.batcher: Batcher | None = None
        self.load_error: BaseException | None = None
        self.ready = threading.Event()

    # -- lifecycle
    def load(self):
        s = self.settings
        try:
            if s.startup_delay_s > 0:
                log.info("waiting %.1fs before loading the model (STARTUP_DELAY_S)", s.startup_delay_s)
                time.sleep(s.startup_delay_s)
            t0 = time.perf_counter()
            model = Model.load(s.model_path, s.model_name, s.device, s.threads, s.ort_spinning)
            h, w = model.input_shape[1:3]
            model.run(np.zeros((1, h, w, 3), np.uint8))  # warm-up: first run allocates
            self.model = model
            self.batcher = Batcher(model, self.metrics, s.max_batch_size, s.max_wait_ms, s.batching)
            log.info("model %s loaded from %s in %.2fs on %s; labels %s; input %s %s; batching %s (max %d, wait %.1f ms)",
                     s.model_name, s.model_path, time.perf_counter() - t0, model.provider, model.labels,
                     model.input_name, model.input_shape, "on" if s.batching else "off", s.max_batch_size, s.max_wait_ms)
            self.ready.set()
            self.metrics.ready.set(1)
        except BaseException as e:  # noqa: BLE001
            self.load_error = e
            log.error("cannot load model %s: %s: %s", s.model_path, type(e).__name__, e)

    def close(self):
        self.ready.clear()
        self.metrics.ready.set(0)
        if self.batcher:
            self.batcher.close()

    # -- helpers
    def check_model(self, name: str, version: str | None) -> Model:
        if name != self.settings.model_name:
            raise ServeError(404, f"unknown model '{name}': this server serves '{self.settings.model_name}'")
        if version not in (None, "", "1"):
            raise ServeError(404, f"unknown version '{version}' of model '{name}': the only version is '1'")
        if not self.ready.is_set() or self.model is None:
            raise ServeError(503, f"model '{name}' is not ready yet")
        return self.model

    def model_metadata(self, m: Model) -> dict:
        return {"name": m.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": m.input_name, "datatype": "UINT8", "shape": m.input_shape}],
                "outputs": m.outputs,
                "parameters": {"labels": m.labels, "provider": m.provider, "preprocessing": m.card.preprocessing_dict(),
                               "max_batch_size": self.settings.max_batch_size,
                               "accepts": [f"{m.input_name}: UINT8 {m.input_shape}",
                                           f"{m.input_name}: BYTES [-1] encoded images"]}}

    def pixels_from_input(self, m: Model, inp: dict, binary: bytes | None) -> np.ndarray:
        name = inp.get("name")
        if name != m.input_name:
            raise bad(f"unknown input '{name}': the model takes one input named '{m.input_name}' "
                      f"(UINT8 {m.input_shape} pixels or BYTES [-1] encoded images)")
        what = f"input '{name}'"
        dt = inp.get("datatype")
        shape = _shape(inp, what)
        h, w = m.input_shape[1:3]
        if dt == "UINT8":
            if len(shape) != 4 or shape[1:] != [h, w, 3] or shape[0] < 1:
                raise bad(f"{what}: shape {shape} does not match the expected [N, {h}, {w}, 3] (N >= 1) for UINT8 pixels")
            self._check_batch(shape[0], what)
            count = int(np.prod(shape))
            if binary is not None:
                if len(binary) != count:
                    raise bad(f"{what}: {len(binary)} bytes of binary data for shape {shape} (expected {count})")
                return np.frombuffer(binary, np.uint8).reshape(shape)
            data = inp.get("data")
            if data is None:
                raise bad(f"{what}: no 'data' and no binary_data_size")
            try:
                arr = np.asarray(data)
            except (ValueError, TypeError) as e:
                raise bad(f"{what}: 'data' is not a regular (flat or nested) list of numbers: {e}") from None
            if arr.size != count:
                raise bad(f"{what}: 'data' holds {arr.size} values, shape {shape} needs {count}")
            if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
                raise bad(f"{what}: UINT8 'data' must be integers 0..255")
            return arr.astype(np.uint8).reshape(shape)
        if dt == "BYTES":
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
                raise bad(f"{what}: shape {shape} does not match the expected [N] or [N, 1] (N >= 1) for BYTES images")
            self._check_batch(shape[0], what)
            if binary is not None:
                items = _deserialize_bytes(binary, what)
            else:
                data = inp.get("data")
                if not isinstance(data, list):
                    raise bad(f"{what}: no 'data' list and no binary_data_size")
                flat = [x for row in data for x in (row if isinstance(row, list) else [row])]
                items = []
                for i, x in enumerate(flat):
                    if not isinstance(x, str):
                        raise bad(f"{what}: BYTES element {i} must be a base64 string in JSON")
                    try:
                        items.append(base64.b64decode(x, validate=True))
                    except (binascii.Error, ValueError):
                        raise bad(f"{what}: BYTES element {i} is not valid base64 (JSON carries encoded images as base64)") from None
            if len(items) != shape[0]:
                raise bad(f"{what}: {len(items)} BYTES elements for shape {shape}")
            return items  # decoded by the caller, off the event loop
        raise bad(f"{what}: datatype {dt!r} is not accepted: expected UINT8 (pixels [N, {h}, {w}, 3]) or BYTES (encoded images)")

    def _check_batch(self, n: int, what: str):
        if n > self.settings.max_batch_size:
            raise bad(f"{what}: {n} images in one request, over the limit of {self.settings.max_batch_size} (MAX_BATCH_SIZE)")

    def decode_all(self, m: Model, items: list[bytes], what: str) -> np.ndarray:
        return np.stack([decode_image(b, m.card, self.settings.max_image_pixels, f"{what} element {i}")
                         for i, b in enumerate(items)])


def _binary_chunks(req: dict, tail: bytes) -> list[bytes | None]:
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad("request needs a non-empty 'inputs' list")
    chunks, pos = [], 0
    for inp in inputs:
        if not isinstance(inp, dict):
            raise bad("each entry of 'inputs' must be an object with name, datatype, shape and data")
        size = _params(inp, f"input '{inp.get('name')}'").get("binary_data_size")
        if size is None:
            chunks.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or pos + size > len(tail):
            raise bad(f"input '{inp.get('name')}': binary_data_size {size!r} does not fit the {len(tail) - pos} binary bytes left")
        chunks.append(tail[pos:pos + size])
        pos += size
    if pos != len(tail):
        raise bad(f"{len(tail) - pos} bytes of binary data are not claimed by any input's binary_data_size")
    return chunks


def encode_infer_response(m: Model, req: dict, out: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    params = _params(req, "request")
    all_binary = bool(params.get("binary_data_output", False))
    wanted = req.get("outputs")
    if wanted is None:
        wanted = [{"name": o["name"]} for o in m.outputs]
    if not isinstance(wanted, list):
        raise bad("'outputs' must be a list of {name, parameters}")
    outputs, blobs = [], []
    for o in wanted:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in out:
            raise bad(f"unknown output {name!r}: the model's outputs are {[x['name'] for x in m.outputs]}")
        op = _params(o, f"output '{name}'")
        if "classification" in op:
            raise bad("the classification extension is not supported: ask for 'probabilities' and use the labels in the model metadata")
        arr = np.ascontiguousarray(out[name])
        dt = NUMPY_TO_V2.get(arr.dtype.name, arr.dtype.name.upper())
        entry: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if op.get("binary_data", all_binary):
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    resp: dict[str, Any] = {"model_name": m.name, "model_version": "1", "outputs": outputs}
    if "id" in req:
        resp["id"] = req["id"]
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LEN: str(len(head))}


# ----------------------------------------------------------------------------------------------- ASGI app

def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise ServeError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise bad(f"cannot {enc}-decompress the body: {e}") from None
    if len(out) > limit:
        raise ServeError(413, f"decompressed body is over the limit of {limit} bytes (MAX_BODY_BYTES)")
    return out


class LimitsAndMetrics:
    """Outermost ASGI layer: counts, times and labels every request; refuses bodies over max_body_bytes with 413.

    The body is read here (it is needed whole anyway) and replayed to the app. Over the limit,
    the rest of it is drained (up to a cap) before the 413 goes out, so the client reads the
    answer instead of a reset connection.
    """

    DRAIN_CAP = 256 * 1024 * 1024

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m = self.service.metrics
        label = endpoint_label(scope["path"])
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            limit = self.service.settings.max_body_bytes
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            declared = headers.get("content-length")
            too_big = declared is not None and declared.isdigit() and int(declared) > limit
            chunks, total, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                part = msg.get("body", b"")
                total += len(part)
                more = msg.get("more_body", False)
                if total > limit:
                    too_big = True
                    chunks = []
                    if total > self.DRAIN_CAP:
                        break
                elif not too_big:
                    chunks.append(part)
            if too_big:
                size = declared if declared is not None else f"over {limit}"
                return await _send_json(send_wrapped, 413, {"error": f"request body of {size} bytes is over the limit of {limit} bytes (MAX_BODY_BYTES)"})
            body = b"".join(chunks)
            replayed = False

            async def receive_replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, receive_replay, send_wrapped)
        finally:
            m.requests.labels(label).inc()
            m.latency.labels(label).observe(time.perf_counter() - t0)
            if status["code"] >= 400:
                m.errors.labels(label, str(status["code"])).inc()


async def _send_json(send, status: int, obj: dict):
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings):
    from contextlib import asynccontextmanager

    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=service.load, name="model-loader", daemon=True)
        loader.start()
        app.state.loader = loader
        yield
        service.close()

    app = FastAPI(title="tlcv inference server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return JSONResponse({"error": f"invalid request: {msgs}"}, status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # a bug, not bad input: say so, keep serving
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    # -- health and metadata
    @app.get("/v2/health/live")
    async def live():
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready():
        ok = service.ready.is_set()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "tlcv", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        return service.model_metadata(service.check_model(name, version))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        service.check_model(name, version)
        return JSONResponse({"name": name, "ready": True})

    # -- inference
    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None):
        m = service.check_model(name, version)
        body = _decompress(await request.body(), request.headers.get("content-encoding", ""), settings.max_body_bytes)
        req, tail = parse_infer_body(body, request.headers)
        chunks = _binary_chunks(req, tail)
        if len(req["inputs"]) != 1:
            raise bad(f"expected exactly one input named '{m.input_name}', got {len(req['inputs'])}")
        pixels = service.pixels_from_input(m, req["inputs"][0], chunks[0])
        if isinstance(pixels, list):  # BYTES: encoded images
            pixels = await asyncio.to_thread(service.decode_all, m, pixels, f"input '{m.input_name}'")
        out = await service.batcher.infer(pixels)
        content, headers = encode_infer_response(m, req, out)
        return Response(content=content, headers=headers, media_type=None)

    @app.post("/v1/predict")
    async def predict(request: Request, top_k: int = 5):
        m = service.check_model(settings.model_name, None)
        if top_k < 1:
            raise bad(f"top_k must be >= 1, got {top_k}")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise bad(f"expected multipart/form-data with one or more image files, got content-type {ctype!r}")
        try:
            form = await request.form(max_files=settings.max_batch_size + 1, max_fields=100)
        except Exception as e:  # noqa: BLE001 - malformed multipart
            raise bad(f"cannot parse the multipart body: {e}") from None
        try:
            files = [(k, v) for k, v in form.multi_items() if hasattr(v, "read")]
            if not files:
                raise bad("no image files in the multipart body (send them as file fields, e.g. -F file=@cat.jpg)")
            if len(files) > settings.max_batch_size:
                raise bad(f"{len(files)} images in one request, over the limit of {settings.max_batch_size} (MAX_BATCH_SIZE)")
            blobs = [(v.filename or k, await v.read()) for k, v in files]
        finally:
            await form.close()

        def decode():
            return np.stack([decode_image(b, m.card, settings.max_image_pixels, f"file '{fn}'") for fn, b in blobs])

        pixels = await asyncio.to_thread(decode)
        out = await service.batcher.infer(pixels)
        probs = out.get("probabilities")
        if probs is None:
            probs = next(iter(out.values()))
        k = min(top_k, probs.shape[1])
        results = []
        for (fn, _), p in zip(blobs, probs):
            idx = np.argsort(-p, kind="stable")[:k]
            label = lambda i: m.labels[i] if i < len(m.labels) else str(i)
            results.append({"filename": fn, "top_k": [{"label": label(int(i)), "index": int(i), "probability": float(p[i])} for i in idx]})
        return {"model_name": m.name, "predictions": results}

    @app.get("/metrics")
    async def metrics():
        data, ctype = service.metrics.render()
        return Response(content=data, media_type=ctype)

    return LimitsAndMetrics(app, service), service


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    import signal

    import uvicorn

    settings = Settings.from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(settings.model_path).is_file():
        log.error("model file %s does not exist (MODEL_PATH / --model-path)", settings.model_path)
        return 2
    app, service = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            access_log=False, lifespan="on", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)

    def watch_load():  # a model that cannot load ends the process (non-zero), so an orchestrator sees it
        while not service.ready.is_set():
            if service.load_error is not None:
                server.should_exit = True
                return
            time.sleep(0.1)

    threading.Thread(target=watch_load, daemon=True).start()
    # uvicorn handles SIGTERM and SIGINT itself (graceful: stop accepting, finish requests, lifespan shutdown);
    # installing handlers is what makes SIGTERM work when this process is PID 1 in a container. After its
    # shutdown uvicorn re-raises the signal to the handler that was there before: these no-ops, so a
    # graceful stop ends with exit status 0 and the log line below.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: log.info("%s: shutting down", signal.Signals(signum).name))
    server.run()
    if service.load_error is not None:
        return 1
    log.info("shut down cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
