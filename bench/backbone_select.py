"""Does the select stage's cheap probe pick a backbone the full pipeline agrees with? One run, one machine.

    python bench/backbone_select.py ../shared/datasets/hymenoptera
    python bench/backbone_select.py digits --far ../shared/datasets/hymenoptera     # + OOD: digits model on bee photos

For every candidate the full pipeline runs (backbone, features of every image, train, evaluate:
`full_acc`, `domain_gap`); then the select stage runs cold (empty cache) with `backbone.name: auto`.
With --far, the digits demo model is exported and its ONNX `ood_score` is compared with its
`ood_threshold` on every image of the far dataset (`ood_flagged_far`) and on the digits test split
(`ood_flagged_in`). The last line is one JSON object; bars: auto_full_acc >= best_full_acc - 0.01,
probe_s <= 0.35 * full_features_s_largest, ood_flagged_far >= 0.95, ood_flagged_in <= 0.05.

probe_s is the probe proper (subsample features, k-fold L-BFGS and LogME, every candidate); the
select stage's one-time work (weights, ONNX export, both cached) and its latency measurement are
reported beside it (setup_s, cost_s). full_features_s is the features stage's pass over all images
(images / its measured rate), without its domain-gap pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

# (Named backbone_select.py, not select.py: a bench/select.py shadowed the standard library's `select` for every
# script in bench/, whose folder Python puts first on the path.)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def data_params(dataset: str) -> dict:
    if dataset == "digits":
        return {"dataset": "digits"}
    root = Path(dataset)
    if not root.is_dir():
        sys.exit(f"{root} not found (the benches use ../shared/datasets/hymenoptera)")
    return {"dataset": "imagefolder", "root": str(root.resolve())}


def ood_rates(layout, far_root: Path | None) -> dict:
    """The exported model's ood_score against its ood_threshold: in (eval split) and far (another dataset)."""
    import numpy as np

    from tasks.preprocess import PreprocessingCard, decoded_batches
    from tasks.runtime import open_session

    session, _ = open_session(layout.model_onnx, device="cpu")
    meta = session.get_modelmeta().custom_metadata_map
    threshold = float(meta["ood_threshold"])
    card_d = json.loads(meta["preprocessing"])
    card = PreprocessingCard.from_dict({k: v for k, v in card_d.items() if k in PreprocessingCard.__dataclass_fields__})

    def flagged(paths) -> tuple[float, int]:
        scores = np.concatenate([session.run(["ood_score"], {"images": b})[0] for b in decoded_batches(paths, card, 32, 2)])
        return float((scores > threshold).mean()), len(scores)

    ds = layout.dataset()
    out = {"ood_threshold": threshold}
    out["ood_flagged_in"], out["ood_in_n"] = flagged([ds.resolve(it) for it in ds.split(ds.eval_split)])
    if far_root is not None:
        far = sorted(p for p in far_root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        from tasks.preprocess import load_image

        usable = []
        for p in far:  # the far set as a user would send it: files that decode (one is a GIF placeholder)
            try:
                load_image(p, card)
                usable.append(p)
            except Exception:  # noqa: BLE001
                pass
        out["ood_flagged_far"], out["ood_far_n"] = flagged(usable)
    return out


def main() -> None:
    args = parse_args()
    if args.work is not None:
        return run(args, args.work)
    with tempfile.TemporaryDirectory(prefix="bench-select-") as tmp:  # ~300 MB of features and models per run
        return run(args, Path(tmp))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", help="an ImageFolder root, or 'digits'")
    ap.add_argument("--far", type=Path, help="a dataset unlike the data (OOD check of the exported model)")
    ap.add_argument("--candidates", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    ap.add_argument("--work", type=Path, help="working directory, kept (default: a temporary one, removed)")
    return ap.parse_args()


def run(args: argparse.Namespace, work: Path) -> None:
    from tasks import backbone, data, evaluate, export, features, select, train
    from tasks.config import parse_params
    from tasks.layout import Layout

    base = {"data": data_params(args.data), "select": {"candidates": args.candidates}}
    prepared = Layout(work / "prepared")
    data.run(parse_params(base), prepared)

    rows: dict[str, dict] = {}
    for name in args.candidates:
        layout = Layout(work / name)
        layout.prepared.parent.mkdir(parents=True, exist_ok=True)
        if not layout.prepared.exists():
            layout.prepared.symlink_to(prepared.prepared.resolve(), target_is_directory=True)
        params = parse_params({**base, "backbone": {"name": name}})
        backbone.run(params, layout)
        f = features.run(params, layout, force=True)
        train.run(params, layout)
        m = evaluate.run(params, layout).metrics
        rows[name] = {"full_acc": m["accuracy"], "full_acc_ci95": m.get("accuracy_ci95"),
                      "domain_gap": m.get("domain_gap"), "ood_flagged_eval": m.get("ood_flagged"),
                      "full_features_s": round(sum(f.counts.values()) / f.images_per_s, 2)}
        print(f"{name}: full accuracy {m['accuracy']:.4f}, gap {m.get('domain_gap')}, "
              f"features {rows[name]['full_features_s']} s", file=sys.stderr, flush=True)

    sel_layout = Layout(work / "select")
    sel_layout.prepared.parent.mkdir(parents=True, exist_ok=True)
    if not sel_layout.prepared.exists():
        sel_layout.prepared.symlink_to(prepared.prepared.resolve(), target_is_directory=True)
    t0 = time.perf_counter()
    rep = select.run(parse_params({**base, "backbone": {"name": "auto"}}), sel_layout).report
    select_s = time.perf_counter() - t0
    for c in rep["candidates"]:
        rows[c["name"]].update({k: c[k] for k in ("probe_acc", "probe_std", "logme", "latency_ms_b1", "throughput_b32",
                                                   "gflops", "params_m")})
    choice = rep["choice"]["name"]
    largest = max(rep["candidates"], key=lambda c: c["gflops"])["name"]
    result = {
        "dataset": args.data, "images": sum(1 for _ in prepared.dataset().items), "probe_images": rep["images"],
        "candidates": rows, "auto_choice": choice, "auto_reason": rep["choice"]["reason"],
        "auto_full_acc": rows[choice]["full_acc"], "best_full_acc": max(r["full_acc"] for r in rows.values()),
        "probe_s": rep["probe_s"], "select_setup_s": rep["setup_s"], "select_cost_s": rep["cost_s"],
        "select_s": round(select_s, 2), "largest": largest,
        "full_features_s_largest": rows[largest]["full_features_s"],
        "dropped_first_round": {c["name"]: c["dropped"]["reason"] for c in rep["candidates"] if c.get("dropped")},
        "halving_rounds": rep.get("halving", {}).get("rounds"), "probe_time": rep.get("probe_time"),
    }
    result["probe_share"] = round(result["probe_s"] / result["full_features_s_largest"], 3)
    result["bar_auto"] = result["auto_full_acc"] >= result["best_full_acc"] - 0.01
    result["bar_probe_cost"] = result["probe_s"] <= 0.35 * result["full_features_s_largest"]
    if args.far is not None or args.data == "digits":
        lite0 = Layout(work / args.candidates[0])
        params = parse_params({**base, "backbone": {"name": args.candidates[0]}})
        export.run(params, lite0)
        result.update(ood_model=args.candidates[0], **ood_rates(lite0, args.far))
        if "ood_flagged_far" in result:
            result["bar_ood"] = result["ood_flagged_far"] >= 0.95 and result["ood_flagged_in"] <= 0.05
    print(json.dumps(result))


if __name__ == "__main__":
    main()
