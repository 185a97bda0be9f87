"""The tasks the pipeline serves and where each one's code is: the only place that knows them.

`task:` in params.yaml picks one. Every task is a package, tasks/<task>/, with the same parts (modules), each
holding what one stage (or the server) needs of the task under the same names:

  params.py    <Task>Params                          its params.yaml section, named after the task
  data.py      prepare(params, layout, tmp, skipped) -> Prepared
                                                     read its dataset format into manifest items (prepare stage)
  features.py  KIND                                  tasks.pooled or tasks.dense: what the backbone stage exports
                                                     and the features stage caches
               label_options(params, layout), write_labels(create, params, layout, dataset, card, counts)
                                                     the training targets cached beside the features
  train.py     train(params, layout, progress) -> Trained        the head on the cached features (train stage)
  evaluate.py  evaluate(params, layout, out_dir) -> metrics      scores + tables + pictures (evaluate stage)
  export.py    export(params, layout, out_dir) -> parity report  model.onnx, its parity gate, Triton (export stage)
  summary.py   train_line, evaluate_line, export_line, parity_failure, result_lines   what it says (no torch)
  serve.py     Serving                               what the server needs of it (no torch: the image copies it)
  audit.py     fit, probabilities, score, label_issues, ...   (only tasks with TaskSpec.audit: pooled features)
                                                     the head refit on any subset for the audit stage

Stages look the task up here (`part(task, "train")`) and never compare `task` themselves; `tasks.contract.TASKS`
(torch-free, for the server) lists the same names. Like timm's model registry, a name maps to code that is
imported only when asked for; like torchvision's references, each task keeps its own folder.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from tasks import contract


@dataclass(frozen=True)
class TaskSpec:
    name: str
    datasets: tuple[str, ...]  # the data.dataset values it reads
    probe: bool = False  # the select stage can rank backbones for it (backbone.name: auto)
    audit: bool = False  # the audit stage can read it (pooled features; tasks/<task>/audit.py)
    ignores: tuple[str, ...] = ()  # shared params it does not read: setting one away from its default is an error


DENSE_IGNORES = ("evaluate.ece_bins", "evaluate.top_mistakes", "evaluate.bootstrap_samples", "evaluate.bootstrap_seed",
                 "export.quantize", "export.max_int8_drop", "export.calibration_images")

TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("classification", ("digits", "imagefolder", "cifar10", "cifar100"), probe=True, audit=True),
    TaskSpec("multilabel", ("csv",), audit=True, ignores=("evaluate.ece_bins", "export.quantize", "export.max_int8_drop",
                                               "export.calibration_images")),
    TaskSpec("detection", ("voc", "coco"), ignores=DENSE_IGNORES),
    TaskSpec("segmentation", ("masks", "voc_seg"), ignores=DENSE_IGNORES),
)}
assert tuple(TASKS) == contract.TASKS, "tasks.contract.TASKS must list the registered tasks"

# The parts every task package has, and the names each must define (tests/test_stage_contract.py checks them).
PARTS: dict[str, tuple[str, ...]] = {
    "params": (),
    "data": ("prepare",),
    "features": ("KIND", "label_options", "write_labels"),
    "train": ("train",),
    "evaluate": ("evaluate",),
    "export": ("export",),
    "summary": ("train_line", "evaluate_line", "export_line", "parity_failure", "result_lines"),
    "serve": ("Serving",),
}
# Parts only some tasks have, and the TaskSpec flag that says which.
OPTIONAL_PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "audit": ("audit", ("METRIC", "PER_LABEL", "fit", "probabilities", "strata", "score", "per_label", "counts",
                        "log_loss", "label_issues", "given", "suggested")),
}


def spec(task: str) -> TaskSpec:
    return TASKS[task]


def part(task: str, name: str) -> ModuleType:
    """tasks/<task>/<name>.py, imported on first use (a stage pays only for the chosen task's code)."""
    optional = OPTIONAL_PARTS.get(name)
    if task not in TASKS or (name not in PARTS and not (optional and getattr(TASKS[task], optional[0]))):
        raise KeyError(f"no part {name!r} of task {task!r}")
    return importlib.import_module(f"tasks.{task}.{name}")
