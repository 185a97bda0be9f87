"""What the features stage caches for segmentation: the dense maps (tasks/dense.py) and, beside them, each
image's mask at the loss resolution, the training targets.

`y_<split>` uint8 [N, H/stride, W/stride] (stride: segmentation.features.loss_stride; the majority label of
each cell, IGNORE only where ignored pixels are the majority), and `y_train_flip`, mirrored, when the mirrored
training maps are cached (segmentation.features.flip_train).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tasks import dense as KIND  # noqa: N812, F401 - the registry's name for the feature kind
from tasks.segmentation.data import downsample_labels, label_size, load_mask, meta_lut, read_masks


def label_options(params, layout) -> dict:
    """What the cached labels depend on beyond the images (joins the feature cache key)."""
    from tasks.files import sha256_file

    if not layout.masks.exists():
        read_masks(layout)  # raises the fix
    return {"loss_stride": params.segmentation.features.loss_stride, "masks_sha256": sha256_file(layout.masks)}


def write_labels(create, params, layout, dataset, card, counts: dict[str, int]) -> None:
    """Into the feature cache: `y_<split>` (+ `y_train_flip`), the loss targets."""
    meta = read_masks(layout)
    lut, k = meta_lut(meta), len(meta["classes"])
    size = label_size(card.input_size, params.segmentation.features.loss_stride)
    flip_train = params.head.features.flip_train
    for split, n in counts.items():
        arr = create(f"y_{split}", (n, *size), np.uint8)
        flip = create("y_train_flip", (n, *size), np.uint8) if flip_train and split == "train" else None

        def one(it):
            return downsample_labels(load_mask(dataset.root / meta["masks"][it.path]["mask"], lut), size, k)

        with ThreadPoolExecutor(2) as pool:
            for i, y in enumerate(pool.map(one, dataset.split(split))):
                arr[i] = y
                if flip is not None:
                    flip[i] = y[:, ::-1]
