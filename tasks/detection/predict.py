"""Detections on cached maps and the ground truth they are scored against, in original image pixels: what the
train stage (the selection split, every epoch) and the evaluate stage (the evaluation split) share.

Images are resized to the input size without cropping, so a box maps between the input and the original image
by two scale factors, exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from tasks.dense import flip_boxes, gather_maps
from tasks.detection.model import Detector
from tasks.layout import ArtifactError, Dataset, Layout
from tasks.preprocess import PreprocessingCard


def read_annotations(layout: Layout) -> dict:
    """annotations.json (prepare): per image its boxes, labels, difficult flags and size; the fix when the
    prepared data is another task's."""
    from tasks.files import read_json

    task = layout.read_json(layout.prepared / "dataset.json", {}).get("task")
    if task != "detection" or not layout.annotations.exists():
        raise ArtifactError(f"{layout.prepared} holds a {task or 'classification'} dataset: re-run prepare with "
                            f"task: detection")
    return read_json(layout.annotations)


def ground_truth(annotations: dict, dataset: Dataset, split: str) -> list[dict]:
    """Per image of `split`: boxes in original pixels, labels, difficult flags, size."""
    out = []
    for it in dataset.split(split):
        a = annotations[it.path]
        out.append({"boxes": np.asarray(a["boxes"], np.float32).reshape(-1, 4), "labels": np.asarray(a["labels"], np.int64),
                    "difficult": np.asarray(a["difficult"], bool), "width": a["width"], "height": a["height"]})
    return out


def to_input(gt: dict, card: PreprocessingCard, flip: bool = False) -> dict[str, torch.Tensor]:
    """A training target: boxes scaled to the input size (and mirrored for a flipped image)."""
    h, w = card.input_size
    boxes = gt["boxes"] * np.array([w / gt["width"], h / gt["height"]] * 2, np.float32)
    if flip:
        boxes = flip_boxes(boxes, w)
    return {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(gt["labels"])}


def to_original(boxes: np.ndarray, gt: dict, card: PreprocessingCard) -> np.ndarray:
    """Boxes in input pixels -> the original image's pixels (plain resize: two scale factors, exact)."""
    h, w = card.input_size
    return boxes * np.array([gt["width"] / w, gt["height"] / h] * 2, np.float32)


@torch.no_grad()
def detect_cached(detector: Detector, maps: dict, key: str, index: list[int], card: PreprocessingCard,
                  gts: list[dict], batch_size: int = 8) -> list[dict]:
    """Detections (original pixels, padding dropped) for cached images `index` of `key` ("val", "train", ...);
    `gts` indexed like the split (for each image's size)."""
    detector.eval()
    out = []
    for s in range(0, len(index), batch_size):
        chunk = index[s : s + batch_size]
        boxes, scores, labels = detector.detect(gather_maps(maps, key, chunk))
        for j, i in enumerate(chunk):
            keep = scores[j] > 0
            out.append({"boxes": to_original(boxes[j][keep].numpy(), gts[i], card), "scores": scores[j][keep].numpy(),
                        "labels": labels[j][keep].numpy()})
    return out
