"""The exported model in onnxruntime vs the same classifier in eager PyTorch: same machine, run, input.

    python bench/inference.py [DATA] [--no-int8] [--rounds 10] [--window 1.0]

DATA is an image folder (default ../shared/datasets/hymenoptera; without it, the offline
digits demo). The pipeline (prepare -> ... -> export, INT8 included) runs first in a
temporary folder. Then each runtime loads in its own process and all classify the same
preprocessed images in short alternating windows (batch 1 and 32), so all sample the same
drift of the machine's speed; img/s is total images over total time per side. The last line
is one JSON object.

Runtimes: `ort` (export/model.onnx), `torch` (the same classifier, eager, fed the same uint8
NHWC batch: the headline ratios `ort_over_torch_*`) and `torch_nchw` (the same network fed an
NCHW-contiguous normalised float batch, as the reference example feeds it: `ort_over_torch_nchw_*`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tasks.layout import Layout  # noqa: E402

RUNTIMES = ("torch", "ort", "torch_nchw")
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def build(data_root: Path | None, work: Path, int8: bool):
    from tasks import backbone, evaluate, export, features, train
    from tasks import data as prepare
    from tasks.config import parse_params
    from tasks.layout import Layout

    raw = {"data": {"dataset": "imagefolder", "root": str(data_root)} if data_root else {"dataset": "digits"},
           "export": {"quantize": "int8" if int8 else "none"}}
    params = parse_params(raw)
    layout = Layout(work)
    for stage in (prepare, backbone, features, train, evaluate):
        stage.run(params, layout)
    return params, layout, export.run(params, layout)


def torch_runner(model, runtime: str):
    """The classifier in eager PyTorch: `torch` feeds it the uint8 NHWC batch, `torch_nchw` feeds its network
    an NCHW-contiguous float batch normalised before the model, as the reference example does (ToTensor +
    Normalize). Same weights, same outputs; only the memory layout differs (the classifier's NHWC input makes
    torch run channels_last)."""
    if runtime == "torch":

        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).softmax(-1)
    else:
        mean, std, net, head = model.features.mean, model.features.std, model.features.network, model.head

        def run(x):
            with torch.inference_mode():
                f = (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().float() - mean) / std
                return head(net(f)).softmax(-1)

    return run


def load_classifier(layout: Layout):
    """The trained classifier (backbone + head) from models/model.pt."""
    from tasks.checkpoint import load_model
    from tasks.head import load_classifier as classifier_of

    return classifier_of(load_model(layout, "classification"))


def load_runner(runtime: str, work: Path):
    if runtime == "ort":
        from tasks.runtime import open_session

        session, _ = open_session(Layout(work).model_onnx, device="cpu")
        return lambda x: session.run(["probabilities"], {"images": x})
    return torch_runner(load_classifier(Layout(work)), runtime)


def worker(runtime: str, work: Path) -> None:
    """A measuring process: loads one runtime, then times windows on command ("<batch> <seconds>" per line).

    One process per runtime, so neither's thread pool (torch's OpenMP spin-wait, onnxruntime's
    spinning workers) slows the other; the parent alternates short windows between the two, so
    both sample the same drift of this machine's speed.
    """
    pixels = np.load(work / "pixels.npy")
    run = load_runner(runtime, work)
    for b in (1, len(pixels)):
        for _ in range(3):
            run(pixels[:b])  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        batch, seconds = int(line.split()[0]), float(line.split()[1])
        x = pixels[:batch]
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run(x)
            n += batch
        print(json.dumps({"images": n, "seconds": time.perf_counter() - t0}), flush=True)


def paired_windows(work: Path, rounds: int, window: float, batch32: int) -> dict:
    procs = {rt: subprocess.Popen([sys.executable, __file__, "--worker", rt, "--work", str(work)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for rt in RUNTIMES}
    try:
        for p in procs.values():
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a measuring worker failed to start")
        totals = {(rt, b): [0, 0.0] for rt in procs for b in (1, batch32)}
        ratios: dict[int, list[float]] = {1: [], batch32: []}
        for r in range(rounds):
            for b in (1, batch32):
                order = RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]
                rate = {}
                for rt in order:
                    procs[rt].stdin.write(f"{b} {window}\n")
                    procs[rt].stdin.flush()
                    res = json.loads(procs[rt].stdout.readline())
                    totals[(rt, b)][0] += res["images"]
                    totals[(rt, b)][1] += res["seconds"]
                    rate[rt] = res["images"] / res["seconds"]
                ratios[b].append(rate["ort"] / rate["torch"])
        out = {f"{rt}_img_s_b{'32' if b == batch32 else '1'}": n / t for (rt, b), (n, t) in totals.items()}
        out["window_ratio_b1_min_median_max"] = [round(f(ratios[1]), 2) for f in (min, np.median, max)]
        return out
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", type=Path, default=None)
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--rounds", type=int, default=10, help="paired windows per batch size")
    ap.add_argument("--window", type=float, default=1.0, help="seconds per timing window")
    ap.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.work)
        return
    data = args.data or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    if data is None:
        print(f"{DEFAULT_DATA} not found: benchmarking on the offline digits demo", file=sys.stderr)

    from tasks.preprocess import load_image
    from tasks.runtime import CPU

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        params, layout, exported = build(data, work, not args.no_int8)
        model = load_classifier(layout)
        ds = layout.dataset()
        items = ds.split(ds.eval_split)[:32]
        pixels = np.stack([load_image(ds.resolve(it), model.features.card) for it in items])
        np.save(work / "pixels.npy", pixels)
        a, b = (torch_runner(model, rt)(pixels[:4]) for rt in ("torch", "torch_nchw"))  # same function of the pixels
        if not torch.allclose(a, b, atol=1e-4):
            raise RuntimeError("torch NHWC and NCHW runners disagree")
        speeds = paired_windows(work, args.rounds, args.window, len(pixels))

    q, i = exported.parity, exported.parity.get("int8")
    result = {
        "ort_over_torch_b1": round(speeds["ort_img_s_b1"] / speeds["torch_img_s_b1"], 2),
        "ort_over_torch_b32": round(speeds["ort_img_s_b32"] / speeds["torch_img_s_b32"], 2),
        # Secondary, labelled: against the same network fed NCHW-contiguous floats (the reference example's layout).
        "ort_over_torch_nchw_b1": round(speeds["ort_img_s_b1"] / speeds["torch_nchw_img_s_b1"], 2),
        "ort_over_torch_nchw_b32": round(speeds["ort_img_s_b32"] / speeds["torch_nchw_img_s_b32"], 2),
        **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in speeds.items()},
        # The ort worker opens its session with device="cpu", which always gets the CPU provider.
        "batch32_images": len(pixels), "provider": CPU, "threads": torch.get_num_threads(),
        "parity_argmax_agreement": q["argmax_agreement"], "parity_max_abs_prob_diff": q["max_abs_prob_diff"],
        "onnx_accuracy": round(q["onnx_accuracy"], 4), "torch_accuracy": round(q["torch_accuracy"], 4),
        "parity_n": q["n"], "data": str(data or "digits"),
    }
    if i is not None:
        result.update(int8_over_fp32=round(i["int8_over_fp32_b1"], 2), int8_over_fp32_b32=round(i["int8_over_fp32_b32"], 2),
                      int8_acc_drop_pp=round(i["acc_drop_pp"], 2), int8_written=i["written"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
