"""Stage `features`: the frozen backbone's features for every split, computed once (features/).

The cache key is (weights sha256, preprocessing card, manifest sha256): every head
epoch and every experiment that keeps those reuses the same features. On CPU the
backbone runs in onnxruntime (4-8x faster than torch eager here); on CUDA in torch
with autocast and channels_last. Images are decoded by a small thread pool a batch
or two ahead of the network, so memory stays bounded by a few batches.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from tasks.backbone import BACKBONE_DIR, load_card, load_feature_extractor
from tasks.config import Params, load_params
from tasks.data import PREPARED_DIR, SPLITS, load_dataset
from tasks.files import atomic_path, read_json, sha256_bytes, write_json
from tasks.preprocess import PreprocessingCard, load_image

FEATURES_DIR = Path("features")


class FeaturesError(RuntimeError):
    pass


@dataclass(frozen=True)
class FeaturesResult:
    out_dir: Path
    key: str
    cached: bool
    engine: str
    counts: dict[str, int]
    seconds: float
    images_per_s: float


def feature_key(card: PreprocessingCard, manifest_sha256: str) -> str:
    blob = json.dumps(
        {"weights": card.weights_sha256, "preprocessing": card.preprocessing_dict(), "manifest": manifest_sha256},
        sort_keys=True,
    )
    return sha256_bytes(blob.encode())


class FeatureCache:
    """features/features.npz (x_<split>, y_<split>) + features/key.json; valid while the key matches."""

    def __init__(self, out_dir: Path = FEATURES_DIR):
        self.out_dir = Path(out_dir)
        self.arrays = self.out_dir / "features.npz"
        self.meta = self.out_dir / "key.json"

    def stored_key(self) -> str | None:
        if not (self.arrays.exists() and self.meta.exists()):
            return None
        return read_json(self.meta).get("key")

    def save(self, key: str, arrays: dict[str, np.ndarray], info: dict) -> None:
        with atomic_path(self.arrays) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        write_json(self.meta, {"key": key, **info})

    def load(self) -> dict[str, np.ndarray]:
        if not self.arrays.exists():
            raise FeaturesError(f"{self.arrays} not found: run the features stage first (dvc repro features)")
        with np.load(self.arrays) as z:
            return {k: z[k] for k in z.files}


def decoded_batches(paths: Sequence[Path], card: PreprocessingCard, batch_size: int, workers: int) -> Iterator[np.ndarray]:
    """uint8 [B, H, W, 3] batches in order; at most two batches decoded ahead of the consumer."""

    def load(path: Path) -> np.ndarray:
        try:
            return load_image(path, card)
        except Exception as exc:
            raise FeaturesError(f"cannot decode {path}: {exc} (it changed after prepare? re-run prepare)") from exc

    with ThreadPoolExecutor(workers) as pool:
        pending: deque[list[Future]] = deque()
        starts = iter(range(0, len(paths), batch_size))

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append([pool.submit(load, p) for p in paths[start : start + batch_size]])

        submit_next()
        submit_next()
        while pending:
            batch = pending.popleft()
            submit_next()
            yield np.stack([f.result() for f in batch])


def onnx_runner(onnx_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(["features"], {"images": batch})[0]


def torch_runner(backbone_dir: Path, device_name: str) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    from tasks.model import autocast, pick_device

    device = pick_device(device_name)
    extractor = load_feature_extractor(backbone_dir).to(device)
    if device.type == "cuda":
        extractor = extractor.to(memory_format=torch.channels_last)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast(device):
            x = torch.from_numpy(batch).to(device, non_blocking=True)
            return extractor(x).float().cpu().numpy()

    return run


def choose_engine(params: Params, backbone_dir: Path) -> str:
    import torch

    engine = params.features.engine
    if engine == "auto":
        cuda = params.device in ("auto", "cuda") and torch.cuda.is_available()
        engine = "torch" if cuda or not (Path(backbone_dir) / "features.onnx").exists() else "onnxruntime"
    return engine


def compute_features(
    params: Params,
    prepared_dir: Path = PREPARED_DIR,
    backbone_dir: Path = BACKBONE_DIR,
    out_dir: Path = FEATURES_DIR,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> FeaturesResult:
    """Features of every split, or the stored ones when their key still holds. `progress(done, total)` per batch."""
    t0 = time.perf_counter()
    dataset = load_dataset(prepared_dir)
    card = load_card(backbone_dir)
    key = feature_key(card, dataset.manifest_sha256)
    cache = FeatureCache(out_dir)
    counts = {s: len(dataset.split(s)) for s in SPLITS if dataset.has_split(s)}
    engine = choose_engine(params, backbone_dir)
    if not force and cache.stored_key() == key:
        return FeaturesResult(Path(out_dir), key, True, engine, counts, time.perf_counter() - t0, 0.0)

    if engine == "onnxruntime":
        run = onnx_runner(Path(backbone_dir) / "features.onnx")
    else:
        run = torch_runner(Path(backbone_dir), params.device)

    # One stream over all splits (in split order), so decoding never stalls at a split boundary.
    items = [it for split in counts for it in dataset.split(split)]
    features = np.empty((len(items), card.feature_dim), dtype=np.float32)
    total, done = len(items), 0
    t_net = time.perf_counter()
    with tqdm(total=total, desc=f"features ({engine})", unit="img", disable=None) as bar:
        for batch in decoded_batches([dataset.resolve(it) for it in items], card, params.features.batch_size,
                                     params.features.decode_workers):
            features[done : done + len(batch)] = run(batch)
            done += len(batch)
            bar.update(len(batch))
            if progress:
                progress(done, total)
    arrays: dict[str, np.ndarray] = {}
    start = 0
    for split, n in counts.items():
        arrays[f"x_{split}"] = features[start : start + n]
        arrays[f"y_{split}"] = np.array([dataset.label_index(it) for it in items[start : start + n]], dtype=np.int64)
        start += n
    rate = total / max(time.perf_counter() - t_net, 1e-9)
    cache.save(key, arrays, {"engine": engine, "counts": counts, "feature_dim": card.feature_dim,
                             "manifest_sha256": dataset.manifest_sha256, "weights_sha256": card.weights_sha256,
                             "images_per_s": round(rate, 1)})
    return FeaturesResult(Path(out_dir), key, False, engine, counts, time.perf_counter() - t0, rate)


def main() -> None:
    params = load_params()
    try:
        r = compute_features(params)
    except FeaturesError as exc:
        sys.exit(f"features: {exc}")
    how = "reused (key unchanged)" if r.cached else f"{r.engine}, {r.images_per_s:.0f} img/s"
    print(f"features: {sum(r.counts.values())} images, {how}, {r.seconds:.1f}s -> {r.out_dir}")


if __name__ == "__main__":
    main()
