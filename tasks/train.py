"""Stage `train`: fit the task's new head -> models/, reports/train.json, reports/train_history.csv.

The task (tasks/<task>/train.py) learns on the cached features (the frozen backbone is never touched unless its
params put it in the loop), chooses its settings honestly on the selection split (tasks/selection.py) and saves
models/model.pt (+ model.safetensors, head.pt, labels.json) through tasks/checkpoint.py. This stage times it
and writes what every task reports: the learning curve (a DVC plot) and the summary.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

from tasks import registry
from tasks.cli import stage_main
from tasks.config import Params
from tasks.files import write_json, write_text
from tasks.layout import Layout, Progress


@dataclass(frozen=True)
class TrainResult:
    task: str
    classifier_path: Path
    summary: dict
    seconds: float


def write_history(history: list[dict], path: Path, cols: list[str]) -> None:
    """One row per epoch or per candidate (L2 strength): the DVC learning-curve plot. A row without a phase is
    the selection run's (the refit after a train holdout says "refit")."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({c: (round(v, 6) if isinstance(v, float) else v) for c, v in {"phase": "select", **row}.items()})
    write_text(path, buf.getvalue())


def run(params: Params, layout: Layout, progress: Progress | None = None) -> TrainResult:
    """Fit the head; `progress(done, total)` per epoch or per candidate."""
    t0 = time.perf_counter()
    trained = registry.part(params.task, "train").train(params, layout, progress)
    write_history(trained.history, layout.reports / "train_history.csv", trained.columns)
    seconds = time.perf_counter() - t0
    write_json(layout.reports / "train.json", {"task": params.task, **trained.summary,
                                                "steps_run": len(trained.history), "seconds": round(seconds, 2)})
    return TrainResult(params.task, layout.checkpoint, trained.summary, seconds)


def describe(r: TrainResult) -> str:
    return f"train: {registry.part(r.task, 'summary').train_line(r.summary)}, {r.seconds:.1f}s -> {r.classifier_path}"


def main() -> None:
    """The console script (tlcv-...) and `python -m tasks.train`."""
    stage_main("train", run, describe)


if __name__ == "__main__":
    main()
