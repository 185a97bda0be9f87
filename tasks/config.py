"""Every knob of the pipeline, typed and validated, loaded from one params.yaml.

Each section is a frozen pydantic model (strict: no silent "3" -> 3). A validation
error becomes one ConfigError line: an unknown key names the valid ones (and the
closest match), a wrong type names the key and the type expected, a value out of
range names the bound. `python -m tasks.config --schema` prints the JSON schema
of params.yaml (committed as params.schema.json, which editors use for completion).
"""

from __future__ import annotations

import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")


class UserError(Exception):
    """A problem the user fixes (params, data, missing artifact): one line naming the fix, never a traceback."""


class ConfigError(UserError, ValueError):
    """A params file that does not match the schema below."""


def _float_from_str(value: Any) -> Any:
    # YAML 1.1 reads "1e-3" (no dot) as a string, and `dvc exp run -S` passes what it is given.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _listify(value: Any) -> Any:
    # `-S train.l2=0.01` gives a scalar where a list is expected.
    return [value] if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value


Float = Annotated[float, BeforeValidator(_float_from_str)]
Fraction = Annotated[float, BeforeValidator(_float_from_str), Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


DETECTION_DATASETS = ("voc", "coco")
SEGMENTATION_DATASETS = ("masks", "voc_seg")


class DataParams(Section):
    dataset: Literal["digits", "imagefolder", "cifar10", "cifar100", "voc", "coco", "masks", "voc_seg"] = "digits"
    """classification: digits (offline demo) | imagefolder | cifar10 | cifar100;
    detection: voc (Annotations/, JPEGImages/, ImageSets/Main/) | coco (annotations/instances_<split>.json);
    segmentation: masks (<split>/images + <split>/masks + labelmap.txt) | voc_seg (SegmentationClass/)"""
    root: str = "data/raw"
    """imagefolder: folder of class sub-folders, or of train/ val/ [test/] each holding class folders."""
    val_fraction: Fraction = 0.15
    """Share of each class put in val when the data has no val/ folder."""
    test_fraction: Fraction = 0.15
    """Share of each class put in test when the data has no test/ folder."""
    seed: int = 0
    """Split assignment (hash order: adding files keeps the others in place)."""
    min_images_per_class: int = Field(2, ge=1)
    """Fewer usable images in a class is an error."""
    max_images_per_class: int | None = Field(None, ge=1)
    """Cap per class and split (quick experiments); null keeps everything."""
    download_url: str | None = None
    """cifar10/cifar100 archive URL (a mirror); null = torchvision's official URL."""
    download_dir: str = "data/downloads"
    """Where CIFAR archives live (place them here for offline use)."""

    @model_validator(mode="after")
    def _fractions(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.val_fraction + data.test_fraction must be < 1")
        return self


class BackboneParams(Section):
    name: str = "efficientnet_lite0"
    """efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2 (bundled, offline) | resnet50 | resnet18 |
    mobilenet_v3_large | efficientnet_b0 | timm:<name> | file:<path> | auto (the select stage chooses)"""
    arch: str | None = None
    """Architecture of a `file:` state dict: a timm model name (e.g. resnet18) or torchvision:<name>."""
    url: str | None = None
    """Mirror for the weights file of a torchvision backbone (its file name must stay the same)."""


class DenseParams(Section):
    """Detection and segmentation: the frozen backbone's maps at strides 8/16/32."""

    input_size: Annotated[list[int], Field(min_length=2, max_length=2)] = [480, 640]
    """[height, width] every image is resized to (no crop; boxes and masks map back exactly). Multiples of 32."""
    flip_train: bool = True
    """Also cache the maps of horizontally flipped training images (a free augmentation)."""

    @model_validator(mode="after")
    def _multiple_of_32(self) -> DenseParams:
        if any(v < 32 or v % 32 for v in self.input_size):
            raise ValueError(f"dense.input_size: {self.input_size} must be multiples of 32 (the coarsest stride)")
        return self


class DetectionParams(Section):
    """The detection head (FCOS-style, anchor-free, on a small trainable FPN) and its training."""

    width: int = Field(64, ge=8)
    """Channels of the FPN and the head."""
    num_convs: int = Field(4, ge=0)
    """Conv layers per head branch (torchvision's FCOS default, 4)."""
    epochs: int = Field(24, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: Annotated[Float, Field(gt=0.0)] = 0.002
    weight_decay: Annotated[Float, Field(ge=0.0)] = 0.0001
    patience: int = Field(8, ge=0)
    """Stop when the selection split's mAP has not improved for this many epochs; 0 = off."""
    augment: bool = False
    """Scale jitter + mirror + random offset per step, the frozen backbone run on every training batch (no
    cached training maps: several times slower on a CPU)."""
    scale_jitter: Annotated[list[Annotated[Float, Field(gt=0.0)]], BeforeValidator(_listify),
                            Field(min_length=2, max_length=2)] = [0.75, 1.25]
    """augment: each image scaled by a factor drawn from [low, high]."""
    ema: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.99
    """Decay per step of an exponential moving average of the head's weights, which is what is scored and
    kept (ramped up over the first steps: min(ema, (1 + step) / (10 + step))); 0 = off (the raw weights)."""
    holdout_fraction: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.1
    """Without a test split: share of train images held out to choose the epoch."""
    score_threshold: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.05
    nms_threshold: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.6
    max_detections: int = Field(100, ge=1)
    pre_nms_top_k: int = Field(1000, ge=1)
    seed: int = 0


class SegmentationParams(Section):
    """The segmentation decoder (FPN-style, on the cached maps) and its training."""

    width: int = Field(96, ge=8)
    """Channels of the decoder at stride 16 (a third of them at stride 8, where most of the work is)."""
    epochs: int = Field(16, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: Annotated[Float, Field(gt=0.0)] = 0.003
    """AdamW, cosine schedule with a one-epoch warm-up."""
    weight_decay: Annotated[Float, Field(ge=0.0)] = 0.0001
    patience: int = Field(6, ge=0)
    """Stop when the selection split's mIoU has not improved for this many epochs; 0 = off."""
    holdout_fraction: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.1
    """Without a test split: share of train images held out to choose the epoch."""
    loss_stride: Literal[2, 4, 8] = 4
    """The loss is computed on labels at input size / loss_stride (majority vote per cell), cached by the
    features stage; metrics are always per original pixel."""
    class_weighting: Literal["none", "inverse_sqrt"] = "none"
    """none | inverse_sqrt: cross-entropy weights 1/sqrt(pixel frequency) of each class in train, mean 1."""
    seed: int = 0


class SelectParams(Section):
    """The select stage: a cheap probe of candidate backbones on a subsample of train (run for backbone.name: auto)."""

    candidates: Annotated[list[str], BeforeValidator(_listify), Field(min_length=1)] = [
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    """Backbone names (as backbone.name); one whose weights cannot be had is skipped with the reason."""
    max_images_per_class: int = Field(40, ge=2)
    """Train images per class the probe looks at (a stratified, deterministic subsample)."""
    max_fraction: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.15
    """...and at most this share of all the dataset's images per candidate, so that the probe of three
    candidates stays well under one features pass of the largest over the full data."""
    max_latency_ms: Annotated[Float | None, Field(gt=0.0)] = None
    """auto picks the most accurate candidate whose onnxruntime batch-1 latency here is within this; null = no budget."""
    folds: int = Field(5, ge=2)
    """Cross-validation folds of the probe (stratified)."""
    repeats: int = Field(2, ge=1)
    """The k-fold probe is repeated with this many fold assignments (its mean is then steadier)."""


class FeaturesParams(Section):
    batch_size: int = Field(32, ge=1)
    engine: Literal["auto", "torch", "onnxruntime"] = "auto"
    """auto: torch on CUDA when present, else onnxruntime on CPU (4-8x faster than torch eager here)."""
    decode_workers: int = Field(2, ge=1)
    """Threads that decode and resize images while the network runs."""
    layers: Literal["last", "multi"] = "last"
    """Classification: last = the backbone's pooled features; multi = every stage's pooled output concatenated
    with them (Head2Toe-style, for data far from ImageNet; one pass, still computed once)."""
    flip: bool = False
    """Classification: average each image's features with its mirror image's (twice the backbone compute,
    once; the exported model does the same)."""


class TrainParams(Section):
    head: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = Field(512, ge=1)
    dropout: Fraction = 0.0
    optimizer: Literal["auto", "lbfgs", "adamw", "adam", "sgd"] = "auto"
    """auto: lbfgs for a linear head on cached features (logistic regression solved exactly, L2 chosen on
    the selection split), adamw otherwise (mlp, augment, unfreeze)."""
    l2: Annotated[list[Annotated[Float, Field(ge=0.0)]], BeforeValidator(_listify), Field(min_length=1)] = [0.001, 0.01, 0.1]
    """lbfgs: candidate L2 strengths (on the mean cross-entropy); the selection split picks one."""
    feature_power: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.5
    """Signed power applied to features before standardising (0.5 = square root; 1.0 = off)."""
    lr: Annotated[Float, Field(gt=0.0)] = 0.001
    weight_decay: Annotated[Float, Field(ge=0.0)] = 0.0001
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(20, ge=0)
    """Stop when the selection-split accuracy has not improved for this many epochs; 0 disables."""
    label_smoothing: Fraction = 0.0
    seed: int = 0
    augment: bool = False
    """Random resized crop + flip, running the frozen backbone every epoch instead of the feature cache."""
    unfreeze_blocks: int = Field(0, ge=0)
    """Train the last N blocks of the backbone too (BatchNorm included); 0 = frozen."""
    backbone_lr: Annotated[Float, Field(gt=0.0)] = 0.0001
    holdout_fraction: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.15
    """Without a test split, val is the evaluation split: the epoch (or L2) is then chosen on this
    fraction of train, and the head refit on all of train (val stays untouched)."""

    @model_validator(mode="after")
    def _lbfgs_fits(self) -> TrainParams:
        if self.optimizer == "lbfgs" and (self.head != "linear" or self.augment or self.unfreeze_blocks):
            raise ValueError(f"train.optimizer: lbfgs fits a linear head on cached features only; use adamw (or auto) "
                             f"with head={self.head!r}, augment={self.augment}, unfreeze_blocks={self.unfreeze_blocks}")
        return self

    @property
    def solver(self) -> str:
        """The optimizer `auto` stands for with these settings."""
        if self.optimizer != "auto":
            return self.optimizer
        return "lbfgs" if self.head == "linear" and not self.augment and not self.unfreeze_blocks else "adamw"


class EvaluateParams(Section):
    ece_bins: int = Field(15, ge=1)
    top_mistakes: int = Field(20, ge=0)
    bootstrap_samples: int = Field(1000, ge=0)
    """Resamples for the 95% bootstrap intervals of accuracy and macro-F1; 0 = none."""
    bootstrap_seed: int = 0


class ExportParams(Section):
    opset: int = Field(17, ge=13)
    quantize: Literal["none", "int8"] = "none"
    """none | int8: also write a static-QDQ, per-channel INT8 model calibrated on training images."""
    max_int8_drop: Annotated[Float, Field(ge=0.0)] = 1.0
    """The INT8 model is not written if its accuracy drops by more than this many points."""
    calibration_images: int = Field(128, ge=1)
    parity_tolerance: Annotated[Float, Field(gt=0.0)] = 0.0001
    """The parity gate: max |p_onnx - p_torch| allowed, every eval image."""
    triton_model_name: str = Field("classifier", pattern=r"^[A-Za-z0-9_-]+$")
    triton_max_batch_size: int = Field(32, ge=1)


class Params(Section):
    task: Literal["classification", "detection", "segmentation"] = "classification"
    """What the pipeline learns; every stage dispatches on it."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available (autocast + channels_last), else CPU."""
    data: DataParams = DataParams()
    backbone: BackboneParams = BackboneParams()
    select: SelectParams = SelectParams()
    features: FeaturesParams = FeaturesParams()
    dense: DenseParams = DenseParams()
    train: TrainParams = TrainParams()
    detection: DetectionParams = DetectionParams()
    segmentation: SegmentationParams = SegmentationParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()


    @model_validator(mode="after")
    def _dataset_fits_task(self) -> Params:
        fits = {"detection": DETECTION_DATASETS, "segmentation": SEGMENTATION_DATASETS}.get(
            self.task, ("digits", "imagefolder", "cifar10", "cifar100"))
        if self.data.dataset not in fits:
            raise ValueError(f"data.dataset: {self.data.dataset!r} is not a {self.task} dataset; "
                             f"with task: {self.task} use one of {', '.join(fits)}")
        if self.task != "classification" and (self.features.layers != "last" or self.features.flip):
            raise ValueError(f"features.layers / features.flip shape pooled classification features; with task: "
                             f"{self.task} leave them at last / false (dense.flip_train mirrors training images)")
        return self


# ---------------------------------------------------------------- errors as one line


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a non-empty list of {_type_name(typing.get_args(tp)[0])}"
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _walk(loc: tuple) -> tuple[str, Any, type[BaseModel] | None]:
    """(dotted key, annotation at it, the model holding its last part) for a pydantic error location."""
    key, tp, owner = "", Params, None
    for part in loc:
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
        if isinstance(inner, type) and issubclass(inner, BaseModel) and isinstance(part, str):
            owner = inner
            if part not in inner.model_fields:
                return (f"{key}.{part}" if key else part), None, owner
            key, tp = (f"{key}.{part}" if key else part), inner.model_fields[part].annotation
        elif isinstance(part, int) and typing.get_origin(inner) is list:
            key, tp = f"{key}[{part}]", typing.get_args(inner)[0]
        else:
            break  # a union arm or validator name, not a key
    return key, tp, owner


def one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key, tp, owner = _walk(err["loc"])
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown param {key!r}{hint}; valid keys here: {', '.join(valid)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("value_error", "assertion_error"):
        return msg
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short",
                       "string_pattern_mismatch"):
        return f"{key}: {msg[0].lower()}{msg[1:]}, got {value!r}"
    got = f"got {type(value).__name__} {value!r}" if not isinstance(value, dict) else "got a mapping"
    return f"{key or 'params'}: expected {_type_name(tp)}, {got}"


def parse_params(raw: Any) -> Params:
    """Validate a plain mapping (as read from YAML) into Params."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(one_line(exc)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path.resolve()} (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    try:
        return parse_params(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def as_dict(obj: BaseModel) -> dict:
    return obj.model_dump(mode="json")


def json_schema() -> dict:
    schema = Params.model_json_schema()
    schema["title"] = "tlcv params.yaml"
    return schema


if __name__ == "__main__":
    if sys.argv[1:] != ["--schema"]:
        sys.exit("usage: python -m tasks.config --schema  (prints the JSON schema of params.yaml)")
    print(json.dumps(json_schema(), indent=2))
