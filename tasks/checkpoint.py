"""The trained model on disk, whatever the task: models/model.pt, model.safetensors, head.pt, labels.json.

model.pt holds plain tensors and JSON-able metadata only, so it loads with torch.load(weights_only=True): the
frozen backbone's weights under `backbone.`, the head's under `head.`, the metadata (task, card, labels, the data
version it was trained on, the task's own settings) and any extra tensors a task keeps (the OOD statistics).
Reading it checks the task and the data version in one place: a model trained on other data is never scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tasks.files import atomic_files, write_json
from tasks.layout import ArtifactError, Dataset, Layout
from tasks.preprocess import PreprocessingCard

BACKBONE, HEAD = "backbone.", "head."


@dataclass
class Trained:
    """What a task's train() returns to the train stage (which writes reports/train.json and train_history.csv)."""
    summary: dict  # solver, what was chosen (l2, best_epoch), selection ("val" | "train-holdout"), its score(s)
    history: list[dict]  # one row per epoch or candidate
    columns: list[str]  # the columns of reports/train_history.csv (a DVC plot)


@dataclass
class Checkpoint:
    meta: dict
    card: PreprocessingCard
    head_state: dict[str, torch.Tensor]
    backbone_state: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. "ood": tensors and numbers

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]


def save_model(layout: Layout, task: str, head: nn.Module, dataset: Dataset, card: PreprocessingCard, meta: dict,
               backbone_state: dict | None = None, extra: dict | None = None) -> Path:
    """Every model file, written together (a failure leaves the previous ones). The backbone is the backbone
    stage's unless `backbone_state` (blocks trained with the head) is given."""
    from safetensors.torch import save_file

    if backbone_state is None:
        backbone_state = torch.load(layout.weights, map_location="cpu", weights_only=True)
    head_state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    state = {**{BACKBONE + k: v.detach().cpu().contiguous() for k, v in backbone_state.items()},
             **{HEAD + k: v for k, v in head_state.items()}}
    meta = json.loads(json.dumps({"task": task, "card": card.to_dict(), "labels": dataset.classes,
                                  "data_version": dataset.version, **meta}))
    with atomic_files(layout.models) as tmp:
        torch.save({"state_dict": state, "meta": meta, **(extra or {})}, tmp / layout.checkpoint.name)
        save_file(state, str(tmp / "model.safetensors"), metadata={"meta": json.dumps(meta)})
        torch.save(head_state, tmp / layout.head.name)
        write_json(tmp / "labels.json", dataset.classes)
    return layout.checkpoint


def load_model(layout: Layout, task: str, dataset: Dataset | None = None) -> Checkpoint:
    """model.pt as its parts (memory-mapped: a head-only reader never pages the backbone in). Fails with the
    fix when the file is missing, holds another task's model, or (given `dataset`) was trained on other data."""
    path = layout.checkpoint
    if not path.exists():
        raise ArtifactError(f"{path} not found: run the train stage first (dvc repro train)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta = ckpt["meta"]
    if meta.get("task") != task:
        raise ArtifactError(f"{path} holds a {meta.get('task', 'older')} model: re-run train with task: {task}")
    if dataset is not None and meta.get("data_version") != dataset.version:
        raise ArtifactError(f"{path} was trained on another version of the data: re-run train (dvc repro train)")
    state = ckpt["state_dict"]
    return Checkpoint(meta, PreprocessingCard.from_dict(meta["card"]),
                      {k[len(HEAD):]: v for k, v in state.items() if k.startswith(HEAD)},
                      {k[len(BACKBONE):]: v for k, v in state.items() if k.startswith(BACKBONE)},
                      {k: v for k, v in ckpt.items() if k not in ("state_dict", "meta")})


def backbone_network(ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's backbone, rebuilt and frozen."""
    from tasks.network import build_network, freeze

    net = build_network(ckpt.card.arch)
    net.load_state_dict(ckpt.backbone_state)
    return freeze(net)
