"""Classification export: the trained classifier -> model.onnx, proven equal to PyTorch on every evaluation image.

  model.onnx        uint8 [N, H, W, 3] RGB "images" -> "probabilities" [N, C] (softmax), "logits" [N, C] and, with
                    OOD statistics, "ood_score" [N] (tasks/ood.py; above metadata "ood_threshold" = unlike the
                    training data). Scaling and mean/std are inside the graph; resize + centre crop are not
                    (tasks.preprocess.load_image does them, in training, evaluation and serving alike).
  labels.txt, triton/<name>/   (tasks.onnxfile.write_deployable)
  model.int8.onnx   with export.quantize=int8, when its accuracy holds (tasks/classification/int8.py)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.checkpoint import load_model
from tasks.classification.int8 import eval_batches, try_int8
from tasks.config import Params
from tasks.contract import INPUT, OOD_SCORE, OOD_THRESHOLD, OUTPUTS
from tasks.head import Classifier, load_classifier
from tasks.layout import Layout
from tasks.ood import MahalanobisScore, load_ood
from tasks.onnxfile import export_images_model, model_metadata, set_metadata, write_deployable
from tasks.runtime import open_session


class ExportModel(nn.Module):
    """What the ONNX graph computes: uint8 pixels -> (softmax probabilities, logits[, ood_score])."""

    def __init__(self, classifier: Classifier, ood: MahalanobisScore | None = None):
        super().__init__()
        self.classifier = classifier
        self.ood = ood

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.classifier.features(images)
        logits = self.classifier.head(feats)
        if self.ood is None:
            return logits.softmax(dim=-1), logits
        return logits.softmax(dim=-1), logits, self.ood(self.classifier.head[0](feats))


def output_names(ood: MahalanobisScore | None) -> list[str]:
    return [*OUTPUTS["classification"], *([OOD_SCORE] if ood is not None else [])]


def check_parity(onnx_path: Path, classifier: Classifier, batches, tolerance: float,
                 ood: MahalanobisScore | None = None) -> dict:
    """onnxruntime (CPU) vs the PyTorch classifier, image by image.

    Argmax disagreements count unless PyTorch's own top two are within `tolerance` (a tie). With an OOD scorer,
    `ood_score` must agree too, relatively (it is a distance, tens to thousands): |s_onnx - s_torch| <=
    tolerance * max(1, s_torch).
    """
    session, _ = open_session(onnx_path, device="cpu")
    max_diff, n, agree, ties, right_onnx, right_torch = 0.0, 0, 0, 0, 0, 0
    ood_diff = 0.0
    for pixels, labels in batches:
        out = session.run(output_names(ood), {INPUT: pixels})
        p_onnx = out[0]
        with torch.inference_mode():
            feats = classifier.features(torch.from_numpy(pixels))
            p_torch = classifier.head(feats).softmax(-1).numpy()
            if ood is not None:
                s_torch = ood(classifier.head[0](feats)).numpy()
                ood_diff = max(ood_diff, float((np.abs(out[2] - s_torch) / np.maximum(1.0, s_torch)).max()))
        max_diff = max(max_diff, float(np.abs(p_onnx - p_torch).max()))
        a_onnx, a_torch = p_onnx.argmax(1), p_torch.argmax(1)
        top2 = np.sort(p_torch, axis=1)[:, -2:] if p_torch.shape[1] > 1 else np.zeros((len(p_torch), 2))
        tie = (top2[:, 1] - top2[:, 0]) <= tolerance
        agree += int(((a_onnx == a_torch) | tie).sum())
        ties += int((tie & (a_onnx != a_torch)).sum())
        right_onnx += int((a_onnx == labels).sum())
        right_torch += int((a_torch == labels).sum())
        n += len(labels)
    ood_ok = ood is None or ood_diff <= tolerance
    return {"n": n, "max_abs_prob_diff": max_diff, "argmax_agreement": agree / max(n, 1), "ties": ties,
            "onnx_accuracy": right_onnx / max(n, 1), "torch_accuracy": right_torch / max(n, 1),
            **({"ood_max_rel_diff": ood_diff} if ood is not None else {}),
            "tolerance": tolerance, "passed": agree == n and max_diff <= tolerance and ood_ok}


def export(params: Params, layout: Layout, out: Path) -> dict:
    p = params.export
    dataset = layout.dataset()
    ckpt = load_model(layout, "classification", dataset)
    classifier, card, labels = load_classifier(ckpt), ckpt.card, ckpt.labels
    split = dataset.eval_split
    bs, workers = params.features.batch_size, params.features.decode_workers
    model_path = out / layout.model_onnx.name
    loaded = load_ood(ckpt.extra)
    scorer, ood_threshold = loaded if loaded is not None else (None, None)
    names = output_names(scorer)
    export_images_model(ExportModel(classifier, scorer), card.input_size, model_path, names, p.opset)
    parity = {"split": split, **check_parity(model_path, classifier, eval_batches(dataset, split, card, bs, workers),
                                             p.parity_tolerance, scorer)}
    if not parity["passed"]:
        return parity
    metrics = {**layout.read_json(layout.metrics, {}), "onnx_accuracy": parity["onnx_accuracy"],
               "torch_accuracy": parity["torch_accuracy"], "split": split}
    extra = {OOD_THRESHOLD: repr(ood_threshold), "ood": json.dumps(ckpt.meta.get("ood", {}))} if scorer else {}
    set_metadata(model_path, model_metadata("classification", labels, card, dataset, metrics,
                                            ckpt.meta.get("params", {}), "resize, centre crop", **extra))
    if p.quantize == "int8":
        parity["int8"] = try_int8(model_path, out / "model.int8.onnx", dataset, split, card, p, bs, workers,
                                  parity["onnx_accuracy"])
    n = len(labels)
    h, w = card.input_size
    outputs = [(names[0], "float32", [n]), (names[1], "float32", [n])] + ([(OOD_SCORE, "float32", [])] if scorer else [])
    write_deployable(out, model_path, labels, params, card.input_size, outputs, label_output=names[0],
                     comment=f"Input: uint8 RGB pixels, already resized to {card.resize_size} (shorter side, "
                             f"{card.interpolation}) and\n# centre-cropped to {h}x{w}; normalisation happens inside the model.")
    return parity
