"""Stage `prepare`: a dataset -> validated images + a split manifest (data/prepared/).

The task's reader (tasks/<task>/data.py) knows its format (class folders, a tags CSV, VOC/COCO boxes, masks);
every image is fully decoded once there. This stage writes what all tasks share, in one directory swapped in
atomically:

  manifest.csv   path, label, split, sha256 (path relative to dataset.json's `root`; the label is the task's)
  dataset.json   task, root, classes, per-split and per-class counts, manifest sha256 (+ the task's label files)
  report.json    files skipped and why, the same image in two classes or two splits (+ what the task reports)
  images/        only for generated datasets (digits, cifar10, cifar100); annotations.json / masks.json: the task's
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from tasks import registry
from tasks.cli import stage_main
from tasks.config import Params
from tasks.files import atomic_dir, sha256_bytes, write_json
from tasks.imagefiles import DataError, find_duplicates  # noqa: F401 - DataError: the stage's user error
from tasks.layout import SPLITS, Item, Layout, Progress


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    counts: dict[str, int]
    skipped: int
    manifest_sha256: str


def manifest_csv(items: list[Item]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split", "sha256"])
    for it in items:
        w.writerow([it.path, it.label, it.split, it.sha256])
    return buf.getvalue().encode()


def run(params: Params, layout: Layout, progress: Progress | None = None) -> PrepareResult:
    """Validate and split the dataset into layout.prepared, swapped in whole only when everything succeeded.

    The run's report (skipped files and why, duplicates) is written to layout.prepare_report whether the
    run succeeds or fails; a failed run leaves the previous data/prepared in place.
    """
    p = params.data
    skipped: list[dict] = []
    report: dict = {"status": "failed", "task": params.task, "dataset": p.dataset, "skipped_count": 0,
                    "skipped": skipped}
    try:
        with atomic_dir(layout.prepared) as tmp:
            prepared = registry.part(params.task, "data").prepare(params, layout, tmp, skipped)
            items = sorted(prepared.items, key=lambda it: (SPLITS.index(it.split), it.label, it.path))
            data = manifest_csv(items)
            (tmp / "manifest.csv").write_bytes(data)
            digest = sha256_bytes(data)
            counts = {s: sum(1 for it in items if it.split == s) for s in SPLITS}
            write_json(tmp / "dataset.json", {
                "task": params.task, "dataset": p.dataset, "root": prepared.root, "classes": prepared.classes,
                "counts": counts, "per_class": prepared.per_class, "skipped": len(skipped), "manifest_sha256": digest,
                **prepared.meta,
            })
            report.update(find_duplicates(items), **prepared.report, status="ok", skipped_count=len(skipped))
            write_json(tmp / "report.json", {k: v for k, v in report.items() if k != "status"})
    finally:
        report["skipped_count"] = len(skipped)
        write_json(layout.prepare_report, report)
    return PrepareResult(layout.prepared, counts, len(skipped), digest)


def describe(r: PrepareResult) -> str:
    skipped = f", {r.skipped} file(s) skipped (see {r.out_dir}/report.json)" if r.skipped else ""
    return "prepare: " + ", ".join(f"{k} {v}" for k, v in r.counts.items()) + skipped


def main() -> None:
    """The console script (tlcv-...) and `python -m tasks.data`."""
    stage_main("prepare", run, describe)


if __name__ == "__main__":
    main()
