"""What the features stage caches for classification: pooled features (tasks/pooled.py) and y_<split>, the class
index of every image."""

from __future__ import annotations

import numpy as np

from tasks import pooled as KIND  # noqa: N812 - the registry's name for the feature kind


def label_options(params, layout) -> None:
    """The targets are the manifest's labels (already in the cache key)."""
    return None


def write_labels(create, params, layout, dataset, card, counts: dict[str, int]) -> None:
    for split in counts:
        create(f"y_{split}", (counts[split],), np.int64)[...] = dataset.labels(split)
