"""Do `classification.features.layers: multi` and `.flip: true` help? The whole classification pipeline, each way,
on a far dataset (the digits demo) and a close one (hymenoptera), in one run.

    python bench/feature_options.py                       # digits + ../shared/datasets/hymenoptera
    python bench/feature_options.py digits

Per dataset and option set (last/multi x flip off/on): accuracy with its 95% bootstrap interval, macro-F1,
the feature dimension and the features stage's time. The last line is one JSON object; `helps` says, per
option, whether it raised accuracy on that dataset beyond the baseline's 95% interval (a default should
change only where that holds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTIONS = [("last", False), ("multi", False), ("last", True), ("multi", True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="*", default=["digits", str(ROOT.parent / "shared" / "datasets" / "hymenoptera")])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()

    from backbone_select import data_params  # bench/ is this script's folder, first on the path

    from tasks import backbone, data, evaluate, features, train
    from tasks.config import parse_params
    from tasks.layout import Layout

    out: dict = {"backbone": args.backbone, "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="bench-feature-options-") as tmp:
        for d in args.data:
            name = "digits" if d == "digits" else Path(d).name
            base = {"data": data_params(d), "backbone": {"name": args.backbone}}
            prepared = Layout(Path(tmp) / name / "prepared")
            data.run(parse_params(base), prepared)
            rows = {}
            for layers, flip in OPTIONS:
                layout = Layout(Path(tmp) / name / f"{layers}-flip{int(flip)}")
                layout.prepared.parent.mkdir(parents=True, exist_ok=True)
                layout.prepared.symlink_to(prepared.prepared.resolve(), target_is_directory=True)
                params = parse_params({**base, "classification": {"features": {"layers": layers, "flip": flip}}})
                card = backbone.run(params, layout).card
                t0 = time.perf_counter()
                f = features.run(params, layout, force=True)
                features_s = time.perf_counter() - t0
                train.run(params, layout)
                m = evaluate.run(params, layout).metrics
                key = f"{layers}" + ("+flip" if flip else "")
                rows[key] = {"accuracy": round(m["accuracy"], 4), "accuracy_ci95": m.get("accuracy_ci95"),
                             "macro_f1": round(m["macro_f1"], 4), "feature_dim": card.feature_dim,
                             "features_s": round(features_s, 1),
                             "images_per_s": round(f.images_per_s, 1), "n_eval": m.get("n")}
                print(f"{name} {key}: accuracy {m['accuracy']:.4f} {m.get('accuracy_ci95')}, dim {card.feature_dim}, "
                      f"features {features_s:.1f}s", file=sys.stderr, flush=True)
            lo, hi = rows["last"]["accuracy_ci95"] or (rows["last"]["accuracy"],) * 2
            helps = {k: r["accuracy"] > hi for k, r in rows.items() if k != "last"}
            out["datasets"][name] = {"rows": rows, "baseline_ci95": [lo, hi], "helps": helps}
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
