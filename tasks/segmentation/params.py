"""params.yaml `segmentation:` — the FPN-style decoder over the cached maps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.sections import DenseFeatures, DenseHead


class SegmentationFeatures(DenseFeatures):
    loss_stride: Literal[2, 4, 8] = 4
    """The loss is computed on labels at input size / loss_stride (majority vote per cell), cached beside the
    maps; metrics are always per original pixel."""


class SegmentationParams(DenseHead):
    """task: segmentation. AdamW, early stopping on the selection split's mIoU (per original pixel)."""

    features: SegmentationFeatures = SegmentationFeatures()
    width: int = Field(96, ge=8)
    """Channels of the decoder at stride 16 (a third of them at stride 8, where most of the work is)."""
    class_weighting: Literal["none", "inverse_sqrt"] = "none"
    """none | inverse_sqrt: cross-entropy weights 1/sqrt(pixel frequency) of each class in train, mean 1."""
