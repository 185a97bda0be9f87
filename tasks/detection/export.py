"""Exporting the detector: one ONNX file, uint8 images in, final detections out, proven equal to PyTorch.

  images  uint8 [N, H, W, 3]  ->  boxes FP32 [N, K, 4] (x1, y1, x2, y2 in input pixels),
                                  scores FP32 [N, K] (descending; 0 = padding), labels INT64 [N, K] (-1 = padding)

Normalisation, the frozen backbone, the FPN and head, scoring, top-k, class-aware NMS and the
padding to K = max_detections are all inside the graph (NMS as ONNX NonMaxSuppression), so
onnxruntime and Triton return final detections. Resize (no crop) happens before the graph, in
tasks.preprocess.load_image; a box maps back to the original image by width/W and height/H.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import torch

from tasks.config import Params
from tasks.detection.model import Detector, load_detector
from tasks.layout import ArtifactError, Layout
from tasks.onnxfile import export_images_model, set_metadata, triton_config, version_of, write_triton_model
from tasks.preprocess import decoded_batches
from tasks.runtime import open_session

OUTPUTS = ("boxes", "scores", "labels")


def export_onnx(detector: Detector, path: Path, opset: int) -> None:
    export_images_model(detector, detector.input_size, path, OUTPUTS, opset)


def image_parity(onnx_out: tuple, torch_out: tuple, threshold: float, tolerance: float) -> tuple[bool, dict]:
    """One image: the same detections (count, labels), matched boxes IoU >= 0.99, scores within `tolerance`.

    A detection that only one runtime keeps is forgiven when its score is within `tolerance` of the
    threshold (a tie on the cut-off, not a disagreement).
    """
    from torchvision.ops import box_iou

    (b1, s1, l1), (b2, s2, l2) = onnx_out, torch_out
    k1, k2 = s1 > 0, s2 > 0
    b1, s1, l1, b2, s2, l2 = b1[k1], s1[k1], l1[k1], b2[k2], s2[k2], l2[k2]
    ious = box_iou(torch.from_numpy(b1), torch.from_numpy(b2)).numpy() if len(b1) and len(b2) else np.zeros((len(b1), len(b2)))
    used = np.zeros(len(b2), bool)
    worst_iou, worst_score, unmatched = 1.0, 0.0, 0
    for i in np.argsort(-s1):
        cand = np.flatnonzero((l2 == l1[i]) & ~used)
        j = max(cand, key=lambda c: ious[i, c], default=None)
        if j is None or ious[i, j] < 0.99:
            unmatched += int(abs(s1[i] - threshold) > tolerance)
            continue
        used[j] = True
        worst_iou, worst_score = min(worst_iou, float(ious[i, j])), max(worst_score, float(abs(s1[i] - s2[j])))
    unmatched += int(sum(abs(s2[j] - threshold) > tolerance for j in np.flatnonzero(~used)))
    ok = unmatched == 0 and worst_score <= tolerance
    return ok, {"count_onnx": int(len(s1)), "count_torch": int(len(s2)), "min_iou": worst_iou,
                "max_score_diff": worst_score, "unmatched": unmatched}


def check_parity(path: Path, detector: Detector, batches, threshold: float, tolerance: float = 1e-3) -> dict:
    session, _ = open_session(path, device="cpu")
    n = passed = unmatched = 0
    min_iou, max_diff = 1.0, 0.0
    for pixels in batches:
        got = session.run(list(OUTPUTS), {"images": pixels})
        with torch.inference_mode():
            want = [t.numpy() for t in detector(torch.from_numpy(pixels))]
        for i in range(len(pixels)):
            ok, d = image_parity(tuple(o[i] for o in got), tuple(o[i] for o in want), threshold, tolerance)
            n, passed, unmatched = n + 1, passed + ok, unmatched + d["unmatched"]
            min_iou, max_diff = min(min_iou, d["min_iou"]), max(max_diff, d["max_score_diff"])
    return {"n": n, "images_matching": passed, "match_rate": passed / max(n, 1), "min_matched_iou": min_iou,
            "max_score_diff": max_diff, "unmatched_detections": unmatched, "score_tolerance": tolerance,
            "passed": passed == n}


def export_detection(params: Params, layout: Layout, out: Path) -> dict:
    """Into `out` (the new export/ folder): model.onnx, labels.txt, triton/. Returns the parity report."""
    dataset = layout.dataset()
    detector, meta = load_detector(layout.checkpoint)
    if meta.get("manifest_sha256") != dataset.manifest_sha256:
        raise ArtifactError("the detector was trained on another version of the data: re-run train (dvc repro train)")
    card, labels, split = detector.extractor.card, meta["labels"], dataset.eval_split
    model_path = out / layout.model_onnx.name
    export_onnx(detector, model_path, params.export.opset)
    paths = [dataset.resolve(it) for it in dataset.split(split)]
    batches = decoded_batches(paths, card, params.features.batch_size, params.features.decode_workers)
    parity = {**check_parity(model_path, detector, batches, detector.settings[0]), "split": split}
    if not parity["passed"]:
        return parity
    d = meta["detection"]
    metrics = layout.read_json(layout.metrics, {})
    set_metadata(model_path, {
        "task": "detection", "labels": json.dumps(labels),
        "preprocessing": json.dumps({**card.to_dict(), "input": f"images: uint8 [N, {card.input_size[0]}, "
                                     f"{card.input_size[1]}, 3] RGB after tasks.preprocess.load_image (resized, no crop)"}),
        "score_threshold": str(d["score_threshold"]), "nms_threshold": str(d["nms_threshold"]),
        "max_detections": str(d["max_detections"]),
        "outputs": "boxes [N,K,4] xyxy input pixels; scores [N,K] (0 = padding); labels [N,K] int64 (-1 = padding)",
        "backbone": json.dumps({"arch": card.arch, "source": card.source, "weights_sha256": card.weights_sha256}),
        "dataset_sha256": dataset.manifest_sha256, "metrics": json.dumps(metrics),
        "params": json.dumps(d), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "producer": f"tlcv {version_of('tlcv')}, torch {torch.__version__}, onnx {version_of('onnx')}",
    })
    (out / "labels.txt").write_text("\n".join(labels) + "\n")
    k = d["max_detections"]
    config = triton_config(params.export.triton_model_name, card.input_size,
                           [("boxes", "float32", [k, 4]), ("scores", "float32", [k]), ("labels", "int64", [k])],
                           params.export.triton_max_batch_size,
                           "Detection: uint8 RGB resized (no crop) to the input size; boxes in input pixels, "
                           "scores 0 and labels -1 on padding rows.")
    write_triton_model(model_path, out / "triton", params.export.triton_model_name, config, labels)
    return parity
