"""Training the detection head on the cached maps (the backbone never runs here, unless `detection.augment`).

The epoch loop is the dense heads' (tasks.dense.fit_epochs: AdamW, a one-epoch warm-up then cosine decay,
early stopping on the selection split's mAP; the selection split is tasks.selection's: val when a test split
scores, else a held-out slice of train, never val). Training images come twice when
`detection.features.flip_train` cached their mirrored maps. `detection.ema`: the selection split scores (and
the checkpoint keeps) an exponential moving average of the head's weights. `detection.augment`: scale jitter,
random offset and mirror per step, through the frozen backbone (LiveBatches); the cached maps then only score
the selection split.
"""

from __future__ import annotations

import numpy as np
import torch

from tasks.checkpoint import Trained, save_model
from tasks.config import Params
from tasks.dense import Sample, fit_epochs, gather_batch, load_maps, map_shapes, selection_set, training_samples
from tasks.detection.metrics import coco_eval
from tasks.detection.model import Detector, PostProcess, build_detector, loss_helper, model_meta
from tasks.detection.predict import detect_cached, ground_truth, read_annotations, to_input
from tasks.layout import Dataset, Layout, Progress
from tasks.preprocess import PreprocessingCard

HISTORY = ["step", "loss_classification", "loss_bbox_regression", "loss_bbox_ctrness", "select_map", "select_ap50",
           "lr", "train_seconds", "seconds"]
POSTPROCESS = ("score_threshold", "nms_threshold", "pre_nms_top_k", "max_detections")  # the model's, not params'


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


def ema_of(head: torch.nn.Module, decay_max: float):
    """An exponential moving average of `head` with TF's ramp: the decay grows to `decay_max` over the first
    steps, min(decay_max, (1 + n) / (10 + n)), so that a short run is not the initialisation's average."""
    from torch.optim.swa_utils import AveragedModel

    def average(mean: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        decay = min(decay_max, (1.0 + float(n)) / (10.0 + float(n)))
        return decay * mean + (1.0 - decay) * current

    return AveragedModel(head, avg_fn=average, use_buffers=True)


def train_detector(params: Params, layout: Layout, dataset: Dataset, annotations: dict,
                   progress: Progress | None = None) -> tuple[Detector, list[dict], dict]:
    """(the detector with the best epoch's weights, one history row per epoch, the summary)."""
    d = params.detection
    card = layout.card()
    maps = load_maps(layout, "detection")
    classes = dataset.classes
    train_gt = ground_truth(annotations, dataset, "train")
    selection, sel_key, sel_index = selection_set(dataset, d)
    sel_gt = train_gt if sel_key == "train" else ground_truth(annotations, dataset, sel_key)
    # the variants of each training image: live jittered images (augment) or the cached maps (+ their mirror)
    samples = training_samples(maps, selection.fit, flip=not d.augment)
    live = LiveBatches(layout, dataset, card, train_gt, d.scale_jitter, d.seed, params.features.decode_workers) \
        if d.augment else None
    targets = {(v, i): to_input(train_gt[i], card, flip=v == "train_flip") for v, i in samples}

    torch.manual_seed(d.seed)  # the head's initial weights
    post = PostProcess.from_params(d)
    detector = build_detector(card, len(classes), d.width, d.num_convs, post)
    fcos = loss_helper(detector.head)
    per_level = [h * w for _, h, w in map_shapes(card)]
    ema = ema_of(detector.head, d.ema) if d.ema else None
    scored = build_detector(card, len(classes), d.width, d.num_convs, post) if ema else detector  # what is kept

    def losses(batch: list[Sample]) -> dict[str, torch.Tensor]:
        if live is not None:
            level_maps, batch_targets = live([i for _, i in batch])
        else:
            level_maps, _ = gather_batch(maps, batch)
            batch_targets = [targets[b] for b in batch]
        out = fcos.compute_loss(batch_targets, detector.head(level_maps), [detector.anchors] * len(batch), per_level)
        return {f"loss_{k}": v for k, v in out.items()}

    def score() -> dict[str, float]:
        if ema is not None:
            scored.head.load_state_dict(ema.module.state_dict())
        r = coco_eval([sel_gt[i] for i in sel_index], detect_cached(scored, maps, sel_key, sel_index, card, sel_gt),
                      classes)
        return {"select_map": r["map"], "select_ap50": r["ap50"]}

    try:
        history, stop = fit_epochs(detector.head, d, samples, losses, score, "select_map",
                                   lambda: scored.head.state_dict(), "train detection head", progress,
                                   after_step=(lambda: ema.update_parameters(detector.head)) if ema else None)
    finally:
        if live is not None:
            live.pool.shutdown()
    detector.head.load_state_dict(stop.state)
    return detector.eval(), history, {"solver": "adamw", "best_epoch": stop.epoch, "selection": selection.source,
                                      "selection_map": float(stop.score)}


def train(params: Params, layout: Layout, progress: Progress | None = None) -> Trained:
    """The train stage for detection: the head learns, models/model.pt is written (tasks.checkpoint)."""
    dataset = layout.dataset()
    annotations = read_annotations(layout)
    detector, history, summary = train_detector(params, layout, dataset, annotations, progress)
    settings = {k: v for k, v in params.detection.model_dump(mode="json").items() if k not in POSTPROCESS}
    save_model(layout, "detection", detector.head, dataset, layout.card(),
               {**model_meta(detector), "params": settings, **summary})
    return Trained(summary, history, HISTORY)
