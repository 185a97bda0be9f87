"""Predictions on cached maps at each original mask's own size: what the train stage (the selection split,
every epoch) and the evaluate stage (the evaluation split) score, per original pixel."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tasks.dense import gather_maps
from tasks.segmentation.data import load_mask
from tasks.segmentation.model import Segmenter, upsample


@torch.no_grad()
def predict_original(segmenter: Segmenter, maps: dict, key: str, index: list[int], mask_paths: list[Path],
                     lut: np.ndarray, batch_size: int = 8) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(i, truth, prediction) per cached image `index[i]` of `key`: class indices at the original mask's size
    (the logits upsampled bilinearly to it; the image was resized without a crop, so the map covers it all)."""
    segmenter.eval()
    for s in range(0, len(index), batch_size):
        chunk = index[s : s + batch_size]
        logits = segmenter.head(gather_maps(maps, key, chunk))
        for j, i in enumerate(chunk):
            truth = load_mask(mask_paths[i], lut)
            pred = upsample(logits[j : j + 1], truth.shape).argmax(1)[0].numpy().astype(np.uint8)
            yield i, truth, pred
