"""Exporting the segmenter: one ONNX file, uint8 images in, a class mask out, proven equal to PyTorch.

  images  uint8 [N, H, W, 3]  ->  mask UINT8 [N, H, W] (class index per pixel at the input size),
                                  probabilities FP32 [N, C, H/8, W/8] (softmax at the head's resolution, stride 8)

Normalisation, the frozen backbone, the decoder, the bilinear upsampling of the logits to the input size and the
argmax are inside the graph. Resize (no crop) happens before it, in tasks.preprocess.load_image; the mask maps
back to the original image by a plain (nearest) resize, which the server does.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import torch

from tasks.config import Params
from tasks.layout import ArtifactError, Layout
from tasks.onnxfile import export_images_model, set_metadata, triton_config, version_of, write_triton_model
from tasks.preprocess import decoded_batches
from tasks.runtime import open_session
from tasks.segmentation.model import HEAD_STRIDE, Segmenter, cpu_threads, load_segmenter

OUTPUTS = ("mask", "probabilities")
MIN_PIXEL_AGREEMENT = 0.999  # the parity gate: share of pixels whose class agrees, over every evaluation image
MAX_PROB_DIFF = 1e-3  # and the largest |p_onnx - p_torch|


def export_onnx(segmenter: Segmenter, path: Path, opset: int) -> None:
    export_images_model(segmenter, segmenter.input_size, path, OUTPUTS, opset)


def check_parity(path: Path, segmenter: Segmenter, batches) -> dict:
    """Every image through onnxruntime and PyTorch: pixel agreement of the masks, largest probability gap."""
    session, _ = open_session(path, device="cpu")
    n = pixels = agree = 0
    worst_image, max_diff = 1.0, 0.0
    for batch in batches:
        got_mask, got_prob = session.run(list(OUTPUTS), {"images": batch})
        with torch.inference_mode():
            want_mask, want_prob = (t.numpy() for t in segmenter(torch.from_numpy(batch)))
        same = (got_mask == want_mask).reshape(len(batch), -1)
        n, pixels, agree = n + len(batch), pixels + same.size, agree + int(same.sum())
        worst_image = min(worst_image, float(same.mean(1).min()))
        max_diff = max(max_diff, float(np.abs(got_prob - want_prob).max()))
    rate = agree / max(pixels, 1)
    return {"n": n, "pixels": pixels, "pixel_agreement": rate, "min_image_pixel_agreement": worst_image,
            "max_prob_diff": max_diff, "min_pixel_agreement": MIN_PIXEL_AGREEMENT, "prob_tolerance": MAX_PROB_DIFF,
            "passed": n > 0 and rate >= MIN_PIXEL_AGREEMENT and max_diff <= MAX_PROB_DIFF}


def export_segmentation(params: Params, layout: Layout, out: Path) -> dict:
    """Into `out` (the new export/ folder): model.onnx, labels.txt, triton/. Returns the parity report."""
    dataset = layout.dataset()
    segmenter, meta = load_segmenter(layout.checkpoint)
    if meta.get("manifest_sha256") != dataset.manifest_sha256:
        raise ArtifactError("the segmenter was trained on another version of the data: re-run train (dvc repro train)")
    card, labels, palette, split = segmenter.extractor.card, meta["labels"], meta["palette"], dataset.eval_split
    model_path = out / layout.model_onnx.name
    export_onnx(segmenter, model_path, params.export.opset)
    paths = [dataset.resolve(it) for it in dataset.split(split)]
    batches = decoded_batches(paths, card, params.features.batch_size, params.features.decode_workers)
    with cpu_threads():
        parity = {**check_parity(model_path, segmenter, batches), "split": split}
    if not parity["passed"]:
        return parity
    h, w = card.input_size
    hh, ww = -(-h // HEAD_STRIDE), -(-w // HEAD_STRIDE)
    metrics = layout.read_json(layout.metrics, {})
    set_metadata(model_path, {
        "task": "segmentation", "labels": json.dumps(labels), "palette": json.dumps(palette),
        "preprocessing": json.dumps({**card.to_dict(), "input": f"images: uint8 [N, {h}, {w}, 3] RGB after "
                                     f"tasks.preprocess.load_image (resized, no crop)"}),
        "outputs": f"mask [N,{h},{w}] uint8 class index at the input size (resize to the original image with "
                   f"nearest); probabilities [N,{len(labels)},{hh},{ww}] float32 softmax at stride {HEAD_STRIDE}",
        "backbone": json.dumps({"arch": card.arch, "source": card.source, "weights_sha256": card.weights_sha256}),
        "dataset_sha256": dataset.manifest_sha256, "metrics": json.dumps(metrics),
        "params": json.dumps(meta["segmentation"]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "producer": f"tlcv {version_of('tlcv')}, torch {torch.__version__}, onnx {version_of('onnx')}",
    })
    (out / "labels.txt").write_text("\n".join(labels) + "\n")
    config = triton_config(params.export.triton_model_name, card.input_size,
                           [("mask", "uint8", [h, w]), ("probabilities", "float32", [len(labels), hh, ww])],
                           params.export.triton_max_batch_size,
                           "Segmentation: uint8 RGB resized (no crop) to the input size; mask = class index per "
                           "input pixel, probabilities at stride 8.")
    write_triton_model(model_path, out / "triton", params.export.triton_model_name, config, labels)
    return parity
