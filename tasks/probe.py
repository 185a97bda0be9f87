"""Cheap measurements of a candidate backbone on the user's own data, before the full run (the select stage).

  logme             LogME (You et al., ICML 2021): the maximised log marginal evidence of a Bayesian
                    linear model from the features to each one-hot label column, per sample, averaged
                    over classes. Hyperparameter-free; higher is better.
  stratified_folds  deterministic stratified k-fold assignment
  probe_accuracy    repeated k-fold cross-validated accuracy of the default head (L-BFGS logistic regression)
  paired_gap        the gap between two candidates' fold scores on the same folds, and its standard error
                    (the select stage's successive halving drops a candidate on it)
  cost              parameters, GFLOPs at the card's input size, onnxruntime latency (batch 1) and
                    throughput (batch 32) on this machine
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch and BLAS on one thread: the probe's problems are small, and on a busy 2-core machine two
    spinning threads per library make them 20-50x slower (measured here: a 5-fold probe 0.8 s vs 85 s)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- LogME


def logme_evidence(f: np.ndarray, t: np.ndarray, max_iter: int = 100, tol: float = 1e-8,
                   pad_spectrum: bool = True, svd: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[float, float, float]:
    """(log evidence / N, alpha, beta) of t [N] given features f [N, D], at the fixed point of MacKay's updates.

    Model: t = f w + noise, w ~ N(0, I / alpha), noise ~ N(0, 1 / beta). With m the posterior mean,
    A = alpha I + beta F^T F and sigma_i the D eigenvalues of F^T F:
      L = D/2 log alpha + N/2 log beta - N/2 log 2pi - beta/2 |F m - t|^2 - alpha/2 |m|^2 - 1/2 sum_i log(alpha + beta sigma_i)
    Everything comes from one thin SVD of F (k = min(N, D) singular values). When N < D, F^T F has
    D - N more eigenvalues, all zero: each adds log(alpha) to log|A|. The reference implementation sums
    over the k computed ones only, which is wrong for N < D; `pad_spectrum` (the default) pads the
    spectrum with those zeros (False reproduces the reference bug, for the tests). `svd`: (U, s) of f,
    when the caller scores several targets against the same features (one SVD instead of one per class).
    """
    f = np.asarray(f, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    n, d = f.shape
    u, s = svd if svd is not None else np.linalg.svd(f, full_matrices=False)[:2]
    sigma = s ** 2  # the k non-trivial eigenvalues of F^T F
    x2 = (u.T @ t) ** 2  # t in F's column space, per singular direction
    res_x2 = max(float(t @ t - x2.sum()), 0.0)  # the part of t outside F's column space: never fitted
    alpha, beta = 1.0, 1.0

    def terms(alpha: float, beta: float) -> tuple[float, float, float]:
        denom = alpha + beta * sigma
        gamma = float((beta * sigma / denom).sum())  # effective number of parameters
        m2 = float((beta ** 2 * sigma * x2 / denom ** 2).sum())  # |m|^2
        res2 = float((alpha ** 2 * x2 / denom ** 2).sum()) + res_x2  # |F m - t|^2
        return gamma, m2, res2

    for _ in range(max_iter):
        gamma, m2, res2 = terms(alpha, beta)
        new_alpha = gamma / max(m2, 1e-12)
        new_beta = (n - gamma) / max(res2, 1e-12)
        done = abs(new_alpha / alpha - 1) < tol and abs(new_beta / beta - 1) < tol
        alpha, beta = new_alpha, new_beta
        if done:
            break
    _, m2, res2 = terms(alpha, beta)
    logdet = float(np.log(alpha + beta * sigma).sum())
    if pad_spectrum:
        logdet += (d - len(sigma)) * math.log(alpha)  # the zero eigenvalues of F^T F when N < D
    evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * res2 - alpha / 2 * m2 - logdet / 2)
    return evidence / n, alpha, beta


def logme(f: np.ndarray, y: np.ndarray) -> float:
    """LogME of features f [N, D] for integer labels y [N]: the mean over classes of the per-sample evidence
    of the one-hot column. Comparable across backbones on the same data (higher = more transferable)."""
    y = np.asarray(y)
    f = np.asarray(f, dtype=np.float64)
    svd = np.linalg.svd(f, full_matrices=False)[:2]  # shared by every class's evidence
    return float(np.mean([logme_evidence(f, (y == c).astype(np.float64), svd=svd)[0] for c in np.unique(y)]))


# ---------------------------------------------------------------- k-fold probe


def _hash_order(seed: int, keys) -> np.ndarray:
    return np.argsort([hashlib.sha256(f"{seed}:{k}".encode()).hexdigest() for k in keys], kind="stable")


def stratified_folds(y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold id [N] in 0..k-1: every class spread over the folds as evenly as it can be (counts differ by at
    most one), each class starting where the last one stopped so the fold sizes stay even too.
    Deterministic in (labels, seed): hash order, no global random state."""
    y = np.asarray(y)
    fold = np.empty(len(y), dtype=np.int64)
    start = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[_hash_order(seed, [f"{c}:{i}" for i in idx])]
        fold[idx] = (np.arange(len(idx)) + start) % k
        start += len(idx)
    return fold


def fold_accuracies(x: np.ndarray, y: np.ndarray, num_classes: int, l2s: list[float], feature_power: float = 0.5,
                    folds: int = 5, seed: int = 0, repeats: int = 3) -> list[float]:
    """Held-out accuracy of the default head (L-BFGS logistic regression, the train stage's solver, at the middle
    of `select.l2`) on each fold of each repeat, in (repeat, fold) order. The folds depend on (y, seed) only, so
    two candidates probed on the same images get the same folds: their fold scores pair up.

    The folds' fits are solved together (`fit_folds`): one L-BFGS over the sum of their losses, whose optimum is
    every fold's own (the problems share no parameter), in a fraction of the time of one small solve after another
    (most of a small fit is per-step overhead)."""
    l2 = sorted(l2s)[len(l2s) // 2]
    tests = []
    for r in range(repeats):
        fold = stratified_folds(y, folds, seed + r)
        tests += [t for t in (fold == f for f in range(folds)) if t.any() and not t.all()]
    if not tests:
        return []
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
    # a bounded batch of folds per solve (64 MiB of standardised features at most)
    per_solve = max(1, (16 << 20) // max(x.size, 1))
    accs = []
    for s in range(0, len(tests), per_solve):
        group = np.stack(tests[s : s + per_solve])
        pred = fit_folds(x, y, ~group, num_classes, l2, feature_power)
        accs += [float((pred[k][t] == y[t]).mean()) for k, t in enumerate(group)]
    return accs


def fit_folds(x: np.ndarray, y: np.ndarray, train: np.ndarray, num_classes: int, l2: float, feature_power: float,
              max_iter: int = 200) -> np.ndarray:
    """Class predictions [F, N] of F linear heads, head f fitted on the rows where train[f] holds: per fold
    tasks.head.fit_lbfgs's problem (the features standardised with its training rows' statistics, mean softmax
    loss + l2/2 ||W||^2, from zero), all F solved as one L-BFGS on the sum of the losses (block-separable, so its
    gradient per block is that fold's own and the same tolerance holds each)."""
    import torch
    from torch import nn

    from tasks.head import LBFGS_OPTIONS, Standardize

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    m = torch.from_numpy(train.astype(np.float32))  # [F, N]
    with torch.no_grad():
        z = torch.stack([Standardize(x.shape[1], feature_power).fit(xt[torch.from_numpy(t)])(xt) for t in train])
    f, n, d = z.shape
    w = torch.zeros(f, d, num_classes, requires_grad=True)
    b = torch.zeros(f, 1, num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, **LBFGS_OPTIONS)
    target, count = yt.expand(f, n).reshape(-1), m.sum(1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        ce = nn.functional.cross_entropy(torch.baddbmm(b, z, w).reshape(f * n, -1), target, reduction="none")
        value = ((ce.reshape(f, n) * m).sum(1) / count).sum() + 0.5 * l2 * w.pow(2).sum()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        return torch.baddbmm(b, z, w).argmax(2).numpy()


def probe_accuracy(x: np.ndarray, y: np.ndarray, num_classes: int, l2s: list[float], feature_power: float = 0.5,
                   folds: int = 5, seed: int = 0, repeats: int = 3) -> dict:
    """Repeated k-fold cross-validated accuracy of the default head: the mean over repeats x folds, the standard
    deviation of the fold scores, the standard error of the mean (std / sqrt(repeats x folds)) and the fold
    scores themselves ("fold_accs", for `paired_gap`)."""
    accs = fold_accuracies(x, y, num_classes, l2s, feature_power, folds, seed, repeats)
    std = float(np.std(accs))
    return {"probe_acc": round(float(np.mean(accs)), 4), "probe_std": round(std, 4),
            "probe_se": round(std / math.sqrt(len(accs)), 4), "folds": folds, "repeats": repeats,
            "l2": sorted(l2s)[len(l2s) // 2], "fold_accs": accs}


def paired_gap(best: list[float], other: list[float], images: int) -> tuple[float, float]:
    """(mean, standard error) of best - other over paired fold scores (same images, same folds).

    Pairing removes what both candidates share (a hard fold is hard for both), so a real difference shows on a
    smaller sample than two independent standard errors would allow. The standard error is floored at one image
    in `images` (the resolution of an accuracy on that sample): fold differences that happen to be all equal
    (zero spread, e.g. one image per fold) do not make a gap of an image or two look certain."""
    d = np.asarray(best, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    se = float(np.std(d)) / math.sqrt(len(d)) if len(d) else 0.0
    return float(d.mean()) if len(d) else 0.0, max(se, 1.0 / max(images, 1))


# ---------------------------------------------------------------- cost


def count_flops(network, input_size: tuple[int, int]) -> float:
    """FLOPs (2 x multiply-adds) of one image through the network at this input size, by torch's counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    h, w = input_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(torch.zeros(1, 3, h, w))
    return float(counter.get_total_flops())


def export_features_onnx(extractor, input_size: tuple[int, int], path: Path) -> None:
    """uint8 NHWC -> pooled features, as the backbone stage exports its features.onnx (the one exporter)."""
    from tasks.onnxfile import export_images_model
    from tasks.pooled import OUTPUTS

    export_images_model(extractor, input_size, path, OUTPUTS)


def latency(session, input_size: tuple[int, int], seconds: float = 1.5) -> dict:
    """onnxruntime latency at batch 1 (ms) and throughput at batch 32 (img/s), warm, on this machine."""
    h, w = input_size
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    batch = rng.integers(0, 256, (32, h, w, 3), dtype=np.uint8)

    def timed(x: np.ndarray, min_runs: int, budget: float) -> list[float]:
        session.run(None, {"images": x})  # warm-up
        out, t_end = [], time.perf_counter() + budget
        while len(out) < min_runs or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            session.run(None, {"images": x})
            out.append(time.perf_counter() - t0)
            if len(out) >= 200:
                break
        return out

    # The fastest run, not the median: on a shared machine the other load only ever adds time.
    b1 = timed(one, 5, seconds)
    b32 = timed(batch, 2, 0.0)
    return {"latency_ms_b1": round(1000 * float(np.min(b1)), 2), "throughput_b32": round(32 / float(np.min(b32)), 1)}
