"""What the pipeline's models and the server agree on, without torch: task names, ONNX tensor names, metadata keys.

The export stage writes these names into every model.onnx; deploy/ reads them back. Both import this file, and
the serving image copies it (with tasks/<task>/serve.py), so a name is spelled once. The end of the file is
what serving a task means (the `Serving` protocol each tasks/<task>/serve.py implements) and the few helpers
those modules share; like the rest, it is standard library only.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol

TASKS = ("classification", "multilabel", "detection", "segmentation")
SPLITS = ("train", "val", "test")
# Files prepare looks at in image folders (anything else is still decoded to be sure, but these are the usual).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# ---------------------------------------------------------------- the ONNX graph

INPUT = "images"  # uint8 [N, H, W, 3] RGB after tasks.preprocess.load_image
OOD_SCORE = "ood_score"  # FP32 [N]: above metadata ood_threshold = unlike the training data (pooled tasks)
OUTPUTS = {
    "classification": ("probabilities", "logits"),  # FP32 [N, C] softmax, FP32 [N, C]; + OOD_SCORE
    "multilabel": ("probabilities", "tags"),  # FP32 [N, T] sigmoid, BOOL [N, T] at the per-tag thresholds; + OOD_SCORE
    "detection": ("boxes", "scores", "labels"),  # FP32 [N, K, 4] input pixels, FP32 [N, K] (0 = padding), INT64 [N, K]
    "segmentation": ("mask", "probabilities"),  # UINT8 [N, H, W] at the input size, FP32 [N, C, H/8, W/8]
}

# ---------------------------------------------------------------- metadata_props keys

TASK = "task"  # one of TASKS; every exported model carries it
LABELS = "labels"  # JSON list: class (or tag) names in index order
PREPROCESSING = "preprocessing"  # JSON: the PreprocessingCard
OOD_THRESHOLD = "ood_threshold"  # float
THRESHOLDS = "thresholds"  # multilabel: JSON list, the decision threshold of each tag
SCORE_THRESHOLD = "score_threshold"  # detection: scores below it are padding
NMS_THRESHOLD = "nms_threshold"
MAX_DETECTIONS = "max_detections"  # detection: K
PALETTE = "palette"  # segmentation: JSON list of [r, g, b], index order

IGNORE = 255  # segmentation: the class index of pixels that are never scored


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour of each index (bit-interleaved): the palette of VOC's own mask PNGs."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def palette256(palette) -> list[tuple[int, int, int]]:
    """A model's palette (index order), then the VOC colour map for every other index up to 255."""
    own = [tuple(int(v) for v in c) for c in list(palette or ())[:256]]
    return own + voc_colormap()[len(own):]


class QueryError(ValueError):
    """A request the model cannot answer as asked (an option its task does not take): the server answers 400."""


# ---------------------------------------------------------------- serving a task (deploy/ and tasks/<task>/serve.py)

class ModelError(RuntimeError):
    """A model.onnx the server cannot serve as its metadata says: the server does not start, and logs this line."""


class Serving(Protocol):
    """What deploy/ needs of a task: tasks/<task>/serve.py's class `Serving`, torch-free (numpy, Pillow).

    deploy/ reads metadata `task`, imports tasks.<task>.serve and makes one Serving(meta, outputs, input_hw);
    it checks `required` and `resize_modes` itself, then delegates the rest."""

    required: tuple[str, ...]  # outputs it cannot answer without
    resize_modes: tuple[str, ...] | None  # the preprocessing resize modes it can map answers back from; None: any
    formats: tuple[str, ...]  # /v1/predict answers: "json", and "overlay" (one image drawn on, a PNG)
    answer_pixels: float  # decode budget per original pixel that answering one image holds (0: cheap, inline)

    def __init__(self, meta: dict[str, str], outputs: list[str], input_hw: tuple[int, int]) -> None: ...  # ModelError

    def parameters(self) -> dict[str, Any]: ...  # its settings, for GET /v2/models/{name} `parameters`

    def fill_output_shapes(self, outputs: list[dict]) -> None: ...  # the -1 dims its metadata fixes, in place

    def query(self, options: dict[str, str]) -> dict[str, Any]: ...  # /v1/predict's options but format; QueryError

    def answer(self, out: dict[str, Any], size: tuple[int, int], query: dict[str, Any]) -> dict[str, Any]: ...
    # one image's output rows and its original (width, height) -> its JSON answer (beside filename, width, height)

    def overlay(self, image: Any, out: dict[str, Any], size: tuple[int, int], query: dict[str, Any]) -> bytes: ...
    # "overlay" in formats: the original image (PIL, RGB) with the answer drawn on it, a PNG


def meta_number(meta: dict[str, str], key: str, default: Any = None, kind: type = float) -> Any:
    """A finite number from the metadata, `default` when absent; ModelError when it is not one."""
    if key not in meta:
        return default
    try:
        v = kind(meta[key])
    except ValueError:
        raise ModelError(f"metadata {key} must be a number, got {meta[key]!r}") from None
    if not math.isfinite(v):
        raise ModelError(f"metadata {key} must be finite, got {meta[key]!r}")
    return v


def meta_labels(meta: dict[str, str]) -> tuple[str, ...]:
    try:
        labels = json.loads(meta.get(LABELS, "[]"))
    except ValueError as e:
        raise ModelError(f"metadata {LABELS} must be a JSON list of names: {e}") from None
    if not isinstance(labels, list):
        raise ModelError(f"metadata {LABELS} must be a JSON list of names, got {type(labels).__name__}")
    return tuple(str(v) for v in labels)


def label_name(labels: tuple[str, ...], i: int) -> str:
    return labels[i] if 0 <= i < len(labels) else str(i)


def take_options(task: str, options: dict[str, str], takes: tuple[str, ...]) -> None:
    """QueryError for the first option this task does not take, naming those it does."""
    for name in options:
        if name not in takes:
            raise QueryError(f"option {name!r} is not one a {task} model takes; it takes: {', '.join((*takes, 'format'))}")


def query_number(name: str, raw: str, low: float, high: float = math.inf, kind: type = float) -> Any:
    """A query option's value in [low, high]; QueryError naming the option otherwise (NaN too)."""
    try:
        v = kind(raw)
    except ValueError:
        v = math.nan
    if not low <= v <= high:
        what = "an integer" if kind is int else "a number"
        where = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise QueryError(f"{name} must be {what} {where}, got {raw[:40]!r}")
    return v


def ood_answer(threshold: float | None, score: Any) -> dict[str, Any]:
    """An image's OOD fields (pooled tasks): its score and whether it is like the training data (score <= threshold)."""
    if threshold is None:
        return {}
    s = float(score.ravel()[0]) if hasattr(score, "ravel") else float(score)  # a row of [N] or [N, 1]
    return {"ood_score": s, "in_distribution": bool(s <= threshold)}
