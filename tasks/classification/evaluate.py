"""Classification evaluation: the trained model on the evaluation split -> reports/evaluation/.

  per_class.csv       precision, recall, F1, support per class
  predictions.csv     path, actual, predicted, confidence (the DVC confusion-matrix plot reads it)
  confusion.png       confusion matrix, counts and row-normalised colour
  calibration.png     reliability diagram (+ calibration.json)
  mistakes.json/.png  the most confident mistakes with their file paths
The metrics: accuracy (with a bootstrap 95% interval), top-5 (more than 5 classes), macro-F1, ECE, NLL, the share
flagged out of distribution, the domain gap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.checkpoint import Checkpoint, load_model
from tasks.classification.metrics import bootstrap_ci, classification_metrics
from tasks.config import Params
from tasks.files import write_csv, write_json
from tasks.gap import gap_metrics
from tasks.head import load_classifier, load_head
from tasks.layout import Dataset, Layout
from tasks.network import autocast, pick_device
from tasks.ood import ood_metrics
from tasks.plots import new_figure, plot_confusion, plot_thumbnails, save_png
from tasks.preprocess import decoded_batches


def plot_calibration(bins: list[dict], ece: float, path: Path) -> None:
    fig, ax = new_figure((5, 5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    pts = [(b["confidence"], b["accuracy"], b["count"]) for b in bins if b["count"]]
    if pts:
        c, a, k = map(np.array, zip(*pts))
        ax.plot(c, a, "o-", label="model")
        for ci, ai, ki in zip(c, a, k):
            ax.annotate(str(ki), (ci, ai), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, ECE = {ece:.4f}")
    ax.legend(loc="upper left")
    save_png(fig, path)


def eval_logits(params: Params, layout: Layout, ckpt: Checkpoint, dataset: Dataset, split: str
                ) -> tuple[np.ndarray, dict]:
    """(logits of the eval split, OOD metrics): the head on the cached features (read once for both), or the whole
    network when the backbone was trained (no OOD statistics then)."""
    if not ckpt.meta.get("backbone_trained"):
        head = load_head(ckpt)
        x = layout.feature_cache().load()[f"x_{split}"]
        with torch.no_grad():
            logits = head(torch.from_numpy(x)).numpy()
        return logits, ood_metrics(ckpt.extra, head[0], x)
    device = pick_device(params.device)
    model = load_classifier(ckpt).to(device)
    out = []
    paths = [dataset.resolve(it) for it in dataset.split(split)]
    with torch.inference_mode(), autocast(device):
        for batch in decoded_batches(paths, ckpt.card, params.features.batch_size, params.features.decode_workers):
            out.append(model(torch.from_numpy(batch).to(device)).float().cpu().numpy())
    return np.concatenate(out), {}


def evaluate(params: Params, layout: Layout, out: Path) -> dict:
    ep = params.evaluate
    dataset = layout.dataset()
    ckpt = load_model(layout, "classification", dataset)
    split = dataset.eval_split
    items, y, classes = dataset.split(split), dataset.labels(split), dataset.classes
    logits, ood = eval_logits(params, layout, ckpt, dataset, split)
    r = classification_metrics(logits, y, classes, ep.ece_bins)
    ci = bootstrap_ci(y, r["pred"], len(classes), ep.bootstrap_samples, ep.bootstrap_seed) if ep.bootstrap_samples else {}
    meta = ckpt.meta
    metrics = {**{k: round(v, 6) if isinstance(v, float) else v for k, v in r["metrics"].items()},
               **{f"{k}_ci95": [round(v, 4) for v in lo_hi] for k, lo_hi in ci.items()},
               "eval_split": split, "num_classes": len(classes),
               "skipped_images": int(layout.read_json(layout.prepared / "report.json", {}).get("skipped_count", 0)),
               "model_selected_on": meta.get("selection"), "solver": meta.get("solver"), "l2": meta.get("l2"),
               "best_epoch": meta.get("best_epoch"), **ood, **gap_metrics(layout)}

    s, probs, pred = r["scores"], r["probs"], r["pred"]
    write_csv(out / "per_class.csv", ["class", "precision", "recall", "f1", "support"], (
        [c, *(round(float(s[k][i]), 6) for k in ("precision", "recall", "f1")), int(s["support"][i])]
        for i, c in enumerate(classes)))
    write_csv(out / "predictions.csv", ["path", "actual", "predicted", "confidence"], (
        [it.path, classes[yi], classes[pi], round(float(pr[pi]), 6)] for it, yi, pi, pr in zip(items, y, pred, probs)))
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][: ep.top_mistakes]
    mistakes = [{"path": str(dataset.resolve(items[i])), "actual": classes[y[i]], "predicted": classes[pred[i]],
                 "confidence": round(float(probs[i, pred[i]]), 6), "p_actual": round(float(probs[i, y[i]]), 6)}
                for i in wrong]
    write_json(out / "mistakes.json", mistakes)
    plot_thumbnails([(f"{m['actual']} -> {m['predicted']}\n({m['confidence']:.2f})", Path(m["path"])) for m in mistakes],
                    out / "mistakes.png", empty="no mistakes")
    write_json(out / "calibration.json", r["calibration"])
    plot_confusion(r["confusion"], classes, out / "confusion.png",
                   f"{split}: accuracy {metrics['accuracy']:.4f} (n={metrics['n']})")
    plot_calibration(r["calibration"], metrics["ece"], out / "calibration.png")
    return metrics
