"""Peak memory of deploy/server.py under concurrent requests of very large images: does the limit hold?

    python bench/serve_memory.py [--model export/model.onnx] [--requests 6] [--images 4] [--size 6324]
                                 [--server-arg=--max-decode-pixels=1000000000 ...]

Starts the server as a subprocess on 127.0.0.1 (default settings unless --server-arg), then sends
--requests concurrent requests of --images PNG files each, --size x --size pixels (40 M at the default,
just inside MAX_IMAGE_PIXELS), alternating /v1/predict (multipart) and V2 infer (BYTES, binary extension).
The PNGs are smooth gradients with a few shapes: they compress well, so 4 fit in the default
MAX_BODY_BYTES (32 MiB) while each decodes to 40 M pixels. A client answered 503/429 with Retry-After
waits and retries (counted); any other 5xx is an error. Every answer is checked against onnxruntime in
this process on the same images (tasks.preprocess.load_image).

The server's resident memory is sampled every 10 ms; its kernel high-water mark (VmHWM, which no
sampling can miss) is the peak. Without --model, a tiny model is trained and exported first, as the
tests do (the real backbone, so the same memory as a real model; ~10 s). The last line printed is one
JSON object. The bar (deploy/k8s.yaml allows 2 GiB): peak_rss_mib <= 1536 and errors_5xx == 0, with
every image answered 200.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np
from PIL import Image, ImageDraw
from serve_load import build_tiny_model, free_port

from tasks.preprocess import PreprocessingCard, load_image
from tasks.runtime import open_session

BAR_MIB = 1536


def big_png(size: int, seed: int) -> bytes:
    """A size x size RGB PNG: gradients plus a few filled shapes (structure), a few MB at 40 M pixels."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    img = np.empty((size, size, 3), np.uint8)
    img[..., 0] = ramp[None, :].astype(np.uint8)
    img[..., 1] = ramp[:, None].astype(np.uint8)
    img[..., 2] = (rng.integers(0, 128) + ramp[None, ::-1] // 2).astype(np.uint8)
    pil = Image.fromarray(img)
    del img
    d = ImageDraw.Draw(pil)
    for _ in range(12):
        x, y = (int(v) for v in rng.integers(0, size - size // 5, 2))
        r = int(rng.integers(size // 40, size // 5))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x, y, x + r, y + r), fill=color)
    buf = io.BytesIO()
    pil.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def reference(model: Path, pngs: list[bytes]) -> tuple[np.ndarray, PreprocessingCard]:
    session, _ = open_session(model, device="cpu")
    meta = session.get_modelmeta().custom_metadata_map
    card_d = json.loads(meta["preprocessing"])
    card = PreprocessingCard.from_dict({k: v for k, v in card_d.items() if k in PreprocessingCard.__dataclass_fields__})
    pixels = np.stack([load_image(b, card) for b in pngs])
    return session.run(None, {"images": pixels})[0], card


def v1_request(pngs: list[bytes]) -> tuple[str, bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for i, b in enumerate(pngs):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big{i}.png"\r\n'
                     "Content-Type: image/png\r\n\r\n".encode() + b + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return "/v1/predict?top_k=1000", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def v2_request(pngs: list[bytes]) -> tuple[str, bytes, dict]:
    raw = b"".join(len(b).to_bytes(4, "little") + b for b in pngs)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(pngs)],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "probabilities"}]}).encode()
    return "/v2/models/classifier/infer", head + raw, {"Inference-Header-Content-Length": str(len(head)),
                                                       "Content-Type": "application/octet-stream"}


def probabilities(path: str, body: bytes, n_classes: int) -> np.ndarray:
    out = json.loads(body)
    if path.startswith("/v1"):
        rows = []
        for p in out["predictions"]:
            row = np.zeros(n_classes, np.float32)
            for t in p["top_k"]:
                row[t["index"]] = t["probability"]
            rows.append(row)
        return np.stack(rows)
    o = {x["name"]: x for x in out["outputs"]}["probabilities"]
    return np.asarray(o["data"], np.float32).reshape(o["shape"])


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.01):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak_kib, self.stopped = pid, every_s, 0, threading.Event()

    def status(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
        return 0

    def run(self):
        while not self.stopped.is_set():
            try:
                self.peak_kib = max(self.peak_kib, self.status("VmRSS"))
            except (OSError, ValueError):
                return
            time.sleep(self.every_s)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready in {timeout} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model.onnx (default: export/model.onnx if present, else a tiny one)")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=6324)
    ap.add_argument("--threads", type=int, default=2, help="server THREADS")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server flag, e.g. --server-arg=--max-decode-pixels=1000000000")
    ap.add_argument("--deadline-s", type=float, default=300, help="give up on a request after this long (retries included)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tlcv-serve-memory-"))
    if args.model is not None and not args.model.is_file():
        sys.exit(f"serve_memory: {args.model} not found")
    model = args.model or (ROOT / "export" / "model.onnx")
    if not model.is_file():
        print("building a tiny model (tests' pipeline) ...", flush=True)
        model = build_tiny_model(tmp)
    t0 = time.perf_counter()
    pngs = [big_png(args.size, seed) for seed in range(args.images)]
    print(f"{args.images} PNGs of {args.size}x{args.size}: {[len(b) // 1024 for b in pngs]} KiB, "
          f"{time.perf_counter() - t0:.1f} s to make", flush=True)
    ref, _ = reference(model, pngs)

    port = free_port()
    extra = list(args.server_arg)
    cmd = [sys.executable, "-m", "deploy.server", "--model-path", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--threads", str(args.threads), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    statuses: Counter = Counter()
    errors_5xx = retries = wrong = 0
    answered: list[float] = []
    lock = threading.Lock()
    try:
        wait_ready(proc, port)
        sampler = RssSampler(proc.pid)
        baseline_mib = sampler.status("VmRSS") / 1024
        hwm_before_mib = sampler.status("VmHWM") / 1024
        sampler.start()
        requests = [(v1_request if i % 2 == 0 else v2_request)(pngs) for i in range(args.requests)]
        barrier = threading.Barrier(args.requests)

        def client(i: int):
            nonlocal errors_5xx, retries, wrong
            path, body, headers = requests[i]
            barrier.wait()
            start = time.monotonic()
            while time.monotonic() - start < args.deadline_s:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.deadline_s)
                try:
                    conn.request("POST", path, body=body, headers=headers)
                    r = conn.getresponse()
                    data, retry_after = r.read(), r.getheader("Retry-After")
                except OSError as e:
                    with lock:
                        statuses[type(e).__name__] += 1
                    return
                finally:
                    conn.close()
                with lock:
                    statuses[str(r.status)] += 1
                    if r.status >= 500 and not (r.status == 503 and retry_after):
                        errors_5xx += 1
                if r.status in (429, 503) and retry_after:
                    with lock:
                        retries += 1
                    time.sleep(float(retry_after))
                    continue
                if r.status == 200:
                    got = probabilities(path, data, ref.shape[1])
                    with lock:
                        answered.append(time.monotonic() - start)
                        if not np.allclose(got, ref, atol=1e-4):
                            wrong += 1
                else:
                    print(f"request {i}: {r.status} {data[:300]!r}", flush=True)
                return

        t_start = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - t_start
        time.sleep(0.2)
        sampler.stopped.set()
        sampler.join()
        hwm_mib = sampler.status("VmHWM") / 1024
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)

    body_mib = [round(len(b) / 2**20, 1) for _, b, _ in requests]
    result = {
        "peak_rss_mib": round(hwm_mib, 1),
        "peak_rss_sampled_mib": round(sampler.peak_kib / 1024, 1),
        "rss_ready_mib": round(baseline_mib, 1),
        "peak_before_requests_mib": round(hwm_before_mib, 1),
        "requests": args.requests,
        "images_per_request": args.images,
        "image": f"{args.size}x{args.size} PNG",
        "body_mib": max(body_mib),
        "status_counts": dict(statuses),
        "errors_5xx": errors_5xx,
        "retries": retries,
        "answered_200": len(answered),
        "wrong_answers": wrong,
        "seconds": round(seconds, 1),
        "slowest_request_s": round(max(answered), 1) if answered else None,
        "server_args": extra,
        "bar_mib": BAR_MIB,
    }
    result["pass"] = (result["peak_rss_mib"] <= BAR_MIB and errors_5xx == 0 and wrong == 0
                      and len(answered) == args.requests)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
