"""What /v1/predict answers for each kind of model, which the ONNX metadata key `task` names.

    classification (also when `task` is absent): top-k labels with probabilities (+ ood_score, in_distribution)
    detection:     per image its detections, boxes in the ORIGINAL image's pixels
    segmentation:  per image a mask PNG at the original size and each class's fraction of the pixels
    format=overlay (detection, segmentation; one image): that image with its boxes or its mask drawn on it, a PNG

Detection and segmentation models take images resized without cropping (`resize_mode: stretch` in the
preprocessing card), so a box or a mask maps back to the original image by two scale factors: original width /
input width and original height / input height. The original size is the image's after EXIF orientation, as
deploy/images.py gets it from the decode.

Pure functions of a model's metadata, its outputs and the original sizes: deploy/app.py runs them (those that
work on full-size pixels in a thread, holding the decode budget).
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deploy.errors import bad

TASKS = ("classification", "detection", "segmentation")
FORMATS = ("json", "overlay")
DETECTION_OUTPUTS = ("boxes", "scores", "labels")
OVERLAY_ALPHA = 0.5
PNG_LEVEL = 1  # zlib level: masks still shrink ~50x; photos (overlays) compress little whatever the level


@dataclass(frozen=True)
class TaskInfo:
    """What /v1/predict needs to know about the model, from its metadata."""

    task: str
    labels: tuple[str, ...]
    score_threshold: float = 0.0  # detection: what the model already zeroed out below
    max_detections: int | None = None  # detection: K
    palette: tuple[tuple[int, int, int], ...] | None = None  # segmentation: colour of each class, index order
    ood_threshold: float | None = None  # classification with an ood_score output

    def label(self, i: int) -> str:
        return self.labels[i] if 0 <= i < len(self.labels) else str(i)

    def parameters(self) -> dict:
        """The model metadata's parameters for this task (GET /v2/models/{name})."""
        p: dict = {"task": self.task}
        if self.task == "detection":
            p.update(score_threshold=self.score_threshold, max_detections=self.max_detections)
        if self.task == "segmentation" and self.palette is not None:
            p["palette"] = [list(c) for c in self.palette]
        if self.ood_threshold is not None:
            p["ood_threshold"] = self.ood_threshold
        return p


def task_info(meta: dict[str, str], labels: list[str], outputs: list[str], resize_mode: str) -> TaskInfo:
    """The model's TaskInfo; RuntimeError (the server does not start) if it cannot be served as its task says."""
    task = meta.get("task", "classification")
    if task not in TASKS:
        raise RuntimeError(f"metadata task {task!r} is not one this server serves: {', '.join(TASKS)}")

    def number(key: str, default, kind=float):
        try:
            v = kind(meta[key]) if key in meta else default
        except ValueError:
            raise RuntimeError(f"metadata {key} must be a number, got {meta[key]!r}") from None
        if v is not None and not math.isfinite(v):
            raise RuntimeError(f"metadata {key} must be finite, got {meta[key]!r}")
        return v

    if task == "classification":
        ood = number("ood_threshold", None) if "ood_score" in outputs else None
        return TaskInfo(task, tuple(labels), ood_threshold=ood)
    if resize_mode != "stretch":  # boxes and masks map back by two scale factors only for a plain resize
        raise RuntimeError(f"a {task} model must be exported with preprocessing resize_mode 'stretch', "
                           f"its card says {resize_mode!r}")
    need = DETECTION_OUTPUTS if task == "detection" else ("mask",)
    missing = [n for n in need if n not in outputs]
    if missing:
        raise RuntimeError(f"a {task} model needs outputs {list(need)}; missing {missing} (it has {outputs})")
    if task == "detection":
        return TaskInfo(task, tuple(labels), score_threshold=number("score_threshold", 0.0),
                        max_detections=number("max_detections", None, int))
    palette = None
    if "palette" in meta:
        try:
            palette = tuple(tuple(int(v) for v in c) for c in json.loads(meta["palette"]))
        except (ValueError, TypeError) as e:
            raise RuntimeError(f"metadata palette must be a JSON list of [r, g, b]: {e}") from None
        if not all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette):
            raise RuntimeError("metadata palette must be a JSON list of [r, g, b], each 0..255")
    return TaskInfo(task, tuple(labels), palette=palette)


def fill_output_shapes(info: TaskInfo, outputs: list[dict], input_hw: list[int]) -> None:
    """Dimensions the graph leaves open that the metadata fixes: classes, K, the mask's input size."""
    n_classes = len(info.labels)
    for o in outputs:
        shape = o["shape"]
        if info.task == "classification":
            if n_classes and len(shape) == 2 and shape[1] == -1:
                shape[1] = n_classes
        elif info.task == "detection":
            if o["name"] in DETECTION_OUTPUTS and len(shape) >= 2 and shape[1] == -1 and info.max_detections:
                shape[1] = info.max_detections
        elif o["name"] == "mask" and len(shape) == 3:
            shape[1:3] = [d if d != -1 else s for d, s in zip(shape[1:3], input_hw)]
        elif o["name"] == "probabilities" and len(shape) == 4 and shape[1] == -1 and n_classes:
            shape[1] = n_classes


# ----------------------------------------------------------------------------------------------- the query

def parse_format(raw: str | None, info: TaskInfo) -> str:
    fmt = (raw or "json").lower()
    if fmt not in FORMATS:
        raise bad(f"unknown format {raw!r}: json (the default) or overlay (one image drawn with its "
                  "boxes or mask, a PNG; detection and segmentation models)")
    if fmt == "overlay" and info.task == "classification":
        raise bad("format=overlay is for detection and segmentation models; this model is a classifier")
    return fmt


def parse_threshold(raw: str | None, info: TaskInfo) -> float:
    if raw is None:
        return info.score_threshold
    if info.task != "detection":
        raise bad(f"threshold is for detection models; this model does {info.task}")
    try:
        t = float(raw)
    except ValueError:
        t = math.nan
    if not 0.0 <= t <= 1.0:  # NaN too
        raise bad(f"threshold must be a number in [0, 1], got {raw[:40]!r}")
    return t


# ----------------------------------------------------------------------------------------------- classification

def classifications(info: TaskInfo, names: list[str], out: dict[str, np.ndarray], top_k: int) -> list[dict]:
    probs = out.get("probabilities")
    if probs is None:
        probs = next(iter(out.values()))
    k = min(top_k, probs.shape[1])
    # a model exported with an OOD score (tasks/ood.py) says per image whether it is like its training data
    ood = out.get("ood_score") if info.ood_threshold is not None else None
    results = []
    for j, (fn, p) in enumerate(zip(names, probs)):
        idx = np.argsort(-p, kind="stable")[:k]
        r = {"filename": fn, "top_k": [{"label": info.label(int(i)), "index": int(i), "probability": float(p[i])}
                                       for i in idx]}
        if ood is not None:
            score = float(np.asarray(ood[j]).reshape(-1)[0])
            r.update(ood_score=score, in_distribution=bool(score <= info.ood_threshold))
        results.append(r)
    return results


# ----------------------------------------------------------------------------------------------- detection

def detections(info: TaskInfo, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
               size: tuple[int, int], input_hw: tuple[int, int], threshold: float) -> list[dict]:
    """One image's rows ([K, 4], [K], [K]) -> its detections, boxes in the original image's pixels.

    Padding rows (label < 0, or score 0) and rows under `threshold` are dropped; each box is scaled by
    original size / input size and clipped to the image; highest score first."""
    w, h = size
    sx, sy = w / input_hw[1], h / input_hw[0]
    keep = [i for i in range(len(scores)) if labels[i] >= 0 and scores[i] > 0 and scores[i] >= threshold]
    keep.sort(key=lambda i: -float(scores[i]))
    out = []
    for i in keep:
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        box = [min(max(x1 * sx, 0.0), w), min(max(y1 * sy, 0.0), h), min(max(x2 * sx, 0.0), w), min(max(y2 * sy, 0.0), h)]
        out.append({"label": info.label(int(labels[i])), "index": int(labels[i]), "score": float(scores[i]), "box": box})
    return out


# distinct, bright on dark and on light images (Trubetskoy's list): box colours by class index
BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


def boxes_png(info: TaskInfo, img: Image.Image, dets: list[dict], size: tuple[int, int]) -> bytes:
    """The image with its detections drawn (box, and "label score" on a tab), a PNG at the image's size."""
    img = img.convert("RGB")
    fx, fy = img.width / size[0], img.height / size[1]  # 1, 1 unless the decodes disagree on the size
    draw = ImageDraw.Draw(img)
    line = max(2, round(min(img.size) / 250))
    try:
        font = ImageFont.load_default(size=max(10, round(min(img.size) / 40)))
    except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType: its bitmap font
        font = ImageFont.load_default()
    for d in reversed(dets):  # the best on top
        x1, y1 = d["box"][0] * fx, d["box"][1] * fy
        x2, y2 = min(d["box"][2] * fx, img.width - 1), min(d["box"][3] * fy, img.height - 1)  # the edge, drawn inside
        colour = BOX_COLOURS[d["index"] % len(BOX_COLOURS)]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        text = f"{d['label']} {d['score']:.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        ty = y1 - (b - t) - 2 * line if y1 - (b - t) - 2 * line >= 0 else y1  # above the box if it fits
        draw.rectangle([x1, ty, x1 + (r - l) + 2 * line, ty + (b - t) + 2 * line], fill=colour)
        draw.text((x1 + line - l, ty + line - t), text, fill=(0, 0, 0), font=font)
    return _png(img)


# ----------------------------------------------------------------------------------------------- segmentation

def palette256(palette: tuple[tuple[int, int, int], ...] | None) -> list[tuple[int, int, int]]:
    """The model's palette, then the PASCAL VOC colour map for every other index up to 255."""
    voc = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        voc.append((r, g, b))
    own = list(palette or ())[:256]
    return own + voc[len(own):]


def mask_image(mask: np.ndarray, size: tuple[int, int], palette) -> Image.Image:
    """uint8 class indices [H, W] at the input size -> the mask at `size` (NEAREST): mode "P" with the palette,
    or "L" for a model without one."""
    mask = np.ascontiguousarray(mask, np.uint8)
    img = Image.frombytes("P" if palette else "L", (mask.shape[1], mask.shape[0]), mask.tobytes())
    if palette:
        img.putpalette([v for c in palette256(palette) for v in c])
    return img if img.size == tuple(size) else img.resize(tuple(size), Image.Resampling.NEAREST)


def segmentation(info: TaskInfo, mask: np.ndarray, size: tuple[int, int]) -> dict:
    """One image's mask [H, W] -> {"mask_png": base64 PNG at the original size, "class_fractions": {label:
    fraction of its pixels}} for the classes present, largest first; counted on the mask as returned."""
    img = mask_image(mask, size, info.palette)
    counts = np.bincount(np.asarray(img).ravel(), minlength=1)
    total = int(counts.sum())
    present = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
    fractions = {info.label(int(i)): float(counts[i] / total) for i in present}
    return {"mask_png": base64.b64encode(_png(img)).decode(), "class_fractions": fractions}


def mask_overlay_png(info: TaskInfo, img: Image.Image, mask: np.ndarray) -> bytes:
    """The image blended (alpha 0.5) with its mask coloured by the palette, a PNG at the image's size."""
    colour = mask_image(mask, img.size, info.palette or palette256(None)).convert("RGB")
    return _png(Image.blend(img.convert("RGB"), colour, OVERLAY_ALPHA))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()
