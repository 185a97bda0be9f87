"""Every knob of the pipeline, typed and validated, loaded from one params.yaml.

Each section is a frozen pydantic model (strict: no silent "3" -> 3). The shared sections are here; each task's
own section, named after the task, lives in its package (tasks/<task>/params.py), and only the chosen task's is
read. A validation error becomes one ConfigError line: an unknown key names the valid ones (and the closest
match), a wrong type names the key and the type expected, a value out of range names the bound, and a shared
param the chosen task does not read, set away from its default, names the task. `python -m tasks.config
--schema` prints the JSON schema of params.yaml (committed as params.schema.json, which editors use).
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
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, model_validator

from tasks import registry
from tasks.classification.params import ClassificationParams
from tasks.detection.params import DetectionParams
from tasks.multilabel.params import MultilabelParams
from tasks.sections import Float, FloatList, Fraction, Section, listify
from tasks.segmentation.params import SegmentationParams

PARAMS_FILE = Path("params.yaml")
RENAMED = {"train": "classification", "dense": "detection.features / segmentation.features",
           "features.layers": "classification.features.layers", "features.flip": "classification.features.flip",
           "multilabel.pos_weight": "multilabel.class_weights"}


class UserError(Exception):
    """A problem the user fixes (params, data, missing artifact): one line naming the fix, never a traceback."""


class ConfigError(UserError, ValueError):
    """A params file that does not match the schema below."""


class DataParams(Section):
    dataset: Literal["digits", "imagefolder", "cifar10", "cifar100", "csv", "voc", "coco", "masks", "voc_seg"] = "digits"
    """classification: digits (offline demo) | imagefolder | cifar10 | cifar100;
    multilabel: csv (data.root/labels.csv, or data.root the CSV itself: path,labels[,split], tags split by |);
    detection: voc (Annotations/, JPEGImages/, ImageSets/Main/) | coco (annotations/instances_<split>.json);
    segmentation: masks (<split>/images + <split>/masks + labelmap.txt) | voc_seg (SegmentationClass/)"""
    root: str = "data/raw"
    """The dataset's folder (imagefolder: class sub-folders, or train/ val/ [test/] each holding class folders)."""
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


class SelectParams(Section):
    """The select stage: a cheap probe of candidate backbones on a subsample of train (run for backbone.name: auto)."""

    candidates: Annotated[list[str], BeforeValidator(listify), Field(min_length=1)] = [
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    """Backbone names (as backbone.name); one whose weights cannot be had is skipped with the reason."""
    max_images_per_class: int = Field(40, ge=2)
    """Train images per class the probe looks at (a stratified, deterministic subsample)."""
    max_fraction: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.10
    """...and at most this share of all the dataset's images per candidate, so that the probe of three
    candidates stays well under one features pass of the largest over the full data (0.10: ~0.3 of it on
    hymenoptera, where successive halving drops nothing; 0.15 cost ~0.45)."""
    max_latency_ms: Annotated[Float | None, Field(gt=0.0)] = None
    """auto picks the most accurate candidate whose onnxruntime batch-1 latency here is within this; null = no budget."""
    first_images_per_class: int = Field(10, ge=0)
    """Successive halving: every candidate is first probed on this many of the probe's images per class (a subset:
    its features are reused); the clearly worse (select.drop_margin_se) stop there, the rest go on to the whole
    probe sample. 0, or not below the probe's images per class: one round, every candidate on the whole sample."""
    drop_margin_se: Annotated[Float, Field(gt=0.0)] = 2.0
    """After the first round a candidate is dropped when its probe accuracy is below the best's by more than this
    many standard errors of the paired fold-score difference (same images and folds; floored at one image)."""
    folds: int = Field(5, ge=2)
    """Cross-validation folds of the probe (stratified)."""
    repeats: int = Field(2, ge=1)
    """The k-fold probe is repeated with this many fold assignments (its mean is then steadier)."""
    l2: FloatList = [0.001, 0.01, 0.1]
    """The probe's head: L-BFGS logistic regression, each fold choosing among these L2 strengths."""
    feature_power: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.5
    """The probe's head: signed power on the features before standardising."""


class DaskParams(Section):
    """features.executor: dask -- where the shards run."""

    address: str | None = None
    """A running scheduler (tcp://host:8786); null: a LocalCluster on 127.0.0.1 with n_workers x threads_per_worker.
    Workers must see the project and the data at the same paths (a shared mount): checked on connect."""
    n_workers: int = Field(2, ge=1)
    """LocalCluster only: worker processes (each keeps one onnxruntime session)."""
    threads_per_worker: int = Field(1, ge=1)
    """LocalCluster only: threads per worker; each worker's onnxruntime session uses as many (no oversubscription)."""
    window: int | None = Field(None, ge=1)
    """Shards in flight at most; null: twice the cluster's threads."""


class FeaturesParams(Section):
    """The feature pass, whatever the task (what the features are is the task's: <task>.features)."""

    executor: Literal["local", "dask"] = "local"
    """local: this process. dask: the pooled features pass (classification, multilabel) in shards on a Dask cluster
    (features.dask); the arrays are the same, so neither this nor the two below enter the feature cache key."""
    shard_size: int = Field(256, ge=1)
    """dask: images per shard (never across splits; a shard is one task, one atomic .npy with its sha256)."""
    dask: DaskParams = DaskParams()

    batch_size: int = Field(32, ge=1)
    """Images per network batch in torch and in the dense tasks' pass. The pooled features on CPU (onnxruntime) run
    in runs of 8 instead, one per core at a time, each core decoding its own images (measured fastest on CPU)."""
    engine: Literal["auto", "torch", "onnxruntime"] = "auto"
    """auto: torch on CUDA when present, else onnxruntime on CPU (4-8x faster than torch eager here)."""
    decode_workers: int = Field(2, ge=1)
    """Threads that decode and resize images while the network runs (torch, the dense tasks, export and evaluate
    checks; the pooled CPU pass decodes in its own per-core threads)."""


class EvaluateParams(Section):
    """The evaluate stage. Which keys a task reads is said per key; set for another task, a key is an error."""

    ece_bins: int = Field(15, ge=1)
    """classification: calibration bins."""
    top_mistakes: int = Field(20, ge=0)
    """classification, multilabel: the worst-scored evaluation images listed (and drawn)."""
    bootstrap_samples: int = Field(1000, ge=0)
    """classification, multilabel: resamples for the 95% bootstrap intervals (accuracy / mAP, macro-F1); 0 = none."""
    bootstrap_seed: int = 0
    """classification, multilabel."""


class AuditParams(Section):
    """The audit stage (classification, multilabel): what the cached features say about the data."""

    enabled: bool = True
    """false: the stage writes a one-line reports/audit.json saying it was skipped."""
    folds: int = Field(5, ge=2)
    """Out-of-sample probabilities for the label-issue search: a stratified k-fold of the task's head."""
    duplicate_similarity: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.7
    """Cosine similarity of two images' standardised features (centred: unrelated images score near 0) at or above
    which they are a near-duplicate pair. Measured on hymenoptera (Lite0): re-encoded, resized, 4%-cropped copies
    0.78-0.92, the closest two distinct photos 0.62."""
    curve_fractions: Annotated[list[Annotated[Float, Field(gt=0.0, le=1.0)]], BeforeValidator(listify),
                               Field(min_length=3)] = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
    """The learning curve: the head refit on these nested shares of train, scored on the selection split."""
    curve_seeds: int = Field(3, ge=1)
    """Subsets drawn per share (the full share is one fit)."""
    max_listed: int = Field(50, ge=1)
    """Label issues, pairs and outliers listed in reports/audit.json (all are counted)."""
    seed: int = 0


class ExportParams(Section):
    opset: int = Field(17, ge=13)
    quantize: Literal["none", "int8"] = "none"
    """classification: int8 also writes a static-QDQ, per-channel INT8 model calibrated on training images."""
    max_int8_drop: Annotated[Float, Field(ge=0.0)] = 1.0
    """classification: the INT8 model is not written if its accuracy drops by more than this many points."""
    calibration_images: int = Field(128, ge=1)
    """classification: training images that calibrate INT8."""
    parity_tolerance: Annotated[Float, Field(gt=0.0)] = 0.0001
    """The parity gate, every task: max |p_onnx - p_torch| of any probability (detection: any score) on every
    evaluation image; a decision within it of a cut-off may differ (an argmax tie, a score at a threshold)."""
    triton_model_name: str = Field("classifier", pattern=r"^[A-Za-z0-9_-]+$")
    triton_max_batch_size: int = Field(32, ge=1)


class Params(Section):
    task: Literal["classification", "multilabel", "detection", "segmentation"] = "classification"
    """What the pipeline learns; every stage asks the task's package (tasks/<task>/) what to do."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available (autocast + channels_last), else CPU."""
    data: DataParams = DataParams()
    backbone: BackboneParams = BackboneParams()
    select: SelectParams = SelectParams()
    features: FeaturesParams = FeaturesParams()
    classification: ClassificationParams = ClassificationParams()
    """task: classification (read only then)."""
    multilabel: MultilabelParams = MultilabelParams()
    """task: multilabel (read only then)."""
    detection: DetectionParams = DetectionParams()
    """task: detection (read only then)."""
    segmentation: SegmentationParams = SegmentationParams()
    """task: segmentation (read only then)."""
    evaluate: EvaluateParams = EvaluateParams()
    audit: AuditParams = AuditParams()
    """classification, multilabel: label issues, duplicates and leaks, outliers, class balance, learning curve."""
    export: ExportParams = ExportParams()

    @property
    def head(self):
        """The chosen task's own section (params.classification for task: classification, ...)."""
        return getattr(self, self.task)

    @model_validator(mode="after")
    def _fits_task(self) -> Params:
        spec = registry.spec(self.task)
        if self.data.dataset not in spec.datasets:
            raise ValueError(f"data.dataset: {self.data.dataset!r} is not a {self.task} dataset; "
                             f"with task: {self.task} use one of {', '.join(spec.datasets)}")
        if self.backbone.name == "auto" and not spec.probe:
            raise ValueError(f"backbone.name: auto ranks backbones with a classification probe, which task: "
                             f"{self.task} has not; name a backbone (e.g. efficientnet_lite0)")
        for dotted in spec.ignores:
            section, key = dotted.split(".")
            if getattr(getattr(self, section), key) != type(getattr(self, section)).model_fields[key].default:
                users = [t for t, s in registry.TASKS.items() if dotted not in s.ignores]
                raise ValueError(f"{dotted} does not apply to task: {self.task} (only {', '.join(users)}); "
                                 f"remove it from params.yaml")
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
        if key in RENAMED:  # a key of an earlier version: say where it went
            hint = f" (it is now {RENAMED[key]})"
        return f"unknown param {key!r}{hint}; valid keys here: {', '.join(valid)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("value_error", "assertion_error"):
        # a section's own check names its key ("optimizer: ..."): prefix the section ("classification.optimizer")
        first = msg.split(":", 1)[0]
        return f"{key}.{msg}" if key and first.isidentifier() and owner and first in (
            _walk(err["loc"] + (first,))[2] or owner).model_fields else msg
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
    """The schema of params.yaml; a shared param some tasks do not read says which (setting it there is an error)."""
    schema = Params.model_json_schema()
    schema["title"] = "tlcv params.yaml"
    for dotted in sorted({d for spec in registry.TASKS.values() for d in spec.ignores}):
        section, key = dotted.split(".")
        ref = schema["properties"][section]["$ref"].rsplit("/", 1)[1]
        field = schema["$defs"][ref]["properties"][key]
        not_read = [t for t, spec in registry.TASKS.items() if dotted in spec.ignores]
        field["description"] = (field.get("description", "") + f" Not read with task: {', '.join(not_read)} "
                                "(setting it away from its default there is an error).").strip()
    return schema


if __name__ == "__main__":
    if sys.argv[1:] != ["--schema"]:
        sys.exit("usage: python -m tasks.config --schema  (prints the JSON schema of params.yaml)")
    print(json.dumps(json_schema(), indent=2))
