"""What the audit needs of single-label classification: the head refit on any subset, its probabilities, the
score, and cleanlab's label-issue ranking (tasks/audit.py runs the rest, the same for every pooled task)."""

from __future__ import annotations

import numpy as np
import torch

from tasks.head import class_weights, fit_lbfgs

METRIC = "accuracy"
PER_LABEL = "recall"  # what `per_label` scores


def fit(p, x: np.ndarray, y: np.ndarray, classes: list[str], l2: float):
    """The task's head (L-BFGS softmax regression with the section's feature power and class weights) on (x, y)."""
    weight = class_weights(p.class_weights, classes, y)
    return fit_lbfgs(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), len(classes), l2,
                     p.feature_power, label_smoothing=p.label_smoothing, class_weight=weight)


def probabilities(head, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(head(torch.from_numpy(np.ascontiguousarray(x))), 1).numpy().astype(np.float64)


def strata(y: np.ndarray) -> np.ndarray:
    """What folds and subsets are stratified by: the class."""
    return np.asarray(y, dtype=np.int64)


def score(y: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean()) if len(y) else float("nan")


def per_label(y: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """Recall of each class (nan for a class absent from y)."""
    pred = probs.argmax(1)
    return np.array([float((pred[y == k] == k).mean()) if np.any(y == k) else np.nan for k in range(n)])


def counts(y: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(y, minlength=n)


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).mean())


def label_issues(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cleanlab's issue mask, label quality score per image: low = likely wrong) from out-of-sample probabilities."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    # n_jobs=1: cleanlab's default forks a multiprocessing pool, which deadlocks in a threaded host (a Prefect flow
    # run hung forever in the forked child); one process takes milliseconds at this size anyway
    return (find_label_issues(y, probs, filter_by="prune_by_noise_rate", n_jobs=1),
            get_label_quality_scores(y, probs, method="self_confidence"))


def given(y_row, classes: list[str]) -> str:
    return classes[int(y_row)]


def suggested(probs_row: np.ndarray, classes: list[str]) -> str:
    return classes[int(np.argmax(probs_row))]
