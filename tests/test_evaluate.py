import csv

import numpy as np
import pytest

from conftest import tiny_params
from tasks.classification.metrics import classification_metrics, expected_calibration_error
from tasks.files import read_json


def test_ece_by_hand():
    # Two bins used: conf 0.9 (2 samples, 1 right) and conf 0.6 (2 samples, 2 right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    ece, bins = expected_calibration_error(probs, y, 15)
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert sum(b["count"] for b in bins) == 4 and len(bins) == 15


def test_metrics_by_hand():
    logits = np.log(np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))
    y = np.array([0, 1, 0, 2])
    r = classification_metrics(logits, y, ["a", "b", "c"])
    m = r["metrics"]
    assert m["accuracy"] == pytest.approx(0.75)
    # class a: P=1 R=0.5 F1=2/3; b: P=0.5 R=1 F1=2/3; c: 1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert "top5_accuracy" not in m  # 3 classes: top-5 would always be 1
    assert r["confusion"].tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    logits7 = 2 * np.eye(7)[[1, 2, 3, 4, 5, 6, 0]] + np.eye(7)  # the true class always second
    many = classification_metrics(logits7, np.arange(7), list("abcdefg"))["metrics"]
    assert many["accuracy"] == 0 and many["top5_accuracy"] == pytest.approx(1.0)


def test_evaluate_writes_every_report(imagefolder, workdir):
    params = tiny_params(imagefolder)
    for f in list((imagefolder / "stripes").iterdir())[:3]:  # some noise so mistakes may exist
        f.rename(imagefolder / "squares" / f"moved_{f.name}")
    r = workdir.run_all(params)
    m = read_json(workdir.reports / "metrics.json")
    assert m == r.metrics
    for key in ("accuracy", "macro_f1", "ece", "n", "eval_split", "skipped_images"):
        assert key in m
    assert m["eval_split"] == "test"
    with open(workdir.layout.evaluation / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["circles", "squares", "stripes"]
    assert sum(int(r["support"]) for r in rows) == m["n"]
    with open(workdir.layout.evaluation / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == m["n"]
    wrong = [p for p in preds if p["actual"] != p["predicted"]]
    mistakes = read_json(workdir.layout.evaluation / "mistakes.json")
    assert len(mistakes) == min(len(wrong), params.evaluate.top_mistakes)
    assert [x["confidence"] for x in mistakes] == sorted((x["confidence"] for x in mistakes), reverse=True)
    for png in ("confusion.png", "calibration.png", "mistakes.png"):
        assert (workdir.layout.evaluation / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bootstrap_interval_is_reproducible_and_brackets_the_score():
    from tasks.classification.metrics import bootstrap_ci

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    pred = np.where(rng.random(150) < 0.8, y, (y + 1) % 3)  # ~80% right
    a, b = bootstrap_ci(y, pred, 3, 500, seed=7), bootstrap_ci(y, pred, 3, 500, seed=7)
    assert a == b  # same seed, same interval
    acc = float((y == pred).mean())
    lo, hi = a["accuracy"]
    assert lo < acc < hi and 0.05 < hi - lo < 0.2  # ~ +-1.96 * sqrt(.8 * .2 / 150) = +-0.064
    assert bootstrap_ci(y, pred, 3, 500, seed=8) != a
    f1 = classification_metrics(np.eye(3)[pred] * 5, y, ["a", "b", "c"])["metrics"]["macro_f1"]
    assert a["macro_f1"][0] < f1 < a["macro_f1"][1]
    perfect = bootstrap_ci(y, y, 3, 100)
    assert perfect == {"accuracy": [1.0, 1.0], "macro_f1": [1.0, 1.0]}
