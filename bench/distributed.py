"""The feature pass in-process against the same pass on a Dask LocalCluster (127.0.0.1), side by side in one run.

    python bench/distributed.py                 # 2000 generated JPEGs of 500x375, 10 classes
    python bench/distributed.py --images 4000

Arms, each the features stage's work over every image (data prepared once, the backbone built once):
- inprocess_2t: the stage's local path (decode threads + onnxruntime on all cores);
- inprocess_1t: one thread: decode then onnxruntime with 1 intra-op thread, serially, in the same runs of
  tasks/pooled.py CPU_RUN images (what one 1x1 worker does);
- cluster_1x1, cluster_2x1: `features.executor: dask` on a LocalCluster of 1 / 2 single-threaded workers, started
  before the arm, each worker's onnxruntime session opened (start-up, timed apart: the rates are the steady
  state), driven by the stage itself (its domain-gap subsample runs on the driver, as in the in-process arm).
Then a 2x1 run with one worker SIGKILLed mid-shard (`kill_recovered`: every shard once, arrays identical).
The last line is one JSON object: images/s per arm, `cluster_over_local` (2x1 / in-process 2 threads; bar 0.85),
`scaling_2_over_1` (2x1 / 1x1; bar 1.6), `identical` (every arm's arrays equal to the local path's),
`per_shard_overhead_ms` ((1x1 - in-process 1 thread) / shards), `startup_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the `distributed` package: take its own folder off the path before importing it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


def make_images(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n):
        c = i % classes
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = (np.sin(xx / (12 + 3 * c)) * 60 + np.cos(yy / (9 + 2 * c)) * 60 + 128).astype(np.float32)
        rgb = np.stack([base, np.roll(base, 40 * c, axis=1), 255 - base], -1) + rng.normal(0, 12, (375, 500, 3))
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.integers(0, 420), rng.integers(0, 300)
            draw.ellipse([x, y, x + 40 + 8 * c, y + 40 + 5 * c], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img.save(d / f"{i:05d}.jpg", quality=90)


def arm_layout(work: Path, name: str, prepared: Path, backbone: Path):
    from tasks.layout import Layout

    layout = Layout(work / name)
    for src, dst in ((prepared, layout.prepared), (backbone, layout.backbone)):
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(src.resolve(), target_is_directory=True)
    return layout


def with_executor(params, executor: str, address: str | None = None, shard_size: int = 100):
    f = params.features.model_copy(update={"executor": executor, "shard_size": shard_size,
                                           "dask": params.features.dask.model_copy(update={"address": address})})
    return params.model_copy(update={"features": f})


def inprocess_one_thread(layout) -> dict[str, np.ndarray]:
    from tasks.pooled import CPU_RUN
    from tasks.preprocess import load_image
    from tasks.runtime import open_session

    dataset, card = layout.dataset(), layout.card()
    session, _ = open_session(layout.features_onnx, device="cpu", threads=1, spinning=False)
    out = {}
    bs = CPU_RUN  # the runs a worker and the local pass use
    for split in ("train", "val", "test"):
        items = dataset.split(split)
        parts = []
        for s in range(0, len(items), bs):
            batch = np.stack([load_image(dataset.resolve(it), card) for it in items[s : s + bs]])
            parts.append(session.run(["features"], {"images": batch})[0])
        out[f"x_{split}"] = np.concatenate(parts)
    return out


def open_worker_session(onnx_path: str) -> None:
    """On a worker: open its cached onnxruntime session (1 thread, as run_shard will ask for)."""
    from tasks.distributed import _session

    _session(onnx_path, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=100)
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from tasks import backbone, data, features
    from tasks.config import parse_params
    from tasks.distributed import attempts
    from tasks.layout import Layout

    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        make_images(work / "images", args.images)
        gen_s = time.perf_counter() - t0
        params = parse_params({"data": {"dataset": "imagefolder", "root": str(work / "images")}})
        base = Layout(work / "base")
        data.run(params, base)
        backbone.run(params, base)
        n = sum(1 for _ in base.dataset().items)
        result: dict = {"images": n, "image_size": [500, 375], "shard_size": args.shard_size, "cores": os.cpu_count(),
                        "generate_s": round(gen_s, 1)}
        rates, arrays = {}, {}

        layout = arm_layout(work, "local", base.prepared, base.backbone)
        t = time.perf_counter()
        features.run(with_executor(params, "local"), layout, force=True)
        rates["inprocess_2t"] = n / (time.perf_counter() - t)
        arrays["inprocess_2t"] = layout.feature_cache().load()
        print(f"in-process 2 threads: {rates['inprocess_2t']:.1f} img/s", file=sys.stderr, flush=True)

        t = time.perf_counter()
        one = inprocess_one_thread(base)
        rates["inprocess_1t"] = n / (time.perf_counter() - t)
        print(f"in-process 1 thread: {rates['inprocess_1t']:.1f} img/s", file=sys.stderr, flush=True)

        startup, shards = {}, {}
        for workers in (1, 2):
            t = time.perf_counter()
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None) as cluster, Client(cluster) as client:
                client.wait_for_workers(workers, timeout=60)
                # each worker opens its one onnxruntime session once (tasks/distributed.py's per-process cache):
                # a start-up cost, opened here so the arm's rate is the steady state
                client.run(open_worker_session, str(base.features_onnx.resolve()))
                startup[workers] = time.perf_counter() - t
                name = f"cluster_{workers}x1"
                layout = arm_layout(work, name, base.prepared, base.backbone)
                t = time.perf_counter()
                features.run(with_executor(params, "dask", cluster.scheduler_address, args.shard_size), layout, force=True)
                rates[name] = n / (time.perf_counter() - t)
                arrays[name] = layout.feature_cache().load()
                shards[workers] = json.loads((layout.features / "key.json").read_text())["dask"]["shards"]
                print(f"{name}: {rates[name]:.1f} img/s (start-up {startup[workers]:.1f} s)", file=sys.stderr, flush=True)
                if workers == 2:  # the worker-kill run, on the same cluster
                    layout = arm_layout(work, "killed", base.prepared, base.backbone)
                    seen: dict = {}

                    def progress(done, total, layout=layout, seen=seen):
                        d = next(iter((layout.features.parent / ".features-shards").glob("*")), None)
                        if d is None or not (d / "journal.jsonl").exists():
                            return
                        finished = {json.loads(x)["name"] for x in (d / "journal.jsonl").read_text().splitlines()}
                        seen["attempts"] = attempts(d)
                        if "victim" not in seen and len(finished) >= 3:
                            running = [(s, pid) for s, pid in seen["attempts"] if s not in finished]
                            if running:
                                seen["victim"], seen["shard"] = running[-1][1], running[-1][0]
                                os.kill(running[-1][1], signal.SIGKILL)

                    features.run(with_executor(params, "dask", cluster.scheduler_address, args.shard_size), layout,
                                 progress=progress, force=True)
                    got = layout.feature_cache().load()
                    info = json.loads((layout.features / "key.json").read_text())["dask"]
                    reruns = [pid for s, pid in seen.get("attempts", []) if s == seen.get("shard")]
                    result["kill"] = {"killed_pid": seen.get("victim"), "shard": seen.get("shard"),
                                      "attempts_of_that_shard": len(reruns), "shards": info["shards"],
                                      "computed": info["computed"]}
                    result["kill_recovered"] = bool(seen.get("victim")) and len(reruns) >= 2 and all(
                        np.array_equal(got[k], arrays["inprocess_2t"][k]) for k in ("x_train", "x_val", "x_test"))

        ref = arrays["inprocess_2t"]
        keys = ("x_train", "x_val", "x_test")
        result["identical"] = {name: all(np.array_equal(a[k], ref[k]) for k in keys) for name, a in arrays.items()}
        result["identical_1t"] = all(np.array_equal(one[k], ref[k]) for k in keys)
        result["max_abs_diff"] = {name: float(max(np.abs(a[k] - ref[k]).max() for k in keys)) for name, a in arrays.items()}
        result["images_per_s"] = {k: round(v, 1) for k, v in rates.items()}
        result["startup_s"] = {f"{k}x1": round(v, 2) for k, v in startup.items()}
        result["shards"] = shards[1]
        result["per_shard_overhead_ms"] = round(1000 * (n / rates["cluster_1x1"] - n / rates["inprocess_1t"]) / shards[1], 1)
        result["cluster_over_local"] = round(rates["cluster_2x1"] / rates["inprocess_2t"], 3)
        result["scaling_2_over_1"] = round(rates["cluster_2x1"] / rates["cluster_1x1"], 3)
        result["bar_cluster_over_local"] = result["cluster_over_local"] >= 0.85
        result["bar_scaling"] = result["scaling_2_over_1"] >= 1.6
        result["identical"] = all(result["identical"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
