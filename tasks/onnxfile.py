"""Writing deployable ONNX files, whatever the task: metadata, version stamps, a Triton model repository."""

from __future__ import annotations

import shutil
from importlib import metadata as importlib_metadata
from pathlib import Path

from tasks.files import atomic_path, write_text

TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8", "int32": "TYPE_INT32",
                "float16": "TYPE_FP16", "bool": "TYPE_BOOL"}


def export_images_model(model, input_hw: tuple[int, int], path: Path, outputs: tuple[str, ...], opset: int) -> None:
    """uint8 images [N, H, W, 3] -> named outputs, dynamic batch, one file (TorchScript exporter, static padding)."""
    import warnings

    import torch

    from tasks.model import with_static_padding

    h, w = input_hw
    dummy = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    static = with_static_padding(model, dummy).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracing notes
        torch.onnx.export(static, (dummy,), str(path), input_names=["images"], output_names=list(outputs),
                          dynamic_axes={n: {0: "batch"} for n in ("images", *outputs)}, opset_version=max(opset, 11),
                          dynamo=False)


def version_of(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


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


def write_triton_model(model_path: Path, repo: Path, name: str, config: str, labels: list[str]) -> Path:
    """repo/<name>/{config.pbtxt, labels.txt, 1/model.onnx}: what `tritonserver --model-repository repo` loads."""
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    with atomic_path(model_dir / "1" / "model.onnx") as tmp:
        shutil.copyfile(model_path, tmp)
    write_text(model_dir / "labels.txt", "\n".join(labels) + "\n")
    write_text(model_dir / "config.pbtxt", config)
    return model_dir
