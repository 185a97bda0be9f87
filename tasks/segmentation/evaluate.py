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
from tasks.dense import load_maps
from tasks.files import write_text
from tasks.layout import Layout
from tasks.plots import new_figure, plot_bars, plot_confusion, save_png
from tasks.segmentation.data import IGNORE, ground_truth
from tasks.segmentation.metrics import confusion_matrix, scores
from tasks.segmentation.model import load_segmenter
from tasks.segmentation.predict import predict_original

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
    from matplotlib.patches import Patch

    from tasks.preprocess import decode_rgb

    fig, axes = new_figure((12, 3.2 * len(panels) + 0.6), len(panels), 3)
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
    save_png(fig, path, dpi=80)


def evaluate(params: Params, layout: Layout, out_dir: Path) -> dict:
    """The evaluate stage for segmentation: the metrics (reports/metrics.json) and, into `out_dir`, the tables
    and pictures above."""
    dataset = layout.dataset()
    split = dataset.eval_split
    segmenter, ckpt = load_segmenter(layout, dataset, with_backbone=False)
    meta = ckpt.meta
    classes, palette = dataset.classes, meta["palette"]
    k = len(classes)
    items = dataset.split(split)
    paths, lut = ground_truth(layout, dataset, split)
    maps = load_maps(layout, "segmentation")
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
                   f"{r['pixel_accuracy']:.4f} (n={len(items)})", counts=False)
    plot_bars({c: None if np.isnan(v) else float(v) for c, v in zip(classes, r["iou"])}, out_dir / "iou.png", "IoU",
              mean=r["miou"], mean_label="mIoU")
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
        "miou": round(r["miou"], 6), "pixel_accuracy": round(r["pixel_accuracy"], 6),
        "mean_accuracy": round(r["mean_accuracy"], 6), "fw_iou": round(r["fw_iou"], 6),
        "iou_per_class": {c: None if np.isnan(v) else round(float(v), 6) for c, v in zip(classes, r["iou"])},
        "n": len(items), "pixels_scored": int(r["pixels"]), "pixels_ignored": ignored, "eval_split": split,
        "model_selected_on": meta.get("selection"), "best_epoch": meta.get("best_epoch"),
        "skipped_images": int(layout.read_json(layout.prepared / "report.json", {}).get("skipped_count", 0)),
    }
