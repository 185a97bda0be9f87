"""Per-image out-of-distribution score: the Mahalanobis math, its calibration, and the exported output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import export_, tiny_params
from tasks.files import read_json
from tasks.ood import MahalanobisScore, conformal_threshold, fit_gaussian, load_ood
from tasks.preprocess import load_image
from tasks.runtime import open_session


def test_score_is_the_distance_to_the_nearest_class_mean_under_the_shared_precision():
    rng = np.random.default_rng(0)
    d, k = 6, 3
    y = np.repeat(np.arange(k), 40)
    z = rng.normal(size=(len(y), d)) * np.linspace(0.5, 3, d) + 4 * np.eye(k, d)[y]
    means, whiten, shrinkage = fit_gaussian(z, y, k)
    np.testing.assert_allclose(means, np.stack([z[y == c].mean(0) for c in range(k)]))
    assert 0 <= shrinkage <= 1
    precision = whiten @ whiten.T
    q = rng.normal(size=(5, d)) * 3
    expected = np.sqrt(np.min([np.einsum("nd,de,ne->n", q - m, precision, q - m) for m in means], axis=0))
    got = MahalanobisScore(torch.from_numpy(means), torch.from_numpy(whiten))(torch.from_numpy(q).float()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_shrinkage_keeps_it_finite_when_there_are_fewer_images_than_dimensions():
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(12, 50)), np.repeat(np.arange(3), 4)
    means, whiten, shrinkage = fit_gaussian(z, y, 3)
    assert np.isfinite(whiten).all() and shrinkage > 0
    s = MahalanobisScore(torch.from_numpy(means), torch.from_numpy(whiten))(torch.from_numpy(z).float())
    far = MahalanobisScore(torch.from_numpy(means), torch.from_numpy(whiten))(torch.from_numpy(z * 10).float())
    assert torch.isfinite(s).all() and (far > s.max()).all()


def test_conformal_threshold_covers_about_95_percent():
    rng = np.random.default_rng(2)
    cal, fresh = rng.normal(size=400), rng.normal(size=20000)
    t = conformal_threshold(cal)
    assert (cal <= t).mean() >= 0.95
    assert 0.93 <= (fresh <= t).mean() <= 0.98
    assert conformal_threshold(np.array([3.0, 1.0])) == 3.0  # too few to leave any out: the largest


@pytest.fixture
def exported(imagefolder, workdir):
    params = tiny_params(imagefolder)
    workdir.run_all(params)
    return workdir, params, export_(workdir, params)


def test_exported_model_outputs_ood_score_equal_to_pytorch_with_its_threshold(exported):
    w, params, r = exported
    parity = read_json(w.reports / "parity.json")
    assert parity["passed"] and parity["ood_max_rel_diff"] <= params.export.parity_tolerance
    session, _ = open_session(r.model_path, device="cpu")
    assert [o.name for o in session.get_outputs()] == ["probabilities", "logits", "ood_score"]
    meta = session.get_modelmeta().custom_metadata_map
    threshold = float(meta["ood_threshold"])
    from tasks.checkpoint import load_model
    from tasks.head import load_classifier

    ckpt = load_model(w.layout, "classification")
    scorer, thr = load_ood(ckpt.extra)
    assert threshold == thr and json.loads(meta["ood"])["calibrated_on"] == "val"
    ds = w.layout.dataset()
    model = load_classifier(ckpt)
    card = model.features.card
    inside = np.stack([load_image(ds.resolve(it), card) for it in ds.split("test")])
    noise = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)  # nothing like the shapes
    probs, _, scores = session.run(None, {"images": np.concatenate([inside, noise])})
    with torch.no_grad():
        feats = model.features(torch.from_numpy(np.concatenate([inside, noise])))
        expected = scorer(model.head[0](feats)).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert scores.shape == (len(inside) + 4,) and (scores[-4:] > threshold).all()
    assert (scores[: len(inside)] <= threshold).mean() >= 0.5
    m = read_json(w.reports / "metrics.json")
    assert m["ood_threshold"] == round(threshold, 4) and 0.0 <= m["ood_flagged"] <= 1.0
    config = (r.triton_dir / "config.pbtxt").read_text()
    assert 'name: "ood_score"' in config and "reshape: { shape: [ ] }" in config


def test_ledoit_wolf_is_scikit_learns():
    from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

    from tasks.ood import ledoit_wolf

    rng = np.random.default_rng(0)
    for n, d in ((50, 200), (300, 40), (5, 3)):
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        cov, shrinkage = ledoit_wolf(x)
        want_cov, want_shrinkage = sklearn_ledoit_wolf(x, assume_centered=True)
        assert np.allclose(cov, want_cov, rtol=1e-10, atol=1e-12) and abs(shrinkage - want_shrinkage) < 1e-12
