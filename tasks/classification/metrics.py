"""Classification scores, numpy only: accuracy, top-5, per-class precision/recall/F1, macro-F1, expected
calibration error, NLL, and percentile-bootstrap intervals of accuracy and macro-F1."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(y * n + pred, minlength=n * n).reshape(n, n)


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def bootstrap_ci(y: np.ndarray, pred: np.ndarray, n_classes: int, samples: int = 1000, seed: int = 0,
                 level: float = 0.95, chunk: int = 100) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy and macro-F1: resample the evaluation images with
    replacement `samples` times (seeded, so the interval is reproducible) and take the central `level`.

    A 153-image score moves by several points between resamples; the interval says how many.
    """
    rng = np.random.default_rng(seed)
    n, k = len(y), n_classes
    accs, f1s = [], []
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        idx = rng.integers(0, n, (b, n))
        yi, pi = y[idx], pred[idx]
        accs.append((yi == pi).mean(axis=1))
        cm = np.bincount((np.arange(b)[:, None] * k * k + yi * k + pi).ravel(), minlength=b * k * k).reshape(b, k, k)
        tp = np.einsum("bii->bi", cm).astype(float)
        support, predicted = cm.sum(axis=2), cm.sum(axis=1)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
        present = support > 0
        f1s.append((f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1))
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {"accuracy": [float(v) for v in np.percentile(np.concatenate(accs), tails)],
            "macro_f1": [float(v) for v in np.percentile(np.concatenate(f1s), tails)]}


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> tuple[float, list[dict]]:
    """Equal-width confidence bins; ECE = sum over bins of |accuracy - confidence| weighted by bin size."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            acc, mean_conf = correct[in_bin].mean(), conf[in_bin].mean()
            ece += in_bin.mean() * abs(acc - mean_conf)
            table.append({"lo": lo, "hi": hi, "count": int(in_bin.sum()), "accuracy": float(acc), "confidence": float(mean_conf)})
        else:
            table.append({"lo": lo, "hi": hi, "count": 0, "accuracy": None, "confidence": None})
    return float(ece), table


def classification_metrics(logits: np.ndarray, y: np.ndarray, classes: list[str], ece_bins: int = 15) -> dict:
    probs = softmax(logits.astype(np.float64))
    pred = probs.argmax(axis=1)
    n = len(classes)
    cm = confusion_matrix(y, pred, n)
    scores = per_class_scores(cm)
    present = scores["support"] > 0
    ece, bins = expected_calibration_error(probs, y, ece_bins)
    metrics = {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(scores["f1"][present].mean()),
        "ece": ece,
        "nll": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()),
        "n": int(len(y)),
    }
    if n > 5:  # top-5 with 5 or fewer classes is always 1.0
        top5 = np.argsort(-probs, axis=1)[:, :5]
        metrics["top5_accuracy"] = float((top5 == y[:, None]).any(axis=1).mean())
    return {"metrics": metrics, "confusion": cm, "scores": scores, "probs": probs, "pred": pred, "calibration": bins}
