"""Serving a detector (torch-free: the serving image copies this file).

/v1/predict answers each image's detections with boxes in the ORIGINAL image's pixels (?threshold=0..1 keeps
scores at or above it, default the model's score_threshold); ?format=overlay draws them on the one image.

The model takes images resized without cropping (`resize_mode: stretch` in its preprocessing card), so a box
maps back by two scale factors: original width / input width and original height / input height. The
original size is the image's after EXIF orientation, as the server gets it from the decode.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from tasks import contract

TASK = "detection"
# distinct, bright on dark and on light images (Trubetskoy's list): box colours by class index
BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


class Serving:
    required = contract.OUTPUTS[TASK]
    resize_modes = ("stretch",)
    formats = ("json", "overlay")
    answer_pixels = 0.0

    def __init__(self, meta: dict[str, str], outputs: list[str], input_hw: tuple[int, int]):
        self.labels = contract.meta_labels(meta)
        self.input_hw = input_hw
        self.score_threshold = contract.meta_number(meta, contract.SCORE_THRESHOLD, 0.0)  # the model zeroed out below
        self.max_detections = contract.meta_number(meta, contract.MAX_DETECTIONS, None, int)  # K

    def parameters(self) -> dict[str, Any]:
        return {"task": TASK, contract.SCORE_THRESHOLD: self.score_threshold,
                contract.MAX_DETECTIONS: self.max_detections}

    def fill_output_shapes(self, outputs: list[dict]) -> None:
        for o in outputs:
            if o["name"] in self.required and len(o["shape"]) >= 2 and o["shape"][1] == -1 and self.max_detections:
                o["shape"][1] = self.max_detections

    def query(self, options: dict[str, str]) -> dict[str, Any]:
        contract.take_options(TASK, options, ("threshold",))
        raw = options.get("threshold")
        return {"threshold": self.score_threshold if raw is None else contract.query_number("threshold", raw, 0.0, 1.0)}

    def answer(self, out: dict[str, np.ndarray], size: tuple[int, int], query: dict[str, Any]) -> dict[str, Any]:
        return {"detections": self.detections(out, size, query["threshold"])}

    def detections(self, out: dict[str, np.ndarray], size: tuple[int, int], threshold: float) -> list[dict]:
        """One image's rows (boxes [K, 4], scores [K], labels [K]) -> its detections in the original's pixels.

        Padding rows (label < 0, or score 0) and rows under `threshold` are dropped; each box is scaled by
        original size / input size and clipped to the image; highest score first."""
        boxes, scores, labels = (out[n] for n in contract.OUTPUTS[TASK])
        w, h = size
        sx, sy = w / self.input_hw[1], h / self.input_hw[0]
        keep = [i for i in range(len(scores)) if labels[i] >= 0 and scores[i] > 0 and scores[i] >= threshold]
        keep.sort(key=lambda i: -float(scores[i]))
        dets = []
        for i in keep:
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            box = [min(max(x1 * sx, 0.0), w), min(max(y1 * sy, 0.0), h), min(max(x2 * sx, 0.0), w),
                   min(max(y2 * sy, 0.0), h)]
            dets.append({"label": contract.label_name(self.labels, int(labels[i])), "index": int(labels[i]),
                         "score": float(scores[i]), "box": box})
        return dets

    def overlay(self, image, out: dict[str, np.ndarray], size: tuple[int, int], query: dict[str, Any]) -> bytes:
        """The image with its detections drawn (box, and "label score" on a tab), a PNG at the image's size."""
        from PIL import ImageDraw, ImageFont

        dets = self.detections(out, size, query["threshold"])
        img = image.convert("RGB")
        fx, fy = img.width / size[0], img.height / size[1]  # 1, 1 unless the decodes disagree on the size
        draw = ImageDraw.Draw(img)
        line = max(2, round(min(img.size) / 250))
        try:
            font = ImageFont.load_default(size=max(10, round(min(img.size) / 40)))
        except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType: its bitmap font
            font = ImageFont.load_default()
        for d in reversed(dets):  # the best on top
            x1, y1 = d["box"][0] * fx, d["box"][1] * fy
            x2, y2 = min(d["box"][2] * fx, img.width - 1), min(d["box"][3] * fy, img.height - 1)  # the edge, inside
            colour = BOX_COLOURS[d["index"] % len(BOX_COLOURS)]
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
            text = f"{d['label']} {d['score']:.2f}"
            l, t, r, b = draw.textbbox((0, 0), text, font=font)
            ty = y1 - (b - t) - 2 * line if y1 - (b - t) - 2 * line >= 0 else y1  # above the box if it fits
            draw.rectangle([x1, ty, x1 + (r - l) + 2 * line, ty + (b - t) + 2 * line], fill=colour)
            draw.text((x1 + line - l, ty + line - t), text, fill=(0, 0, 0), font=font)
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)  # photos compress little whatever the level
        return buf.getvalue()
