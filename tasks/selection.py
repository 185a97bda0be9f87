"""Where a model is chosen, and when its training stops: one rule for every task.

The selection split is val when a test split scores the model; otherwise val scores it, so nothing may be chosen
on val and a stratified holdout of train is used instead ("train-holdout"; the head is then refit on all of
train where the task can). Early stopping keeps the best state by the selection score.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.config import UserError
from tasks.layout import Dataset, holdout_split


@dataclass(frozen=True)
class Selection:
    source: str  # "val" or "train-holdout"
    fit: np.ndarray  # indices into the train split the model learns from
    holdout: np.ndarray | None  # train-holdout: indices into train it is chosen on; val: None (the val split)

    @property
    def on_val(self) -> bool:
        return self.holdout is None

    def arrays(self, feats: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x_fit, y_fit, x_sel, y_sel) of cached features (x_<split>, y_<split>)."""
        x, y = feats["x_train"], feats["y_train"]
        if self.on_val:
            return x, y, feats["x_val"], feats["y_val"]
        return x[self.fit], y[self.fit], x[self.holdout], y[self.holdout]


def select_split(dataset: Dataset, strata: np.ndarray, fraction: float, seed: int) -> Selection:
    """`strata`: one integer per training image to stratify the holdout by (its class, or zeros)."""
    if dataset.selection == "val":
        return Selection("val", np.arange(len(strata)), None)
    fit, hold = holdout_split(np.asarray(strata), fraction, seed)
    if len(hold) == 0:
        raise UserError("the train split is too small to hold out a selection set: add images, or a val/ and a "
                        "test/ split")
    return Selection("train-holdout", fit, hold)


class EarlyStopping:
    """The best epoch by score (higher is better; tuples compare in order, e.g. (accuracy, -loss)), a copy of its
    state, and whether `patience` epochs have passed without a better one (patience 0: never stop early)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.score: Any = -math.inf
        self.epoch = 0
        self.state: Any = None

    def update(self, epoch: int, score: Any, state: Any) -> bool:
        """Record this epoch; True when training should stop now."""
        if self.state is None or score > self.score:
            self.score, self.epoch, self.state = score, epoch, copy.deepcopy(state)
            return False
        return bool(self.patience) and epoch - self.epoch >= self.patience
