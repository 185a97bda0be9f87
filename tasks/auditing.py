"""The audit's measurements on cached pooled features, the same for every pooled task (numpy only).

- stratified folds and nested stratified subsets, deterministic in a seed;
- feature neighbours: cosine similarity of standardised features, every pair at or above a threshold, computed
  in row blocks (memory O(block x N); time O(N^2 D): fine to a few 10^4 images on one machine);
- a saturating power law fitted to a learning curve, error(n) = e_inf + b * n^-c, by a grid over c with the
  two linear coefficients solved in closed form (bounded: 0 <= e_inf <= the smallest error seen, b >= 0);
- own-class outliers: the Mahalanobis distance of a training image to its own class mean (tasks.ood's
  Ledoit-Wolf Gaussian), flagged beyond the median + 3 MAD of its class.
"""

from __future__ import annotations

import hashlib

import numpy as np



def _order(n: int, seed: int, salt: str = "") -> np.ndarray:
    keys = [hashlib.sha256(f"{seed}:{salt}:{i}".encode()).digest() for i in range(n)]
    return np.array(sorted(range(n), key=keys.__getitem__), dtype=np.int64)


def stratified_folds(strata: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) per item: each stratum dealt round-robin in a seeded hash order."""
    strata = np.asarray(strata)
    fold = np.zeros(len(strata), dtype=np.int64)
    offset = 0
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        members = members[_order(len(members), seed, f"fold{s}")]
        fold[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)  # strata smaller than k do not all start in fold 0
    return fold


def nested_subsets(strata: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """For each fraction, indices of a stratified subset (at least one per stratum); each subset holds the
    smaller ones (one seeded order per stratum, cut at each fraction)."""
    strata = np.asarray(strata)
    orders = {s: (m := np.flatnonzero(strata == s))[_order(len(m), seed, f"sub{s}")] for s in np.unique(strata)}
    out = []
    for f in fractions:
        parts = [m[: max(1, round(f * len(m)))] for m in orders.values()]
        out.append(np.sort(np.concatenate(parts)))
    return out


# ---------------------------------------------------------------- neighbours


def unit_features(x: np.ndarray, ref: np.ndarray, power: float) -> np.ndarray:
    """Signed power, standardised with `ref`'s statistics (the head's own preprocessing), rows scaled to unit length."""
    def pw(a):
        a = np.asarray(a, dtype=np.float32)
        return a if power == 1.0 else np.sign(a) * np.abs(a) ** power
    r = pw(ref)
    mean, std = r.mean(0), r.std(0)
    z = (pw(x) - mean) / np.where(std < 1e-6, 1.0, std)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def similar_pairs(z: np.ndarray, threshold: float, block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) of every pair i < j of unit rows with cosine >= threshold, most similar first."""
    ii, jj, ss = [], [], []
    for start in range(0, len(z), block):
        sims = z[start : start + block] @ z.T
        rows, cols = np.nonzero(sims >= threshold)
        rows = rows + start
        keep = cols > rows
        ii.append(rows[keep])
        jj.append(cols[keep])
        ss.append(sims[rows[keep] - start, cols[keep]])
    i, j, s = (np.concatenate(a) if a else np.zeros(0) for a in (ii, jj, ss))
    order = np.argsort(-s, kind="stable")
    return i[order].astype(np.int64), j[order].astype(np.int64), s[order].astype(np.float64)


# ---------------------------------------------------------------- the learning curve's law


C_GRID = np.linspace(0.05, 2.0, 118)


def fit_power_law(n: np.ndarray, err: np.ndarray) -> tuple[float, float, float]:
    """(e_inf, b, c) minimising the squared error of e_inf + b * n^-c over `err` (rows of err: several curves
    at once -> arrays). Bounded: 0 <= e_inf <= min(err), b >= 0."""
    n = np.asarray(n, dtype=np.float64)
    err = np.atleast_2d(np.asarray(err, dtype=np.float64))  # [R, F]
    best = (np.full(len(err), np.inf), np.zeros(len(err)), np.zeros(len(err)), np.zeros(len(err)))
    for c in C_GRID:
        t = n ** -c  # [F]
        tm, em = t.mean(), err.mean(1)
        var = ((t - tm) ** 2).sum()
        b = np.maximum(((t - tm) * (err - em[:, None])).sum(1) / var, 0.0)
        e_inf = np.clip(em - b * tm, 0.0, err.min(1))
        b = np.maximum(((err - e_inf[:, None]) * t).sum(1) / (t * t).sum(), 0.0)  # refit b for the clipped e_inf
        sse = ((e_inf[:, None] + b[:, None] * t - err) ** 2).sum(1)
        better = sse < best[0]
        best = (np.where(better, sse, best[0]), np.where(better, e_inf, best[1]), np.where(better, b, best[2]),
                np.where(better, c, best[3]))
    return best[1], best[2], best[3]


def law_at(law: tuple, n: float) -> np.ndarray:
    e_inf, b, c = law
    return e_inf + b * float(n) ** -c


def predict_curve(n: np.ndarray, scores: np.ndarray, at: list[float], resamples: int = 200, seed: int = 0) -> dict:
    """Fit the law to the mean error of `scores` [fractions, seeds] over sizes `n`; the predicted score at each
    size in `at` with a 95% interval from resampling the seeds' scores at each size."""
    scores = np.asarray(scores, dtype=np.float64)
    mean = np.nanmean(scores, 1)
    law = fit_power_law(n, 1.0 - mean)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, scores.shape[1], size=(resamples, *scores.shape))  # [R, F, S]
    boot = np.nanmean(np.take_along_axis(np.broadcast_to(scores, picks.shape), picks, 2), 2)
    boot_law = fit_power_law(n, 1.0 - boot)
    out = []
    for m in at:
        pred = 1.0 - law_at(law, m)
        lo, hi = np.quantile(1.0 - law_at(boot_law, m), [0.025, 0.975])
        out.append({"n": int(round(m)), "score": round(float(pred[0]), 4), "low": round(float(lo), 4),
                    "high": round(float(hi), 4)})
    return {"law": {"e_inf": float(law[0][0]), "b": float(law[1][0]), "c": float(law[2][0])}, "at": out}


# ---------------------------------------------------------------- outliers


def own_class_outliers(z: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(distance of each row to its own class mean, flagged) under one shared Ledoit-Wolf covariance (the Gaussian
    tasks.ood.fit_gaussian fits; a test checks they agree); flagged: beyond the median + 3 * 1.4826 MAD of its
    class's distances (a robust z > 3).

    With fewer rows than dimensions everything is computed from the n x n Gram matrix instead of the d x d
    covariance (hymenoptera: 245 x 245 instead of 1280 x 1280, 0.34 s -> ~0.02 s)."""
    z = np.asarray(z, dtype=np.float64)
    means = np.stack([z[y == k].mean(0) if np.any(y == k) else z.mean(0) for k in range(n_classes)])
    xc = z - means[y]
    n, d = xc.shape
    x2 = xc * xc
    trace = x2.sum(0) / n
    mu = trace.sum() / d
    if n <= d:
        gram = xc @ xc.T
        delta_ = (gram**2).sum() / n**2  # = sum(cov^2), cov = xc^T xc / n
        evals, evecs = np.linalg.eigh(gram)
        evals = np.maximum(evals, 0.0)
        proj = evecs * np.sqrt(evals)  # row i's coordinates on the covariance's eigenvectors
        lam = evals / n
    else:
        cov = xc.T @ xc / n
        delta_ = (cov**2).sum()
        lam, vecs = np.linalg.eigh(cov)
        proj = xc @ vecs
    beta = ((x2.sum(1) ** 2).sum() / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace.sum() + d * mu**2) / d
    shrink = 0.0 if beta == 0 or delta == 0 else min(beta, delta) / delta
    spread = (1.0 - shrink) * lam + shrink * mu
    floor = max(spread.max() * 1e-10, 1e-300)
    d2 = (proj**2 / np.maximum(spread, floor)).sum(1)
    if n <= d and shrink * mu > floor:  # the directions outside the rows' span: variance shrink * mu
        d2 += np.maximum(x2.sum(1) - (proj**2).sum(1), 0.0) / (shrink * mu)
    dist = np.sqrt(d2)
    flagged = np.zeros(n, dtype=bool)
    for k in np.unique(y):
        m = y == k
        med = np.median(dist[m])
        mad = 1.4826 * np.median(np.abs(dist[m] - med))
        flagged[m] = dist[m] > med + 3.0 * max(mad, 1e-12)
    return dist, flagged
