"""Serving a multi-label classifier (torch-free: the serving image copies this file).

/v1/predict answers each image's predicted tags, those its `tags` output marks (the probability at or above
the tag's own threshold, metadata `thresholds`), most probable first, and its top-k tags by probability
whether predicted or not, as classification answers (?top_k=, default 5). ?threshold=0..1 predicts with one
threshold for every tag instead. With an `ood_score` output and `ood_threshold` metadata, as classification.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tasks import contract

TASK = "multilabel"


class Serving:
    required = ("probabilities", "tags")
    resize_modes = None
    formats = ("json",)
    answer_pixels = 0.0

    def __init__(self, meta: dict[str, str], outputs: list[str], input_hw: tuple[int, int]):
        self.labels = contract.meta_labels(meta)
        self.thresholds = thresholds(meta, len(self.labels))
        self.ood_threshold = (contract.meta_number(meta, contract.OOD_THRESHOLD)
                              if contract.OOD_SCORE in outputs else None)

    def parameters(self) -> dict[str, Any]:
        p: dict[str, Any] = {"task": TASK, contract.THRESHOLDS: list(self.thresholds)}
        if self.ood_threshold is not None:
            p[contract.OOD_THRESHOLD] = self.ood_threshold
        return p

    def fill_output_shapes(self, outputs: list[dict]) -> None:
        for o in outputs:
            if len(o["shape"]) == 2 and o["shape"][1] == -1:
                o["shape"][1] = len(self.thresholds)

    def query(self, options: dict[str, str]) -> dict[str, Any]:
        contract.take_options(TASK, options, ("top_k", "threshold"))
        raw = options.get("threshold")
        return {"top_k": contract.query_number("top_k", options.get("top_k", "5"), 1, kind=int),
                "threshold": None if raw is None else contract.query_number("threshold", raw, 0.0, 1.0)}

    def answer(self, out: dict[str, np.ndarray], size: tuple[int, int], query: dict[str, Any]) -> dict[str, Any]:
        p = out["probabilities"]
        chosen = np.asarray(out["tags"], bool) if query["threshold"] is None else p >= query["threshold"]
        order = np.argsort(-p, kind="stable")

        def entry(i) -> dict[str, Any]:
            return {"label": contract.label_name(self.labels, int(i)), "index": int(i), "probability": float(p[i])}

        return {"tags": [entry(i) for i in order if chosen[i]], "top_k": [entry(i) for i in order[: query["top_k"]]],
                **contract.ood_answer(self.ood_threshold, out.get(contract.OOD_SCORE))}


def thresholds(meta: dict[str, str], n_labels: int) -> tuple[float, ...]:
    """Metadata `thresholds`: one number in [0, 1] per tag; ModelError otherwise."""
    key = contract.THRESHOLDS
    if key not in meta:
        raise contract.ModelError(f"a {TASK} model needs metadata {key} (a JSON list: each tag's decision threshold); "
                                  "re-export it with the current tlcv")
    try:
        values = tuple(float(v) for v in json.loads(meta[key]))
    except (ValueError, TypeError) as e:
        raise contract.ModelError(f"metadata {key} must be a JSON list of numbers: {e}") from None
    if not all(0.0 <= v <= 1.0 for v in values):  # NaN too
        raise contract.ModelError(f"metadata {key} must be numbers in [0, 1], got {meta[key][:200]}")
    if n_labels and len(values) != n_labels:
        raise contract.ModelError(f"metadata {key} has {len(values)} thresholds for {n_labels} labels")
    return values
