"""The preprocessing card and the one image loader that training, evaluation and serving share.

Pillow and numpy only (no torch): the serving image uses this module as it is.
Resize and crop happen here; scaling and mean/std normalisation happen inside
the model (so the ONNX graph takes uint8 pixels).
"""

from __future__ import annotations

import io
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class PreprocessingCard:
    """What a backbone's weights expect, recorded once and carried to every consumer."""

    input_size: tuple[int, int]  # (height, width) fed to the network
    resize_size: int  # shorter side before the centre crop
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int = 0
    arch: str = ""  # how to rebuild the network: "timm:<name>" or "torchvision:<name>"
    source: str = ""  # where the weights came from
    weights_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # center_crop: shorter side to resize_size, centre crop (classification, as the weights were trained);
    # stretch: plain resize to input_size (detection, segmentation: every pixel kept, and a box or mask
    # maps back to the original image exactly by the two scale factors).
    resize_mode: str = "center_crop"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessingCard":
        d = dict(d)
        d["input_size"] = tuple(d["input_size"])
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)

    def preprocessing_dict(self) -> dict[str, Any]:
        """Only the fields that change pixels (the feature cache key uses these)."""
        return {k: self.to_dict()[k] for k in ("input_size", "resize_size", "interpolation", "mean", "std", "resize_mode")}


def open_image(source: str | Path | bytes) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    return Image.open(source)


def decode_rgb(source: str | Path | bytes | Image.Image, min_short_side: int) -> Image.Image:
    """Decode to RGB, letting JPEG's DCT scaling skip resolution we would throw away.

    `draft` keeps the image at least `min_short_side` on its shorter side, so the
    following resize still downsamples (a 2592x1984 JPEG decodes at 1/4 size: ~10x faster).
    """
    img = source if isinstance(source, Image.Image) else open_image(source)
    w, h = img.size
    if img.format == "JPEG" and min(w, h) > 2 * min_short_side:
        scale = min_short_side / min(w, h)
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    img = to_8bit(ImageOps.exif_transpose(img))
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")
    return img


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(img: Image.Image) -> Image.Image:
    """Rescale high-bit-depth greyscale to 8 bits; any other image is returned as it is.

    Pillow's convert("RGB") clips "I;16"/"I"/"F" values at 255, so a 16-bit PNG or TIFF comes out almost
    white. 16-bit modes keep their top byte (v >> 8). "I" and "F" values within 0..255 are already 8-bit;
    within 0..65535 they are a 16-bit container (Pillow decodes 16-bit TIFF, and PGM of any maxval rescaled
    to 65535, as "I"); anything wider (negative, or beyond 16 bits) is stretched over its own min..max.
    """
    if img.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    if img.mode not in ("I", "F"):
        return img
    arr = np.asarray(img, dtype=np.float32)
    finite = np.isfinite(arr)  # "F" may hold NaN/inf
    lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
    if lo >= 0 and hi <= 255:
        return img
    arr = np.where(finite, arr, lo)
    if lo >= 0 and hi <= 65535:
        return Image.fromarray((arr // 256).astype(np.uint8))  # v >> 8
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return Image.fromarray(np.round((arr - lo) * scale).astype(np.uint8))


def resize_center_crop(img: Image.Image, resize_size: int, crop: tuple[int, int], interpolation: str) -> Image.Image:
    """Resize the shorter side to `resize_size`, then take the centre `crop` (height, width).

    Done in one resample of just the crop window (Pillow's `box`; filter support still
    reads pixels outside it), so no time goes into resizing pixels the crop throws away.
    """
    w, h = img.size
    scale = resize_size / min(w, h)
    new_w, new_h = max(crop[1], round(w * scale)), max(crop[0], round(h * scale))
    sx, sy = w / new_w, h / new_h
    left, top = (new_w - crop[1]) // 2, (new_h - crop[0]) // 2
    box = (left * sx, top * sy, (left + crop[1]) * sx, (top + crop[0]) * sy)
    if (new_w, new_h) == (w, h):
        return img.crop((left, top, left + crop[1], top + crop[0]))
    return img.resize((crop[1], crop[0]), INTERPOLATIONS[interpolation], box=box)


def load_image(source: str | Path | bytes | Image.Image, card: PreprocessingCard) -> np.ndarray:
    """Any image -> uint8 array [H, W, 3] at the card's input size: what the model's graph takes."""
    if card.resize_mode == "stretch":
        h, w = card.input_size
        img = decode_rgb(source, min(h, w))
        if img.size != (w, h):
            img = img.resize((w, h), INTERPOLATIONS[card.interpolation])
        return np.asarray(img, dtype=np.uint8)
    img = decode_rgb(source, card.resize_size)
    img = resize_center_crop(img, card.resize_size, card.input_size, card.interpolation)
    return np.asarray(img, dtype=np.uint8)


class ImageDecodeError(ValueError):
    """An image that decoded in `prepare` no longer does (changed on disk since)."""


def load_checked(path: Path, card: PreprocessingCard) -> np.ndarray:
    """load_image of a file that `prepare` already decoded: a failure now is ImageDecodeError naming the file."""
    try:
        return load_image(path, card)
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode {path}: {exc} (it changed after prepare? re-run prepare)") from exc


def decoded_batches(paths: Sequence[Path], card: PreprocessingCard, batch_size: int, workers: int) -> Iterator[np.ndarray]:
    """uint8 [B, H, W, 3] batches in order; at most two batches decoded ahead of the consumer (bounded memory)."""

    with ThreadPoolExecutor(workers) as pool:
        pending: deque[list[Future]] = deque()
        starts = iter(range(0, len(paths), batch_size))

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append([pool.submit(load_checked, p, card) for p in paths[start : start + batch_size]])

        submit_next()
        submit_next()
        while pending:
            batch = pending.popleft()
            submit_next()
            yield np.stack([f.result() for f in batch])
