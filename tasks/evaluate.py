"""Stage `evaluate`: the trained model on the test split (val when there is none) -> reports/.

The task (tasks/<task>/evaluate.py) scores it and draws its pictures into reports/evaluation/ (one DVC out,
staged and swapped in whole: a failure leaves the previous reports); its headline numbers, with "task", go to
reports/metrics.json (the DVC metric).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tasks import registry
from tasks.cli import stage_main
from tasks.config import Params
from tasks.files import atomic_dir, write_json
from tasks.layout import Layout, Progress


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    reports_dir: Path
    seconds: float


def run(params: Params, layout: Layout, progress: Progress | None = None) -> EvaluateResult:
    t0 = time.perf_counter()
    with atomic_dir(layout.evaluation) as out:
        metrics = {"task": params.task, **registry.part(params.task, "evaluate").evaluate(params, layout, out)}
    write_json(layout.metrics, metrics)
    return EvaluateResult(metrics, layout.reports, time.perf_counter() - t0)


def describe(r: EvaluateResult) -> str:
    return "evaluate: " + registry.part(r.metrics["task"], "summary").evaluate_line(r.metrics, r.reports_dir)


def main() -> None:
    """The console script (tlcv-...) and `python -m tasks.evaluate`."""
    stage_main("evaluate", run, describe)


if __name__ == "__main__":
    main()
