"""Stage `evaluate`: the trained model on the test split (val when there is none) -> reports/.

metrics.json is the DVC metric; everything else goes to reports/evaluation/ (one DVC out, whatever the task):

  metrics.json        accuracy, top-5 (more than 5 classes), macro-F1, ECE (15 bins), counts (a DVC metric)
  per_class.csv       precision, recall, F1, support per class
  predictions.csv     path, actual, predicted, confidence (the DVC confusion-matrix plot reads it)
  confusion.png       confusion matrix, counts and row-normalised colour
  calibration.png     reliability diagram
  mistakes.json       the most confident mistakes with their file paths
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.cli import stage_main
from tasks.config import EvaluateParams, Params
from tasks.files import atomic_dir, atomic_path, read_json, write_json, write_text
from tasks.layout import ArtifactError, Dataset, Layout, Progress
from tasks.model import autocast, load_classifier, load_head, pick_device
from tasks.gap import gap_metrics
from tasks.ood import ood_metrics
from tasks.preprocess import decoded_batches

@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    reports_dir: Path
    seconds: float


# ---------------------------------------------------------------- metrics (numpy only)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(y * n + pred, minlength=n * n).reshape(n, n)


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def bootstrap_ci(y: np.ndarray, pred: np.ndarray, n_classes: int, samples: int = 1000, seed: int = 0,
                 level: float = 0.95, chunk: int = 100) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy and macro-F1: resample the evaluation images with
    replacement `samples` times (seeded, so the interval is reproducible) and take the central `level`.

    A 153-image score moves by several points between resamples; the interval says how many.
    """
    rng = np.random.default_rng(seed)
    n, k = len(y), n_classes
    accs, f1s = [], []
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        idx = rng.integers(0, n, (b, n))
        yi, pi = y[idx], pred[idx]
        accs.append((yi == pi).mean(axis=1))
        cm = np.bincount((np.arange(b)[:, None] * k * k + yi * k + pi).ravel(), minlength=b * k * k).reshape(b, k, k)
        tp = np.einsum("bii->bi", cm).astype(float)
        support, predicted = cm.sum(axis=2), cm.sum(axis=1)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
        present = support > 0
        f1s.append((f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1))
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {"accuracy": [float(v) for v in np.percentile(np.concatenate(accs), tails)],
            "macro_f1": [float(v) for v in np.percentile(np.concatenate(f1s), tails)]}


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> tuple[float, list[dict]]:
    """Equal-width confidence bins; ECE = sum over bins of |accuracy - confidence| weighted by bin size."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            acc, mean_conf = correct[in_bin].mean(), conf[in_bin].mean()
            ece += in_bin.mean() * abs(acc - mean_conf)
            table.append({"lo": lo, "hi": hi, "count": int(in_bin.sum()), "accuracy": float(acc), "confidence": float(mean_conf)})
        else:
            table.append({"lo": lo, "hi": hi, "count": 0, "accuracy": None, "confidence": None})
    return float(ece), table


def classification_metrics(logits: np.ndarray, y: np.ndarray, classes: list[str], ece_bins: int = 15) -> dict:
    probs = softmax(logits.astype(np.float64))
    pred = probs.argmax(axis=1)
    n = len(classes)
    cm = confusion_matrix(y, pred, n)
    scores = per_class_scores(cm)
    present = scores["support"] > 0
    ece, bins = expected_calibration_error(probs, y, ece_bins)
    metrics = {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(scores["f1"][present].mean()),
        "ece": ece,
        "nll": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()),
        "n": int(len(y)),
    }
    if n > 5:  # top-5 with 5 or fewer classes is always 1.0
        top5 = np.argsort(-probs, axis=1)[:, :5]
        metrics["top5_accuracy"] = float((top5 == y[:, None]).any(axis=1).mean())
    return {"metrics": metrics, "confusion": cm, "scores": scores, "probs": probs, "pred": pred, "calibration": bins}


# ---------------------------------------------------------------- plots


def new_figure(size: tuple[float, float]):
    """A figure on the Agg canvas, without pyplot's global state (and its import time)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


def save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    n = len(classes)
    size = min(4 + 0.45 * n, 24)
    fig, ax = new_figure((size, size * 0.85))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of actual class")
    save_png(fig, path)


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


def plot_mistakes(mistakes: list[dict], path: Path, columns: int = 5, size: int = 128) -> None:
    """The most confident mistakes as a thumbnail grid, each titled true -> predicted (confidence)."""
    from tasks.preprocess import decode_rgb

    shown = mistakes[: columns * 4]
    rows = max(1, -(-len(shown) // columns))
    fig, _ = new_figure((2.2 * columns, 2.5 * rows))
    fig.clear()
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, m in zip(axes, shown):
        try:
            img = decode_rgb(m["path"], size)
            img.thumbnail((size, size))
            ax.imshow(np.asarray(img))
        except Exception:  # noqa: BLE001 - a file that vanished since: leave the cell empty, keep the title
            pass
        ax.set_title(f"{m['actual']} -> {m['predicted']}\n({m['confidence']:.2f})", fontsize=8, color="firebrick")
    if not shown:
        axes[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("most confident mistakes: true -> predicted (confidence)", fontsize=10)
    save_png(fig, path)


# ---------------------------------------------------------------- stage


def eval_logits(layout: Layout, dataset: Dataset, split: str, params: Params) -> tuple[np.ndarray, dict]:
    """Logits of the eval split: the head on cached features, or the whole network when the backbone was trained."""
    head, meta = load_head(layout)
    if meta.get("manifest_sha256") != dataset.manifest_sha256:
        raise ArtifactError("the classifier was trained on another version of the data: re-run train (dvc repro train)")
    if not meta.get("backbone_trained"):
        feats = layout.feature_cache().load()
        with torch.no_grad():
            return head(torch.from_numpy(feats[f"x_{split}"])).numpy(), meta
    device = pick_device(params.device)
    model, _ = load_classifier(layout.classifier)
    model = model.to(device)
    card = model.features.card
    out = []
    paths = [dataset.resolve(it) for it in dataset.split(split)]
    with torch.inference_mode(), autocast(device):
        for batch in decoded_batches(paths, card, params.features.batch_size, params.features.decode_workers):
            out.append(model(torch.from_numpy(batch).to(device)).float().cpu().numpy())
    return np.concatenate(out), meta


def run(params: Params, layout: Layout, progress: Progress | None = None) -> EvaluateResult:
    t0 = time.perf_counter()
    if params.task == "detection":
        from tasks.detection.evaluate import evaluate_detection

        with atomic_dir(layout.evaluation) as out:
            metrics = evaluate_detection(params, layout, out)
        write_json(layout.metrics, metrics)
        return EvaluateResult(metrics, layout.reports, time.perf_counter() - t0)
    if params.task == "segmentation":
        from tasks.segmentation.evaluate import evaluate_segmentation

        with atomic_dir(layout.evaluation) as out:
            metrics = evaluate_segmentation(params, layout, out)
        write_json(layout.metrics, metrics)
        return EvaluateResult(metrics, layout.reports, time.perf_counter() - t0)
    ep: EvaluateParams = params.evaluate
    dataset = layout.dataset()
    split = dataset.eval_split
    items = dataset.split(split)
    y = dataset.labels(split)
    logits, meta = eval_logits(layout, dataset, split, params)
    r = classification_metrics(logits, y, dataset.classes, ep.ece_bins)
    # Every report is staged and swapped in together: a failure leaves the previous reports whole.
    with atomic_dir(layout.evaluation) as reports_dir:
        skipped = int(layout.read_json(layout.prepared / "report.json", {}).get("skipped_count", 0))
        ci = bootstrap_ci(y, r["pred"], len(dataset.classes), ep.bootstrap_samples, ep.bootstrap_seed) \
            if ep.bootstrap_samples else {}
        metrics = {**{k: round(v, 6) if isinstance(v, float) else v for k, v in r["metrics"].items()},
                   **{f"{k}_ci95": [round(v, 4) for v in lo_hi] for k, lo_hi in ci.items()},
                   "eval_split": split, "num_classes": len(dataset.classes), "skipped_images": skipped,
                   "model_selected_on": meta.get("selection"), "solver": meta.get("solver"),
                   "l2": meta.get("l2"), "best_epoch": meta.get("best_epoch"),
                   **({} if meta.get("backbone_trained") else ood_metrics(layout, split)), **gap_metrics(layout)}

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["class", "precision", "recall", "f1", "support"])
        for i, c in enumerate(dataset.classes):
            w.writerow([c, *(round(float(r["scores"][k][i]), 6) for k in ("precision", "recall", "f1")), int(r["scores"]["support"][i])])
        write_text(reports_dir / "per_class.csv", buf.getvalue())

        probs, pred = r["probs"], r["pred"]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "actual", "predicted", "confidence"])
        for it, yi, pi, pr in zip(items, y, pred, probs):
            w.writerow([it.path, dataset.classes[yi], dataset.classes[pi], round(float(pr[pi]), 6)])
        write_text(reports_dir / "predictions.csv", buf.getvalue())

        wrong = np.flatnonzero(pred != y)
        wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][: ep.top_mistakes]
        write_json(reports_dir / "mistakes.json", [
            {"path": str(dataset.resolve(items[i])), "actual": dataset.classes[y[i]], "predicted": dataset.classes[pred[i]],
             "confidence": round(float(probs[i, pred[i]]), 6), "p_actual": round(float(probs[i, y[i]]), 6)}
            for i in wrong
        ])
        plot_mistakes(read_json(reports_dir / "mistakes.json"), reports_dir / "mistakes.png")
        write_json(reports_dir / "calibration.json", r["calibration"])
        plot_confusion(r["confusion"], dataset.classes, reports_dir / "confusion.png",
                       f"{split}: accuracy {metrics['accuracy']:.4f} (n={metrics['n']})")
        plot_calibration(r["calibration"], metrics["ece"], reports_dir / "calibration.png")
    write_json(layout.metrics, metrics)
    return EvaluateResult(metrics, layout.reports, time.perf_counter() - t0)


def describe(r: EvaluateResult) -> str:
    m = r.metrics
    if m.get("task") == "detection":
        per = ", ".join(f"{c} {v:.3f}" for c, v in m["ap50_per_class"].items())
        return (f"evaluate: {m['eval_split']} n={m['n']}: mAP@[.5:.95] {m['map']:.4f}, AP50 {m['ap50']:.4f} ({per}), "
                f"AP75 {m['ap75']:.4f}\n  reports: {r.reports_dir}/metrics.json, evaluation/ (examples.png, pr.png, "
                f"per_class.csv, detections.json)")
    if m.get("task") == "segmentation":
        worst = sorted((v, c) for c, v in m["iou_per_class"].items() if v is not None)[:3]
        return (f"evaluate: {m['eval_split']} n={m['n']}: mIoU {m['miou']:.4f}, pixel accuracy {m['pixel_accuracy']:.4f}, "
                f"fw-IoU {m['fw_iou']:.4f}; weakest {', '.join(f'{c} {v:.3f}' for v, c in worst)}\n"
                f"  reports: {r.reports_dir}/metrics.json, evaluation/ (examples.png, iou.png, confusion.png, "
                f"confusion.csv, per_class.csv, per_image.csv)")
    top5 = f", top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""
    ci = "" if "accuracy_ci95" not in m else " [{:.3f}, {:.3f}]".format(*m["accuracy_ci95"])
    return (f"evaluate: {m['eval_split']} n={m['n']}: accuracy {m['accuracy']:.4f}{ci}{top5}, macro-F1 {m['macro_f1']:.4f}, "
            f"ECE {m['ece']:.4f}; skipped images {m['skipped_images']}\n"
            f"  reports: {r.reports_dir}/metrics.json, evaluation/ (per_class.csv, confusion.png, calibration.png, mistakes.json)")


if __name__ == "__main__":
    stage_main("evaluate", run, describe)
