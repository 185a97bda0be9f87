"""The exported model in onnxruntime vs the same classifier in eager PyTorch: same machine, run, input.

    python bench/inference.py [DATA] [--no-int8] [--seconds 3]

DATA is an image folder (default ../shared/datasets/hymenoptera; without it, the offline
digits demo). The pipeline (prepare -> ... -> export, INT8 included) runs first in a
temporary folder; then both runtimes classify the same preprocessed images at batch 1
and 32, each runtime in its own process, alternating three times, best throughput of each kept.
The last line is one JSON object.
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

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def build(data: Path | None, work: Path, int8: bool):
    from tasks.backbone import build_backbone
    from tasks.config import parse_params
    from tasks.data import prepare
    from tasks.evaluate import evaluate
    from tasks.export import export
    from tasks.features import compute_features
    from tasks.train import train

    raw = {"data": {"dataset": "imagefolder", "root": str(data)} if data else {"dataset": "digits"},
           "export": {"quantize": "int8" if int8 else "none"}}
    params = parse_params(raw)
    d = {k: work / k for k in ("prepared", "backbone", "features", "models", "reports", "export")}
    prepare(params.data, d["prepared"])
    build_backbone(params.backbone, d["backbone"])
    compute_features(params, d["prepared"], d["backbone"], d["features"])
    train(params, d["prepared"], d["backbone"], d["features"], d["models"], d["reports"])
    evaluate(params, d["prepared"], d["features"], d["models"], d["reports"])
    result = export(params, d["prepared"], d["models"], d["reports"], d["export"])
    return params, d, result


def rate(fn, n_images: int, seconds: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3 * n_images:
        fn()
        n += n_images
    return n / (time.perf_counter() - t0)


def measure(runtime: str, work: Path, seconds: float) -> dict:
    """Images/s of one runtime on the saved input, at batch 1 and 32; run in its own process so that
    neither runtime's thread pool (torch's OpenMP spin-wait, onnxruntime's spinning workers) slows the other."""
    pixels = np.load(work / "pixels.npy")
    if runtime == "torch":
        from tasks.train import load_classifier

        model, _ = load_classifier(work / "models" / "classifier.pt")

        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).softmax(-1)
    else:
        from tasks.runtime import open_session

        session, _ = open_session(work / "export" / "model.onnx", device="cpu")

        def run(x):
            return session.run(["probabilities"], {"images": x})

    return {f"{runtime}_img_s_b{len(x)}": rate(lambda x=x: run(x), len(x), seconds) for x in (pixels[:1], pixels)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", type=Path, default=None)
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    ap.add_argument("--measure", choices=["torch", "ort"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.work, args.seconds)))
        return
    data = args.data or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    if data is None:
        print(f"{DEFAULT_DATA} not found: benchmarking on the offline digits demo", file=sys.stderr)

    from tasks.data import load_dataset
    from tasks.preprocess import load_image
    from tasks.runtime import open_session
    from tasks.train import load_classifier

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        params, d, exported = build(data, work, not args.no_int8)
        model, _ = load_classifier(d["models"] / "classifier.pt")
        ds = load_dataset(d["prepared"])
        items = (ds.split("test") or ds.split("val"))[:32]
        pixels = np.stack([load_image(ds.resolve(it), model.features.card) for it in items])
        np.save(work / "pixels.npy", pixels)
        _, provider = open_session(exported.model_path, device="cpu")
        speeds: dict[str, float] = {}
        for _ in range(3):  # alternate, best of each: drift hits both sides alike
            for runtime in ("torch", "ort"):
                out = subprocess.run([sys.executable, __file__, "--measure", runtime, "--work", str(work),
                                      "--seconds", str(args.seconds)], check=True, capture_output=True, text=True)
                for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    speeds[k] = max(speeds.get(k, 0.0), v)

    q, i = exported.parity, exported.int8
    result = {
        "ort_over_torch_b1": round(speeds["ort_img_s_b1"] / speeds["torch_img_s_b1"], 2),
        "ort_over_torch_b32": round(speeds["ort_img_s_b32"] / speeds["torch_img_s_b32"], 2),
        **{k: round(v, 1) for k, v in speeds.items()},
        "batch32_images": len(pixels), "provider": provider, "threads": torch.get_num_threads(),
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
