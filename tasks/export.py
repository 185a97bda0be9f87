"""Stage `export`: the trained classifier -> export/model.onnx, proven equal to PyTorch before it lands.

  model.onnx           uint8 [N, H, W, 3] RGB "images" -> "probabilities" [N, C] (softmax) and "logits" [N, C],
                       and "ood_score" [N] (tasks/ood.py; above metadata "ood_threshold" = out of distribution).
                       Scaling and mean/std normalisation are inside the graph; resize + centre crop are
                       not (tasks.preprocess.load_image does them, in training, evaluation and serving alike).
                       metadata_props: task, labels, preprocessing, backbone, dataset_sha256, metrics, params, created...
  labels.txt           one class name per line, index order
  model.int8.onnx      with export.quantize=int8, when its accuracy holds (static QDQ, per-channel)
  triton/<name>/       a Triton Inference Server model repository: config.pbtxt, labels.txt, 1/model.onnx
  reports/parity.json  onnxruntime vs PyTorch on every evaluation image (a DVC metric)

Exporter: torch.onnx.export(dynamo=False), the TorchScript exporter, opset 17 by default. It
writes one self-contained file (torch 2.14's default dynamo exporter splits weights into a
`.onnx.data` file), and timm's TF-"same" padding is made static first so onnxruntime can
fuse it. Models over 2 GB (protobuf's limit) are out of scope here.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from tasks.cli import stage_main
from tasks.config import ExportParams, Params, UserError
from tasks.files import atomic_dir, write_json, write_text
from tasks.layout import Dataset, Layout, Progress
from tasks.model import Classifier, load_classifier, with_static_padding
from tasks.ood import MahalanobisScore, load_ood
from tasks.preprocess import PreprocessingCard, decoded_batches
from tasks.onnxfile import set_metadata, version_of, write_triton_model
from tasks.onnxfile import triton_config as onnxfile_triton_config
from tasks.runtime import open_session
INPUT, OUTPUTS = "images", ("probabilities", "logits")
OOD_OUTPUT = "ood_score"


class ExportError(UserError):
    """The exported model cannot be trusted; nothing was written as deployable."""


@dataclass(frozen=True)
class ExportResult:
    model_path: Path
    parity: dict
    int8: dict | None
    triton_dir: Path
    seconds: float


class ExportModel(nn.Module):
    """What the ONNX graph computes: uint8 pixels -> (softmax probabilities, logits[, ood_score]).

    With an OOD scorer (tasks/ood.py) a third output, `ood_score` [N], is the Mahalanobis distance
    of the image's standardised features to the nearest class mean (above `ood_threshold` in the
    metadata: out of distribution).
    """

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
    return [*OUTPUTS, OOD_OUTPUT] if ood is not None else list(OUTPUTS)


def export_onnx(classifier: Classifier, card: PreprocessingCard, path: Path, opset: int = 17,
                ood: MahalanobisScore | None = None) -> None:
    h, w = card.input_size
    dummy = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    model = ExportModel(with_static_padding(classifier, dummy), ood).eval()
    names = output_names(ood)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and constant-folding notes
        torch.onnx.export(
            model, (dummy,), str(path), input_names=[INPUT], output_names=names,
            dynamic_axes={INPUT: {0: "batch"}, **{name: {0: "batch"} for name in names}},
            opset_version=opset, dynamo=False,
        )


def eval_batches(dataset: Dataset, split: str, card: PreprocessingCard, batch_size: int,
                 workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    items = dataset.split(split)
    labels = np.array([dataset.label_index(it) for it in items])
    start = 0
    for batch in decoded_batches([dataset.resolve(it) for it in items], card, batch_size, workers):
        yield batch, labels[start : start + len(batch)]
        start += len(batch)


def check_parity(onnx_path: Path, classifier: Classifier, batches, tolerance: float,
                 ood: MahalanobisScore | None = None) -> dict:
    """onnxruntime (CPU) vs the PyTorch classifier, image by image.

    Argmax disagreements count unless PyTorch's own top two are within `tolerance` (a tie).
    With an OOD scorer, `ood_score` must agree too, relatively (it is a distance, tens to
    thousands): |s_onnx - s_torch| <= tolerance * max(1, s_torch).
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


# ---------------------------------------------------------------- INT8


def onnx_accuracy(session, batches) -> float:
    right = total = 0
    for pixels, labels in batches:
        right += int((session.run([OUTPUTS[0]], {INPUT: pixels})[0].argmax(1) == labels).sum())
        total += len(labels)
    return right / max(total, 1)


def throughput(session, pixels: np.ndarray, seconds: float = 2.0) -> float:
    session.run(None, {INPUT: pixels})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, {INPUT: pixels})
        n += len(pixels)
    return n / (time.perf_counter() - t0)


def quantize_int8(fp32_path: Path, out_path: Path, calibration: list[np.ndarray]) -> None:
    """Static QDQ quantization, per-channel weights, MinMax calibration on training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calibration)

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {INPUT: batch}

    import onnx

    prepped = out_path.with_name(out_path.name + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        first_conv = next(n.name for n in onnx.load(str(prepped)).graph.node if n.op_type == "Conv")
        # Convolutions only (the backbone's compute); the head stays FP32. 7-bit weights (reduce_range)
        # avoid the u8s8 saturation of AVX2 CPUs without VNNI. Measured on Lite0 features here, mean
        # relative error vs FP32: plain u8s8 0.88, reduce_range + first conv in FP32 0.53; u8u8 is
        # closer (0.41) but 7x slower. EfficientNet-Lite0 does not survive post-training INT8 well on
        # this CPU: the accuracy gate decides, and FP32 stays the deployable model when it fails.
        quantize_static(str(prepped), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv"], nodes_to_exclude=[first_conv])
    finally:
        prepped.unlink(missing_ok=True)


def try_int8(fp32_path: Path, out_path: Path, dataset: Dataset, split: str, card: PreprocessingCard,
             p: ExportParams, batch_size: int, workers: int, fp32_accuracy: float) -> dict:
    train_items = dataset.split("train")
    step = max(1, len(train_items) // p.calibration_images)
    calib_paths = [dataset.resolve(it) for it in train_items[::step][: p.calibration_images]]
    calibration = list(decoded_batches(calib_paths, card, 16, workers))
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        quantize_int8(fp32_path, tmp, calibration)
        int8_session, _ = open_session(tmp, device="cpu")
        fp32_session, _ = open_session(fp32_path, device="cpu")
        acc = onnx_accuracy(int8_session, eval_batches(dataset, split, card, batch_size, workers))
        sample = calibration[0][:1]
        batch = np.concatenate(calibration)[:32]
        speed = {
            "int8_img_s_b1": throughput(int8_session, sample), "fp32_img_s_b1": throughput(fp32_session, sample),
            "int8_img_s_b32": throughput(int8_session, batch), "fp32_img_s_b32": throughput(fp32_session, batch),
        }
        drop_pp = (fp32_accuracy - acc) * 100
        result = {"accuracy": acc, "fp32_accuracy": fp32_accuracy, "acc_drop_pp": drop_pp,
                  "int8_over_fp32_b1": speed["int8_img_s_b1"] / speed["fp32_img_s_b1"],
                  "int8_over_fp32_b32": speed["int8_img_s_b32"] / speed["fp32_img_s_b32"], **speed,
                  "max_drop_pp": p.max_int8_drop, "calibration_images": len(calib_paths)}
        if drop_pp > p.max_int8_drop:
            result.update(written=False, reason=f"INT8 accuracy {acc:.4f} is {drop_pp:.2f} points below FP32 "
                          f"{fp32_accuracy:.4f} (export.max_int8_drop={p.max_int8_drop}); FP32 stays the deployable model")
            out_path.unlink(missing_ok=True)
        else:
            os.replace(tmp, out_path)
            result["written"] = True
        return result
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- Triton


def triton_config(name: str, card: PreprocessingCard, num_classes: int, max_batch_size: int, ood: bool = False) -> str:
    outputs = [(OUTPUTS[0], "float32", [num_classes]), (OUTPUTS[1], "float32", [num_classes])]
    if ood:
        outputs.append((OOD_OUTPUT, "float32", []))  # [N]: one score per image
    h, w = card.input_size
    return onnxfile_triton_config(
        name, card.input_size, outputs, max_batch_size, label_output=OUTPUTS[0],
        comment=f"Input: uint8 RGB pixels, already resized to {card.resize_size} (shorter side, {card.interpolation}) "
                f"and\n# centre-cropped to {h}x{w}; normalisation happens inside the model.")


def write_triton_repo(model_path: Path, out_dir: Path, name: str, card: PreprocessingCard, labels: list[str],
                      max_batch_size: int, ood: bool = False) -> Path:
    return write_triton_model(model_path, out_dir, name, triton_config(name, card, len(labels), max_batch_size, ood),
                              labels)


# ---------------------------------------------------------------- stage


def gate_failure(parity: dict) -> str:
    """Why a dense model's parity gate failed, in the terms of its task."""
    if "images_matching" in parity:
        return (f"{parity['images_matching']} of {parity['n']} {parity['split']} images give the same detections in "
                f"onnxruntime and PyTorch (min matched IoU {parity['min_matched_iou']:.4f}, max score difference "
                f"{parity['max_score_diff']:.1e})")
    return (f"{parity['pixel_agreement']:.4%} of pixels on {parity['n']} {parity['split']} images agree between "
            f"onnxruntime and PyTorch (need {parity['min_pixel_agreement']:.1%}), max probability difference "
            f"{parity['max_prob_diff']:.1e} (tolerance {parity['prob_tolerance']:.0e})")


def run_dense(params: Params, layout: Layout, t0: float) -> ExportResult:
    """Detection or segmentation: the task's export into a new export/, swapped in only when its parity gate passed."""
    if params.task == "detection":
        from tasks.detection.export import export_detection as export_task
    else:
        from tasks.segmentation.export import export_segmentation as export_task

    with atomic_dir(layout.export) as out:
        parity = export_task(params, layout, out)
        write_json(layout.parity, parity)
        if not parity["passed"]:
            raise ExportError(f"parity gate failed: {gate_failure(parity)}; the previous {layout.model_onnx} is kept "
                              f"(see {layout.parity})")
    return ExportResult(layout.model_onnx, parity, None, layout.export / "triton" / params.export.triton_model_name,
                        time.perf_counter() - t0)


def run(params: Params, layout: Layout, progress: Progress | None = None) -> ExportResult:
    """Export, prove parity, write INT8 and Triton: all into a new export/ swapped in only when every step passed.

    A failing parity gate leaves the previous export/ (the deployable model) untouched; its
    reports/parity.json says why.
    """
    t0 = time.perf_counter()
    if params.task != "classification":
        return run_dense(params, layout, t0)
    p = params.export
    dataset = layout.dataset()
    classifier, meta = load_classifier(layout.classifier)
    if meta.get("manifest_sha256") != dataset.manifest_sha256:
        raise ExportError("the classifier was trained on another version of the data: re-run train (dvc repro train)")
    card: PreprocessingCard = classifier.features.card
    labels: list[str] = meta["labels"]
    split = dataset.eval_split
    bs, workers = params.features.batch_size, params.features.decode_workers
    metrics = layout.read_json(layout.metrics, {})

    with atomic_dir(layout.export) as out:
        model_path = out / layout.model_onnx.name
        ood = load_ood(layout.classifier)
        scorer, ood_threshold = ood if ood is not None else (None, None)
        export_onnx(classifier, card, model_path, p.opset, scorer)
        parity = check_parity(model_path, classifier, eval_batches(dataset, split, card, bs, workers), p.parity_tolerance,
                              scorer)
        parity["split"] = split
        if not parity["passed"]:
            write_json(layout.parity, parity)
            raise ExportError(
                f"parity gate failed on {parity['n']} {split} images: argmax agreement {parity['argmax_agreement']:.4%}, "
                f"max |p_onnx - p_torch| {parity['max_abs_prob_diff']:.2e} (tolerance {p.parity_tolerance:.0e}); "
                f"the previous {layout.model_onnx} is kept (see {layout.parity})")
        set_metadata(model_path, {
            "task": "classification",  # tasks/contract.py TASK: the server refuses a model without it
            "labels": json.dumps(labels),
            "preprocessing": json.dumps({**card.to_dict(), "input": f"{INPUT}: uint8 [N, {card.input_size[0]}, "
                                         f"{card.input_size[1]}, 3] RGB after tasks.preprocess.load_image"}),
            "backbone": json.dumps({"arch": card.arch, "source": card.source, "weights_sha256": card.weights_sha256}),
            "dataset_sha256": dataset.manifest_sha256,
            **({"ood_threshold": repr(ood_threshold), "ood": json.dumps(meta.get("ood", {}))} if scorer is not None else {}),
            "metrics": json.dumps({**metrics, "onnx_accuracy": parity["onnx_accuracy"],
                                   "torch_accuracy": parity["torch_accuracy"], "split": split}),
            "params": json.dumps(meta.get("train", {})),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "producer": f"tlcv {version_of('tlcv')}, torch {torch.__version__}, onnx {version_of('onnx')}",
        })
        write_text(out / "labels.txt", "\n".join(labels) + "\n")
        int8 = None
        if p.quantize == "int8":
            int8 = try_int8(model_path, out / "model.int8.onnx", dataset, split, card, p, bs, workers,
                            parity["onnx_accuracy"])
        write_triton_repo(model_path, out / "triton", p.triton_model_name, card, labels, p.triton_max_batch_size,
                          scorer is not None)
        write_json(layout.parity, {**parity, **({"int8": int8} if int8 is not None else {})})
    return ExportResult(layout.model_onnx, parity, int8, layout.export / "triton" / p.triton_model_name,
                        time.perf_counter() - t0)


def describe(r: ExportResult) -> str:
    q = r.parity
    if "images_matching" in q:
        return (f"export: {r.model_path} — parity on {q['n']} {q['split']} images: {q['match_rate']:.2%} give the same "
                f"detections (min IoU {q['min_matched_iou']:.4f}, max score diff {q['max_score_diff']:.1e}); "
                f"Triton repository {r.triton_dir}; {r.seconds:.1f}s")
    if "pixel_agreement" in q:
        return (f"export: {r.model_path} — parity on {q['n']} {q['split']} images: {q['pixel_agreement']:.4%} of pixels "
                f"agree, max |dp| {q['max_prob_diff']:.1e}; Triton repository {r.triton_dir}; {r.seconds:.1f}s")
    line = (f"export: {r.model_path} — parity on {q['n']} {q['split']} images: argmax agreement {q['argmax_agreement']:.2%}, "
            f"max |dp| {q['max_abs_prob_diff']:.1e}, onnxruntime accuracy {q['onnx_accuracy']:.4f} "
            f"(PyTorch {q['torch_accuracy']:.4f}); Triton repository {r.triton_dir}; {r.seconds:.1f}s")
    if r.int8 is not None:
        i = r.int8
        state = "written" if i["written"] else f"NOT written: {i['reason']}"
        line += (f"\n  int8: accuracy {i['accuracy']:.4f} ({i['acc_drop_pp']:+.2f} pp drop), "
                 f"{i['int8_over_fp32_b1']:.2f}x FP32 speed at batch 1 — {state}")
    return line


if __name__ == "__main__":
    stage_main("export", run, describe)
