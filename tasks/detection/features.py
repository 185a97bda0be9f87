"""What the features stage caches for detection: the dense maps (tasks/dense.py), nothing beside them.

The targets, boxes per image, stay in data/prepared/annotations.json (already part of the data version): they
are scaled to the input size when training reads them, so no option of theirs joins the cache key.
"""

from __future__ import annotations

from tasks import dense as KIND  # noqa: N812, F401 - the registry's name for the feature kind


def label_options(params, layout) -> None:
    return None


def write_labels(create, params, layout, dataset, card, counts: dict[str, int]) -> None:
    """Nothing to write: the boxes are read from annotations.json."""
