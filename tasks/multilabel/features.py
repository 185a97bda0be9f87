"""What the features stage caches for multi-label classification: pooled features (tasks/pooled.py) and y_<split>,
each image's tags as a multi-hot row (uint8 [N, T], the tags in dataset.classes order)."""

from __future__ import annotations

import numpy as np

from tasks import pooled as KIND  # noqa: N812, F401 - the registry's name for the feature kind
from tasks.layout import Dataset
from tasks.multilabel.data import tags_of


def label_options(params, layout) -> None:
    """The targets are the manifest's labels (the tags: already in the cache key)."""
    return None


def tag_matrix(dataset: Dataset, split: str) -> np.ndarray:
    """Multi-hot uint8 [N, T] of the split's images."""
    index = {t: i for i, t in enumerate(dataset.classes)}
    items = dataset.split(split)
    y = np.zeros((len(items), len(dataset.classes)), np.uint8)
    for row, it in enumerate(items):
        y[row, [index[t] for t in tags_of(it.label)]] = 1
    return y


def write_labels(create, params, layout, dataset: Dataset, card, counts: dict[str, int]) -> None:
    for split in counts:
        create(f"y_{split}", (counts[split], len(dataset.classes)), np.uint8)[...] = tag_matrix(dataset, split)
