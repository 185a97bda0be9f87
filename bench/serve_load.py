"""Load test of deploy/server.py on loopback: throughput and latency, batching on vs off, vs raw onnxruntime.

    python bench/serve_load.py [--model export/model.onnx | --tiny] [--clients 8] [--seconds 10]

Without --model (and without export/model.onnx) a tiny model is trained and exported first, as
the tests do (generated images, the real bundled backbone; ~30 s). Then, in this order, so the
measurements never share the CPU:
  1. raw onnxruntime in this process, same model, batch 1 and batch --max-batch-size: best img/s,
     measured before each served run and once after the last; each served run is compared with
     the better of the raw runs on either side of it (a CPU shared with other work only ever
     lowers a figure, so the better neighbour is the stricter bar);
  2. the server (a subprocess on 127.0.0.1, random port) with dynamic batching, driven by
     --clients threads, each a keep-alive HTTP connection sending one-image UINT8 V2 infer
     requests (binary tensor extension) back to back for --seconds;
  3. the same with batching off (each request is its own onnxruntime run).
Every answer is checked against the raw onnxruntime result for its image (a wrong answer counts
as an error). The last line printed is one JSON object; top-level values are the batching run.
The bar: throughput_ratio (server img/s / raw img/s) >= 0.7 with batching, and errors == 0.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from tasks.runtime import open_session


def build_tiny_model(work: Path) -> Path:
    """model.onnx of the tests' tiny pipeline: generated images, the real bundled backbone, every stage run."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import Workdir, make_imagefolder, tiny_params  # the tests' tiny pipeline

    from tasks import backbone as backbone_stage
    from tasks.config import parse_params
    from tasks.layout import Layout

    backbone = Layout(work / "backbone")
    backbone_stage.run(parse_params({}), backbone)
    w = Workdir(work / "work", backbone.backbone)
    params = tiny_params(make_imagefolder(work / "images"))
    w.run_all(params)
    return w.export(params).model_path


def raw_ort(model: Path, pixels: np.ndarray, max_batch: int, seconds: float) -> dict:
    session, provider = open_session(model, device="cpu")
    best = {}
    for b in sorted({1, max_batch}):
        x = np.concatenate([pixels] * (b // len(pixels) + 1))[:b]
        session.run(None, {"images": x})
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            session.run(None, {"images": x})
            n += b
        best[b] = n / (time.perf_counter() - t0)
    return {"img_s": round(max(best.values()), 1), "by_batch": {str(k): round(v, 1) for k, v in best.items()}, "provider": provider}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, batching: bool, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deploy.server", "--model-path", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--batching", "1" if batching else "0", "--max-batch-size", str(args.max_batch_size),
           "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                c.close()
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server not ready in 60 s")


def infer_body(pixels: np.ndarray) -> tuple[bytes, int]:
    head = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(pixels.shape),
                                   "parameters": {"binary_data_size": pixels.nbytes}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return head + pixels.tobytes(), len(head)


def metrics_batches(port: int) -> tuple[float, float]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    vals = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("tlcv_batch_size_")}
    return vals.get("tlcv_batch_size_count", 0.0), vals.get("tlcv_batch_size_sum", 0.0)


def load(port: int, bodies: list[tuple[bytes, int]], expected: np.ndarray, clients: int, seconds: float, warmup: float) -> dict:
    stop_at = [0.0]
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    done = [0] * clients
    start = threading.Barrier(clients + 1)
    path = "/v2/models/classifier/infer"

    def client(k: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = k
        start.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                break
            body, hl = bodies[i % len(bodies)]
            try:
                conn.request("POST", path, body=body, headers={"Inference-Header-Content-Length": str(hl),
                                                              "Content-Type": "application/octet-stream"})
                r = conn.getresponse()
                data = r.read()
                ok = r.status == 200
                if ok:
                    n = int(r.getheader("Inference-Header-Content-Length"))
                    probs = np.frombuffer(data[n:], np.float32)
                    ok = np.allclose(probs, expected[i % len(bodies)], atol=1e-5)
            except (OSError, http.client.HTTPException, ValueError, TypeError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            t1 = time.perf_counter()
            if t1 - warmup_end[0] >= 0:  # count only after the warm-up
                if ok:
                    lat[k].append(t1 - t0)
                    done[k] += 1
                else:
                    errors[k] += 1
            i += clients
        conn.close()

    warmup_end = [0.0]
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    warmup_end[0] = now + warmup
    stop_at[0] = now + warmup + seconds
    b0 = metrics_batches(port)  # before the measured window's batches (warm-up ones are close to it)
    start.wait()
    for t in threads:
        t.join(seconds + warmup + 60)
    # requests that started before stop_at may end after it: measure over the real window
    window = max(time.perf_counter(), stop_at[0]) - warmup_end[0]
    b1 = metrics_batches(port)
    all_lat = np.array([x for xs in lat for x in xs]) * 1000
    n = int(sum(done))
    return {"throughput_img_s": round(n / window, 1), "requests": n, "errors": int(sum(errors)),
            "p50_ms": round(float(np.percentile(all_lat, 50)), 2) if n else None,
            "p99_ms": round(float(np.percentile(all_lat, 99)), 2) if n else None,
            "mean_batch_size": round((b1[1] - b0[1]) / max(1.0, b1[0] - b0[0]), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default export/model.onnx, else a tiny model built here")
    ap.add_argument("--tiny", action="store_true", help="build and serve the tests' tiny model even if export/model.onnx exists")
    ap.add_argument("--clients", type=int, default=8, help="concurrent loopback clients (bounded: 1..64)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run (bounded: <= 120)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    args = ap.parse_args()
    args.clients = min(max(args.clients, 1), 64)
    args.seconds = min(max(args.seconds, 1.0), 120.0)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or (ROOT / "export" / "model.onnx")
        if args.tiny or not model.is_file():
            if args.model and not args.tiny:
                sys.exit(f"{model}: no such model")
            print("no export/model.onnx: building a tiny model (as the tests do)...", file=sys.stderr)
            model = build_tiny_model(Path(tmp))
        session, _ = open_session(model, device="cpu")
        h, w = [int(d) for d in session.get_inputs()[0].shape[1:3]]
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (16, h, w, 3), dtype=np.uint8)  # preprocessed images: what the graph takes
        expected = session.run(None, {"images": pixels})[0]
        del session
        raws = []

        def measure_raw():
            raws.append(raw_ort(model, pixels, args.max_batch_size, seconds=min(4.0, args.seconds)))
            print(f"raw onnxruntime: {raws[-1]}", file=sys.stderr)

        bodies = [infer_body(pixels[i:i + 1]) for i in range(len(pixels))]
        runs = {}
        for key, batching in (("batching", True), ("no_batching", False)):
            measure_raw()  # before each served run: the CPU may be shared with other work; the best raw figure is the bar
            port = free_port()
            proc = start_server(model, port, batching, args)
            try:
                r = load(port, bodies, expected, args.clients, args.seconds, args.warmup)
            finally:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(30)
            runs[key] = r
            print(f"{key}: {r}", file=sys.stderr)
        measure_raw()
        # each served run against the better of the raw runs just before and just after it
        for k, r in enumerate(runs.values()):
            r["raw_ort_img_s"] = round(max(raws[k]["img_s"], raws[k + 1]["img_s"]), 1)
            r["throughput_ratio"] = round(r["throughput_img_s"] / r["raw_ort_img_s"], 3)

    b = runs["batching"]
    out = {"throughput_img_s": b["throughput_img_s"], "raw_ort_img_s": b["raw_ort_img_s"],
           "throughput_ratio": b["throughput_ratio"], "p50_ms": b["p50_ms"], "p99_ms": b["p99_ms"], "errors": b["errors"],
           "passed": b["throughput_ratio"] >= 0.7 and b["errors"] == 0,
           "batching": runs["batching"], "no_batching": runs["no_batching"],
           "raw_ort": {"runs": raws},
           "config": {"model": "tiny (built here)" if args.tiny or not args.model and not (ROOT / "export" / "model.onnx").is_file() else str(model), "clients": args.clients,
                      "seconds": args.seconds, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                      "cpus": os.cpu_count(), "request": "1 image, UINT8 binary V2 infer"}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
