"""Training the detection head on the cached maps (the backbone never runs here, unless `detection.augment`).

AdamW, a one-epoch linear warm-up then cosine decay, early stopping on the selection
split's mAP (val when a test split scores; else a held-out slice of train, never val).
Training images come twice when `dense.flip_train` cached their mirrored maps.
`detection.ema`: the selection split scores (and the checkpoint keeps) an exponential moving
average of the head's weights. `detection.augment`: scale jitter, random offset and mirror per
step, through the frozen backbone (LiveBatches); the cached maps then only score the selection split.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from tasks.config import Params, UserError
from tasks.dense import MAP_NAMES, flip_boxes, gather_maps, map_shapes, warmup_cosine
from tasks.detection.metrics import coco_eval
from tasks.detection.model import DetectionHead, Detector, loss_helper, make_anchors
from tasks.layout import Dataset, Layout, Progress, holdout_split
from tasks.preprocess import PreprocessingCard


def ground_truth(annotations: dict, dataset: Dataset, split: str) -> list[dict]:
    """Per image of `split`: boxes in original pixels, labels, difficult flags, size."""
    out = []
    for it in dataset.split(split):
        a = annotations[it.path]
        out.append({"boxes": np.asarray(a["boxes"], np.float32).reshape(-1, 4), "labels": np.asarray(a["labels"], np.int64),
                    "difficult": np.asarray(a["difficult"], bool), "width": a["width"], "height": a["height"]})
    return out


def to_input(gt: dict, card: PreprocessingCard, flip: bool = False) -> dict[str, torch.Tensor]:
    """A training target: boxes scaled to the input size (and mirrored for a flipped image)."""
    h, w = card.input_size
    boxes = gt["boxes"] * np.array([w / gt["width"], h / gt["height"]] * 2, np.float32)
    if flip:
        boxes = flip_boxes(boxes, w)
    return {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(gt["labels"])}


def to_original(boxes: np.ndarray, gt: dict, card: PreprocessingCard) -> np.ndarray:
    """Boxes in input pixels -> the original image's pixels (plain resize: two scale factors, exact)."""
    h, w = card.input_size
    return boxes * np.array([gt["width"] / w, gt["height"] / h] * 2, np.float32)


@torch.no_grad()
def detect_cached(detector: Detector, maps: dict, key: str, index: list[int], card: PreprocessingCard,
                  gts: list[dict], batch_size: int = 8) -> list[dict]:
    """Detections (original pixels, padding dropped) for cached images `index` of `key` ("val", "train", ...)."""
    detector.eval()
    out = []
    for s in range(0, len(index), batch_size):
        chunk = index[s : s + batch_size]
        boxes, scores, labels = detector.detect(gather_maps(maps, key, chunk))
        for j, i in enumerate(chunk):
            keep = scores[j] > 0
            out.append({"boxes": to_original(boxes[j][keep].numpy(), gts[i], card), "scores": scores[j][keep].numpy(),
                        "labels": labels[j][keep].numpy()})
    return out


class LiveBatches:
    """`detection.augment`: training images decoded at the input size, jittered (scale, offset, mirror; see
    tasks.dense.jitter) and run through the frozen backbone every step; boxes follow the same moves."""

    def __init__(self, layout: Layout, dataset: Dataset, card: PreprocessingCard, gts: list[dict],
                 scale: tuple[float, float], seed: int, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        from tasks.dense import load_dense_extractor

        self.extractor = load_dense_extractor(layout)
        self.paths = [dataset.resolve(it) for it in dataset.split("train")]
        self.card, self.gts, self.scale = card, gts, tuple(scale)
        self.rng = np.random.default_rng(seed)
        self.pool = ThreadPoolExecutor(workers)
        self.fill = [255.0 * m for m in card.mean]

    def __call__(self, index: list[int]) -> tuple[list[torch.Tensor], list[dict]]:
        from tasks.dense import jitter, jitter_boxes
        from tasks.preprocess import load_image

        images = np.stack(list(self.pool.map(lambda i: load_image(self.paths[i], self.card), index)))
        images, moves = jitter(images, self.rng, self.scale, self.fill)
        targets = []
        for i, move in zip(index, moves):
            t = to_input(self.gts[i], self.card)
            boxes, labels = jitter_boxes(t["boxes"].numpy(), t["labels"].numpy(), move, self.card.input_size)
            targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)})
        # Frozen: no graph through the backbone. (no_grad, not inference_mode: the head's backward saves these maps.)
        with torch.no_grad():
            maps = self.extractor(torch.from_numpy(images))
        return list(maps), targets


def build_detector(card: PreprocessingCard, num_classes: int, params: Params, extractor=None) -> Detector:
    d = params.detection
    shapes = map_shapes(card)
    anchors, _ = make_anchors(card.input_size, [(h, w) for _, h, w in shapes])
    head = DetectionHead([c for c, _, _ in shapes], num_classes, d.width, d.num_convs)
    return Detector(extractor, head, anchors, card.input_size, d.score_threshold, d.nms_threshold, d.pre_nms_top_k,
                    d.max_detections)


def train_detector(params: Params, layout: Layout, dataset: Dataset, annotations: dict,
                   progress: Progress | None = None) -> tuple[Detector, list[dict], dict]:
    d = params.detection
    torch.manual_seed(d.seed)
    gen = torch.Generator().manual_seed(d.seed)
    card = layout.card()
    maps = layout.feature_cache().load(mmap=True)
    if f"{MAP_NAMES[0]}_train" not in maps:
        raise UserError(f"{layout.features} holds no dense maps: re-run the features stage with task: detection")
    classes = dataset.classes
    train_gt = ground_truth(annotations, dataset, "train")
    if dataset.selection == "val":
        fit, sel_key, sel_index, sel_gt = list(range(len(train_gt))), "val", None, ground_truth(annotations, dataset, "val")
        sel_index = list(range(len(sel_gt)))
    else:
        fit_idx, hold_idx = holdout_split(np.zeros(len(train_gt), np.int64), d.holdout_fraction, d.seed)
        if len(hold_idx) == 0:
            raise UserError("too few training images to hold out a selection set; add images or a test split")
        fit, sel_key, sel_index, sel_gt = list(fit_idx), "train", list(hold_idx), train_gt
    if d.augment:  # the backbone runs on jittered images every step; cached maps only score the selection split
        variants = ["train"]
        live = LiveBatches(layout, dataset, card, train_gt, d.scale_jitter, d.seed, params.features.decode_workers)
    else:
        variants = ["train"] + (["train_flip"] if f"{MAP_NAMES[0]}_train_flip" in maps else [])
    samples = [(v, i) for v in variants for i in fit]
    targets = {(v, i): to_input(train_gt[i], card, flip=v == "train_flip") for v, i in samples}

    def batch_maps(batch: list[tuple[str, int]]) -> tuple[list[torch.Tensor], list[dict]]:
        if d.augment:
            return live([i for _, i in batch])
        parts = [gather_maps(maps, v, [i for vv, i in batch if vv == v]) for v in variants
                 if any(vv == v for vv, _ in batch)]
        return [torch.cat([p[k] for p in parts]) for k in range(len(MAP_NAMES))], [targets[b] for b in batch]

    detector = build_detector(card, len(classes), params)
    fcos = loss_helper(detector.head)
    anchors = detector.anchors
    per_level = [h * w for _, h, w in map_shapes(card)]
    opt = torch.optim.AdamW(detector.head.parameters(), lr=d.lr, weight_decay=d.weight_decay)
    sched = warmup_cosine(opt, math.ceil(len(samples) / d.batch_size), d.epochs)
    ema, scored = None, detector  # scored: the weights the selection split scores and the checkpoint keeps
    if d.ema:
        from torch.optim.swa_utils import AveragedModel

        def average(mean: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            # TF's ramp: the decay grows to d.ema over the first steps, so a short run is not the init's average
            decay = min(d.ema, (1.0 + float(n)) / (10.0 + float(n)))
            return decay * mean + (1.0 - decay) * current

        ema = AveragedModel(detector.head, avg_fn=average, use_buffers=True)
        scored = build_detector(card, len(classes), params)  # holds the averaged weights
    history, best = [], (-1.0, 0, None)
    bar = tqdm(range(1, d.epochs + 1), desc="train detection head", unit="ep", disable=None)
    for epoch in bar:
        t0 = time.perf_counter()
        detector.head.train()
        order = torch.randperm(len(samples), generator=gen).tolist()
        sums = {"classification": 0.0, "bbox_regression": 0.0, "bbox_ctrness": 0.0}
        for s in range(0, len(order), d.batch_size):
            batch = sorted((samples[j] for j in order[s : s + d.batch_size]))
            level_maps, batch_targets = batch_maps(batch)
            out = detector.head(level_maps)
            losses = fcos.compute_loss(batch_targets, out, [anchors] * len(batch), per_level)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(detector.head)
            for k, v in losses.items():
                sums[k] += v.item() * len(batch)
        if ema is not None:
            scored.head.load_state_dict(ema.module.state_dict())
        dets = detect_cached(scored, maps, sel_key, sel_index, card, sel_gt)
        score = coco_eval([sel_gt[i] for i in sel_index], dets, classes)
        row = {"step": epoch, **{f"loss_{k}": v / len(samples) for k, v in sums.items()},
               "select_map": score["map"], "select_ap50": score["ap50"], "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        bar.set_postfix(map=f"{score['map']:.3f}", ap50=f"{score['ap50']:.3f}")
        if progress:
            progress(epoch, d.epochs)
        if score["map"] > best[0]:
            best = (score["map"], epoch, copy.deepcopy(scored.head.state_dict()))
        elif d.patience and epoch - best[1] >= d.patience:
            break
    if d.augment:
        live.pool.shutdown()
    detector.head.load_state_dict(best[2])
    return detector.eval(), history, {"solver": "adamw", "best_epoch": best[1], "selection": dataset.selection,
                                      "selection_map": best[0], "l2": None}


HISTORY = ["step", "loss_classification", "loss_bbox_regression", "loss_bbox_ctrness", "select_map", "select_ap50",
           "lr", "seconds"]


def fit_and_save(params: Params, layout: Layout, progress: Progress | None = None) -> tuple:
    """The train stage for detection: (checkpoint path, history, summary)."""
    from tasks.detection.model import save_detector
    from tasks.files import read_json

    dataset = layout.dataset()
    meta = read_json(layout.prepared / "dataset.json")
    if meta.get("task") != "detection":
        raise UserError(f"{layout.prepared} holds a {meta.get('task', 'classification')} dataset: re-run prepare "
                        f"with task: detection")
    annotations = read_json(layout.annotations)
    detector, history, summary = train_detector(params, layout, dataset, annotations, progress)
    extra = {**summary, "task": "detection", "manifest_sha256": dataset.manifest_sha256,
             "annotations_sha256": meta["annotations_sha256"]}
    path = save_detector(detector, layout, dataset.classes, params, extra)
    return path, history, {k: v for k, v in extra.items() if not k.endswith("sha256")}
