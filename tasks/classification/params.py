"""params.yaml `classification:` — the head that learns one label per image, on the cached pooled features."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from tasks.sections import Float, Fraction, PooledHead


class ClassificationParams(PooledHead):
    """task: classification. The default head is softmax regression solved with L-BFGS (L2 chosen on the
    selection split); adamw/adam/sgd train by epochs with early stopping."""

    label_smoothing: Fraction = 0.0
    augment: bool = False
    """Random resized crop + flip, running the frozen backbone every epoch instead of the feature cache."""
    unfreeze_blocks: int = Field(0, ge=0)
    """Train the last N blocks of the backbone too (BatchNorm included); 0 = frozen."""
    backbone_lr: Annotated[Float, Field(gt=0.0)] = 0.0001

    def _gradient_only(self) -> bool:
        return self.head != "linear" or self.augment or bool(self.unfreeze_blocks)
