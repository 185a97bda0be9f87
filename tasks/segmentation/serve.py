"""Serving a segmenter (torch-free: the serving image copies this file).

/v1/predict answers each image's mask as a PNG at the ORIGINAL size (NEAREST; mode "P" with the model's
palette, pixel value = class index; "L" without one) and each class's share of its pixels;
?format=overlay blends the coloured mask over the one image.

The model takes images resized without cropping (`resize_mode: stretch`), so its input-size mask maps back
to the original image by resizing it.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np

from tasks import contract

TASK = "segmentation"
OVERLAY_ALPHA = 0.5
PNG_LEVEL = 1  # zlib level: masks still shrink ~50x; photos (overlays) compress little whatever the level


class Serving:
    required = ("mask",)
    resize_modes = ("stretch",)
    formats = ("json", "overlay")
    answer_pixels = 0.5  # the mask at the original size: 1 byte a pixel, then its PNG

    def __init__(self, meta: dict[str, str], outputs: list[str], input_hw: tuple[int, int]):
        self.labels = contract.meta_labels(meta)
        self.input_hw = input_hw
        self.palette = palette(meta)

    def parameters(self) -> dict[str, Any]:
        p: dict[str, Any] = {"task": TASK}
        if self.palette is not None:
            p[contract.PALETTE] = [list(c) for c in self.palette]
        return p

    def fill_output_shapes(self, outputs: list[dict]) -> None:
        for o in outputs:
            shape = o["shape"]
            if o["name"] == "mask" and len(shape) == 3:
                shape[1:3] = [d if d != -1 else s for d, s in zip(shape[1:3], self.input_hw)]
            elif o["name"] == "probabilities" and len(shape) == 4 and shape[1] == -1 and self.labels:
                shape[1] = len(self.labels)

    def query(self, options: dict[str, str]) -> dict[str, Any]:
        contract.take_options(TASK, options, ())
        return {}

    def answer(self, out: dict[str, np.ndarray], size: tuple[int, int], query: dict[str, Any]) -> dict[str, Any]:
        """{"mask_png": base64 PNG at the original size, "class_fractions": {label: fraction of its pixels}} for the
        classes present, largest first; counted on the mask as returned."""
        img = self.mask_image(out["mask"], size, self.palette)
        counts = np.bincount(np.asarray(img).ravel(), minlength=1)
        total = int(counts.sum())
        present = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
        fractions = {contract.label_name(self.labels, int(i)): float(counts[i] / total) for i in present}
        return {"mask_png": base64.b64encode(_png(img)).decode(), "class_fractions": fractions}

    def overlay(self, image, out: dict[str, np.ndarray], size: tuple[int, int], query: dict[str, Any]) -> bytes:
        """The image blended (alpha 0.5) with its mask coloured by the palette, a PNG at the image's size."""
        from PIL import Image

        colour = self.mask_image(out["mask"], image.size, self.palette or contract.palette256(None)).convert("RGB")
        return _png(Image.blend(image.convert("RGB"), colour, OVERLAY_ALPHA))

    @staticmethod
    def mask_image(mask: np.ndarray, size: tuple[int, int], palette):
        """uint8 class indices [H, W] at the input size -> the mask at `size` (NEAREST): mode "P" with the
        palette, or "L" for a model without one."""
        from PIL import Image

        mask = np.ascontiguousarray(mask, np.uint8)
        img = Image.frombytes("P" if palette else "L", (mask.shape[1], mask.shape[0]), mask.tobytes())
        if palette:
            img.putpalette([v for c in contract.palette256(palette) for v in c])
        return img if img.size == tuple(size) else img.resize(tuple(size), Image.Resampling.NEAREST)


def palette(meta: dict[str, str]) -> tuple[tuple[int, int, int], ...] | None:
    """Metadata `palette` (JSON list of [r, g, b], index order), None when absent; ModelError when malformed."""
    if contract.PALETTE not in meta:
        return None
    try:
        p = tuple(tuple(int(v) for v in c) for c in json.loads(meta[contract.PALETTE]))
    except (ValueError, TypeError) as e:
        raise contract.ModelError(f"metadata palette must be a JSON list of [r, g, b]: {e}") from None
    if not all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in p):
        raise contract.ModelError("metadata palette must be a JSON list of [r, g, b], each 0..255")
    return p


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()
