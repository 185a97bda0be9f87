"""Exporting the detector: one ONNX file, uint8 images in, final detections out, proven equal to PyTorch.

  images  uint8 [N, H, W, 3]  ->  boxes FP32 [N, K, 4] (x1, y1, x2, y2 in input pixels),
                                  scores FP32 [N, K] (descending; 0 = padding), labels INT64 [N, K] (-1 = padding)

Normalisation, the frozen backbone, the FPN and head, scoring, top-k, class-aware NMS and the
padding to K = max_detections are all inside the graph (NMS as ONNX NonMaxSuppression), so
onnxruntime and Triton return final detections. Resize (no crop) happens before the graph, in
tasks.preprocess.load_image; a box maps back to the original image by width/W and height/H.
The cut-offs in the graph and in its metadata are the model's own (checkpoint meta["postprocess"]).
"""

from __future__ import annotations

from pathlib import Path

from tasks import contract
from tasks.config import Params
from tasks.detection.model import load_detector
from tasks.detection.parity import check_parity
from tasks.layout import Layout
from tasks.onnxfile import export_images_model, model_metadata, set_metadata, write_deployable
from tasks.preprocess import decoded_batches

TASK = "detection"


def export(params: Params, layout: Layout, out: Path) -> dict:
    """Into `out` (the new export/ folder): model.onnx, labels.txt, triton/. Returns the parity report."""
    dataset = layout.dataset()
    detector, ckpt = load_detector(layout, dataset)
    card, labels, split, post = ckpt.card, ckpt.labels, dataset.eval_split, detector.post
    outputs = contract.OUTPUTS[TASK]
    model_path = out / layout.model_onnx.name
    export_images_model(detector, card.input_size, model_path, outputs, params.export.opset)
    paths = [dataset.resolve(it) for it in dataset.split(split)]
    batches = decoded_batches(paths, card, params.features.batch_size, params.features.decode_workers)
    parity = {**check_parity(model_path, detector, batches, params.export.parity_tolerance), "split": split}
    if not parity["passed"]:
        return parity
    settings = {**ckpt.meta.get("params", {}), "score_threshold": post.score_threshold,
                "nms_threshold": post.nms_threshold, "pre_nms_top_k": post.pre_nms_top_k,
                "max_detections": post.max_detections}
    set_metadata(model_path, model_metadata(
        TASK, labels, card, dataset, layout.read_json(layout.metrics, {}), settings, "resized, no crop",
        **{contract.SCORE_THRESHOLD: str(post.score_threshold), contract.NMS_THRESHOLD: str(post.nms_threshold),
           contract.MAX_DETECTIONS: str(post.max_detections),
           "outputs": "boxes [N,K,4] xyxy input pixels; scores [N,K] (0 = padding); labels [N,K] int64 (-1 = padding)"}))
    k = post.max_detections
    write_deployable(out, model_path, labels, params, card.input_size,
                     list(zip(outputs, ("float32", "float32", "int64"), ([k, 4], [k], [k]))),
                     "Detection: uint8 RGB resized (no crop) to the input size; boxes in input pixels, "
                     "scores 0 and labels -1 on padding rows.")
    return parity
