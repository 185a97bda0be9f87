"""Serve export/model.onnx over HTTP: the Open Inference Protocol (KServe V2, as Triton does it) and /v1/predict.

    python -m deploy.server --model export/model.onnx --host 127.0.0.1 --port 8000

Every flag has an environment variable (flags win): MODEL_PATH, MODEL_NAME, HOST, PORT, DEVICE
(auto|cpu|cuda), THREADS, MAX_BATCH_SIZE, MAX_WAIT_MS, BATCHING (1|0), MAX_BODY_BYTES,
MAX_IMAGE_PIXELS, MAX_BUFFERED_BYTES, MAX_DECODE_PIXELS, QUEUE_TIMEOUT_S, READ_TIMEOUT_S,
KEEP_ALIVE_S, MAX_CONNECTIONS, ORT_SPINNING (1|0), LOG_LEVEL, STARTUP_DELAY_S (deploy/settings.py).

Endpoints
  GET  /v2                              server metadata
  GET  /v2/health/live                  200 while the process runs (HEAD too, as for every GET)
  GET  /v2/health/ready                 200 once the model is loaded and warmed up, else 503
  GET  /v2/models/{name}[/versions/1]   model metadata (inputs/outputs: name, datatype, shape; labels)
  GET  /v2/models/{name}[/versions/1]/ready
  POST /v2/models/{name}[/versions/1]/infer
        input "images": UINT8 [N, H, W, 3] pixels already resized and cropped (tasks.preprocess.load_image),
                        or BYTES [N] (or [N, 1]): encoded JPEG/PNG/... files, preprocessed here by the
                        same load_image that training used. In JSON, BYTES elements are base64 strings.
        JSON `data` flat or nested; or the binary tensor extension (Inference-Header-Content-Length)
        for inputs, and for outputs when asked (`binary_data` per output, `binary_data_output` per request).
  POST /v1/predict                       multipart image file(s) (any field name); the answer follows the model's
                                         metadata `task` (tasks/<task>/serve.py), per image with filename, width,
                                         height (the original's, after EXIF orientation):
        classification  ?top_k=5          -> top-k labels (+ ood_score, in_distribution with an OOD score), JSON
        multilabel      ?top_k=5 ?threshold=0..1 -> the tags predicted + the top-k tags (+ OOD as above), JSON
        detection       ?threshold=0..1   -> its boxes in the original image's pixels, JSON
        segmentation                      -> a mask PNG at the original size + class fractions, JSON
        detection, segmentation ?format=overlay (one image) -> that image with its boxes / mask drawn, image/png
        An option the model's task does not take -> 400 naming those it does.
  GET  /metrics                          Prometheus text format

Where things are: deploy/codec.py (the protocol on the wire), deploy/batcher.py (dynamic batching),
deploy/images.py (decoding within the pixel budget), deploy/limits.py (timeouts, connection cap, body
budget, log flood filter), deploy/predict.py (finds the task's tasks/<task>/serve.py, parses the query),
deploy/model.py (the model), deploy/app.py (routes), deploy/settings.py; this module starts uvicorn.

Bad input is a 4xx with {"error": "..."}: body over MAX_BODY_BYTES or image over MAX_IMAGE_PIXELS -> 413,
undecodable image / wrong name, shape, datatype / too many images -> 400, request not received within
READ_TIMEOUT_S -> 408, unknown model or version -> 404; model not loaded yet, or busy past QUEUE_TIMEOUT_S ->
503 (busy: with Retry-After).

A model whose metadata has no `task` is refused at startup (one log line: re-export it with the current tlcv).

No torch here: deploy/, tasks/preprocess.py, tasks/runtime.py, tasks/contract.py and each task's
tasks/<task>/serve.py (with the packages' __init__.py) are all the serving image holds.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # `python deploy/server.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.app import Model, Service, create_app  # noqa: F401 - the public names, as before the split
from deploy.errors import ServeError  # noqa: F401
from deploy.images import return_big_frees_to_the_os
from deploy.limits import connection_limits, connection_protocol, install_flood_filter
from deploy.settings import Settings

log = logging.getLogger("tlcv.serve")


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    settings = Settings.from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_flood_filter()
    return_big_frees_to_the_os()
    if not Path(settings.model_path).is_file():
        log.error("model file %s does not exist (MODEL_PATH / --model-path)", settings.model_path)
        return 2
    app, service = create_app(settings)
    max_connections, backlog = connection_limits(settings.max_connections)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), access_log=False,
        lifespan="on", timeout_graceful_shutdown=10, ws="none", backlog=backlog,
        http=connection_protocol(settings.read_timeout_s, max_connections, service.metrics),
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type] - uvicorn takes a float here too
    )
    server = uvicorn.Server(config)
    log.info("limits: %d connections, read timeout %g s, keep-alive %g s, bodies %d bytes (%d at once), "
             "images %d pixels (%d decoding at once), queue timeout %g s", max_connections, settings.read_timeout_s,
             settings.keep_alive_s, settings.max_body_bytes, settings.max_buffered_bytes, settings.max_image_pixels,
             settings.max_decode_pixels, settings.queue_timeout_s)

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
