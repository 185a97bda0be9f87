"""Serving a classifier (torch-free: the serving image copies this file).

/v1/predict answers each image's top-k labels with their probabilities (?top_k=, default 5), and with an
`ood_score` output and `ood_threshold` metadata whether the image is like the training data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks import contract

TASK = "classification"


class Serving:
    required = ("probabilities",)
    resize_modes = None  # the answer is about the whole image: any preprocessing
    formats = ("json",)
    answer_pixels = 0.0

    def __init__(self, meta: dict[str, str], outputs: list[str], input_hw: tuple[int, int]):
        self.labels = contract.meta_labels(meta)
        # a model exported with an OOD score (tasks/ood.py) says per image whether it is like its training data
        self.ood_threshold = (contract.meta_number(meta, contract.OOD_THRESHOLD)
                              if contract.OOD_SCORE in outputs else None)

    def parameters(self) -> dict[str, Any]:
        p: dict[str, Any] = {"task": TASK}
        if self.ood_threshold is not None:
            p[contract.OOD_THRESHOLD] = self.ood_threshold
        return p

    def fill_output_shapes(self, outputs: list[dict]) -> None:
        for o in outputs:
            if self.labels and len(o["shape"]) == 2 and o["shape"][1] == -1:
                o["shape"][1] = len(self.labels)

    def query(self, options: dict[str, str]) -> dict[str, Any]:
        contract.take_options(TASK, options, ("top_k",))
        return {"top_k": contract.query_number("top_k", options.get("top_k", "5"), 1, kind=int)}

    def answer(self, out: dict[str, np.ndarray], size: tuple[int, int], query: dict[str, Any]) -> dict[str, Any]:
        p = out["probabilities"]
        idx = np.argsort(-p, kind="stable")[: query["top_k"]]
        top = [{"label": contract.label_name(self.labels, int(i)), "index": int(i), "probability": float(p[i])}
               for i in idx]
        return {"top_k": top, **contract.ood_answer(self.ood_threshold, out.get(contract.OOD_SCORE))}
