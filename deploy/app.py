"""The served model and the HTTP routes: what deploy/server.py runs under uvicorn.

The wire format is deploy/codec.py's, batching deploy/batcher.py's, decoding deploy/images.py's and the
limits deploy/limits.py's; this module wires them to one model.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.batcher import Batcher
from deploy.budget import Budget
from deploy.codec import (
    HEADER_LEN,
    InputSpec,
    binary_chunks,
    decode_input,
    decompress,
    encode_infer_response,
    parse_infer_body,
    requested_outputs,
)
from deploy.model import Model
from deploy.errors import ServeError, bad
from deploy.images import budgeted, decode_full, decode_images, decode_images_sized
from deploy.limits import LimitsAndMetrics
from deploy.metrics import Metrics
from deploy.predict import parse_query
from deploy.settings import Settings
from tasks import contract

log = logging.getLogger("tlcv.serve")


class Service:
    """The model once it is loaded, its batcher, the metrics and the memory budgets every request shares."""

    def __init__(self, settings: Settings):
        s = self.settings = settings
        self.metrics = Metrics()
        self.model: Model | None = None
        self.batcher: Batcher | None = None
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.body_budget = Budget("request bodies", s.max_buffered_bytes, "bytes", "MAX_BUFFERED_BYTES")
        self.decode_budget = Budget("image decoding", s.max_decode_pixels, "pixels", "MAX_DECODE_PIXELS")

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
            self.batcher = Batcher(model.run, s.max_batch_size, s.max_wait_ms, s.batching, self.metrics.observe_batch)
            log.info("%s model %s loaded from %s in %.2fs on %s; labels %s; input %s %s; batching %s (max %d, wait %.1f ms)",
                     model.task, s.model_name, s.model_path, time.perf_counter() - t0, model.provider, model.labels,
                     model.input_name, model.input_shape, "on" if s.batching else "off", s.max_batch_size, s.max_wait_ms)
            self.ready.set()
            self.metrics.ready.set(1)
        except contract.ModelError as e:  # a model file that says what it is wrongly: one line naming the fix
            self.load_error = e
            log.error("cannot serve model %s: %s", s.model_path, e)
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

    def input_spec(self, m: Model) -> InputSpec:
        return InputSpec(m.input_name, m.input_shape[1], m.input_shape[2], self.settings.max_batch_size)

    def model_metadata(self, m: Model) -> dict:
        return {"name": m.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": m.input_name, "datatype": "UINT8", "shape": m.input_shape}],
                "outputs": m.outputs,
                "parameters": {**m.serving.parameters(),
                               "labels": m.labels, "provider": m.provider, "preprocessing": m.card.preprocessing_dict(),
                               "max_batch_size": self.settings.max_batch_size,
                               "accepts": [f"{m.input_name}: UINT8 {m.input_shape}",
                                           f"{m.input_name}: BYTES [-1] encoded images"]}}

    async def decode(self, m: Model, items: list[tuple[str, bytes]]) -> np.ndarray:
        s = self.settings
        return await decode_images(items, m.card, s.max_image_pixels, self.decode_budget, s.queue_timeout_s)

    async def decode_sized(self, m: Model, items: list[tuple[str, bytes]]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        s = self.settings
        return await decode_images_sized(items, m.card, s.max_image_pixels, self.decode_budget, s.queue_timeout_s)

    async def full_size(self, size: tuple[int, int], per_pixel: float, fn, *args):
        """fn(*args) in a thread that works on an original-size image: it holds `per_pixel` x its pixels from
        the decode budget (1 = what decoding it takes)."""
        return await budgeted(self.decode_budget, math.ceil(size[0] * size[1] * per_pixel),
                              self.settings.queue_timeout_s, fn, *args)


def create_app(settings: Settings):
    """(ASGI app wrapped in LimitsAndMetrics, Service)."""
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
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers())

    @app.exception_handler(contract.QueryError)
    async def _query_error(request: Request, e: contract.QueryError):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return JSONResponse({"error": f"invalid request: {msgs}"}, status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # a bug, not bad input: say so, keep serving
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    get = ["GET", "HEAD"]  # HEAD answers as GET does, without the body (probes and load balancers use it)

    # -- health and metadata
    @app.api_route("/v2/health/live", methods=get)
    async def live():
        return JSONResponse({"live": True})

    @app.api_route("/v2/health/ready", methods=get)
    async def ready():
        ok = service.ready.is_set()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.api_route("/v2", methods=get)
    async def server_metadata():
        return {"name": "tlcv", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @app.api_route("/v2/models/{name}", methods=get)
    @app.api_route("/v2/models/{name}/versions/{version}", methods=get)
    async def model_metadata(name: str, version: str | None = None):
        return service.model_metadata(service.check_model(name, version))

    @app.api_route("/v2/models/{name}/ready", methods=get)
    @app.api_route("/v2/models/{name}/versions/{version}/ready", methods=get)
    async def model_ready(name: str, version: str | None = None):
        service.check_model(name, version)
        return JSONResponse({"name": name, "ready": True})

    # -- inference
    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None):
        m = service.check_model(name, version)
        body = decompress(await request.body(), request.headers.get("content-encoding", ""), settings.max_body_bytes)
        req, tail = parse_infer_body(body, request.headers.get(HEADER_LEN))
        chunks = binary_chunks(req, tail)
        if len(req["inputs"]) != 1:
            raise bad(f"expected exactly one input named '{m.input_name}', got {len(req['inputs'])}")
        requested_outputs(req, [o["name"] for o in m.outputs])  # a bad output request fails before any work
        pixels = decode_input(req["inputs"][0], chunks[0], service.input_spec(m))
        if isinstance(pixels, list):  # BYTES: encoded images
            pixels = await service.decode(m, [(f"input '{m.input_name}' element {i}", b) for i, b in enumerate(pixels)])
        out = await service.batcher.infer(pixels)
        content, headers = encode_infer_response(m.name, req, out)
        return Response(content=content, headers=headers, media_type=None)

    @app.post("/v1/predict")
    async def predict(request: Request):
        m = service.check_model(settings.model_name, None)
        serving = m.serving
        fmt, query = parse_query(m.task, serving, request.query_params.multi_items())  # bad ones fail before any work
        blobs = await read_files(request)
        if fmt == "overlay" and len(blobs) != 1:
            raise bad(f"format=overlay answers one image (a PNG) per request, got {len(blobs)} images: "
                      "send them one at a time, or use format=json")
        items = [(f"file '{fn}'", b) for fn, b in blobs]
        pixels, sizes = await service.decode_sized(m, items)
        out = await service.batcher.infer(pixels)
        del pixels
        rows = [{k: v[j] for k, v in out.items()} for j in range(len(blobs))]  # each image's outputs
        if fmt == "overlay":  # the one image decoded again at full size and drawn on: ~2 decodes' worth of memory
            def draw():
                return serving.overlay(decode_full(blobs[0][1], items[0][0]), rows[0], sizes[0], query)

            return Response(content=await service.full_size(sizes[0], 2, draw), media_type="image/png")
        results = []
        for (fn, _), size, row in zip(blobs, sizes, rows):
            if serving.answer_pixels:  # works on full-size pixels (a mask at the original size): in a thread, budgeted
                answer = await service.full_size(size, serving.answer_pixels, serving.answer, row, size, query)
            else:
                answer = serving.answer(row, size, query)
            results.append({"filename": fn, "width": size[0], "height": size[1], **answer})
        return {"model_name": m.name, "task": m.task, "predictions": results}

    async def read_files(request: Request) -> list[tuple[str, bytes]]:
        """[(filename, bytes)] of the multipart body's file fields, at least one, at most MAX_BATCH_SIZE."""
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
            return [(v.filename or k, await v.read()) for k, v in files]
        finally:
            await form.close()

    @app.api_route("/metrics", methods=get)
    async def metrics():
        for label, b in (("body_bytes", service.body_budget), ("decode_pixels", service.decode_budget)):
            service.metrics.budget_used.labels(label).set(b.used)
            service.metrics.budget_peak.labels(label).set(b.peak)
            service.metrics.budget_waiting.labels(label).set(b.waiting)
        data, ctype = service.metrics.render()
        return Response(content=data, media_type=ctype)

    return LimitsAndMetrics(app, service), service
