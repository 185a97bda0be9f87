"""What /v1/predict answers, whatever the task: the model's metadata `task` names the torch-free
tasks.<task>.serve.Serving (tasks/contract.py's Serving protocol) that reads the task's settings from the
metadata, checks the query options it takes and turns one image's outputs into its answer. This module finds
it and holds it to the protocol; deploy/app.py runs it (answers that work on full-size pixels in a thread,
holding the decode budget).
"""

from __future__ import annotations

import importlib
from typing import Any

from tasks import contract

FORMAT_HELP = {"json": "json (the default)", "overlay": "overlay (one image drawn with its answer, a PNG)"}
REEXPORT = "re-export it with the current tlcv (dvc repro export, or python -m tasks.export)"


def load_serving(meta: dict[str, str], outputs: list[str], input_hw: tuple[int, int],
                 resize_mode: str) -> tuple[str, contract.Serving]:
    """(task, its Serving) for a model; contract.ModelError (the server does not start) if it cannot be served
    as its metadata says. A model without `task` is refused, not taken for a classifier."""
    task = meta.get(contract.TASK)
    if task is None:
        raise contract.ModelError(f"the model has no metadata {contract.TASK!r} (an older tlcv exported it), "
                                  f"so the server cannot tell what it answers: {REEXPORT}")
    if task not in contract.TASKS:  # also what keeps the import below to this project's task modules
        raise contract.ModelError(f"metadata {contract.TASK} {task!r} is not one this server serves: "
                                  f"{', '.join(contract.TASKS)}")
    cls = importlib.import_module(f"tasks.{task}.serve").Serving
    missing = [n for n in cls.required if n not in outputs]
    if missing:
        raise contract.ModelError(f"a {task} model needs outputs {list(cls.required)}; missing {missing} "
                                  f"(it has {outputs})")
    if cls.resize_modes is not None and resize_mode not in cls.resize_modes:
        # boxes and masks map back to the original image by two scale factors only for a plain resize
        raise contract.ModelError(f"a {task} model must be exported with preprocessing resize_mode "
                                  f"{' or '.join(map(repr, cls.resize_modes))}, its card says {resize_mode!r}")
    return task, cls(meta, outputs, input_hw)


def parse_query(task: str, serving: contract.Serving, items: list[tuple[str, str]]) -> tuple[str, dict[str, Any]]:
    """(format, the task's validated options) from the query string; contract.QueryError (400) otherwise."""
    options: dict[str, str] = {}
    for name, value in items:
        if name in options:
            raise contract.QueryError(f"option {name!r} is given twice")
        options[name] = value
    raw = options.pop("format", None)
    fmt = (raw or "json").lower()
    if fmt not in serving.formats:
        raise contract.QueryError(f"format {raw[:40]!r} is not one a {task} model answers; it answers: "
                                  f"{', '.join(FORMAT_HELP.get(f, f) for f in serving.formats)}")
    return fmt, serving.query(options)
