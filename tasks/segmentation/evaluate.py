"""Evaluating the segmenter on the eval split, per original pixel, and pictures to look at.

  metrics.json                  miou, pixel_accuracy, mean_accuracy, fw_iou, iou_per_class (a DVC metric)
  evaluation/per_class.csv      class, iou, accuracy (recall), true pixels, predicted pixels
  evaluation/confusion.csv      pixels of true class (row) predicted as class (column), every scored pixel
  evaluation/confusion.png      the same, row-normalised
  evaluation/iou.png            per-class IoU bar chart
  evaluation/examples.png       image | ground truth | prediction (fixed palette, legend): best and worst images
  evaluation/per_image.csv      path, miou, pixel_accuracy of every image (to find the hard ones)

Predictions are the head's logits on the cached maps, upsampled bilinearly to each mask's original size; pixels
marked ignore in the ground truth are never scored (they are white in the pictures).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from tasks.config import Params
from tasks.files import atomic_path, read_json, write_text
from tasks.layout import ArtifactError, Layout
from tasks.segmentation.data import IGNORE, ground_truth
from tasks.segmentation.metrics import confusion_matrix, scores
from tasks.segmentation.model import load_segmenter
from tasks.segmentation.train import predict_original

IGNORE_COLOUR = (255, 255, 255)
EXAMPLES = 2  # best and worst images each


def colourise(mask: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    lut[IGNORE] = IGNORE_COLOUR
    return lut[mask]


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def plot_examples(panels: list[tuple[str, Path, np.ndarray, np.ndarray]], classes: list[str],
                  palette: list[list[int]], path: Path) -> None:
    """One row per (title, image, truth, prediction): image | ground truth | prediction, and a legend."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from tasks.preprocess import decode_rgb

    fig = Figure(figsize=(12, 3.2 * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 3, squeeze=False)
    for row, (title, image, truth, pred) in zip(axes, panels):
        img = np.asarray(decode_rgb(image, 10**6))
        for ax, pic, name in zip(row, (img, colourise(truth, palette), colourise(pred, palette)),
                                 (title, "ground truth", "prediction")):
            ax.imshow(pic, interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.set_axis_off()
    handles = [Patch(color=np.array(c) / 255, label=n) for n, c in zip(classes, palette)]
    handles.append(Patch(facecolor="white", edgecolor="grey", label="ignored (not scored)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def plot_iou(iou: np.ndarray, classes: list[str], miou: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 0.45 * len(classes) + 2), 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(classes)), np.nan_to_num(iou), color="tab:blue")
    ax.axhline(miou, color="tab:red", ls="--", lw=1, label=f"mIoU {miou:.3f}")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.legend(loc="upper right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.5, 0.45 * len(classes) + 2)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 25:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def evaluate_segmentation(params: Params, layout: Layout, out_dir: Path) -> dict:
    dataset = layout.dataset()
    split = dataset.eval_split
    segmenter, meta = load_segmenter(layout.checkpoint, with_backbone=False)
    if meta.get("manifest_sha256") != dataset.manifest_sha256:
        raise ArtifactError("the segmenter was trained on another version of the data: re-run train (dvc repro train)")
    classes, palette = dataset.classes, meta["palette"]
    k = len(classes)
    items = dataset.split(split)
    paths, lut = ground_truth(layout, dataset, split)
    maps = layout.feature_cache().load(mmap=True)
    cm = np.zeros((k, k), np.int64)
    per_image, ignored = [], 0
    for i, truth, pred in predict_original(segmenter, maps, split, list(range(len(items))), paths, lut):
        c = confusion_matrix(truth, pred, k)
        cm += c
        ignored += int((truth == IGNORE).sum())
        s = scores(c)
        per_image.append((s["miou"], s["pixel_accuracy"]))
    r = scores(cm)

    write_text(out_dir / "confusion.csv", _csv([["true\\predicted", *classes],
                                                *[[c, *map(int, row)] for c, row in zip(classes, cm)]]))
    acc = np.diag(cm) / np.maximum(cm.sum(1), 1)
    write_text(out_dir / "per_class.csv", _csv([["class", "iou", "accuracy", "true_pixels", "predicted_pixels"],
                                                *[[c, None if np.isnan(v) else round(float(v), 6), round(float(a), 6),
                                                   int(t), int(p)] for c, v, a, t, p in
                                                  zip(classes, r["iou"], acc, cm.sum(1), cm.sum(0))]]))
    write_text(out_dir / "per_image.csv", _csv([["path", "miou", "pixel_accuracy"],
                                                *[[it.path, round(m, 6), round(a, 6)]
                                                  for it, (m, a) in zip(items, per_image)]]))
    plot_confusion(cm, classes, out_dir / "confusion.png", f"{split}: mIoU {r['miou']:.4f}, pixel accuracy "
                                                             f"{r['pixel_accuracy']:.4f} (n={len(items)})")
    plot_iou(r["iou"], classes, r["miou"], out_dir / "iou.png")
    order = np.argsort([m for m, _ in per_image], kind="stable")
    picks = [("best", int(i)) for i in order[::-1][:EXAMPLES]] + \
            [("worst", int(i)) for i in order[:EXAMPLES] if int(i) not in order[::-1][:EXAMPLES]]
    panels = []
    for why, i in picks:
        _, truth, pred = next(predict_original(segmenter, maps, split, [i], paths, lut))
        panels.append((f"{why}: {Path(items[i].path).name} (mIoU {per_image[i][0]:.3f})", dataset.resolve(items[i]),
                       truth, pred))
    plot_examples(panels, classes, palette, out_dir / "examples.png")
    return {
        "task": "segmentation", "miou": round(r["miou"], 6), "pixel_accuracy": round(r["pixel_accuracy"], 6),
        "mean_accuracy": round(r["mean_accuracy"], 6), "fw_iou": round(r["fw_iou"], 6),
        "iou_per_class": {c: None if np.isnan(v) else round(float(v), 6) for c, v in zip(classes, r["iou"])},
        "n": len(items), "pixels_scored": int(r["pixels"]), "pixels_ignored": ignored, "eval_split": split,
        "model_selected_on": meta.get("selection"), "best_epoch": meta.get("best_epoch"),
        "skipped_images": int(read_json(layout.prepared / "report.json").get("skipped_count", 0))
        if (layout.prepared / "report.json").exists() else 0,
    }
