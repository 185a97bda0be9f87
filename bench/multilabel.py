"""Multi-label classification on a real tags CSV, whole pipeline with default params: prepare, backbone, features,
train, evaluate, export (with its parity gate). The last line is one JSON object.

    python bench/multilabel.py ../shared/datasets/multilabel [--set multilabel.class_weights='"balanced"']

Bar (issue 17): macro-F1 with the per-tag thresholds (chosen on the selection split) >= the plain baseline's,
measured in the same run on the same features and the same head: one global 0.5 threshold (`baseline_macro_f1`).
mAP is threshold-free (the ranking of the images per tag); `map_ci95` and `macro_f1_ci95` are bootstrap 95%
intervals over the evaluation images. `total_s` is the whole run, every stage from prepare to the export's parity
check; `load_avg_1m` says how busy the machine was.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Not bench/ itself on the path (a bench named after a standard-library module would shadow it).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def main() -> None:
    from bench.pipeline_run import parse_args, run_pipeline

    args = parse_args(__doc__, ROOT.parent / "shared" / "datasets" / "multilabel", 'multilabel.class_weights="balanced"')
    if not (args.data / "labels.csv").is_file() and args.data.suffix != ".csv":
        sys.exit(f"{args.data} holds no labels.csv (the shared CamVid tags set lives in ../shared/datasets/multilabel; "
                 f"it is not in a fresh clone)")
    run = run_pipeline({"task": "multilabel", "data": {"dataset": "csv", "root": str(args.data)}}, args.set)
    results, times, train_json = run.results, run.times, run.train_json
    m = results["evaluate"].metrics
    parity = results["export"].parity
    out = {
        "map": m["map"], "macro_f1": m["macro_f1"], "micro_f1": m["micro_f1"],
        "map_ci95": m.get("map_ci95"), "macro_f1_ci95": m.get("macro_f1_ci95"),
        "baseline_macro_f1": m["macro_f1_at_05"], "baseline_micro_f1": m["micro_f1_at_05"],
        "exact_match": m["exact_match"], "ap_per_tag": m["ap_per_tag"],
        "eval_split": m["eval_split"], "n": m["n"], "num_tags": m["num_tags"],
        "selection": train_json["selection"], "l2": train_json["l2"], "selection_map": round(train_json["selection_map"], 4),
        "thresholds_tuned": train_json["thresholds_tuned"], "ood_flagged": m.get("ood_flagged"),
        "prepare_s": round(times["prepare"], 1), "backbone_s": round(times["backbone"], 1),
        "features_s": round(times["features"], 1), "train_s": round(times["train"], 1),
        "evaluate_s": round(times["evaluate"], 1), "export_s": round(times["export"], 1),
        "total_s": round(sum(times.values()), 1), "images_per_s": round(results["features"].images_per_s, 1),
        "parity_tag_agreement": parity["tag_agreement"], "parity_max_prob_diff": parity["max_abs_prob_diff"],
        "parity_passed": parity["passed"], "load_avg_1m": [round(v, 1) for v in run.loads], "cpus": os.cpu_count(),
        "bar": {"macro_f1": ">= baseline_macro_f1 (one global 0.5, same run)"},
    }
    out["pass"] = out["macro_f1"] >= out["baseline_macro_f1"] and parity["passed"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
