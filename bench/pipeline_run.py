"""The whole pipeline on a temporary Layout, each stage timed: what the detection and segmentation benches share."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

STAGES = ("prepare", "backbone", "features", "train", "evaluate", "export")


@dataclass
class Run:
    params: object
    results: dict  # stage name -> its result
    times: dict[str, float]  # stage name -> seconds
    loads: list[float]  # 1-minute load average before the run and after each stage
    train_json: dict
    history_rows: int  # lines of reports/train_history.csv, header included


def parse_args(doc: str, default_data: Path, example_set: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, nargs="?", default=default_data)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                    help=f"override a param, e.g. --set {example_set}")
    return ap.parse_args()


def run_pipeline(raw: dict, sets: list[str]) -> Run:
    """parse_params(raw + the --set overrides), then every stage in order on a temporary directory."""
    from tasks import backbone, data, evaluate, export, features, train
    from tasks.config import parse_params
    from tasks.layout import Layout

    for item in sets:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = json.loads(value)
    params = parse_params(raw)
    modules = dict(zip(STAGES, (data, backbone, features, train, evaluate, export)))
    times: dict[str, float] = {}
    loads = [os.getloadavg()[0]]
    results = {}
    with tempfile.TemporaryDirectory(prefix=f"bench-{params.task}-") as tmp:
        layout = Layout(Path(tmp))
        for name in STAGES:
            t0 = time.perf_counter()
            try:
                results[name] = modules[name].run(params, layout)
            except export.ExportError as exc:  # a failed gate is a result too: the bench still prints its line
                print(f"{name}: {exc}", file=sys.stderr, flush=True)
                results[name] = SimpleNamespace(parity=json.loads(layout.parity.read_text()), error=str(exc))
            times[name] = time.perf_counter() - t0
            loads.append(os.getloadavg()[0])
            print(f"{name}: {times[name]:.1f}s (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
        train_json = json.loads((layout.reports / "train.json").read_text())
        history_rows = len((layout.reports / "train_history.csv").read_text().splitlines())
    return Run(params, results, times, loads, train_json, history_rows)
