"""Dense features, shared by detection and segmentation: the frozen backbone's multi-scale maps.

The backbone (the same ImageNet weights the classifier uses) returns its feature maps at
strides 8, 16 and 32 for a fixed input size recorded in the preprocessing card. Images are
resized to that size without cropping (`resize_mode: stretch`), so a box or a mask maps back
to the original image exactly by two scale factors.

With augmentation off, the maps of every image are computed once (onnxruntime on CPU) and
cached as fp16 .npy files that later stages memory-map: memory stays bounded by a batch, also
for datasets larger than RAM. Horizontally flipped training images are cached beside them
(`<task>.features.flip_train`), a free augmentation for heads that learn on cached maps.

The heads of both tasks then learn the same way on those maps (`fit_epochs`): AdamW, a one-epoch warm-up then
cosine decay, seeded shuffled batches, one score on the selection split after every epoch and early stopping on
it (tasks/selection.py).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from tasks.config import UserError
from tasks.layout import Dataset, Layout, Progress
from tasks.network import PixelNetwork, freeze, load_backbone
from tasks.preprocess import PreprocessingCard, decoded_batches
from tasks.selection import EarlyStopping, Selection, select_split

STRIDES = (8, 16, 32)
MAP_NAMES = tuple(f"p{i}" for i in (3, 4, 5))  # p3 = stride 8, the FPN naming
OUTPUTS = MAP_NAMES  # features.onnx: images -> p3, p4, p5


def _timm_indices(network: nn.Module) -> list[int]:
    info = getattr(network, "feature_info", None)
    if info is None or not hasattr(network, "forward_intermediates"):
        raise UserError("dense tasks need a timm backbone with forward_intermediates, or a torchvision resnet")
    reductions = [f["reduction"] for f in info]
    missing = [s for s in STRIDES if s not in reductions]
    if missing:
        raise UserError(f"the backbone has no feature maps at stride(s) {missing}")
    return [reductions.index(s) for s in STRIDES]


class DenseExtractor(PixelNetwork):
    """uint8 [N, H, W, 3] RGB pixels -> [p3, p4, p5] feature maps (strides 8, 16, 32): the backbone (same weights,
    same normalisation inside as the pooled extractor) stopped at the maps instead of pooling."""

    def __init__(self, network: nn.Module, card: PreprocessingCard):
        super().__init__(network, card)
        self.resnet = all(hasattr(network, f"layer{i}") for i in (2, 3, 4))
        self.indices = None if self.resnet else _timm_indices(network)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = self.normalize(pixels)
        if self.resnet:
            n = self.network
            x = n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x)))))
            c3 = n.layer2(x)
            c4 = n.layer3(c3)
            return [c3, c4, n.layer4(c4)]
        return list(self.network.forward_intermediates(x, indices=self.indices, intermediates_only=True))

    @torch.no_grad()
    def channels(self) -> list[int]:
        h, w = self.card.input_size
        return [int(m.shape[1]) for m in self(torch.zeros(1, h, w, 3, dtype=torch.uint8))]


def map_shapes(card: PreprocessingCard) -> list[tuple[int, int, int]]:
    """(C, h, w) of each level for the card's input size (from the card, no network needed)."""
    h, w = card.input_size
    return [(c, -(-h // s), -(-w // s)) for c, s in zip(card.extra["channels"], STRIDES)]


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Horizontally flipped image -> its boxes (x1, y1, x2, y2)."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


def write_maps(create: Callable[[str, tuple, np.dtype], np.ndarray], run: Callable[[np.ndarray], list[np.ndarray]],
               batches, counts: dict[str, int], card: PreprocessingCard, flip_train: bool,
               progress: Callable[[int], None]) -> None:
    """Stream every split's maps into fp16 memmaps `p3_<split>` ... (and `p3_train_flip` ... when flip_train).

    `batches` yields (split, uint8 batch) in split order; `create(name, shape, dtype)` makes a memmap.
    """
    shapes = map_shapes(card)
    arrays: dict[str, np.ndarray] = {}
    for split, n in counts.items():
        for name, shape in zip(MAP_NAMES, shapes):
            arrays[f"{name}_{split}"] = create(f"{name}_{split}", (n, *shape), np.float16)
            if flip_train and split == "train":
                arrays[f"{name}_train_flip"] = create(f"{name}_train_flip", (n, *shape), np.float16)
    filled = dict.fromkeys(counts, 0)
    for split, batch in batches:
        start, end = filled[split], filled[split] + len(batch)
        for name, m in zip(MAP_NAMES, run(batch)):
            arrays[f"{name}_{split}"][start:end] = m
        if flip_train and split == "train":
            for name, m in zip(MAP_NAMES, run(np.ascontiguousarray(batch[:, :, ::-1]))):
                arrays[f"{name}_train_flip"][start:end] = m
        filled[split] = end
        progress(len(batch))
    for arr in arrays.values():
        arr.flush()


def gather_maps(arrays: dict[str, np.ndarray], key: str, index: Sequence[int]) -> list[torch.Tensor]:
    """float32 tensors of levels p3..p5 for the images `index` of split/variant `key` (e.g. "train_flip")."""
    idx = np.asarray(index)
    return [torch.from_numpy(np.asarray(arrays[f"{name}_{key}"][idx], dtype=np.float32)) for name in MAP_NAMES]


def jitter(images: np.ndarray, rng: np.random.Generator, scale: Sequence[float], fill: Sequence[float]
           ) -> tuple[np.ndarray, list[tuple]]:
    """Per-step augmentation of uint8 images [N, H, W, 3] at the input size: each is scaled by s ~ U(scale),
    placed at a random offset on a canvas of the same size (cropped when larger, the rest `fill`, the mean
    colour) and mirrored with probability 1/2. Returns the images and each one's (sx, sy, dx, dy, flipped),
    for `jitter_boxes`."""
    n, h, w, _ = images.shape
    out = np.empty_like(images)
    out[:] = np.asarray(fill, np.float32).round().astype(np.uint8)
    moves = []
    for i in range(n):
        s = float(rng.uniform(*scale))
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        x = torch.from_numpy(images[i]).permute(2, 0, 1)[None].float()
        x = torch.nn.functional.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=s < 1)
        img = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        dy, dx = int(rng.integers(min(0, h - sh), max(0, h - sh) + 1)), int(rng.integers(min(0, w - sw), max(0, w - sw) + 1))
        y0, x0 = max(dy, 0), max(dx, 0)  # where the scaled image lands on the canvas, and which part of it
        y1, x1 = min(dy + sh, h), min(dx + sw, w)
        out[i, y0:y1, x0:x1] = img[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
        flipped = bool(rng.random() < 0.5)
        if flipped:
            out[i] = out[i, :, ::-1]
        moves.append((sw / w, sh / h, dx, dy, flipped))  # the scale factors the rounded size really has
    return out, moves


def jitter_boxes(boxes: np.ndarray, labels: np.ndarray, move: tuple, size: tuple[int, int],
                 min_visible: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (input pixels, xyxy) through one `jitter` move: scaled, shifted, clipped to the canvas, mirrored.
    A box with less than `min_visible` of its area left on the canvas, or under 2 px a side, is dropped."""
    sx, sy, dx, dy, flipped = move
    h, w = size
    b = boxes * np.array([sx, sy, sx, sy], np.float32) + np.array([dx, dy, dx, dy], np.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    c = np.stack([b[:, 0].clip(0, w), b[:, 1].clip(0, h), b[:, 2].clip(0, w), b[:, 3].clip(0, h)], axis=1)
    cw, ch = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    keep = (cw >= 2) & (ch >= 2) & (cw * ch >= min_visible * np.maximum(area, 1e-9))
    c, labels = c[keep].astype(np.float32), labels[keep]
    return (flip_boxes(c, w) if flipped else c), labels


def load_dense_extractor(layout: Layout) -> DenseExtractor:
    """The frozen dense extractor from the backbone stage's files (weights checked against the card)."""
    return freeze(DenseExtractor(*load_backbone(layout)))


def warmup_cosine(opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The dense heads' schedule: one epoch of linear warm-up from 10% of the rate, then cosine decay to zero."""
    total, warmup = epochs * steps_per_epoch, steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


# ---------------------------------------------------------------- the backbone stage: card and extractor


def card_fields(params, net: nn.Module, fields: dict) -> dict:
    """A fixed input size, no crop (`resize_mode: stretch`): boxes and masks map back to the original image
    exactly; the channels of each level, so later stages know the map shapes without the network."""
    h, w = params.head.features.input_size
    fields = {**fields, "input_size": (h, w), "resize_size": min(h, w), "resize_mode": "stretch"}
    channels = DenseExtractor(net, PreprocessingCard(**{**fields, "feature_dim": 0})).eval().channels()
    return {**fields, "feature_dim": 0, "extra": {**fields.get("extra", {}), "channels": channels,
                                                  "strides": list(STRIDES)}}


def extractor(net: nn.Module, card: PreprocessingCard) -> nn.Module:
    return DenseExtractor(net, card).eval()


# ---------------------------------------------------------------- the features stage


def options(params, card: PreprocessingCard) -> dict:
    return {"flip_train": params.head.features.flip_train}


def torch_runner(layout: Layout, device_name: str):
    from tasks.network import autocast, pick_device

    device = pick_device(device_name)
    net = load_dense_extractor(layout).to(device)

    def run(batch: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode(), autocast(device):
            return [m.float().cpu().numpy() for m in net(torch.from_numpy(batch).to(device))]

    return run


def compute(params, layout: Layout, dataset: Dataset, card: PreprocessingCard, key: str, engine: str,
            counts: dict[str, int], progress: Progress | None, write_labels: Callable) -> float:
    """fp16 maps at strides 8/16/32 of every split (+ flipped train), streamed to disk, the task's targets
    beside them (`write_labels(create)`). Returns network passes per second."""
    from tqdm import tqdm

    if params.features.executor == "dask":  # said, not silently run here
        raise UserError(f"features.executor dask runs the pooled feature pass (classification, multilabel); "
                        f"{params.task}'s dense maps run in this process: set features.executor: local")
    flip_train = params.head.features.flip_train
    if engine == "onnxruntime":
        from tasks.runtime import open_session

        session, _ = open_session(layout.features_onnx, device="cpu")
        run_batch = lambda batch: session.run(list(MAP_NAMES), {"images": batch})  # noqa: E731
    else:
        run_batch = torch_runner(layout, params.device)
    items = [(split, it) for split in counts for it in dataset.split(split)]
    total = len(items) + (counts.get("train", 0) if flip_train else 0)  # network passes
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

    info = {"engine": engine, "counts": counts, "task": params.task, "flip_train": flip_train,
            "manifest_sha256": dataset.manifest_sha256, "weights_sha256": card.weights_sha256}
    with tqdm(total=len(items), desc=f"dense features ({engine})", unit="img", disable=None) as bar:
        def tick(n: int) -> None:
            done[0] += n
            bar.update(n)
            if progress:
                progress(done[0], len(items))

        with layout.feature_cache().writer(key, info) as create:
            write_maps(create, run_batch, batches(), counts, card, flip_train, tick)
            write_labels(create)
    return total / max(time.perf_counter() - t_net, 1e-9)


def after(params, layout: Layout, dataset: Dataset, card: PreprocessingCard, key: str) -> None:
    """Nothing more for maps (the domain gap is measured on pooled features)."""


# ---------------------------------------------------------------- the train stage: heads on the cached maps

Sample = tuple[str, int]  # (variant: "train" | "train_flip", index into the train split)


def load_maps(layout: Layout, task: str, also: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The cached maps (memory-mapped), and the task's arrays `also` (e.g. "y_train"), or the fix."""
    maps = layout.feature_cache().load(mmap=True)
    missing = [n for n in (f"{MAP_NAMES[0]}_train", *also) if n not in maps]
    if missing:
        raise UserError(f"{layout.features} holds no {task} maps ({', '.join(missing)} missing): re-run the features "
                        f"stage with task: {task}")
    return maps


def selection_set(dataset: Dataset, p) -> tuple[Selection, str, list[int]]:
    """The selection split (tasks.selection: val when a test split scores, else a holdout of train), the cached
    split its maps are in ("val" or "train") and its images' indices there. `p`: a DenseHead section."""
    sel = select_split(dataset, np.zeros(len(dataset.split("train")), np.int64), p.holdout_fraction, p.seed)
    if sel.on_val:
        return sel, "val", list(range(len(dataset.split("val"))))
    return sel, "train", [int(i) for i in sel.holdout]


def training_samples(maps: dict, fit: Sequence[int], flip: bool = True, also: tuple[str, ...] = ()) -> list[Sample]:
    """Every image the head learns from, and its mirror image too when the features stage cached its maps (and
    the arrays `also`, e.g. "y", for the flipped variant)."""
    variants = ["train"]
    if flip and f"{MAP_NAMES[0]}_train_flip" in maps and all(f"{a}_train_flip" in maps for a in also):
        variants.append("train_flip")
    return [(v, int(i)) for v in variants for i in fit]


def gather_batch(maps: dict, batch: Sequence[Sample]) -> tuple[list[torch.Tensor], list[tuple[str, list[int]]]]:
    """Levels p3..p5 of a sorted batch of samples, and its (variant, indices) groups in the same order."""
    groups = [(v, [i for vv, i in batch if vv == v]) for v in dict.fromkeys(v for v, _ in batch)]
    parts = [gather_maps(maps, v, idx) for v, idx in groups]
    return [torch.cat([part[k] for part in parts]) for k in range(len(MAP_NAMES))], groups


def fit_epochs(head: nn.Module, p, samples: list[Sample], losses: Callable[[list[Sample]], dict[str, torch.Tensor]],
               score: Callable[[], dict[str, float]], key: str, kept: Callable[[], dict], desc: str,
               progress: Progress | None = None, after_step: Callable[[], None] | None = None
               ) -> tuple[list[dict], EarlyStopping]:
    """The dense heads' epoch loop. `p` is the task's DenseHead section (epochs, batch_size, lr, weight_decay,
    patience, seed). Each epoch: the samples shuffled (a generator seeded by p.seed; a batch sorted, so the maps
    are read in file order), per batch `losses(batch)` (named terms, summed for the step), AdamW on the head's
    parameters, warmup_cosine, `after_step()` (an EMA update); then `score()` (the selection split's scores,
    one row of the history with the mean losses) and early stopping on `score()[key]`, keeping `kept()`.

    Returns the history and the EarlyStopping (its .state: the kept state of the best epoch)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(p.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = warmup_cosine(opt, math.ceil(len(samples) / p.batch_size), p.epochs)
    stop, history = EarlyStopping(p.patience), []
    bar = tqdm(range(1, p.epochs + 1), desc=desc, unit="ep", disable=None)
    for epoch in bar:
        t0 = time.perf_counter()
        head.train()
        order = torch.randperm(len(samples), generator=gen).tolist()
        sums: dict[str, float] = {}
        for s in range(0, len(order), p.batch_size):
            batch = sorted(samples[j] for j in order[s : s + p.batch_size])
            terms = losses(batch)
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item() * len(batch)
        t_train = time.perf_counter() - t0
        head.eval()
        scores = score()
        history.append({"step": epoch, **{k: v / len(samples) for k, v in sums.items()}, **scores,
                        "lr": opt.param_groups[0]["lr"], "train_seconds": round(t_train, 2),
                        "seconds": round(time.perf_counter() - t0, 2)})
        bar.set_postfix({key: f"{scores[key]:.3f}"})
        if progress:
            progress(epoch, p.epochs)
        if stop.update(epoch, scores[key], kept()):
            break
    return history, stop
