"""The building blocks of params.yaml's sections: strict frozen models, lenient numbers, and the parts tasks share.

tasks/config.py assembles the whole Params from these and from each task's own section (tasks/<task>/params.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _float_from_str(value: Any) -> Any:
    # YAML 1.1 reads "1e-3" (no dot) as a string, and `dvc exp run -S` passes what it is given.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def listify(value: Any) -> Any:
    # `-S classification.l2=0.01` gives a scalar where a list is expected.
    return [value] if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value


Float = Annotated[float, BeforeValidator(_float_from_str)]
Fraction = Annotated[float, BeforeValidator(_float_from_str), Field(ge=0.0, lt=1.0)]
FloatList = Annotated[list[Annotated[Float, Field(ge=0.0)]], BeforeValidator(listify), Field(min_length=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


# ---------------------------------------------------------------- what the features stage caches


class PooledFeatures(Section):
    """How the pooled feature vector of an image is formed (recorded in the card: features.onnx and the exported
    model compute the same)."""

    layers: Literal["last", "multi"] = "last"
    """last = the backbone's pooled features; multi = every stage's pooled output concatenated with them
    (Head2Toe-style, for data far from ImageNet; one pass, still computed once)."""
    flip: bool = False
    """Average each image's features with its mirror image's (twice the backbone compute, once)."""


class DenseFeatures(Section):
    """The frozen backbone's maps at strides 8/16/32, cached once."""

    input_size: Annotated[list[int], Field(min_length=2, max_length=2)] = [480, 640]
    """[height, width] every image is resized to (no crop; boxes and masks map back exactly). Multiples of 32."""
    flip_train: bool = True
    """Also cache the maps of horizontally flipped training images (a free augmentation)."""

    @model_validator(mode="after")
    def _multiple_of_32(self) -> DenseFeatures:
        if any(v < 32 or v % 32 for v in self.input_size):
            raise ValueError(f"input_size: {self.input_size} must be multiples of 32 (the coarsest stride)")
        return self


# ---------------------------------------------------------------- heads on pooled features

ClassWeights = Literal["none", "balanced"] | dict[str, Annotated[Float, Field(gt=0.0)]]


class PooledHead(Section):
    """A head on cached pooled features: the knobs single-label and multi-label classification share."""

    features: PooledFeatures = PooledFeatures()
    head: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = Field(512, ge=1)
    """mlp only."""
    dropout: Fraction = 0.0
    optimizer: Literal["auto", "lbfgs", "adamw", "adam", "sgd"] = "auto"
    """auto: lbfgs for a linear head on cached features (the loss minimised exactly, L2 chosen on the
    selection split), adamw otherwise."""
    l2: FloatList = [0.001, 0.01, 0.1]
    """lbfgs: candidate L2 strengths (on the mean loss); the selection split picks one."""
    feature_power: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.5
    """Signed power applied to features before standardising (0.5 = square root; 1.0 = off)."""
    lr: Annotated[Float, Field(gt=0.0)] = 0.001
    weight_decay: Annotated[Float, Field(ge=0.0)] = 0.0001
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(20, ge=0)
    """Stop when the selection-split score has not improved for this many epochs; 0 disables."""
    seed: int = 0
    holdout_fraction: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.15
    """Without a test split, val is the evaluation split: L2 (or the epoch) is then chosen on this fraction of
    train, and the head refit on all of train (val stays untouched)."""
    class_weights: ClassWeights = "none"
    """none | balanced | {label: weight}. Classification: each image's loss weighted by its class's weight
    (balanced: n / (classes * n_class) in train); multi-label: each tag's positives weighted (balanced:
    negatives / positives in train). Labels left out of a mapping weigh 1."""

    def _gradient_only(self) -> bool:
        """Settings lbfgs cannot fit (a task adds its own, e.g. the backbone in the loop)."""
        return self.head != "linear"

    @model_validator(mode="after")
    def _lbfgs_fits(self) -> PooledHead:
        if self.optimizer == "lbfgs" and self._gradient_only():
            raise ValueError(f"optimizer: lbfgs fits a linear head on cached features only; use adamw (or auto) "
                             f"with head={self.head!r}")
        return self

    @property
    def solver(self) -> str:
        """The optimizer `auto` stands for with these settings."""
        if self.optimizer != "auto":
            return self.optimizer
        return "adamw" if self._gradient_only() else "lbfgs"


class DenseHead(Section):
    """A head trained by epochs on cached dense maps (AdamW, a one-epoch warm-up then cosine decay)."""

    epochs: int = Field(16, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: Annotated[Float, Field(gt=0.0)] = 0.003
    weight_decay: Annotated[Float, Field(ge=0.0)] = 0.0001
    patience: int = Field(6, ge=0)
    """Stop when the selection split's score has not improved for this many epochs; 0 = off."""
    holdout_fraction: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.1
    """Without a test split: share of train images held out to choose the epoch."""
    seed: int = 0
