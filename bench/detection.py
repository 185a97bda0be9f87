"""Detection on a real VOC dataset, whole pipeline with default params: prepare, backbone, features, train,
evaluate, export (with its parity gate). The last line is one JSON object.

    python bench/detection.py ../shared/datasets/bccd

Bar (issue 10): AP50 >= 0.88 and mAP@[.5:.95] >= 0.55 on BCCD val, features + head + evaluation under 15 minutes
on the project's 2-core CPU. `total_s` is that sum; export (ONNX + parity on every val image) is timed apart.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from bench.pipeline_run import parse_args, run_pipeline

    args = parse_args(__doc__, ROOT.parent / "shared" / "datasets" / "bccd", "detection.epochs=12")
    if not (args.data / "Annotations").is_dir():
        sys.exit(f"{args.data} is not a VOC folder (the shared BCCD set lives in ../shared/datasets/bccd; "
                 f"it is not in a fresh clone)")
    run = run_pipeline({"task": "detection", "data": {"dataset": "voc", "root": str(args.data)}}, args.set)
    results, times, train_json = run.results, run.times, run.train_json
    m = results["evaluate"].metrics
    parity = results["export"].parity
    n_images = sum(results["features"].counts.values())
    out = {
        "ap50": round(m["ap50"], 4), "map": round(m["map"], 4), "ap75": round(m["ap75"], 4),
        "ap50_per_class": {k: round(v, 4) for k, v in m["ap50_per_class"].items()},
        "recall_per_class": {k: round(v, 4) for k, v in m["recall_per_class"].items()},
        "features_s": round(times["features"], 1), "train_s": round(times["train"], 1),
        "evaluate_s": round(times["evaluate"], 1),
        "total_s": round(times["features"] + times["train"] + times["evaluate"], 1),
        "images_per_s": round(results["features"].images_per_s, 1), "images": n_images,
        "epochs_run": train_json["steps_run"], "best_epoch": train_json["best_epoch"],
        "export_s": round(times["export"], 1), "parity_match_rate": parity["match_rate"], "parity_passed": parity["passed"],
        "parity_ties": parity["ties"], "parity_max_score_diff": parity["max_score_diff"],
        "prepare_s": round(times["prepare"], 1), "backbone_s": round(times["backbone"], 1),
        "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "bar": {"ap50": 0.88, "map": 0.55, "total_s": 900},
    }
    out["pass"] = out["ap50"] >= 0.88 and out["map"] >= 0.55 and out["total_s"] < 900 and parity["passed"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
