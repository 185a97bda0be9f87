"""Stage `features`: the frozen backbone's features for every split, computed once (features/).

The cache key is (weights sha256, preprocessing card, manifest sha256): every head
epoch and every experiment that keeps those reuses the same features. On CPU the
backbone runs in onnxruntime (4-8x faster than torch eager here); on CUDA in torch
with autocast and channels_last. Images are decoded by a small thread pool a batch
or two ahead of the network, so memory stays bounded by a few batches.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from tasks.cli import stage_main
from tasks.config import Params
from tasks.files import sha256_bytes
from tasks.gap import write_gap
from tasks.layout import Layout, Progress
from tasks.preprocess import PreprocessingCard, decoded_batches


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


def onnx_runner(onnx_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from tasks.runtime import open_session

    session, _ = open_session(onnx_path, device="cpu")
    return lambda batch: session.run(["features"], {"images": batch})[0]


def torch_runner(layout: Layout, device_name: str) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    from tasks.model import autocast, load_feature_extractor, pick_device

    device = pick_device(device_name)
    extractor = load_feature_extractor(layout).to(device)
    if device.type == "cuda":
        extractor = extractor.to(memory_format=torch.channels_last)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast(device):
            x = torch.from_numpy(batch).to(device, non_blocking=True)
            return extractor(x).float().cpu().numpy()

    return run


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
    dense = params.task != "classification"
    if dense:
        options = {"flip_train": params.dense.flip_train}
    else:  # features.layers / features.flip, as the backbone stage recorded them in the card
        from tasks.model import feature_options

        layers, flip = feature_options(card)
        options = None if (layers, flip) == ("last", False) else {"layers": layers, "flip": flip}
    if params.task == "segmentation":  # the masks, cached at the loss resolution beside the maps
        from tasks.segmentation.data import label_options

        options = {**options, "labels": label_options(params, layout)}
    key = feature_key(card, dataset.manifest_sha256, options)
    cache = layout.feature_cache()
    counts = {s: len(dataset.split(s)) for s in ("train", "val", "test") if dataset.has_split(s)}
    engine = choose_engine(params, layout)
    if not force and cache.valid_key() == key:
        if not dense:  # the domain gap is measured for classification (pooled features) only
            write_gap(layout, dataset, card, key, params.features.batch_size, params.features.decode_workers)
        return FeaturesResult(layout.features, key, True, engine, counts, time.perf_counter() - t0, 0.0)
    if dense:
        return dense_maps(params, layout, dataset, card, key, counts, engine, progress, t0)

    run_batch = onnx_runner(layout.features_onnx) if engine == "onnxruntime" else torch_runner(layout, params.device)
    # One stream over all splits (in split order), so decoding never stalls at a split boundary.
    items = [it for split in counts for it in dataset.split(split)]
    features = np.empty((len(items), card.feature_dim), dtype=np.float32)
    total, done = len(items), 0
    t_net = time.perf_counter()
    with tqdm(total=total, desc=f"features ({engine})", unit="img", disable=None) as bar:
        for batch in decoded_batches([dataset.resolve(it) for it in items], card, params.features.batch_size,
                                     params.features.decode_workers):
            features[done : done + len(batch)] = run_batch(batch)
            done += len(batch)
            bar.update(len(batch))
            if progress:
                progress(done, total)
    arrays: dict[str, np.ndarray] = {}
    start = 0
    for split, n in counts.items():
        arrays[f"x_{split}"] = features[start : start + n]
        arrays[f"y_{split}"] = dataset.labels(split)
        start += n
    rate = total / max(time.perf_counter() - t_net, 1e-9)
    cache.save(key, arrays, {"engine": engine, "counts": counts, "feature_dim": card.feature_dim,
                             "manifest_sha256": dataset.manifest_sha256, "weights_sha256": card.weights_sha256,
                             "images_per_s": round(rate, 1)})
    # After the swap (it replaces the directory): one torch pass over a subsample, kept while the key holds.
    write_gap(layout, dataset, card, key, params.features.batch_size, params.features.decode_workers)
    return FeaturesResult(layout.features, key, False, engine, counts, time.perf_counter() - t0, rate)


def dense_maps(params: Params, layout: Layout, dataset, card: PreprocessingCard, key: str, counts: dict[str, int],
               engine: str, progress: Progress | None, t0: float) -> FeaturesResult:
    """Detection/segmentation: fp16 maps at strides 8/16/32 of every split (+ flipped train), streamed to disk."""
    from tasks.dense import MAP_NAMES, write_maps

    if engine == "onnxruntime":
        from tasks.runtime import open_session

        session, _ = open_session(layout.features_onnx, device="cpu")
        run_batch = lambda batch: session.run(list(MAP_NAMES), {"images": batch})  # noqa: E731
    else:
        run_batch = dense_torch_runner(layout, params.device)
    items = [(split, it) for split in counts for it in dataset.split(split)]
    total = len(items) + (counts.get("train", 0) if params.dense.flip_train else 0)  # network passes
    done = [0]
    t_net = time.perf_counter()

    def batches():
        paths = [dataset.resolve(it) for _, it in items]
        start = 0
        for batch in decoded_batches(paths, card, params.features.batch_size, params.features.decode_workers):
            split = items[start][0]
            cut = next((i for i in range(len(batch)) if items[start + i][0] != split), len(batch))
            if cut < len(batch):  # a batch that crosses a split boundary goes out in two parts
                yield split, batch[:cut]
                yield items[start + cut][0], batch[cut:]
            else:
                yield split, batch
            start += len(batch)

    with tqdm(total=len(items), desc=f"dense features ({engine})", unit="img", disable=None) as bar:
        def tick(n: int) -> None:
            done[0] += n
            bar.update(n)
            if progress:
                progress(done[0], len(items))

        with layout.feature_cache().writer(key, {"engine": engine, "counts": counts, "task": params.task,
                                                 "flip_train": params.dense.flip_train,
                                                 "manifest_sha256": dataset.manifest_sha256,
                                                 "weights_sha256": card.weights_sha256}) as create:
            write_maps(create, run_batch, batches(), counts, card, params.dense.flip_train, tick)
            if params.task == "segmentation":
                from tasks.segmentation.data import write_labels

                write_labels(create, layout, dataset, card, counts, params.dense.flip_train,
                             params.segmentation.loss_stride)
    rate = total / max(time.perf_counter() - t_net, 1e-9)
    return FeaturesResult(layout.features, key, False, engine, counts, time.perf_counter() - t0, rate)


def dense_torch_runner(layout: Layout, device_name: str):
    import torch

    from tasks.dense import load_dense_extractor
    from tasks.model import autocast, pick_device

    device = pick_device(device_name)
    extractor = load_dense_extractor(layout).to(device)

    def run(batch: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode(), autocast(device):
            return [m.float().cpu().numpy() for m in extractor(torch.from_numpy(batch).to(device))]

    return run


def describe(r: FeaturesResult) -> str:
    how = "reused (key unchanged, arrays verified)" if r.cached else f"{r.engine}, {r.images_per_s:.0f} img/s"
    return f"features: {sum(r.counts.values())} images, {how}, {r.seconds:.1f}s -> {r.out_dir}"


if __name__ == "__main__":
    stage_main("features", run, describe)
