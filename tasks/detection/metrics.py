"""COCO-style detection metrics with pycocotools (no hand-written AP).

Ground truth and detections are in original image pixels. VOC's `difficult` objects go in as
COCO `iscrowd` regions: a detection on one is neither a true nor a false positive, as VOC
evaluation ignores difficult objects.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np


def coco_eval(gts: list[dict], dets: list[dict], classes: list[str]) -> dict:
    """gts: per image {"boxes" [M, 4] xyxy, "labels" [M], "difficult" [M]}; dets: per image {"boxes", "scores", "labels"}.

    Returns map (AP@[.5:.95]), ap50, ap75, per-class AP, AP50 and recall (at IoU .5, 100 detections),
    and the precision-recall curve per class at IoU .5.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, (g, d) in enumerate(zip(gts, dets)):
        images.append({"id": i})
        for box, label, diff in zip(np.asarray(g["boxes"], float).reshape(-1, 4), g["labels"], g["difficult"]):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label) + 1, "iscrowd": int(bool(diff)),
                         "bbox": [float(box[0]), float(box[1]), float(w), float(h)], "area": float(w * h)})
        for box, score, label in zip(np.asarray(d["boxes"], float).reshape(-1, 4), d["scores"], d["labels"]):
            results.append({"image_id": i, "category_id": int(label) + 1, "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    empty = {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "per_class": {c: {"ap": 0.0, "ap50": 0.0, "recall": 0.0} for c in classes},
             "pr": {c: {"recall": [], "precision": []} for c in classes}}
    if not results or not anns:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxdets]
    recall = ev.eval["recall"]  # [T, K, A, M]
    rec_thrs = ev.params.recThrs

    def mean_valid(a: np.ndarray) -> float:
        a = a[a > -1]
        return float(a.mean()) if a.size else 0.0

    per_class, pr = {}, {}
    for k, c in enumerate(classes):
        per_class[c] = {"ap": mean_valid(precision[:, :, k, 0, -1]), "ap50": mean_valid(precision[0, :, k, 0, -1]),
                        "recall": max(float(recall[0, k, 0, -1]), 0.0)}
        p = precision[0, :, k, 0, -1]
        pr[c] = {"recall": [float(r) for r, q in zip(rec_thrs, p) if q > -1], "precision": [float(q) for q in p if q > -1]}
    return {"map": float(ev.stats[0]), "ap50": float(ev.stats[1]), "ap75": float(ev.stats[2]),
            "per_class": per_class, "pr": pr}
