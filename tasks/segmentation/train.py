"""Training the segmentation decoder on the cached maps (the backbone never runs here).

The loss: cross-entropy (ignore index 255, optional class weights) on the logits upsampled to the cached label
grid (input size / loss_stride, majority labels): a few thousand pixels an image instead of every original
pixel, which is where most of a step went. The model is chosen by mIoU per *original* pixel: the logits of each
selection image are upsampled to its mask's own size. AdamW, a one-epoch linear warm-up then cosine decay,
early stopping on the selection split (val when a test split scores; else a held-out slice of train, never val).
Training images come twice when `dense.flip_train` cached their mirrored maps (labels mirrored to match).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tasks.config import Params, UserError
from tasks.dense import MAP_NAMES, gather_maps, map_shapes, warmup_cosine
from tasks.layout import Dataset, Layout, Progress, holdout_split
from tasks.segmentation.data import IGNORE, ground_truth, load_mask
from tasks.segmentation.metrics import confusion_matrix, scores
from tasks.segmentation.model import SegmentationHead, Segmenter, cpu_threads, upsample


@torch.no_grad()
def predict_original(segmenter: Segmenter, maps: dict, key: str, index: list[int], mask_paths: list[Path],
                     lut: np.ndarray, batch_size: int = 8) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(i, truth, prediction) per cached image `index[i]` of `key`: class indices at the original mask's size."""
    segmenter.eval()
    for s in range(0, len(index), batch_size):
        chunk = index[s : s + batch_size]
        logits = segmenter.head(gather_maps(maps, key, chunk))
        for j, i in enumerate(chunk):
            truth = load_mask(mask_paths[i], lut)
            pred = upsample(logits[j : j + 1], truth.shape).argmax(1)[0].numpy().astype(np.uint8)
            yield i, truth, pred


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """1/sqrt(pixel frequency) per class over the cached training labels, mean 1 (absent classes: weight 1)."""
    counts = np.bincount(labels[labels != IGNORE].ravel(), minlength=num_classes)[:num_classes].astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1) / max(counts.sum(), 1)), 0.0)
    w = w / w[counts > 0].mean()
    return torch.tensor(np.where(counts > 0, w, 1.0), dtype=torch.float32)


def train_segmenter(params: Params, layout: Layout, dataset: Dataset, progress: Progress | None = None
                    ) -> tuple[Segmenter, list[dict], dict]:
    s = params.segmentation
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    card = layout.card()
    maps = layout.feature_cache().load(mmap=True)
    if f"{MAP_NAMES[0]}_train" not in maps or "y_train" not in maps:
        raise UserError(f"{layout.features} holds no segmentation maps and labels: re-run the features stage with "
                        f"task: segmentation")
    want = (card.input_size[0] // s.loss_stride, card.input_size[1] // s.loss_stride)
    if tuple(maps["y_train"].shape[1:]) != want:
        raise UserError(f"{layout.features} holds labels at {maps['y_train'].shape[1:]}, segmentation.loss_stride "
                        f"{s.loss_stride} needs {want}: re-run the features stage")
    classes = dataset.classes
    n_train = len(dataset.split("train"))
    if dataset.selection == "val":
        fit, sel_key = list(range(n_train)), "val"
        sel_index = list(range(len(dataset.split("val"))))
        sel_masks, lut = ground_truth(layout, dataset, "val")
    else:
        fit_idx, hold_idx = holdout_split(np.zeros(n_train, np.int64), s.holdout_fraction, s.seed)
        if len(hold_idx) == 0:
            raise UserError("too few training images to hold out a selection set; add images or a test split")
        fit, sel_key, sel_index = list(fit_idx), "train", list(hold_idx)
        sel_masks, lut = ground_truth(layout, dataset, "train")
    variants = ["train"] + (["train_flip"] if f"{MAP_NAMES[0]}_train_flip" in maps and "y_train_flip" in maps else [])
    samples = [(v, i) for v in variants for i in fit]
    labels = {v: torch.from_numpy(np.array(maps[f"y_{v}"])) for v in variants}
    weight = class_weights(np.asarray(maps["y_train"])[fit], len(classes)) if s.class_weighting != "none" else None

    head = SegmentationHead([c for c, _, _ in map_shapes(card)], len(classes), s.width)
    segmenter = Segmenter(None, head, card.input_size)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = warmup_cosine(opt, math.ceil(len(samples) / s.batch_size), s.epochs)
    history, best = [], (-1.0, 0, None)
    bar = tqdm(range(1, s.epochs + 1), desc="train segmentation head", unit="ep", disable=None)
    for epoch in bar:
        t0 = time.perf_counter()
        head.train()
        order = torch.randperm(len(samples), generator=gen).tolist()
        loss_sum = 0.0
        for b in range(0, len(order), s.batch_size):
            batch = sorted(samples[j] for j in order[b : b + s.batch_size])
            groups = [(v, [i for vv, i in batch if vv == v]) for v in variants if any(vv == v for vv, _ in batch)]
            parts = [gather_maps(maps, v, idx) for v, idx in groups]
            level_maps = [torch.cat([p[k] for p in parts]) for k in range(len(MAP_NAMES))]
            target = torch.cat([labels[v][idx] for v, idx in groups]).long()
            logits = upsample(head(level_maps), want)
            loss = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(batch)
        t_train = time.perf_counter() - t0
        cm = np.zeros((len(classes), len(classes)), np.int64)
        for _, truth, pred in predict_original(segmenter, maps, sel_key, sel_index, sel_masks, lut):
            cm += confusion_matrix(truth, pred, len(classes))
        score = scores(cm)
        row = {"step": epoch, "train_loss": loss_sum / len(samples), "select_miou": score["miou"],
               "select_pixel_accuracy": score["pixel_accuracy"], "lr": opt.param_groups[0]["lr"],
               "train_seconds": round(t_train, 2), "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        bar.set_postfix(miou=f"{score['miou']:.3f}", loss=f"{row['train_loss']:.3f}")
        if progress:
            progress(epoch, s.epochs)
        if score["miou"] > best[0]:
            best = (score["miou"], epoch, copy.deepcopy(head.state_dict()))
        elif s.patience and epoch - best[1] >= s.patience:
            break
    head.load_state_dict(best[2])
    return segmenter.eval(), history, {"solver": "adamw", "best_epoch": best[1], "selection": dataset.selection,
                                       "selection_miou": best[0], "l2": None}


HISTORY = ["step", "train_loss", "select_miou", "select_pixel_accuracy", "lr", "train_seconds", "seconds"]


def fit_and_save(params: Params, layout: Layout, progress: Progress | None = None) -> tuple:
    """The train stage for segmentation: (checkpoint path, history, summary)."""
    from tasks.files import read_json
    from tasks.segmentation.model import save_segmenter

    dataset = layout.dataset()
    meta = read_json(layout.prepared / "dataset.json")
    if meta.get("task") != "segmentation":
        raise UserError(f"{layout.prepared} holds a {meta.get('task', 'classification')} dataset: re-run prepare "
                        f"with task: segmentation")
    with cpu_threads() as threads:
        segmenter, history, summary = train_segmenter(params, layout, dataset, progress)
    summary["threads"] = threads
    extra = {**summary, "task": "segmentation", "manifest_sha256": dataset.manifest_sha256,
             "masks_sha256": meta["masks_sha256"]}
    palette = read_json(layout.masks)["palette"]
    path = save_segmenter(segmenter, layout, dataset.classes, palette, params, extra)
    return path, history, {k: v for k, v in extra.items() if not k.endswith("sha256")}
