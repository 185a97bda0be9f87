"""Per image, "this is not like anything I was trained on": a Mahalanobis out-of-distribution score.

The score of an image is the Mahalanobis distance of its (standardised) pooled features to the
nearest class mean under one covariance shared by all classes (Lee et al., NeurIPS 2018, without
input perturbation or feature ensembles). It is a few matrix products, so it runs inside the
exported ONNX graph beside the probabilities. A softmax alone cannot say this: the digits model
calls a photo of a bee "3" at 99%, while the bee sits far from every digit in feature space.

Fit in the train stage on the features the head was fit on (the head's own Standardize: signed
square root + per-feature scaling), with a Ledoit-Wolf shrunk covariance (D ~ N here, so the
plain sample covariance is singular). The threshold is calibrated on the selection split (val, or
the stratified train holdout, never the evaluation split) as the conformal 95% quantile: about
95% of in-distribution images score below it, i.e. ~5% of them are flagged.

The checkpoint holds plain tensors and numbers (model.pt's "ood" entry), so it loads with
torch.load(weights_only=True).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

COVERAGE = 0.95  # share of in-distribution images meant to fall below the threshold


class MahalanobisScore(nn.Module):
    """z [N, D] (the head's standardised features) -> min over classes of the Mahalanobis distance [N].

    With whiten W such that W W^T = precision, the squared distance to mean m is |zW - mW|^2,
    expanded as |u|^2 - 2 u.m' + |m'|^2 (u = zW, m' = mW): two matmuls, any number of classes.
    """

    def __init__(self, means: torch.Tensor, whiten: torch.Tensor):
        super().__init__()
        self.register_buffer("whiten", whiten.float().contiguous())
        mw = (means.double() @ whiten.double()).float()
        self.register_buffer("means_w", mw.t().contiguous())  # [D, K]
        self.register_buffer("means_sq", mw.pow(2).sum(1))  # [K]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = z @ self.whiten
        d2 = u.pow(2).sum(1, keepdim=True) - 2.0 * (u @ self.means_w) + self.means_sq
        return d2.min(dim=1).values.clamp_min(0.0).sqrt()


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage) of centred samples x [N, D]: Ledoit & Wolf (2004), the estimate
    sklearn.covariance.ledoit_wolf(x, assume_centered=True) makes (tests compare the two), in numpy: importing
    scikit-learn took 1.1 s of the train stage's 1.8 s on hymenoptera."""
    n, d = x.shape
    cov = x.T @ x / n
    x2 = x**2
    trace = x2.sum(0) / n  # the diagonal of cov
    mu = trace.sum() / d
    delta_ = (cov**2).sum()  # sum((X^T X)^2) / n^2
    beta = ((x2.T @ x2).sum() / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace.sum() + d * mu**2) / d
    shrinkage = 0.0 if beta == 0 or delta == 0 else min(beta, delta) / delta
    shrunk = (1.0 - shrinkage) * cov
    shrunk.flat[:: d + 1] += shrinkage * mu
    return shrunk, float(shrinkage)


def fit_gaussian(z: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(class means [K, D], whiten [D, D], Ledoit-Wolf shrinkage) of standardised features z with labels y.

    A class without any sample gets a mean at infinity in effect: it is dropped (its row is the
    mean of all features, so it can never be the unique nearest). Shrinkage keeps the covariance
    invertible when N <= D.
    """
    z = np.asarray(z, dtype=np.float64)
    overall = z.mean(0)
    means = np.stack([z[y == k].mean(0) if np.any(y == k) else overall for k in range(num_classes)])
    centered = z - means[y]
    cov, shrinkage = ledoit_wolf(centered)
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, evals.max() * 1e-10)
    whiten = evecs / np.sqrt(evals)  # W W^T = V diag(1/e) V^T = precision
    return means, whiten, float(shrinkage)


def conformal_threshold(scores: np.ndarray, coverage: float = COVERAGE) -> float:
    """The ceil((n+1) * coverage)-th smallest score: a new in-distribution image scores below it with
    probability >= coverage (split-conformal), so at most ~5% of them are flagged."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = min(len(s), math.ceil((len(s) + 1) * coverage)) - 1
    return float(s[max(k, 0)])


def fit_ood(standardize: nn.Module, x_fit: np.ndarray, y_fit: np.ndarray, num_classes: int, x_sel: np.ndarray,
            calibrated_on: str) -> tuple[dict, dict]:
    """(checkpoint entry with tensors, plain summary) for model.pt's "ood".

    Fit on the features the head learnt from (`x_fit`, labels `y_fit`; one Gaussian for multi-label: all 0,
    num_classes 1), the threshold on the selection split's (`x_sel`), so the calibration images never helped
    place the means.
    """
    with torch.no_grad():
        z_fit = standardize(torch.from_numpy(np.asarray(x_fit))).numpy()
        z_sel = standardize(torch.from_numpy(np.asarray(x_sel))).numpy()
    means, whiten, shrinkage = fit_gaussian(z_fit, np.asarray(y_fit), num_classes)
    scorer = MahalanobisScore(torch.from_numpy(means), torch.from_numpy(whiten))
    with torch.no_grad():
        sel_scores = scorer(torch.from_numpy(z_sel).float()).numpy()
    threshold = conformal_threshold(sel_scores) if len(sel_scores) else float("inf")
    summary = {"method": f"mahalanobis (shared covariance, Ledoit-Wolf), nearest of {num_classes} mean(s)",
               "threshold": round(threshold, 6), "coverage": COVERAGE, "calibrated_on": calibrated_on,
               "calibration_n": int(len(sel_scores)), "fit_n": int(len(z_fit)), "shrinkage": round(shrinkage, 6)}
    entry = {"means": torch.from_numpy(means).float(), "whiten": torch.from_numpy(whiten).float(),
             "threshold": threshold, "coverage": COVERAGE}
    return entry, summary


def load_ood(extra: dict) -> tuple[MahalanobisScore, float] | None:
    """(scorer, threshold) from a checkpoint's extra entries (tasks.checkpoint.Checkpoint.extra), or None when
    the model has none (backbone trained)."""
    entry = extra.get("ood")
    if not entry:
        return None
    return MahalanobisScore(entry["means"], entry["whiten"]).eval(), float(entry["threshold"])


def ood_metrics(extra: dict, standardize: nn.Module, x: np.ndarray) -> dict:
    """Share of the evaluation images (their cached features `x`) flagged out of distribution (about 1 - coverage
    when they are in it); {} when the model has no OOD statistics."""
    loaded = load_ood(extra)
    if loaded is None:
        return {}
    scorer, threshold = loaded
    with torch.no_grad():
        s = scorer(standardize(torch.from_numpy(np.asarray(x)))).numpy()
    return {"ood_threshold": round(threshold, 4), "ood_flagged": round(float((s > threshold).mean()), 6)}
