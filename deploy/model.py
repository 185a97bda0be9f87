"""The served model, without the web stack: an onnxruntime session with what its metadata says (task, labels,
preprocessing card, the task's torch-free Serving). deploy/app.py serves it over HTTP; tasks/predict.py runs it
over folders of images (on a Dask cluster's workers too, which need no fastapi).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from deploy.codec import v2_datatype_of_ort
from deploy.predict import REEXPORT, load_serving
from tasks import contract
from tasks.preprocess import PreprocessingCard
from tasks.runtime import open_session


@dataclass
class Model:
    session: Any
    provider: str
    name: str
    labels: list[str]
    card: PreprocessingCard
    input_name: str
    input_shape: list[int]  # [-1, H, W, 3]
    outputs: list[dict]  # [{"name", "datatype", "shape"}]
    task: str
    serving: contract.Serving  # tasks.<task>.serve.Serving: what /v1/predict needs of the task
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str, name: str, device: str, threads: int, spinning: bool = False) -> Model:
        import onnxruntime as ort

        if device == "auto":  # the CUDA provider's library error on a CPU-only host is expected under auto
            ort.set_default_logger_severity(4)
        try:
            # spinning off by default: idle onnxruntime threads would burn the cores HTTP and decoding need
            session, provider = open_session(path, device=device, threads=threads or None, spinning=spinning)
        finally:
            ort.set_default_logger_severity(2)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        inp = session.get_inputs()
        if len(inp) != 1 or inp[0].type != "tensor(uint8)" or len(inp[0].shape) != 4:
            raise RuntimeError(f"{path}: expected one uint8 [N, H, W, 3] input, got {[(i.name, i.type, i.shape) for i in inp]}")
        if contract.PREPROCESSING not in meta:
            raise contract.ModelError(f"the model has no metadata {contract.PREPROCESSING!r}: {REEXPORT}")
        card_d = json.loads(meta[contract.PREPROCESSING])
        known = {f.name for f in fields(PreprocessingCard)}
        card = PreprocessingCard.from_dict({k: v for k, v in card_d.items() if k in known})
        labels = list(contract.meta_labels(meta))
        shape = [-1] + [int(d) if isinstance(d, int) else -1 for d in inp[0].shape[1:]]
        if shape[1:3] == [-1, -1]:
            shape[1:3] = list(card.input_size)
        outs = [{"name": o.name, "datatype": v2_datatype_of_ort(o.type),
                 "shape": [-1] + [int(d) if isinstance(d, int) else -1 for d in o.shape[1:]]} for o in session.get_outputs()]
        task, serving = load_serving(meta, [o["name"] for o in outs], (shape[1], shape[2]),
                                     getattr(card, "resize_mode", "center_crop"))
        serving.fill_output_shapes(outs)
        return cls(session, provider, name, labels, card, inp[0].name, shape, outs, task, serving, meta)

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        results = self.session.run(None, {self.input_name: pixels})
        return {o["name"]: r for o, r in zip(self.outputs, results)}
