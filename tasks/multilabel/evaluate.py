"""Multi-label evaluation: the trained head on the evaluation split's cached features -> reports/evaluation/.

  per_tag.csv       AP, precision, recall, F1 (at the tag's threshold), the threshold, support, predicted
  predictions.csv   path, actual tags, predicted tags, wrong tags (|-separated)
  ap.png            average precision per tag
  mistakes.json/.png  the worst-scored images (highest summed binary cross-entropy): true and predicted tags
The metrics: mAP (the mean over tags of average precision, the standard multi-label score; threshold-free), macro
and micro F1 at the per-tag thresholds and, as the plain baseline, at one global 0.5; bootstrap 95% intervals of
mAP and macro-F1; the exact-match ratio; the share flagged out of distribution; the domain gap.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from tasks.checkpoint import load_model
from tasks.config import Params
from tasks.files import write_json, write_text
from tasks.gap import gap_metrics
from tasks.head import load_head
from tasks.layout import ArtifactError, Layout
from tasks.multilabel.metrics import average_precision, bootstrap_ci, nanmean, scores_at, sigmoid
from tasks.ood import ood_metrics
from tasks.plots import plot_bars, plot_thumbnails


def write_table(path: Path, header: list[str], rows) -> None:
    """A CSV report (written atomically)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    write_text(path, buf.getvalue())


def num(v) -> float | None:
    """A score for JSON/CSV: rounded, None where it is undefined (a tag without positives)."""
    v = float(v)
    return None if np.isnan(v) else round(v, 6)


def joined(names: list[str], mask: np.ndarray) -> str:
    return "|".join(n for n, m in zip(names, mask) if m)


def evaluate(params: Params, layout: Layout, out: Path) -> dict:
    ep = params.evaluate
    dataset = layout.dataset()
    ckpt = load_model(layout, "multilabel", dataset)
    split, tags = dataset.eval_split, dataset.classes
    items = dataset.split(split)
    feats = layout.feature_cache().load()
    x, y = feats.get(f"x_{split}"), feats.get(f"y_{split}")
    if x is None or y is None or y.shape != (len(items), len(tags)):
        raise ArtifactError(f"{layout.features} does not hold this dataset's {split} tags: re-run the features stage")
    head = load_head(ckpt)
    with torch.no_grad():
        logits = head(torch.from_numpy(x)).numpy()
    probs, truth = sigmoid(logits), y > 0
    thresholds = np.asarray(ckpt.meta["thresholds"], dtype=np.float64)
    ap = average_precision(probs, truth)
    r, base = scores_at(probs, truth, thresholds), scores_at(probs, truth, 0.5)
    ci = bootstrap_ci(probs, truth, thresholds, ep.bootstrap_samples, ep.bootstrap_seed) if ep.bootstrap_samples else {}
    meta = ckpt.meta
    metrics = {
        "map": num(nanmean(ap)), "macro_f1": num(r["macro_f1"]), "micro_f1": num(r["micro_f1"]),
        "macro_f1_at_05": num(base["macro_f1"]), "micro_f1_at_05": num(base["micro_f1"]),
        "exact_match": num(r["exact_match"]),
        **{f"{k}_ci95": [round(v, 4) for v in lo_hi] for k, lo_hi in ci.items()},
        "n": len(items), "eval_split": split, "num_tags": len(tags), "tags_scored": int((r["support"] > 0).sum()),
        "ap_per_tag": {t: num(a) for t, a in zip(tags, ap)},
        "skipped_images": int(layout.read_json(layout.prepared / "report.json", {}).get("skipped_count", 0)),
        "model_selected_on": meta.get("selection"), "solver": meta.get("solver"), "l2": meta.get("l2"),
        "best_epoch": meta.get("best_epoch"), "thresholds_tuned": meta.get("thresholds_tuned"),
        **ood_metrics(ckpt.extra, head[0], x), **gap_metrics(layout),
    }

    pred = r["pred"]
    write_table(out / "per_tag.csv",
        ["tag", "ap", "precision", "recall", "f1", "threshold", "threshold_source", "support", "predicted"],
        ([t, num(ap[i]), num(r["precision"][i]), num(r["recall"][i]), num(r["f1"][i]), round(float(thresholds[i]), 6),
          meta["threshold_source"][i], int(r["support"][i]), int(r["predicted"][i])] for i, t in enumerate(tags)))
    write_table(out / "predictions.csv", ["path", "actual", "predicted", "wrong"], (
        [it.path, joined(tags, truth[i]), joined(tags, pred[i]), joined(tags, truth[i] != pred[i])]
        for i, it in enumerate(items)))
    plot_bars({t: num(a) for t, a in zip(tags, ap)}, out / "ap.png", "average precision", metrics["map"], "mAP")
    # the worst-scored images: the highest summed binary cross-entropy over their tags
    eps = 1e-12
    loss = -(truth * np.log(probs + eps) + (~truth) * np.log(1 - probs + eps)).sum(1)
    worst = [i for i in np.argsort(-loss, kind="stable") if (truth[i] != pred[i]).any()][: ep.top_mistakes]
    mistakes = [{"path": str(dataset.resolve(items[i])), "actual": joined(tags, truth[i]),
                 "predicted": joined(tags, pred[i]), "missed": joined(tags, truth[i] & ~pred[i]),
                 "extra": joined(tags, pred[i] & ~truth[i]), "loss": round(float(loss[i]), 4),
                 "probabilities": {t: round(float(probs[i, k]), 4) for k, t in enumerate(tags) if truth[i, k] or pred[i, k]}}
                for i in worst]
    write_json(out / "mistakes.json", mistakes)
    plot_thumbnails([(caption(m), Path(m["path"])) for m in mistakes], out / "mistakes.png", empty="no mistakes")
    return metrics


def caption(m: dict, width: int = 30) -> str:
    """true: a, b / predicted: a, c, each line cut to fit a thumbnail."""
    lines = [f"{what}: {m[key].replace('|', ', ') or '-'}" for what, key in (("true", "actual"), ("pred", "predicted"))]
    return "\n".join(line if len(line) <= width else line[: width - 1] + "…" for line in lines)
