"""Training the segmentation decoder on the cached maps (the backbone never runs here).

The loss: cross-entropy (ignore index 255, optional class weights) on the logits upsampled to the cached label
grid (input size / segmentation.features.loss_stride, majority labels): a few thousand pixels an image instead
of every original pixel, which is where most of a step went. The model is chosen by mIoU per *original* pixel:
the logits of each selection image are upsampled to its mask's own size. The epoch loop is the dense heads'
(tasks.dense.fit_epochs: AdamW, a one-epoch warm-up then cosine decay, early stopping on the selection split,
tasks.selection's: val when a test split scores, else a held-out slice of train, never val). Training images
come twice when `segmentation.features.flip_train` cached their mirrored maps (labels mirrored to match).

Same params and seed, same model: the head's initial weights and the batch order are seeded, and nothing
depends on how busy the machine is (torch's own thread count, fixed by the machine).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tasks.checkpoint import Trained, save_model
from tasks.config import Params, UserError
from tasks.dense import Sample, fit_epochs, gather_batch, load_maps, map_shapes, selection_set, training_samples
from tasks.layout import Dataset, Layout, Progress
from tasks.segmentation.data import IGNORE, ground_truth, label_size, read_masks
from tasks.segmentation.metrics import confusion_matrix, scores
from tasks.segmentation.model import SegmentationHead, Segmenter, model_meta, upsample
from tasks.segmentation.predict import predict_original

HISTORY = ["step", "train_loss", "select_miou", "select_pixel_accuracy", "lr", "train_seconds", "seconds"]


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """1/sqrt(pixel frequency) per class over the cached training labels, mean 1 (absent classes: weight 1)."""
    counts = np.bincount(labels[labels != IGNORE].ravel(), minlength=num_classes)[:num_classes].astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1) / max(counts.sum(), 1)), 0.0)
    w = w / w[counts > 0].mean()
    return torch.tensor(np.where(counts > 0, w, 1.0), dtype=torch.float32)


def train_segmenter(params: Params, layout: Layout, dataset: Dataset, progress: Progress | None = None
                    ) -> tuple[Segmenter, list[dict], dict]:
    """(the segmenter with the best epoch's weights, one history row per epoch, the summary)."""
    s = params.segmentation
    card = layout.card()
    maps = load_maps(layout, "segmentation", also=("y_train",))
    want = label_size(card.input_size, s.features.loss_stride)
    if tuple(maps["y_train"].shape[1:]) != want:
        raise UserError(f"{layout.features} holds labels at {maps['y_train'].shape[1:]}, segmentation.features."
                        f"loss_stride {s.features.loss_stride} needs {want}: re-run the features stage")
    classes = dataset.classes
    selection, sel_key, sel_index = selection_set(dataset, s)
    sel_masks, lut = ground_truth(layout, dataset, sel_key)
    samples = training_samples(maps, selection.fit, also=("y",))
    labels = {v: torch.from_numpy(np.array(maps[f"y_{v}"])) for v in dict.fromkeys(v for v, _ in samples)}
    weight = class_weights(np.asarray(maps["y_train"])[selection.fit], len(classes)) \
        if s.class_weighting != "none" else None

    torch.manual_seed(s.seed)  # the head's initial weights
    head = SegmentationHead([c for c, _, _ in map_shapes(card)], len(classes), s.width)
    segmenter = Segmenter(None, head, card.input_size)

    def losses(batch: list[Sample]) -> dict[str, torch.Tensor]:
        level_maps, groups = gather_batch(maps, batch)
        target = torch.cat([labels[v][idx] for v, idx in groups]).long()
        return {"train_loss": F.cross_entropy(upsample(head(level_maps), want), target, weight=weight,
                                              ignore_index=IGNORE)}

    def score() -> dict[str, float]:
        cm = np.zeros((len(classes), len(classes)), np.int64)
        for _, truth, pred in predict_original(segmenter, maps, sel_key, sel_index, sel_masks, lut):
            cm += confusion_matrix(truth, pred, len(classes))
        r = scores(cm)
        return {"select_miou": r["miou"], "select_pixel_accuracy": r["pixel_accuracy"]}

    history, stop = fit_epochs(head, s, samples, losses, score, "select_miou", head.state_dict,
                               "train segmentation head", progress)
    head.load_state_dict(stop.state)
    return segmenter.eval(), history, {"solver": "adamw", "best_epoch": stop.epoch, "selection": selection.source,
                                       "selection_miou": float(stop.score)}


def train(params: Params, layout: Layout, progress: Progress | None = None) -> Trained:
    """The train stage for segmentation: the decoder learns, models/model.pt is written (tasks.checkpoint)."""
    dataset = layout.dataset()
    palette = read_masks(layout)["palette"]
    segmenter, history, summary = train_segmenter(params, layout, dataset, progress)
    save_model(layout, "segmentation", segmenter.head, dataset, layout.card(),
               {**model_meta(segmenter, palette), "params": params.segmentation.model_dump(mode="json"), **summary})
    return Trained(summary, history, HISTORY)
