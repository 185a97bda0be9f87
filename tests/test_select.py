"""The select stage: LogME, the stratified folds, the choice under a latency budget, and the stage end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import closed_port_url, make_imagefolder
from tasks.config import parse_params
from tasks.files import read_json
from tasks.layout import Layout
from tasks.probe import fit_folds, fold_accuracies, logme, logme_evidence, stratified_folds
from tasks.select import SelectError, choose, pareto_front


def gaussian_evidence(f: np.ndarray, t: np.ndarray, alpha: float, beta: float) -> float:
    """log N(t; 0, I/beta + F F^T/alpha) / N: the evidence straight from its definition (the marginal of t)."""
    n = len(t)
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (n * math.log(2 * math.pi) + logdet + t @ np.linalg.solve(cov, t))) / n


@pytest.mark.parametrize("n,d", [(40, 6), (8, 30)], ids=["N>D", "N<D"])
def test_logme_is_the_maximised_marginal_likelihood(n, d):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d))
    t = (f @ rng.normal(size=d) + 0.5 * rng.normal(size=n) > 0).astype(float)
    ev, alpha, beta = logme_evidence(f, t)
    assert math.isclose(ev, gaussian_evidence(f, t, alpha, beta), rel_tol=1e-6, abs_tol=1e-9)
    # MacKay's fixed point is the maximum: moving either hyperparameter lowers the evidence
    for a, b in ((alpha * 1.2, beta), (alpha / 1.2, beta), (alpha, beta * 1.2), (alpha, beta / 1.2)):
        assert gaussian_evidence(f, t, a, b) < ev
    # the reference implementation sums log(alpha + beta sigma) over min(N, D) eigenvalues only:
    # right for N >= D, wrong for N < D (the missing D - N zero eigenvalues of F^T F)
    unpadded, _, _ = logme_evidence(f, t, pad_spectrum=False)
    assert math.isclose(unpadded, ev, rel_tol=1e-9) == (n >= d)


def test_logme_prefers_features_that_carry_the_labels():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 25)
    informative = np.eye(4)[y] * 3 + rng.normal(size=(100, 4))
    noise = rng.normal(size=(100, 4))
    assert logme(np.hstack([informative, noise]), y) > logme(np.hstack([noise, rng.normal(size=(100, 4))]), y)


def test_folds_are_stratified_and_deterministic():
    y = np.array([0] * 13 + [1] * 7 + [2] * 5)
    folds = stratified_folds(y, 5, seed=3)
    for c in np.unique(y):
        counts = np.bincount(folds[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    assert np.array_equal(folds, stratified_folds(y, 5, seed=3))
    assert not np.array_equal(folds, stratified_folds(y, 5, seed=4))


def test_the_folds_solved_together_are_each_folds_own_fit():
    """fit_folds (every fold's L-BFGS in one solve) predicts what fit_lbfgs fitted on that fold alone predicts,
    on data hard enough that the folds' accuracies differ (a wrong fold's standardisation, a missing mask or a
    fold's loss scaled by the others would show)."""
    import torch

    from tasks.head import fit_lbfgs

    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 14)
    x = np.maximum(rng.normal(size=(42, 60)) + 0.35 * np.eye(3, 60)[y] @ rng.normal(size=(60, 60)), 0).astype(np.float32)
    train = np.stack([stratified_folds(y, 5, 0) != f for f in range(5)])
    together = fit_folds(x, y, train, 3, 0.01, 0.5)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    accs, sure = [], 0
    for f, t in enumerate(train):
        head = fit_lbfgs(xt[torch.from_numpy(t)], yt[torch.from_numpy(t)], 3, 0.01, 0.5, max_iter=200)
        with torch.no_grad():
            logits = head(xt).numpy()
        top2 = np.sort(logits, 1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3  # not a tie the solver's last digits could turn
        sure += int(clear.sum())
        assert np.array_equal(together[f][clear], logits.argmax(1)[clear])
        accs.append(float((logits.argmax(1)[~t] == y[~t]).mean()))
    assert sure > 0.95 * train.size
    assert 0.4 < np.mean(accs) < 1.0 and len(set(accs)) > 1  # not trivially separable: the check has teeth
    assert np.allclose(fold_accuracies(x, y, 3, [0.01], 0.5, 5, 0, 1), accs, atol=1 / 8 + 1e-9)


ROWS = [
    {"name": "small", "probe_acc": 0.90, "probe_se": 0.02, "latency_ms_b1": 4.0, "logme": 0.1},
    {"name": "medium", "probe_acc": 0.93, "probe_se": 0.02, "latency_ms_b1": 7.0, "logme": 0.2},
    {"name": "large", "probe_acc": 0.94, "probe_se": 0.02, "latency_ms_b1": 12.0, "logme": 0.3},
]


def test_auto_respects_the_latency_budget_and_ties_go_to_the_cheaper():
    assert choose(ROWS, None)["name"] == "medium"  # large is best, medium within one standard error and faster
    assert choose(ROWS, 6.0)["name"] == "small"  # the best within budget
    assert choose(ROWS, 100.0)["name"] == "medium"
    assert choose([{**ROWS[2], "probe_se": 0.001}, ROWS[1]], None)["name"] == "large"  # a clear win is not a tie
    with pytest.raises(SelectError, match="max_latency_ms"):
        choose(ROWS, 1.0)
    assert pareto_front(ROWS + [{"name": "bad", "probe_acc": 0.8, "latency_ms_b1": 20.0}]) == ["small", "medium", "large"]


def test_a_fixed_backbone_is_one_line_and_no_probe(tmp_path):
    from tasks import select

    layout = Layout(tmp_path)
    r = select.run(parse_params({"backbone": {"name": "efficientnet_lite0"}}), layout)
    assert r.report["choice"]["name"] == "efficientnet_lite0" and not r.report["candidates"]
    first = layout.select_report.read_bytes()
    select.run(parse_params({"backbone": {"name": "efficientnet_lite0"}}), layout)
    assert layout.select_report.read_bytes() == first  # unchanged: the backbone stage stays current
    assert layout.select_plot.exists() and layout.select_dir.is_dir()


def test_auto_probes_the_candidates_and_the_backbone_stage_builds_the_choice(tmp_path, monkeypatch):
    from tasks import backbone, data, select

    root = make_imagefolder(tmp_path / "images", per_class=8)
    params = parse_params({
        "data": {"dataset": "imagefolder", "root": str(root), "val_fraction": 0.25, "test_fraction": 0.25},
        # resnet18's weights from a closed port on 127.0.0.1 (and an empty cache): unreachable, so skipped
        "backbone": {"name": "auto", "url": closed_port_url("resnet18-f37072fd.pth")},
        "select": {"candidates": ["efficientnet_lite0", "resnet18"], "max_images_per_class": 4, "max_fraction": 1.0, "folds": 2},
        "features": {"batch_size": 8},
    })
    layout = Layout(tmp_path / "work")
    data.run(params, layout)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = select.run(params, layout)
    rep = read_json(layout.select_report)
    assert [c["name"] for c in rep["candidates"]] == ["efficientnet_lite0"]
    assert rep["skipped"][0]["name"] == "resnet18" and "resnet18" in rep["skipped"][0]["reason"]
    c = rep["candidates"][0]
    assert c["folds"] == 2 and c["repeats"] == 2 and 0 <= c["probe_acc"] <= 1 and math.isfinite(c["logme"])
    assert 0.5 < c["gflops"] < 1.0 and 3 < c["params_m"] < 4 and c["latency_ms_b1"] > 0 and c["throughput_b32"] > 0
    assert rep["choice"]["name"] == "efficientnet_lite0" and rep["images"] == 12 and r.report == rep
    assert layout.select_plot.stat().st_size > 1000
    # a second run reuses the candidate's ONNX and subsample features
    assert select.run(params, layout).report["candidates"][0]["features_cached"]
    b = backbone.run(params, layout, export_onnx=False)
    assert b.card.arch == "timm:tf_efficientnet_lite0" and b.card.extra["selected"] == rep["choice"]
