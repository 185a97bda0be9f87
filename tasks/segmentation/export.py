"""Exporting the segmenter: one ONNX file, uint8 images in, a class mask out, proven equal to PyTorch.

  images  uint8 [N, H, W, 3]  ->  mask UINT8 [N, H, W] (class index per pixel at the input size),
                                  probabilities FP32 [N, C, H/8, W/8] (softmax at the head's resolution, stride 8)

Normalisation, the frozen backbone, the decoder, the bilinear upsampling of the logits to the input size and the
argmax are inside the graph. Resize (no crop) happens before it, in tasks.preprocess.load_image; the mask maps
back to the original image by a plain (nearest) resize, which the server does. The parity gate:
tasks/segmentation/parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks import contract
from tasks.config import Params
from tasks.layout import Layout
from tasks.onnxfile import export_images_model, model_metadata, set_metadata, write_deployable
from tasks.preprocess import decoded_batches
from tasks.segmentation.model import HEAD_STRIDE, load_segmenter
from tasks.segmentation.parity import check_parity

TASK = "segmentation"


def export(params: Params, layout: Layout, out: Path) -> dict:
    """Into `out` (the new export/ folder): model.onnx, labels.txt, triton/. Returns the parity report."""
    dataset = layout.dataset()
    segmenter, ckpt = load_segmenter(layout, dataset)
    card, labels, palette, split = ckpt.card, ckpt.labels, ckpt.meta["palette"], dataset.eval_split
    outputs = contract.OUTPUTS[TASK]
    model_path = out / layout.model_onnx.name
    export_images_model(segmenter, card.input_size, model_path, outputs, params.export.opset)
    paths = [dataset.resolve(it) for it in dataset.split(split)]
    batches = decoded_batches(paths, card, params.features.batch_size, params.features.decode_workers)
    parity = {**check_parity(model_path, segmenter, batches, params.export.parity_tolerance), "split": split}
    if not parity["passed"]:
        return parity
    h, w = card.input_size
    hh, ww = -(-h // HEAD_STRIDE), -(-w // HEAD_STRIDE)
    set_metadata(model_path, model_metadata(
        TASK, labels, card, dataset, layout.read_json(layout.metrics, {}), ckpt.meta.get("params", {}),
        "resized, no crop", **{
            contract.PALETTE: json.dumps(palette),
            "outputs": f"mask [N,{h},{w}] uint8 class index at the input size (resize to the original image with "
                       f"nearest); probabilities [N,{len(labels)},{hh},{ww}] float32 softmax at stride {HEAD_STRIDE}"}))
    write_deployable(out, model_path, labels, params, card.input_size,
                     list(zip(outputs, ("uint8", "float32"), ([h, w], [len(labels), hh, ww]))),
                     "Segmentation: uint8 RGB resized (no crop) to the input size; mask = class index per "
                     "input pixel, probabilities at stride 8.")
    return parity
