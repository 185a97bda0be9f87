"""Multi-label scores (numpy only): average precision per tag, F1 at per-tag thresholds, the threshold that maximises
each tag's F1, and bootstrap intervals. Shared by training (which chooses on the selection split) and evaluation.

A tag without positives among the scored images has no AP, recall or F1 (NaN): the macro averages are over the
tags that have some, as in the classifier's macro-F1 (a class without support is not scored).
"""

from __future__ import annotations

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for a very negative logit: the probability is 0, as it should be
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def average_precision(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AP per tag of scores [..., N, T] against multi-hot y [..., N, T] -> [..., T] (NaN for a tag without positives).

    AP = sum over thresholds of (R_k - R_{k-1}) * P_k, every distinct score a threshold (tied scores enter
    together: scikit-learn's average_precision_score, which the tests check against).
    """
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y) > 0
    order = np.argsort(-scores, axis=-2, kind="stable")
    s = np.take_along_axis(scores, order, axis=-2)
    pos = np.take_along_axis(y, order, axis=-2).astype(np.float64)
    n = s.shape[-2]
    tp = np.cumsum(pos, axis=-2)
    precision = tp / np.arange(1, n + 1).reshape((n, 1))
    # each positive counts the precision at the end of its block of tied scores
    last = np.ones(s.shape, bool)
    last[..., :-1, :] = s[..., :-1, :] != s[..., 1:, :]
    end = np.where(last, np.arange(n).reshape((n, 1)), n)
    end = np.flip(np.minimum.accumulate(np.flip(end, -2), axis=-2), -2)
    at_end = np.take_along_axis(precision, end, axis=-2)
    npos = pos.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(npos > 0, (pos * at_end).sum(-2) / npos, np.nan)


def counts(pred: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, false negatives) per tag, summed over the images axis (-2)."""
    pred, y = np.asarray(pred, bool), np.asarray(y) > 0
    return (pred & y).sum(-2), (pred & ~y).sum(-2), (~pred & y).sum(-2)


def f1_from(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn); NaN where the tag has no positives (tp + fn = 0)."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    return np.where(tp + fn > 0, f1, np.nan)


def nanmean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean over what is not NaN (NaN only when nothing is)."""
    v = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok.any(axis), np.where(ok, v, 0.0).sum(axis) / ok.sum(axis), np.nan)


def scores_at(probs: np.ndarray, y: np.ndarray, thresholds) -> dict:
    """Per tag precision, recall, F1, support and predicted count at `thresholds` (p >= t is a tag), and the
    micro / macro F1 and exact-match ratio over all images."""
    pred = np.asarray(probs) >= np.asarray(thresholds, dtype=np.float64)
    tp, fp, fn = counts(pred, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), np.nan)
    f1 = f1_from(tp, fp, fn)
    micro = f1_from(tp.sum(), fp.sum(), fn.sum())
    return {"pred": pred, "precision": precision, "recall": recall, "f1": f1, "support": tp + fn,
            "predicted": tp + fp, "macro_f1": float(nanmean(f1)), "micro_f1": float(micro),
            "exact_match": float((pred == (np.asarray(y) > 0)).all(1).mean()) if len(pred) else float("nan")}


def best_thresholds(probs: np.ndarray, y: np.ndarray, min_positives: int, default: float = 0.5
                    ) -> tuple[np.ndarray, list[str]]:
    """Per tag, the threshold with the best F1 on these images (probs [N, T], y [N, T]); `default` for a tag with
    fewer than `min_positives` positives. Returns (thresholds [T], "f1" or "default" per tag).

    Cutting below the k-th highest score makes the top k images positive; the threshold is placed halfway
    between that score and the next lower one (not on an image's own score), the highest such cut on a tie of F1.
    """
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y) > 0
    thresholds = np.full(probs.shape[1], default)
    source = ["default"] * probs.shape[1]
    for t in range(probs.shape[1]):
        npos = int(y[:, t].sum())
        if npos < min_positives:
            continue
        order = np.argsort(-probs[:, t], kind="stable")
        s, pos = probs[order, t], y[order, t]
        last = np.append(s[:-1] != s[1:], True)  # a cut can only fall between distinct scores
        tp = np.cumsum(pos)[last]
        k = np.arange(1, len(s) + 1)[last]
        f1 = 2 * tp / (k + npos)
        best = int(np.argmax(f1))  # first = the highest cut among equal F1
        lower = s[last][best + 1] if best + 1 < len(tp) else 0.0
        thresholds[t] = float((s[last][best] + lower) / 2)
        source[t] = "f1"
    return thresholds, source


def bootstrap_ci(probs: np.ndarray, y: np.ndarray, thresholds, samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of mAP and macro-F1: the evaluation images resampled with replacement
    `samples` times (seeded: reproducible), the central `level` of the resampled scores."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y) > 0
    pred = probs >= np.asarray(thresholds, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n, t = probs.shape
    chunk = max(1, min(samples, 20_000_000 // max(n * t, 1)))
    maps, f1s = [], []
    for start in range(0, samples, chunk):
        idx = rng.integers(0, n, (min(chunk, samples - start), n))
        maps.append(nanmean(average_precision(probs[idx], y[idx])))
        f1s.append(nanmean(f1_from(*counts(pred[idx], y[idx]))))
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {name: [float(v) for v in np.nanpercentile(np.concatenate(vals), tails)]
            for name, vals in (("map", maps), ("macro_f1", f1s))}
