"""Every knob of the pipeline, typed and validated, loaded from one params.yaml.

Each section is a frozen dataclass. Loading walks the YAML against the
dataclass fields: an unknown key names the valid ones, a wrong type names the
key and the type expected, a value outside its choices names the choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """A params file that does not match the schema below."""


@dataclass(frozen=True)
class DataParams:
    dataset: Literal["digits", "imagefolder", "cifar10", "cifar100"] = "digits"
    # imagefolder: folder of class sub-folders, or of train/ val/ [test/] each holding class folders.
    # Default data/raw (keep your images there and `dvc add data/raw`, or point it anywhere).
    root: str = "data/raw"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    min_images_per_class: int = 2
    # Cap per class and split (quick experiments); null keeps everything.
    max_images_per_class: int | None = None
    # cifar10/cifar100 archive URL (a mirror); null = torchvision's official URL.
    download_url: str | None = None
    download_dir: str = "data/downloads"


@dataclass(frozen=True)
class BackboneParams:
    # efficientnet_lite0 | resnet50 | resnet18 | mobilenet_v3_large | efficientnet_b0 | timm:<name> | file:<path>
    name: str = "efficientnet_lite0"
    # Architecture of a `file:` state dict: a timm model name (e.g. resnet18) or torchvision:<name>.
    arch: str | None = None
    # Mirror for the weights file of a torchvision backbone (its file name must stay the same).
    url: str | None = None


@dataclass(frozen=True)
class FeaturesParams:
    batch_size: int = 32
    # auto: torch on CUDA when present, else onnxruntime on CPU (4-8x faster than torch eager here).
    engine: Literal["auto", "torch", "onnxruntime"] = "auto"
    # Threads that decode and resize images while the network runs.
    decode_workers: int = 2


@dataclass(frozen=True)
class TrainParams:
    head: Literal["linear", "mlp"] = "linear"
    hidden_dim: int = 512
    dropout: float = 0.0
    # auto: lbfgs for a linear head on cached features (logistic regression solved exactly,
    # L2 strength chosen on the selection split), adamw otherwise (mlp, augment, unfreeze).
    optimizer: Literal["auto", "lbfgs", "adamw", "adam", "sgd"] = "auto"
    # lbfgs: candidate L2 strengths (on the mean cross-entropy); the selection split picks one.
    l2: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1])
    # Signed power applied to features before standardising (0.5 = square root; 1.0 = off).
    feature_power: float = 0.5
    lr: float = 0.001
    weight_decay: float = 0.0001
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: int = 100
    batch_size: int = 64
    # Stop when the selection-split accuracy has not improved for this many epochs; 0 disables.
    patience: int = 20
    label_smoothing: float = 0.0
    seed: int = 0
    # Random resized crop + flip, running the frozen backbone every epoch instead of the feature cache.
    augment: bool = False
    # Train the last N blocks of the backbone too (BatchNorm included); 0 = frozen.
    unfreeze_blocks: int = 0
    backbone_lr: float = 0.0001
    # Without a test split, val is the evaluation split: the epoch is then chosen on this
    # fraction of train, and the head refit on all of train (val stays untouched).
    holdout_fraction: float = 0.15

    @property
    def solver(self) -> str:
        """The optimizer `auto` stands for with these settings."""
        if self.optimizer != "auto":
            return self.optimizer
        return "lbfgs" if self.head == "linear" and not self.augment and not self.unfreeze_blocks else "adamw"


@dataclass(frozen=True)
class EvaluateParams:
    ece_bins: int = 15
    top_mistakes: int = 20


@dataclass(frozen=True)
class ExportParams:
    opset: int = 17
    # none | int8: also write a static-QDQ, per-channel INT8 model calibrated on training images.
    quantize: Literal["none", "int8"] = "none"
    # The INT8 model is not written if its accuracy drops by more than this many points.
    max_int8_drop: float = 1.0
    calibration_images: int = 128
    # The parity gate: max |p_onnx - p_torch| allowed, every eval image.
    parity_tolerance: float = 0.0001
    triton_model_name: str = "classifier"
    triton_max_batch_size: int = 32


@dataclass(frozen=True)
class Params:
    # auto: CUDA when available (autocast + channels_last), else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataParams = field(default_factory=DataParams)
    backbone: BackboneParams = field(default_factory=BackboneParams)
    features: FeaturesParams = field(default_factory=FeaturesParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a non-empty list of {_type_name(typing.get_args(tp)[0])}"
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not valid; expected {_type_name(tp)}")
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-3" as a string; accept numeric strings for floats only.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is list:
        (arm,) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # `-S train.l2=0.01` gives a scalar
        if isinstance(value, list) and value:
            return [_coerce(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        k = unknown[0]
        where = f"{prefix}.{k}" if prefix else str(k)
        close = difflib.get_close_matches(str(k), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown param {where!r}{hint}; valid keys here: {', '.join(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - all fields have defaults
        raise ConfigError(str(exc)) from exc
    _check_ranges(obj, prefix)
    return obj


def _check_ranges(obj: Any, prefix: str) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{prefix}.{name}: {why}, got {getattr(obj, name)!r}")

    if isinstance(obj, DataParams):
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(obj, name) < 1.0:
                raise bad(name, "must be in [0, 1)")
        if obj.val_fraction + obj.test_fraction >= 1.0:
            raise ConfigError("data.val_fraction + data.test_fraction must be < 1")
        if obj.min_images_per_class < 1:
            raise bad("min_images_per_class", "must be >= 1")
        if obj.max_images_per_class is not None and obj.max_images_per_class < 1:
            raise bad("max_images_per_class", "must be >= 1 or null")
    elif isinstance(obj, TrainParams):
        for name in ("epochs", "batch_size", "hidden_dim"):
            if getattr(obj, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("lr", "backbone_lr"):
            if getattr(obj, name) <= 0:
                raise bad(name, "must be > 0")
        if obj.weight_decay < 0 or obj.patience < 0 or obj.unfreeze_blocks < 0:
            raise ConfigError(f"{prefix}: weight_decay, patience and unfreeze_blocks must be >= 0")
        if not 0.0 <= obj.dropout < 1.0 or not 0.0 <= obj.label_smoothing < 1.0:
            raise ConfigError(f"{prefix}: dropout and label_smoothing must be in [0, 1)")
        if not 0.0 < obj.holdout_fraction < 1.0:
            raise bad("holdout_fraction", "must be in (0, 1)")
        if any(v < 0 for v in obj.l2):
            raise bad("l2", "must be >= 0")
        if not 0.0 < obj.feature_power <= 1.0:
            raise bad("feature_power", "must be in (0, 1]")
        if obj.optimizer == "lbfgs" and (obj.head != "linear" or obj.augment or obj.unfreeze_blocks):
            raise ConfigError(f"{prefix}.optimizer: lbfgs fits a linear head on cached features only; "
                              f"use adamw (or auto) with head={obj.head!r}, augment={obj.augment}, "
                              f"unfreeze_blocks={obj.unfreeze_blocks}")


    elif isinstance(obj, FeaturesParams):
        if obj.batch_size < 1 or obj.decode_workers < 1:
            raise ConfigError(f"{prefix}: batch_size and decode_workers must be >= 1")
    elif isinstance(obj, ExportParams):
        if obj.opset < 13 or obj.calibration_images < 1 or obj.triton_max_batch_size < 1:
            raise ConfigError(f"{prefix}: opset must be >= 13, calibration_images and triton_max_batch_size >= 1")
        if obj.max_int8_drop < 0 or obj.parity_tolerance <= 0:
            raise ConfigError(f"{prefix}: max_int8_drop must be >= 0 and parity_tolerance > 0")
        if not obj.triton_model_name.replace("_", "").replace("-", "").isalnum():
            raise bad("triton_model_name", "must be letters, digits, - and _ only")
    elif isinstance(obj, EvaluateParams):
        if obj.ece_bins < 1 or obj.top_mistakes < 0:
            raise ConfigError(f"{prefix}: ece_bins must be >= 1 and top_mistakes >= 0")


def parse_params(raw: Any) -> Params:
    """Validate a plain mapping (as read from YAML) into Params."""
    return _build(Params, raw, "")


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path.resolve()}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return parse_params(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def as_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
