"""Stage `features`: the frozen backbone's features for every split, computed once (features/).

What is cached is the task's feature kind: tasks.pooled (classification, multi-label: one vector per image) or
tasks.dense (detection, segmentation: fp16 maps at strides 8/16/32), and the task's training targets beside
them. The cache key is (weights sha256, preprocessing card, manifest sha256, the kind's and the task's options):
every head epoch and every experiment that keeps those reuses the same features. On CPU the backbone runs in
onnxruntime (4-8x faster than torch eager here); on CUDA in torch with autocast and channels_last. Images are
decoded by a small thread pool a batch or two ahead of the network, so memory stays bounded by a few batches.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tasks import registry
from tasks.cli import stage_main
from tasks.config import Params
from tasks.files import sha256_bytes
from tasks.layout import Layout, Progress
from tasks.preprocess import PreprocessingCard


@dataclass(frozen=True)
class FeaturesResult:
    out_dir: Path
    key: str
    cached: bool
    engine: str
    counts: dict[str, int]
    seconds: float
    images_per_s: float


def feature_key(card: PreprocessingCard, manifest_sha256: str, options: dict | None = None) -> str:
    blob = json.dumps(
        {"weights": card.weights_sha256, "preprocessing": card.preprocessing_dict(), "manifest": manifest_sha256,
         **({"options": options} if options else {})},
        sort_keys=True,
    )
    return sha256_bytes(blob.encode())


def choose_engine(params: Params, layout: Layout) -> str:
    import torch

    engine = params.features.engine
    if engine == "auto":
        cuda = params.device in ("auto", "cuda") and torch.cuda.is_available()
        engine = "torch" if cuda or not layout.features_onnx.exists() else "onnxruntime"
    return engine


def run(params: Params, layout: Layout, progress: Progress | None = None, force: bool = False) -> FeaturesResult:
    """Features of every split, or the stored ones while their key holds and their files are intact."""
    t0 = time.perf_counter()
    dataset = layout.dataset()
    card = layout.card()
    task = registry.part(params.task, "features")
    kind = task.KIND
    options = kind.options(params, card)
    labels = task.label_options(params, layout)
    if labels:  # targets cached in a form the params choose (segmentation: the loss stride)
        options = {**(options or {}), "labels": labels}
    key = feature_key(card, dataset.manifest_sha256, options)
    counts = {s: len(dataset.split(s)) for s in ("train", "val", "test") if dataset.has_split(s)}
    engine = choose_engine(params, layout)
    cached = not force and layout.feature_cache().valid_key() == key
    rate = 0.0
    if not cached:
        rate = kind.compute(params, layout, dataset, card, key, engine, counts, progress,
                            lambda create: task.write_labels(create, params, layout, dataset, card, counts))
    kind.after(params, layout, dataset, card, key)
    return FeaturesResult(layout.features, key, cached, engine, counts, time.perf_counter() - t0, rate)


def describe(r: FeaturesResult) -> str:
    how = "reused (key unchanged, arrays verified)" if r.cached else f"{r.engine}, {r.images_per_s:.0f} img/s"
    return f"features: {sum(r.counts.values())} images, {how}, {r.seconds:.1f}s -> {r.out_dir}"


def main() -> None:
    """The console script (tlcv-...) and `python -m tasks.features`."""
    stage_main("features", run, describe)


if __name__ == "__main__":
    main()
