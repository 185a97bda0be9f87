"""Multi-label export: the trained model -> model.onnx, proven equal to PyTorch on every evaluation image.

  model.onnx        uint8 [N, H, W, 3] RGB "images" -> "probabilities" FP32 [N, T] (sigmoid per tag), "tags" BOOL
                    [N, T] (probability >= the tag's threshold, metadata "thresholds") and "ood_score" FP32 [N]
                    (tasks/ood.py; above metadata "ood_threshold" = unlike the training data). Scaling and mean/std
                    are inside the graph; resize + centre crop are not (tasks.preprocess.load_image does them).
  labels.txt, triton/<name>/   (tasks.onnxfile.write_deployable)

The parity gate: every probability within export.parity_tolerance of PyTorch's, every tag decision equal (one
where PyTorch's probability lies within the tolerance of the threshold is a tie, forgiven), ood_score equal
relatively.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.checkpoint import load_model
from tasks.config import Params
from tasks.contract import INPUT, OOD_SCORE, OOD_THRESHOLD, OUTPUTS, THRESHOLDS
from tasks.head import Classifier, load_classifier
from tasks.layout import Layout
from tasks.ood import MahalanobisScore, load_ood
from tasks.onnxfile import export_images_model, model_metadata, set_metadata, write_deployable
from tasks.preprocess import decoded_batches
from tasks.runtime import open_session


class ExportModel(nn.Module):
    """What the ONNX graph computes: uint8 pixels -> (sigmoid probabilities, tags at the thresholds[, ood_score])."""

    def __init__(self, classifier: Classifier, thresholds: list[float], ood: MahalanobisScore | None = None):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float32))
        self.ood = ood

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.classifier.features(images)
        probs = torch.sigmoid(self.classifier.head(feats))
        tags = probs >= self.thresholds
        if self.ood is None:
            return probs, tags
        return probs, tags, self.ood(self.classifier.head[0](feats))


def output_names(ood: MahalanobisScore | None) -> list[str]:
    return [*OUTPUTS["multilabel"], *([OOD_SCORE] if ood is not None else [])]


def check_parity(onnx_path: Path, model: ExportModel, batches, tolerance: float) -> dict:
    """onnxruntime (CPU) vs the PyTorch model, image by image and tag by tag."""
    session, _ = open_session(onnx_path, device="cpu")
    names = output_names(model.ood)
    thresholds = model.thresholds.numpy()
    n = decisions = agree = ties = positives = 0
    max_diff = ood_diff = 0.0
    for pixels in batches:
        out = session.run(names, {INPUT: pixels})
        with torch.inference_mode():
            ref = [t.numpy() for t in model(torch.from_numpy(pixels))]
        max_diff = max(max_diff, float(np.abs(out[0] - ref[0]).max()))
        same = out[1] == ref[1]
        tie = np.abs(ref[0] - thresholds) <= tolerance
        agree += int((same | tie).sum())
        ties += int((~same & tie).sum())
        positives += int(ref[1].sum())
        if model.ood is not None:
            ood_diff = max(ood_diff, float((np.abs(out[2] - ref[2]) / np.maximum(1.0, ref[2])).max()))
        n += len(pixels)
        decisions += same.size
    ood_ok = model.ood is None or ood_diff <= tolerance
    return {"n": n, "max_abs_prob_diff": max_diff, "tag_agreement": agree / max(decisions, 1), "ties": ties,
            "torch_tags": positives, **({"ood_max_rel_diff": ood_diff} if model.ood is not None else {}),
            "tolerance": tolerance, "passed": agree == decisions and max_diff <= tolerance and ood_ok}


def export(params: Params, layout: Layout, out: Path) -> dict:
    p = params.export
    dataset = layout.dataset()
    ckpt = load_model(layout, "multilabel", dataset)
    card, tags, thresholds = ckpt.card, ckpt.labels, [float(t) for t in ckpt.meta["thresholds"]]
    split = dataset.eval_split
    loaded = load_ood(ckpt.extra)
    scorer, ood_threshold = loaded if loaded is not None else (None, None)
    model = ExportModel(load_classifier(ckpt), thresholds, scorer).eval()
    names = output_names(scorer)
    model_path = out / layout.model_onnx.name
    export_images_model(model, card.input_size, model_path, names, p.opset)
    paths = [dataset.resolve(it) for it in dataset.split(split)]
    batches = decoded_batches(paths, card, params.features.batch_size, params.features.decode_workers)
    parity = {"split": split, **check_parity(model_path, model, batches, p.parity_tolerance)}
    if not parity["passed"]:
        return parity
    metrics = {**layout.read_json(layout.metrics, {}), "split": split}
    extra = {OOD_THRESHOLD: repr(ood_threshold), "ood": json.dumps(ckpt.meta.get("ood", {}))} if scorer else {}
    set_metadata(model_path, model_metadata("multilabel", tags, card, dataset, metrics, ckpt.meta.get("params", {}),
                                            "resize, centre crop", **{THRESHOLDS: json.dumps(thresholds)}, **extra))
    t = len(tags)
    h, w = card.input_size
    outputs = [(names[0], "float32", [t]), (names[1], "bool", [t])] + ([(OOD_SCORE, "float32", [])] if scorer else [])
    write_deployable(out, model_path, tags, params, card.input_size, outputs, label_output=names[0],
                     comment=f"Input: uint8 RGB pixels, already resized to {card.resize_size} (shorter side, "
                             f"{card.interpolation}) and\n# centre-cropped to {h}x{w}; normalisation happens inside the "
                             f"model. tags[i] = probabilities[i] >= thresholds[i] (model metadata).")
    return parity
