"""Pooled features, what classification and multi-label heads learn on: one vector per image, computed once.

The backbone stage records how the vector is formed in the card (`<task>.features.layers`, `.flip`) and exports
the extractor to features.onnx (uint8 pixels in, normalisation inside); the features stage runs it over every
split (onnxruntime on CPU, torch on CUDA) into features/x_<split>.npy, the task writing its targets beside them.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tasks.config import UserError
from tasks.gap import TAP_BATCH, OnnxTap, save_gap, subsample_indices, summarize, write_gap
from tasks.layout import Dataset, Layout, Progress
from tasks.network import PixelNetwork, freeze, load_backbone
from tasks.preprocess import PreprocessingCard, decoded_batches, load_checked

OUTPUTS = ("features",)  # features.onnx: images -> features [N, D]


class FeatureExtractor(PixelNetwork):
    """uint8 [N, H, W, 3] RGB pixels -> features [N, D]: scale, normalise, backbone, pooled.

    Taking raw pixels means the mean/std travel inside the model (and its ONNX graph).
    """

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)
        layers, flip = feature_options(self.card)
        embed = self.network if layers == "last" else self.multi
        if flip:  # the mean with the mirrored image: still one vector per image, computed once
            return (embed(x) + embed(x.flip(3))) / 2
        return embed(x)

    def multi(self, x: torch.Tensor) -> torch.Tensor:
        """`<task>.features.layers: multi`: every stage's globally pooled output beside the last pooled features
        (Head2Toe-style; one pass through the network)."""
        maps, pooled = stages_and_pooled(self.network, x)
        return torch.cat([m.mean((2, 3)) for m in maps] + [pooled], dim=1)


def stages_and_pooled(network: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Normalised NCHW input -> ([every stage's output map], the network's own pooled features), in one pass
    (`<task>.features.layers: multi`). timm: every feature_info level (EfficientNet: strides 2 to 32); torchvision
    ResNet: layer1 to layer3 (layer4's pooled map is the last features themselves)."""
    if all(hasattr(network, f"layer{i}") for i in (2, 3, 4)):
        n = network
        c2 = n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x)))))
        c3 = n.layer2(c2)
        c4 = n.layer3(c3)
        return [c2, c3, c4], torch.flatten(n.avgpool(n.layer4(c4)), 1)
    if getattr(network, "feature_info", None) is None or not hasattr(network, "forward_intermediates"):
        raise UserError("<task>.features.layers: multi needs a timm backbone with forward_intermediates, or a torchvision "
                        "resnet; use <task>.features.layers: last")
    last, maps = network.forward_intermediates(x, indices=list(range(len(network.feature_info))))
    return list(maps), network.forward_head(last)


def feature_options(card: PreprocessingCard) -> tuple[str, bool]:
    """(layers, flip) the card's features are computed with (`<task>.features.layers`, `.flip`)."""
    return card.extra.get("layers", "last"), bool(card.extra.get("flip", False))


def load_feature_extractor(layout: Layout) -> FeatureExtractor:
    """The frozen extractor from the backbone stage's files (weights checked against the card's sha256)."""
    return freeze(FeatureExtractor(*load_backbone(layout)))



# ---------------------------------------------------------------- the backbone stage: card and extractor


def card_fields(params, net: nn.Module, fields: dict) -> dict:
    """The card of pooled features: how they are formed (the task's features.layers / .flip) and their size."""
    f = params.head.features
    fields = {**fields, "extra": {**fields.get("extra", {}), "layers": f.layers, "flip": f.flip}}
    probe = PreprocessingCard(**{**fields, "feature_dim": 0})
    h, w = probe.input_size
    with torch.no_grad():
        dim = int(FeatureExtractor(net, probe).eval()(torch.zeros(1, h, w, 3, dtype=torch.uint8)).shape[1])
    return {**fields, "feature_dim": dim}


def extractor(net: nn.Module, card: PreprocessingCard) -> nn.Module:
    return FeatureExtractor(net, card).eval()


# ---------------------------------------------------------------- the features stage


def options(params, card: PreprocessingCard) -> dict | None:
    """What joins the feature cache key beyond weights, preprocessing and data: none for the plain last layer."""
    layers, flip = feature_options(card)
    return None if (layers, flip) == ("last", False) else {"layers": layers, "flip": flip}


CPU_RUN = 8  # images per onnxruntime run on CPU: one-threaded runs were fastest at 4-8 (Lite0, 2 cores)


def cpu_workers() -> tuple[int, int]:
    """(threads that each decode and run their own images, onnxruntime threads of one run): the machine's cores
    (not its load, so the same params give the same features anywhere), at most 8 runs at once."""
    cores = os.cpu_count() or 1
    workers = min(cores, 8)
    return workers, max(1, cores // workers)


def torch_runner(layout: Layout, device_name: str) -> Callable[[np.ndarray], np.ndarray]:
    from tasks.network import autocast, pick_device

    device = pick_device(device_name)
    extractor = load_feature_extractor(layout).to(device)
    if device.type == "cuda":
        extractor = extractor.to(memory_format=torch.channels_last)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast(device):
            return extractor(torch.from_numpy(batch).to(device, non_blocking=True)).float().cpu().numpy()

    return run


def compute(params, layout: Layout, dataset: Dataset, card: PreprocessingCard, key: str, engine: str,
            counts: dict[str, int], progress: Progress | None, write_labels: Callable) -> float:
    """x_<split> [N, D] float32 of every split into the feature cache, the task's targets beside them
    (`write_labels(create)`), swapped in whole. Returns the network's images per second."""
    # One stream over all splits (in split order), so decoding never stalls at a split boundary.
    items = [it for split in counts for it in dataset.split(split)]
    split_of = np.repeat(np.arange(len(counts)), list(counts.values()))
    row_of = np.concatenate([np.arange(n) for n in counts.values()]) if items else np.zeros(0, int)
    dask = params.features.executor == "dask"
    if dask and engine != "onnxruntime":
        raise UserError(f"features.executor dask runs onnxruntime on the workers, but the engine here is {engine}: "
                        f"set features.engine: onnxruntime")
    workers, threads = cpu_workers() if engine == "onnxruntime" else (1, None)
    # The domain gap's subsample (train rows) goes first, through the tapped features.onnx (its features come
    # from there: the same network, its BatchNorm not fused)
    tap = OnnxTap.open(layout.features_onnx, OUTPUTS[0], threads) if layout.features_onnx.exists() else None
    sample = np.zeros(0, int)
    if tap is not None and "train" in counts:
        sample = np.array(subsample_indices(dataset), int) + sum(list(counts.values())[: list(counts).index("train")])
    order = np.concatenate([sample, np.setdiff1d(np.arange(len(items)), sample)]).astype(int)
    info = {"engine": engine, "counts": counts, "feature_dim": card.feature_dim,
            "manifest_sha256": dataset.manifest_sha256, "weights_sha256": card.weights_sha256}
    total = len(items)
    shard_dir = layout.features.parent / ".features-shards" / key[:16]
    t_net = time.perf_counter()
    with layout.feature_cache().writer(key, info) as create:
        arrays = [create(f"x_{s}", (n, card.feature_dim), np.float32) for s, n in counts.items()]
        stream = order[: len(sample)] if dask else order  # dask: the gap's subsample here, the rest in shards
        paths = [dataset.resolve(items[i]) for i in stream]
        with tqdm(total=total, desc=f"features ({engine}{', dask' if dask else ''})", unit="img", disable=None) as bar:
            def put(lo: int, out: np.ndarray) -> None:  # features of stream positions lo.. into each split's rows
                rows = order[lo : lo + len(out)]
                for k, arr in enumerate(arrays):
                    mine = split_of[rows] == k
                    if mine.any():
                        arr[row_of[rows[mine]]] = out[mine]
                bar.update(len(out))
                if progress:
                    progress(bar.n, total)

            if engine == "onnxruntime":
                cpu_pass(layout.features_onnx, tap, paths, len(sample), card, workers, threads, put)
            else:
                torch_pass(torch_runner(layout, params.device), tap, paths, len(sample), card, params.features, put)
            if dask:
                info["dask"] = shard_features(params, layout, dataset, card, counts, sample, arrays, shard_dir,
                                              lambda n: (bar.update(n), progress and progress(bar.n, total)))
        rate = total / max(time.perf_counter() - t_net, 1e-9)
        info["images_per_s"] = round(rate, 1)  # key.json is written when the block ends
        write_labels(create)
    if dask:  # the features are in place: the shards and their journal are no longer needed
        from tasks.distributed import remove

        remove(shard_dir)
    if tap is not None and tap.images:  # after the swap, which replaces the folder
        save_gap(layout, key, summarize(tap.layers(), tap.images))
    return rate


def cpu_pass(onnx_path: Path, tap: OnnxTap | None, paths: list[Path], n_sample: int, card: PreprocessingCard,
             workers: int, threads: int, put: Callable[[int, np.ndarray], None]) -> None:
    """onnxruntime on CPU: `workers` threads each decode a run of images and put it through one shared session
    themselves (no decode pool fighting the network's threads for the cores; a one-threaded run is also the
    fastest per core). The first `n_sample` paths go through the tap. Runs are fixed by position, so the
    features do not depend on which thread ran what; the tap's statistics are added in run order."""
    from tasks.runtime import open_session

    session, _ = open_session(onnx_path, device="cpu", threads=threads, spinning=False)
    starts = [*range(0, n_sample, TAP_BATCH), *range(n_sample, len(paths), CPU_RUN)]
    ends = [*starts[1:], len(paths)]

    def job(lo: int, hi: int):
        pixels = np.stack([load_checked(p, card) for p in paths[lo:hi]])
        if lo < n_sample:
            return tap.run(pixels)
        return session.run(list(OUTPUTS), {"images": pixels})[0], None

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        runs = iter(zip(starts, ends))
        for lo, hi in itertools.islice(runs, 2 * workers):
            pending.append((lo, pool.submit(job, lo, hi)))
        try:
            while pending:
                lo, future = pending.popleft()
                out, stats = future.result()
                if stats is not None:
                    tap.add(stats, len(out))
                put(lo, out)
                nxt = next(runs, None)
                if nxt is not None:
                    pending.append((nxt[0], pool.submit(job, *nxt)))
        finally:
            for _, future in pending:
                future.cancel()


def torch_pass(run_batch: Callable, tap: OnnxTap | None, paths: list[Path], n_sample: int, card: PreprocessingCard,
               f, put: Callable[[int, np.ndarray], None]) -> None:
    """torch (CUDA): batches decoded by a small pool ahead of the network; the subsample also through the tap."""
    done = 0
    for batch in decoded_batches(paths, card, f.batch_size, f.decode_workers):
        sample = np.arange(done, done + len(batch)) < n_sample
        if tap is not None and sample.any():
            tap(batch[sample])
        put(done, run_batch(batch))
        done += len(batch)


def shard_features(params, layout: Layout, dataset: Dataset, card: PreprocessingCard, counts: dict[str, int],
                   sample: np.ndarray, arrays: list[np.ndarray], shard_dir: Path, tick: Callable[[int], None]) -> dict:
    """features.executor dask: every row not in the gap's subsample, in shards on the cluster, into `arrays`."""
    from tasks.distributed import compute, make_shards

    offsets = np.cumsum([0, *counts.values()])
    in_sample = np.zeros(int(offsets[-1]), dtype=bool)
    in_sample[sample] = True
    order, paths = {}, {}
    for k, split in enumerate(counts):
        mine = dataset.split(split)
        paths[split] = [str(dataset.resolve(it)) for it in mine]
        order[split] = [i for i in range(len(mine)) if not in_sample[offsets[k] + i]]
    shards = make_shards(order, paths, params.features.shard_size)
    index = {split: k for k, split in enumerate(counts)}

    def on_shard(shard, x: np.ndarray) -> None:
        arrays[index[shard.split]][shard.rows] = x

    return compute(shards, layout.features_onnx, card, CPU_RUN, shard_dir, params.features.dask,  # runs as local
                   on_shard, tick)


def after(params, layout: Layout, dataset: Dataset, card: PreprocessingCard, key: str) -> None:
    """The domain gap is measured in compute's pass; for reused features whose gap.json is missing or of another
    key, on its own here (tasks/gap.py measure). Kept while the key holds."""
    write_gap(layout, dataset, card, key, params.features.batch_size, params.features.decode_workers)
