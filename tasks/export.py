"""Stage `export`: the trained model -> export/model.onnx, proven equal to PyTorch before it lands.

The task (tasks/<task>/export.py) writes model.onnx (uint8 images in, its outputs named in tasks.contract, its
metadata from tasks.onnxfile.model_metadata: task, labels, preprocessing, ...), labels.txt and a Triton
repository, and runs its parity gate on every evaluation image; this stage swaps the new export/ in only when
the gate passed and writes reports/parity.json (a DVC metric) either way. A failing gate leaves the previous
export/ (the deployable model) untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tasks import registry
from tasks.cli import stage_main
from tasks.config import Params, UserError
from tasks.files import atomic_dir, write_json
from tasks.layout import Layout, Progress


class ExportError(UserError):
    """The exported model cannot be trusted; nothing was written as deployable."""


@dataclass(frozen=True)
class ExportResult:
    task: str
    model_path: Path
    parity: dict
    triton_dir: Path
    seconds: float


def run(params: Params, layout: Layout, progress: Progress | None = None) -> ExportResult:
    t0 = time.perf_counter()
    summary = registry.part(params.task, "summary")
    with atomic_dir(layout.export) as out:
        parity = registry.part(params.task, "export").export(params, layout, out)
        write_json(layout.parity, parity)
        if not parity["passed"]:
            raise ExportError(f"parity gate failed: {summary.parity_failure(parity)}; the previous "
                              f"{layout.model_onnx} is kept (see {layout.parity})")
    return ExportResult(params.task, layout.model_onnx, parity, layout.export / "triton" / params.export.triton_model_name,
                        time.perf_counter() - t0)


def describe(r: ExportResult) -> str:
    line = registry.part(r.task, "summary").export_line(r.parity)
    return f"export: {r.model_path} — {line}; Triton repository {r.triton_dir}; {r.seconds:.1f}s"


def main() -> None:
    """The console script (tlcv-...) and `python -m tasks.export`."""
    stage_main("export", run, describe)


if __name__ == "__main__":
    main()
