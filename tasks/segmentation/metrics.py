"""Segmentation metrics from one confusion matrix over every scored pixel (numpy only).

confusion[i, j] = pixels of true class i predicted as class j; pixels whose truth is IGNORE are never counted.
IoU_c = TP / (TP + FP + FN); mIoU = mean over classes present in the truth or the prediction (a class absent
from both has no IoU and is left out, as torchmetrics/mmseg do); pixel accuracy = trace / total;
frequency-weighted IoU = sum_c freq_c * IoU_c with freq_c = the class's share of the true pixels.
"""

from __future__ import annotations

import numpy as np

from tasks.segmentation.data import IGNORE


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C] over the pixels where truth != IGNORE (any shape, same for both)."""
    truth, pred = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    if truth.shape != pred.shape:
        raise ValueError(f"truth has {truth.size} pixels, prediction {pred.size}")
    keep = truth != IGNORE
    t, p = truth[keep].astype(np.int64), pred[keep].astype(np.int64)
    if t.size and (t.max() >= num_classes or p.max() >= num_classes or p.min() < 0):
        raise ValueError(f"class index out of range 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(confusion: np.ndarray) -> dict:
    """mIoU, per-class IoU (NaN where a class is in neither truth nor prediction), pixel accuracy, fw-IoU."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    truth, pred = cm.sum(1), cm.sum(0)
    union = truth + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(truth > 0, tp / truth, np.nan)
    total = cm.sum()
    freq = truth / total if total else np.zeros_like(truth)
    return {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0, "iou": iou,
            "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
            "mean_accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
            "fw_iou": float(np.nansum(freq * iou)), "pixels": total}
