"""Evaluating the detector on the eval split: COCO metrics (pycocotools) and pictures to look at.

  metrics.json                  map (AP@[.5:.95]), ap50, ap75, per-class AP / AP50 / recall (a DVC metric)
  evaluation/per_class.csv      class, ap, ap50, recall, objects
  evaluation/pr.png             precision-recall curve per class at IoU 0.5
  evaluation/examples.png       predictions (red) vs ground truth (green) on val images: the best, the worst,
                                the most confident false positive and the most missed objects
  evaluation/detections.json    every detection above the graph's score threshold, in original pixels
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from tasks.config import Params
from tasks.dense import load_maps
from tasks.detection.metrics import coco_eval
from tasks.detection.model import load_detector
from tasks.detection.predict import detect_cached, ground_truth, read_annotations
from tasks.files import write_json, write_text
from tasks.layout import Layout
from tasks.plots import new_figure, save_png

SHOW_THRESHOLD = 0.3  # detections drawn and counted in the pictures (mAP uses them all)


def match(gt: dict, det: dict, iou: float = 0.5) -> dict:
    """Greedy matching at `iou` of detections scoring >= SHOW_THRESHOLD: true/false positives, missed objects."""
    from torchvision.ops import box_iou

    keep = det["scores"] >= SHOW_THRESHOLD
    boxes, labels, scores = det["boxes"][keep], det["labels"][keep], det["scores"][keep]
    care = ~gt["difficult"]
    g_boxes, g_labels = gt["boxes"][care], gt["labels"][care]
    used = np.zeros(len(g_boxes), bool)
    fp_scores = []
    if len(boxes) and len(g_boxes):
        ious = box_iou(torch.from_numpy(boxes), torch.from_numpy(g_boxes)).numpy()
    for d in np.argsort(-scores):
        cand = np.flatnonzero((g_labels == labels[d]) & ~used) if len(g_boxes) else []
        best = max(cand, key=lambda j: ious[d, j], default=None) if len(cand) else None
        if best is not None and ious[d, best] >= iou:
            used[best] = True
        else:
            fp_scores.append(float(scores[d]))
    tp, fp, fn = int(used.sum()), len(fp_scores), int((~used).sum())
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return {"tp": tp, "fp": fp, "fn": fn, "f1": f1, "top_fp": max(fp_scores, default=0.0)}


def plot_pr(pr: dict, path: Path) -> None:
    fig, ax = new_figure((5.5, 4.5))
    for name, curve in pr.items():
        ax.plot(curve["recall"], curve["precision"], label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall at IoU 0.5")
    ax.legend(loc="lower left")
    save_png(fig, path)


def plot_examples(panels: list[tuple[str, Path, dict, dict]], classes: list[str], path: Path) -> None:
    """One panel per (title, image, ground truth, detections): green = ground truth, red = predictions."""
    from matplotlib.patches import Rectangle

    from tasks.preprocess import decode_rgb

    fig, axes = new_figure((5 * len(panels), 4.4), 1, len(panels))
    axes = np.atleast_1d(axes).ravel()
    for ax, (title, image, gt, det) in zip(axes, panels):
        img = decode_rgb(image, 10**6)
        ax.imshow(np.asarray(img))
        for box, label in zip(gt["boxes"], gt["labels"]):
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color="lime", lw=1.5))
        for box, label, score in zip(det["boxes"], det["labels"], det["scores"]):
            if score < SHOW_THRESHOLD:
                continue
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, color="red", lw=1, ls="--"))
            ax.text(box[0], box[1], f"{classes[label]} {score:.2f}", color="white", fontsize=6,
                    bbox={"facecolor": "red", "alpha": 0.6, "pad": 0.5, "lw": 0})
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    save_png(fig, path, dpi=90)


def evaluate(params: Params, layout: Layout, out_dir: Path) -> dict:
    """The evaluate stage for detection: the metrics (reports/metrics.json) and, into `out_dir`, the tables and
    pictures above."""
    dataset = layout.dataset()
    split = dataset.eval_split
    detector, ckpt = load_detector(layout, dataset, with_backbone=False)
    meta = ckpt.meta
    gts = ground_truth(read_annotations(layout), dataset, split)
    card = ckpt.card
    dets = detect_cached(detector, load_maps(layout, "detection"), split, list(range(len(gts))), card, gts)
    r = coco_eval(gts, dets, dataset.classes)

    items = dataset.split(split)
    objects = {c: int(sum((g["labels"] == k).sum() for g in gts)) for k, c in enumerate(dataset.classes)}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "ap", "ap50", "recall", "objects"])
    for c, v in r["per_class"].items():
        w.writerow([c, round(v["ap"], 6), round(v["ap50"], 6), round(v["recall"], 6), objects[c]])
    write_text(out_dir / "per_class.csv", buf.getvalue())
    write_json(out_dir / "detections.json", [
        {"path": it.path, "boxes": np.round(d["boxes"], 2).tolist(), "scores": np.round(d["scores"], 5).tolist(),
         "labels": [dataset.classes[k] for k in d["labels"]]} for it, d in zip(items, dets)])
    plot_pr(r["pr"], out_dir / "pr.png")
    matches = [match(g, d) for g, d in zip(gts, dets)]
    picks = [("best", int(np.argmax([m["f1"] for m in matches]))), ("worst", int(np.argmin([m["f1"] for m in matches]))),
             ("most confident false positive", int(np.argmax([m["top_fp"] for m in matches]))),
             ("most missed objects", int(np.argmax([m["fn"] for m in matches])))]
    panels = [(f"{why}: {Path(items[i].path).name}\nTP {matches[i]['tp']}  FP {matches[i]['fp']}  missed {matches[i]['fn']}",
               dataset.resolve(items[i]), gts[i], dets[i]) for why, i in picks]
    plot_examples(panels, dataset.classes, out_dir / "examples.png")
    return {
        "map": round(r["map"], 6), "ap50": round(r["ap50"], 6), "ap75": round(r["ap75"], 6),
        "ap50_per_class": {c: round(v["ap50"], 6) for c, v in r["per_class"].items()},
        "ap_per_class": {c: round(v["ap"], 6) for c, v in r["per_class"].items()},
        "recall_per_class": {c: round(v["recall"], 6) for c, v in r["per_class"].items()},
        "n": len(gts), "objects": objects, "eval_split": split, "model_selected_on": meta.get("selection"),
        "best_epoch": meta.get("best_epoch"),
        "skipped_images": int(layout.read_json(layout.prepared / "report.json", {}).get("skipped_count", 0)),
    }
