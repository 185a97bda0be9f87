"""params.yaml `detection:` — the FCOS-style head on a small trainable FPN over the cached maps."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field

from tasks.sections import DenseFeatures, DenseHead, Float, listify


class DetectionParams(DenseHead):
    """task: detection. AdamW, early stopping on the selection split's mAP."""

    features: DenseFeatures = DenseFeatures()
    width: int = Field(64, ge=8)
    """Channels of the FPN and the head."""
    num_convs: int = Field(4, ge=0)
    """Conv layers per head branch (torchvision's FCOS default, 4)."""
    epochs: int = Field(24, ge=1)
    lr: Annotated[Float, Field(gt=0.0)] = 0.002
    patience: int = Field(8, ge=0)
    ema: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.99
    """Decay per step of an exponential moving average of the head's weights, which is what is scored and
    kept (ramped up over the first steps: min(ema, (1 + step) / (10 + step))); 0 = off (the raw weights)."""
    augment: bool = False
    """Scale jitter + mirror + random offset per step, the frozen backbone run on every training batch (no
    cached training maps: several times slower on a CPU)."""
    scale_jitter: Annotated[list[Annotated[Float, Field(gt=0.0)]], BeforeValidator(listify),
                            Field(min_length=2, max_length=2)] = [0.75, 1.25]
    """augment: each image scaled by a factor drawn from [low, high]."""
    score_threshold: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.05
    """In the exported graph: detections scoring lower are padding."""
    nms_threshold: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.6
    max_detections: int = Field(100, ge=1)
    """K: boxes [N, K, 4], scores [N, K], labels [N, K]."""
    pre_nms_top_k: int = Field(1000, ge=1)
