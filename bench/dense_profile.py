"""Where the dense feature pass (detection, segmentation) spends its time, beside the network-only limit, in one run.

    python bench/dense_profile.py ../shared/datasets/bccd                     # detection (VOC)
    python bench/dense_profile.py ../shared/datasets/camvid --task segmentation

Runs prepare + backbone, then the features stage itself (`stage_passes_per_s`: network passes, flipped train
included, over the stage's wall time), then on the same images and the same ONNX graph, one at a time:
- decode_ms / resize_ms: per image on one thread (decode with JPEG draft scaling, then the resize to the input);
- decoded_batches: the stage's decode pipeline alone (`features.decode_workers` threads), images/s;
- network_only: onnxruntime on one pre-decoded batch run over and over (passes/s) -- the limit;
- write_ms: fp32 -> fp16 and the copy into a memmap, per pass.
The last line is one JSON object; bar (issue 20): stage within 1.5x of the network-only rate
(`network_over_stage` <= 1.5), or the profile that says why not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASETS = {"detection": "voc", "segmentation": "masks"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--task", choices=sorted(DATASETS), default="detection")
    ap.add_argument("--repeats", type=int, default=6, help="network-only batches timed")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} is not a directory (the shared datasets live in ../shared/datasets)")

    from tasks import backbone, data, features
    from tasks.config import parse_params
    from tasks.dense import MAP_NAMES
    from tasks.layout import Layout
    from tasks.preprocess import decode_rgb, decoded_batches, load_image
    from tasks.runtime import open_session

    params = parse_params({"task": args.task, "data": {"dataset": DATASETS[args.task], "root": str(args.data)}})
    with tempfile.TemporaryDirectory(prefix="bench-dense-") as tmp:
        layout = Layout(Path(tmp))
        data.run(params, layout)
        backbone.run(params, layout)
        t0 = time.perf_counter()
        f = features.run(params, layout, force=True)
        stage_s = time.perf_counter() - t0
        dataset, card = layout.dataset(), layout.card()
        paths = [dataset.resolve(it) for split in f.counts for it in dataset.split(split)]
        flip = bool(params.head.features.flip_train)
        passes = len(paths) + (f.counts.get("train", 0) if flip else 0)

        sample = paths[: min(len(paths), 64)]
        side = min(card.input_size)
        t_dec = t_res = 0.0
        for p in sample:
            a = time.perf_counter()
            img = decode_rgb(p, side)
            b = time.perf_counter()
            load_image(img, card)
            t_res += time.perf_counter() - b
            t_dec += b - a
        bs, workers = params.features.batch_size, params.features.decode_workers
        a = time.perf_counter()
        batches = list(decoded_batches(sample, card, bs, workers))
        pipeline_img_s = len(sample) / (time.perf_counter() - a)

        session, _ = open_session(layout.features_onnx, device="cpu")
        batch = batches[0]
        outs = session.run(list(MAP_NAMES), {"images": batch})  # warm-up
        a = time.perf_counter()
        for _ in range(args.repeats):
            outs = session.run(list(MAP_NAMES), {"images": batch})
        network_passes_s = args.repeats * len(batch) / (time.perf_counter() - a)

        sinks = [np.lib.format.open_memmap(Path(tmp) / f"w{i}.npy", mode="w+", dtype=np.float16, shape=o.shape)
                 for i, o in enumerate(outs)]
        a = time.perf_counter()
        for _ in range(args.repeats):
            for sink, o in zip(sinks, outs):
                sink[:] = o
        write_ms = 1000 * (time.perf_counter() - a) / (args.repeats * len(batch))
        map_mb = sum(o[0].size for o in outs) * 2 / 1e6

    stage_passes_s = passes / stage_s
    per_pass_ms = {"stage": round(1000 / stage_passes_s, 1), "network": round(1000 / network_passes_s, 1),
                   "decode": round(1000 * t_dec / len(sample), 1), "resize": round(1000 * t_res / len(sample), 1),
                   "write": round(write_ms, 2)}
    out = {
        "task": args.task, "images": len(paths), "passes": passes, "flip_train": flip,
        "input_size": list(card.input_size), "batch_size": bs, "decode_workers": workers,
        "stage_s": round(stage_s, 2), "stage_passes_per_s": round(stage_passes_s, 1),
        "network_only_passes_per_s": round(network_passes_s, 1),
        "decode_pipeline_images_per_s": round(pipeline_img_s, 1),
        "per_pass_ms": per_pass_ms, "map_mb_per_pass_fp16": round(map_mb, 2),
        "network_over_stage": round(network_passes_s / stage_passes_s, 3),
        # what one pass would cost if nothing overlapped: network + decode/resize of an image (flipped passes reuse it)
        # + the write; against the stage's own per-pass time
        "serial_estimate_ms": round(per_pass_ms["network"] + (per_pass_ms["decode"] + per_pass_ms["resize"])
                                    * len(paths) / passes + per_pass_ms["write"], 1),
    }
    out["bar_within_1_5x"] = out["network_over_stage"] <= 1.5
    print(json.dumps(out))


if __name__ == "__main__":
    main()
