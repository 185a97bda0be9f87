"""Batch prediction (tasks.predict) on the exported model: the evaluation folder here and on a LocalCluster.

    python bench/predict.py ../shared/datasets/hymenoptera [--workers 2]

Runs prepare, backbone, features, train, evaluate and export with the default params on the dataset (untimed),
then `python -m tasks.predict` over the evaluation split's folder (val/ or test/) twice: in-process, and on a
LocalCluster of --workers single-threaded workers on 127.0.0.1 (start-up included). Both must give the labels of
the evaluate stage's own predictions (reports/evaluation/predictions.csv). The last line is one JSON object:
labels_equal_local / labels_equal_cluster, the differing images, throughput, and the rows equal across the two.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent  # off sys.path: bench/distributed.py would shadow the dask package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_root", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    data_root = a.data_root.resolve()

    from tasks import backbone, data, evaluate, export, features, train
    from tasks.config import parse_params
    from tasks.layout import Layout

    with tempfile.TemporaryDirectory(prefix="tlcv-bench-predict-") as tmp:
        work = Path(tmp)
        params = parse_params({"data": {"dataset": "imagefolder", "root": str(data_root)}, "audit": {"enabled": False}})
        layout = Layout(work)
        t = time.perf_counter()
        for stage in (data, backbone, features, train, evaluate, export):
            stage.run(params, layout)
        pipeline_s = time.perf_counter() - t
        with open(layout.reports / "evaluation" / "predictions.csv", newline="") as f:
            evaluated = {r["path"]: r["predicted"] for r in csv.DictReader(f)}
        split = next(iter(evaluated)).split("/")[0]
        folder = data_root / split
        result = {"dataset": data_root.name, "split": split, "images": len(evaluated), "pipeline_s": round(pipeline_s, 1)}
        rows = {}
        for arm, extra in (("local", ["--executor", "local"]),
                           ("cluster", ["--executor", "dask", "--workers", str(a.workers), "--threads-per-worker", "1",
                                        "--shard-size", "32"])):
            out = work / f"pred-{arm}.csv"
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "tasks.predict", "--model", str(layout.model_onnx),
                                "--images", str(folder), "--out", str(out), "--params", "none.yaml", *extra],
                               cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if r.returncode != 0:
                sys.exit(f"bench/predict.py: the {arm} run failed: {r.stderr.strip().splitlines()[-1:]}")
            print(r.stdout.strip(), file=sys.stderr)
            with open(out, newline="") as f:
                got = {f"{split}/{g['path']}": g for g in csv.DictReader(f)}
            rows[arm] = got
            differ = sorted(p for p in evaluated if got.get(p, {}).get("label") != evaluated[p])
            result[f"labels_equal_{arm}"] = not differ and len(got) == len(evaluated)
            result[f"differing_{arm}"] = differ[:10]
            result[f"wall_s_{arm}"] = round(wall, 2)
            result[f"images_per_s_{arm}"] = round(len(got) / wall, 1)
        result["rows_equal_local_cluster"] = rows["local"] == rows["cluster"]
        result["max_probability_diff"] = max(abs(float(rows["local"][p]["probability"]) -
                                                 float(rows["cluster"][p]["probability"])) for p in evaluated)
        result["workers"] = a.workers
    print(json.dumps(result))


if __name__ == "__main__":
    main()
