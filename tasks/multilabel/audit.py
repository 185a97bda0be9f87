"""What the audit needs of multi-label classification: one sigmoid per tag refit on any subset, its
probabilities, mAP, and cleanlab's multi-label issue ranking (tasks/audit.py runs the rest)."""

from __future__ import annotations

import numpy as np
import torch

from tasks.head import class_weights, fit_lbfgs
from tasks.multilabel.metrics import average_precision, nanmean
from tasks.multilabel.train import rarest_tag

METRIC = "mAP"
PER_LABEL = "AP"


def fit(p, x: np.ndarray, y: np.ndarray, classes: list[str], l2: float):
    weight = class_weights(p.class_weights, classes, y)
    return fit_lbfgs(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, np.float32)),
                     len(classes), l2, p.feature_power, loss="sigmoid", pos_weight=weight)


def probabilities(head, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(head(torch.from_numpy(np.ascontiguousarray(x)))).numpy().astype(np.float64)


def strata(y: np.ndarray) -> np.ndarray:
    """Each image's rarest tag, so rare tags reach every fold."""
    return rarest_tag(np.asarray(y))


def score(y: np.ndarray, probs: np.ndarray) -> float:
    return float(nanmean(average_precision(probs, y))) if len(y) else float("nan")


def per_label(y: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    return average_precision(probs, y)


def counts(y: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(y).sum(0).astype(np.int64)


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    probs = np.clip(probs, 1e-12, 1 - 1e-12)
    return float(-(y * np.log(probs) + (1 - y) * np.log(1 - probs)).mean())


def label_issues(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from cleanlab.multilabel_classification.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    labels = [list(np.flatnonzero(row)) for row in np.asarray(y)]
    return find_label_issues(labels, probs, n_jobs=1), get_label_quality_scores(labels, probs)


def given(y_row, classes: list[str]) -> list[str]:
    return [classes[i] for i in np.flatnonzero(y_row)]


def suggested(probs_row: np.ndarray, classes: list[str]) -> list[str]:
    return [classes[i] for i in np.flatnonzero(probs_row >= 0.5)]
