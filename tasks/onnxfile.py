"""Writing ONNX files, whatever the task: the one exporter, the metadata every model carries, a Triton repository.

Exporter: torch.onnx.export(dynamo=False), the TorchScript exporter, into one self-contained file (torch 2.14's
default dynamo exporter splits the weights into a `.onnx.data` file), with timm's TF-"same" padding made static
first so onnxruntime can fuse it. uint8 images [N, H, W, 3] in (`tasks.contract.INPUT`), a dynamic batch.
Models over 2 GB (protobuf's limit) are out of scope.
"""

from __future__ import annotations

import datetime
import json
import shutil
from importlib import metadata as importlib_metadata
from pathlib import Path

from tasks import contract
from tasks.files import atomic_path, write_text

TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8", "int32": "TYPE_INT32",
                "float16": "TYPE_FP16", "bool": "TYPE_BOOL"}


def export_images_model(model, input_hw: tuple[int, int], path: Path, outputs: tuple[str, ...] | list[str],
                        opset: int = 17, keep_batchnorm: bool = False) -> None:
    """uint8 images [N, H, W, 3] -> named outputs, dynamic batch, one file written atomically.

    keep_batchnorm: BatchNormalization nodes stay in the file with their stored statistics (the exporter's eval
    mode folds them into the convolutions; onnxruntime folds them the same way when it loads the file, measured
    equally fast): the backbone's features.onnx, whose statistics the domain gap reads (tasks/gap.py)."""
    import warnings

    import torch

    from tasks.network import with_static_padding

    h, w = input_hw
    dummy = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    static = with_static_padding(model, dummy).eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracing notes
        torch.onnx.export(static, (dummy,), str(tmp), input_names=[contract.INPUT], output_names=list(outputs),
                          dynamic_axes={n: {0: "batch"} for n in (contract.INPUT, *outputs)},
                          opset_version=max(opset, 11), dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL)


def version_of(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def model_metadata(task: str, labels: list[str], card, dataset, metrics: dict, params: dict, input_note: str,
                   **extra: str) -> dict[str, str]:
    """The metadata_props of every exported model: what it does and on what (task, labels, preprocessing), where
    its backbone and data came from, its evaluation, its params, when and by what; then the task's own keys."""
    import torch

    h, w = card.input_size
    return {
        contract.TASK: task, contract.LABELS: json.dumps(labels),
        contract.PREPROCESSING: json.dumps({**card.to_dict(), "input": f"{contract.INPUT}: uint8 [N, {h}, {w}, 3] RGB "
                                            f"after tasks.preprocess.load_image ({input_note})"}),
        "backbone": json.dumps({"arch": card.arch, "source": card.source, "weights_sha256": card.weights_sha256}),
        "dataset_sha256": dataset.manifest_sha256, "metrics": json.dumps(metrics), "params": json.dumps(params),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "producer": f"tlcv {version_of('tlcv')}, torch {torch.__version__}, onnx {version_of('onnx')}",
        **extra,
    }


def set_metadata(path: Path, props: dict[str, str]) -> None:
    """Replace the file's metadata_props (onnxruntime: session.get_modelmeta().custom_metadata_map); check the model."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "tlcv"
    model.producer_version = version_of("tlcv")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def triton_config(name: str, input_hw: tuple[int, int], outputs: list[tuple[str, str, list[int]]],
                  max_batch_size: int, comment: str, label_output: str | None = None) -> str:
    """config.pbtxt for an onnxruntime model taking uint8 images [N, H, W, 3]; outputs (name, numpy dtype, dims).
    A batch-only output (dims []) is declared dims [ 1 ], reshaped to the model's shape [N]."""
    h, w = input_hw
    preferred = sorted({b for b in (4, 8, 16, 32, 64) if b <= max_batch_size} | {max_batch_size})
    outs = ",\n".join(
        f'  {{\n    name: "{n}"\n    data_type: {TRITON_TYPES[dt]}\n    dims: [ {", ".join(str(d) for d in dims or [1])} ]\n'
        + ("" if dims else "    reshape: { shape: [ ] }\n")
        + ('    label_filename: "labels.txt"\n' if n == label_output else "") + "  }" for n, dt, dims in outputs)
    return f"""# Triton Inference Server model configuration (written by tlcv's export stage).
# {comment}
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "images"
    data_type: TYPE_UINT8
    dims: [ {h}, {w}, 3 ]
  }}
]
output [
{outs}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{
    kind: KIND_AUTO
    count: 1
  }}
]
version_policy: {{ latest: {{ num_versions: 1 }} }}
"""


def write_deployable(out: Path, model_path: Path, labels: list[str], params, input_hw: tuple[int, int],
                     outputs: list[tuple[str, str, list[int]]], comment: str, label_output: str | None = None) -> Path:
    """Beside model.onnx: labels.txt and triton/<export.triton_model_name>/ (config.pbtxt, labels.txt, 1/model.onnx)."""
    write_text(out / "labels.txt", "\n".join(labels) + "\n")
    ep = params.export
    config = triton_config(ep.triton_model_name, input_hw, outputs, ep.triton_max_batch_size, comment, label_output)
    return write_triton_model(model_path, out / "triton", ep.triton_model_name, config, labels)


def write_triton_model(model_path: Path, repo: Path, name: str, config: str, labels: list[str]) -> Path:
    """repo/<name>/{config.pbtxt, labels.txt, 1/model.onnx}: what `tritonserver --model-repository repo` loads."""
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    with atomic_path(model_dir / "1" / "model.onnx") as tmp:
        shutil.copyfile(model_path, tmp)
    write_text(model_dir / "labels.txt", "\n".join(labels) + "\n")
    write_text(model_dir / "config.pbtxt", config)
    return model_dir
