"""The audit stage on tiny generated data: flipped labels rank first, copies are found as pairs (exact ones
marked), the learning curve and its law, outliers, class weights, and a failed audit keeps the last good report."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, make_imagefolder, tiny_params
from tasks.config import UserError, parse_params
from tasks.files import read_json


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def audited(tmp_path_factory, backbone_dir):
    """36 generated images, 3 of them moved to a wrong class folder, one byte-identical copy and one re-encoded
    copy of a training image; prepare -> features -> audit."""
    from conftest import Workdir

    base = tmp_path_factory.mktemp("audit")
    root = make_imagefolder(base / "images", per_class=12)
    flipped = []
    for i, (src, dst) in enumerate([("circles", "squares"), ("squares", "stripes"), ("stripes", "circles")]):
        p = root / src / f"{src}_{(4, 5, 7)[i]:02d}.jpg"
        p.rename(root / dst / p.name)
        flipped.append(f"{dst}/{p.name}")
    shutil.copyfile(root / "circles" / "circles_01.jpg", root / "circles" / "copy_exact.jpg")
    with Image.open(root / "squares" / "squares_02.jpg") as im:
        im.save(root / "squares" / "copy_reencoded.jpg", quality=80)
    w = Workdir(base / "work", backbone_dir)
    params = tiny_params(root)
    w.prepare(params)
    w.features_(params)
    result = w.run("audit", params)
    return w, params, result, flipped


def test_flipped_labels_rank_first_and_are_suggested_back(audited):
    w, _, result, flipped = audited
    ranked = rows(w.layout.audit_dir / "label_scores.csv")
    assert len(ranked) == 38 and [float(r["score"]) for r in ranked] == sorted(float(r["score"]) for r in ranked)
    top = {r["path"] for r in ranked[: len(flipped)]}
    assert top == set(flipped), ranked[:5]
    by_path = {r["path"]: r for r in ranked}
    assert all(by_path[p]["suggested"] != by_path[p]["given"] for p in flipped)
    report = result.report
    assert report["enabled"] and report["task"] == "classification"
    assert report["label_issues"]["count"] >= len(flipped)
    assert {i["path"] for i in report["label_issues"]["issues"]} >= set(flipped)


def test_copies_are_found_as_pairs_and_the_exact_one_is_marked(audited):
    w, _, result, _ = audited
    pairs = {frozenset((r["a"], r["b"])): r for r in rows(w.layout.audit_dir / "pairs.csv")}
    exact = pairs[frozenset(("circles/circles_01.jpg", "circles/copy_exact.jpg"))]
    assert exact["exact"] == "1" and float(exact["similarity"]) > 0.999
    reencoded = pairs[frozenset(("squares/squares_02.jpg", "squares/copy_reencoded.jpg"))]
    assert reencoded["exact"] == "0" and float(reencoded["similarity"]) >= 0.7
    kinds = {r["kind"] for r in pairs.values()}
    assert kinds <= {"near_duplicate", "leak", "conflict"}
    for r in pairs.values():  # the kind follows from the splits and labels
        expected = "leak" if r["split_a"] != r["split_b"] else "conflict" if r["label_a"] != r["label_b"] else \
            "near_duplicate"
        assert r["kind"] == expected
    counts = result.report["duplicates"]["counts"]
    assert counts["exact"] >= 1 and sum(counts[k] for k in ("near_duplicate", "leak", "conflict")) == len(pairs)


def test_learning_curve_law_and_balance(audited):
    _, _, result, _ = audited
    lc = result.report["learning_curve"]
    assert lc["fractions"] == sorted(lc["fractions"]) and lc["fractions"][-1] == 1.0
    assert lc["n_train"] == sorted(lc["n_train"]) and lc["n_train"][0] >= len(CLASSES)
    assert len(lc["scores"]) == len(lc["fractions"]) and all(len(s) == lc["seeds"] for s in lc["scores"])
    for pred in lc["predicted"]:
        assert 0.0 <= pred["low"] <= pred["score"] <= pred["high"] <= 1.0
    assert set(lc["per_label"]) == set(CLASSES) and set(lc["gain_most"]) <= set(CLASSES)
    bal = result.report["balance"]
    assert sum(bal["counts"].values()) == result.report["images"]["train"]
    assert bal["imbalance_ratio"] >= 1.0 and bal["weights"] == {c: 1.0 for c in CLASSES}
    assert set(result.report["timings_s"]) >= {"folds", "cleanlab", "curve", "neighbours", "outliers"}


def test_a_failed_audit_keeps_the_last_good_report(audited):
    from tasks.layout import ArtifactError

    w, params, _, _ = audited
    before = w.layout.audit_report.read_bytes()
    before_scores = (w.layout.audit_dir / "label_scores.csv").read_bytes()
    x = w.layout.features / "x_train.npy"
    saved = x.read_bytes()
    try:
        x.write_bytes(saved[:-8] + b"\0" * 8)  # the cache no longer hashes as recorded
        with pytest.raises(ArtifactError, match="features"):
            w.run("audit", params)
    finally:
        x.write_bytes(saved)
    assert w.layout.audit_report.read_bytes() == before
    assert (w.layout.audit_dir / "label_scores.csv").read_bytes() == before_scores


def test_disabled_or_dense_the_stage_says_why(tmp_path):
    from tasks import audit
    from tasks.layout import Layout

    off = audit.run(parse_params({"audit": {"enabled": False}}), Layout(tmp_path / "a"))
    assert off.report["enabled"] is False and "audit.enabled" in off.report["reason"]
    assert (tmp_path / "a" / "reports" / "audit" / "skipped.txt").is_file()
    dense = audit.run(parse_params({"task": "detection", "data": {"dataset": "voc"}}), Layout(tmp_path / "b"))
    assert dense.report["enabled"] is False and "dense" in dense.report["reason"]
    assert "skipped" in audit.describe(dense)


# ---------------------------------------------------------------- the pieces


def test_power_law_recovers_a_known_curve_and_predicts_it():
    from tasks.auditing import fit_power_law, law_at, predict_curve

    n = np.array([50, 100, 200, 400, 800.0])
    err = 0.05 + 2.0 * n**-0.6
    e_inf, b, c = (v[0] for v in fit_power_law(n, err))
    assert abs(e_inf - 0.05) < 0.01 and abs(c - 0.6) < 0.1
    assert abs(law_at((e_inf, b, c), 1600) - (0.05 + 2.0 * 1600**-0.6)) < 0.003
    rng = np.random.default_rng(0)
    scores = (1 - err)[:, None] + rng.normal(0, 0.005, (5, 3))
    out = predict_curve(n, scores, [1600, 4000])
    assert all(q["low"] <= q["score"] <= q["high"] for q in out["at"])
    assert abs(out["at"][0]["score"] - (1 - 0.05 - 2.0 * 1600**-0.6)) < 0.02


def test_folds_and_subsets_are_stratified_nested_and_seeded():
    from tasks.auditing import nested_subsets, stratified_folds

    y = np.array([0] * 20 + [1] * 10 + [2] * 3)
    fold = stratified_folds(y, 5, seed=0)
    assert (fold == stratified_folds(y, 5, seed=0)).all() and not (fold == stratified_folds(y, 5, seed=1)).all()
    for k in (0, 1):
        assert np.bincount(fold[y == k], minlength=5).tolist() == [len(y[y == k]) // 5] * 5
    subsets = nested_subsets(y, [0.1, 0.5, 1.0], seed=0)
    assert set(subsets[0]) <= set(subsets[1]) <= set(subsets[2]) and len(subsets[2]) == len(y)
    assert set(y[subsets[0]]) == {0, 1, 2}  # at least one of each class


def test_outlier_distance_is_the_ood_gaussians():
    from tasks.auditing import own_class_outliers
    from tasks.ood import fit_gaussian

    rng = np.random.default_rng(0)
    for n, d in ((40, 90), (150, 30)):  # fewer rows than dimensions (the Gram path) and more
        z = rng.normal(size=(n, d)) * np.linspace(0.2, 3, d)
        y = rng.integers(0, 3, n)
        z[0] += 25.0
        dist, flagged = own_class_outliers(z, y, 3)
        means, whiten, _ = fit_gaussian(z, y, 3)
        np.testing.assert_allclose(dist, np.sqrt((((z - means[y]) @ whiten) ** 2).sum(1)), rtol=1e-8)
        assert flagged[0] and flagged.mean() < 0.2


def test_class_weights_balanced_mapping_and_a_wrong_label():
    from tasks.head import class_weights

    y = np.array([0, 0, 0, 1])
    assert class_weights("none", ["a", "b"], y) is None
    np.testing.assert_allclose(class_weights("balanced", ["a", "b", "c"], y).numpy(), [4 / 9, 4 / 3, 1.0])
    np.testing.assert_allclose(class_weights({"b": 3.0}, ["a", "b"], y).numpy(), [1.0, 3.0])
    multi = np.array([[1, 0], [1, 1], [0, 0], [1, 0]])
    np.testing.assert_allclose(class_weights("balanced", ["x", "y"], multi).numpy(), [1 / 3, 3.0])
    with pytest.raises(UserError, match="'z'.*labels: a, b"):
        class_weights({"z": 2.0}, ["a", "b"], y)


def test_balanced_weights_reach_the_trained_head(imagefolder, workdir):
    params = tiny_params(imagefolder, class_weights="balanced")
    workdir.prepare(params)
    workdir.features_(params)
    workdir.train(params)
    summary = read_json(workdir.reports / "train.json")
    assert set(summary["class_weights"]) == set(CLASSES) and all(v > 0 for v in summary["class_weights"].values())


def test_label_issues_start_no_process_pool(monkeypatch):
    """cleanlab forks a multiprocessing pool by default; forked from a threaded host (a Prefect flow run) the child
    deadlocked. The audit asks for one process: a pool started here fails the test."""
    import multiprocessing
    import multiprocessing.pool

    import cleanlab.filter  # noqa: F401  (imported first: joblib subclasses multiprocessing's Pool on import)
    import cleanlab.multilabel_classification.filter  # noqa: F401

    from tasks.classification import audit as cls_audit
    from tasks.multilabel import audit as ml_audit

    def no_pool(*a, **k):
        raise AssertionError("a process pool was started")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    monkeypatch.setattr(multiprocessing.pool, "Pool", no_pool)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    probs = rng.dirichlet(np.ones(4), size=len(y))
    probs[np.arange(len(y)), y] += 2.0
    probs /= probs.sum(1, keepdims=True)
    probs[:5] = np.roll(probs[:5], 1, axis=1)  # five confidently wrong
    issues, scores = cls_audit.label_issues(y, probs)
    assert issues[:5].sum() >= 4 and issues[5:].sum() <= 10 and len(scores) == len(y)
    tags = (rng.random((200, 3)) < 0.4).astype(np.float32)
    p = np.clip(tags * 0.8 + 0.1 + rng.normal(0, 0.02, tags.shape), 0.01, 0.99)
    p[:5] = 1 - p[:5]
    ml_issues, ml_scores = ml_audit.label_issues(tags, p)
    assert ml_issues[:5].sum() >= 4 and ml_issues[5:].sum() <= 10 and len(ml_scores) == len(tags)
