"""Classification training: the head that learns one label per image.

Default: softmax regression on the cached features, solved with L-BFGS (tasks.head.fit_lbfgs), one fit per L2
candidate, the best on the selection split kept (accuracy, then loss); with a train holdout it is refit on all
of train. adamw/adam/sgd (and an mlp head) train by epochs with early stopping on the selection split.
`classification.augment` runs the frozen backbone every epoch on random crops/flips instead of the cache;
`classification.unfreeze_blocks: N` trains the last N backbone blocks with the head (their BatchNorm included).
The OOD statistics (tasks/ood.py) are fit on the cached features the head learnt from.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tasks.checkpoint import Trained, save_model
from tasks.config import Params, as_dict
from tasks.head import (
    Classifier, build_head, class_weights, fit_lbfgs, head_meta, make_optimizer, make_schedule, seed_everything, softmax_scores,
)
from tasks.layout import ArtifactError, Dataset, Item, Layout, Progress
from tasks.network import autocast, freeze, pick_device, unfreeze_last_blocks
from tasks.ood import fit_ood
from tasks.pooled import load_feature_extractor
from tasks.preprocess import PreprocessingCard, decode_rgb
from tasks.selection import EarlyStopping, Selection, select_split

COLUMNS = ["step", "phase", "l2", "train_loss", "train_acc", "select_loss", "select_acc", "lr"]


# ---------------------------------------------------------------- head on cached features


def fit_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, p, x_sel: torch.Tensor | None,
             y_sel: torch.Tensor | None, stop_at: int | None = None, desc: str = "train head",
             progress: Progress | None = None, weight: torch.Tensor | None = None,
             ) -> tuple[nn.Module, list[dict], int, float]:
    """Mini-batch training of the head; returns (head at the best selection epoch, history, best epoch, best acc)."""
    gen = seed_everything(p.seed)
    head = build_head(p.head, x.shape[1], num_classes, p.hidden_dim, p.dropout, p.feature_power)
    head[0].fit(x)
    opt = make_optimizer([{"params": head.parameters()}], p)
    steps = math.ceil(len(x) / p.batch_size)
    sched = make_schedule(opt, p, steps)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=p.label_smoothing)
    history: list[dict] = []
    stopper = EarlyStopping(p.patience)
    epochs = stop_at or p.epochs
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="ep", disable=None)
    for epoch in bar:
        head.train()
        perm = torch.randperm(len(x), generator=gen)
        total_loss, correct = 0.0, 0
        for s in range(steps):
            idx = perm[s * p.batch_size : (s + 1) * p.batch_size]
            logits = head(x[idx])
            loss = loss_fn(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
        row = {"step": epoch, "train_loss": total_loss / len(x), "train_acc": correct / len(x),
               "lr": opt.param_groups[0]["lr"]}
        stop = False
        if x_sel is not None:
            head.eval()
            sel_loss, sel_acc = softmax_scores(head, x_sel, y_sel)
            row.update(select_loss=sel_loss, select_acc=sel_acc)
            stop = stopper.update(epoch, (sel_acc, -sel_loss), head.state_dict())  # accuracy, ties: lower loss
        history.append(row)
        if progress:
            progress(epoch, epochs)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}",
                        **({"sel_acc": f"{row['select_acc']:.3f}"} if x_sel is not None else {}))
        if stop:
            break
    if x_sel is None:
        return head.eval(), history, epochs, float("nan")
    head.load_state_dict(stopper.state)
    return head.eval(), history, stopper.epoch, stopper.score[0]


def select_l2(x: torch.Tensor, y: torch.Tensor, num_classes: int, p, x_sel: torch.Tensor, y_sel: torch.Tensor,
              progress: Progress | None = None, weight: torch.Tensor | None = None,
              ) -> tuple[nn.Module, list[dict], float, float]:
    """Fit one head per candidate L2 strength; keep the best on the selection split (accuracy, then loss)."""
    history, best = [], None
    for step, l2 in enumerate(tqdm(p.l2, desc="train head (lbfgs)", unit="fit", disable=None), start=1):
        head = fit_lbfgs(x, y, num_classes, l2, p.feature_power, label_smoothing=p.label_smoothing,
                         class_weight=weight)
        train_loss, train_acc = softmax_scores(head, x, y)
        sel_loss, sel_acc = softmax_scores(head, x_sel, y_sel)
        history.append({"step": step, "l2": l2, "train_loss": train_loss, "train_acc": train_acc,
                        "select_loss": sel_loss, "select_acc": sel_acc})
        if progress:
            progress(step, len(p.l2))
        if best is None or (sel_acc, -sel_loss) > (best[0], -best[1]):
            best = (sel_acc, sel_loss, l2, head)
    return best[3], history, best[2], best[0]


def train_on_features(p, n_classes: int, feats: dict[str, np.ndarray], sel: Selection,
                      progress: Progress | None = None, weight: torch.Tensor | None = None,
                      ) -> tuple[nn.Module, list[dict], dict]:
    """Head on cached features (`weight`: per-class loss weights, or None). Returns (head, history, summary with
    the chosen epoch or L2)."""
    x, y = torch.from_numpy(feats["x_train"]), torch.from_numpy(feats["y_train"])
    x_fit, y_fit, x_sel, y_sel = map(torch.from_numpy, sel.arrays(feats))
    refit = not sel.on_val
    if p.solver == "lbfgs":
        head, history, l2, acc = select_l2(x_fit, y_fit, n_classes, p, x_sel, y_sel, progress, weight)
        if refit:
            head = fit_lbfgs(x, y, n_classes, l2, p.feature_power, label_smoothing=p.label_smoothing,
                             class_weight=weight)
        return head, history, {"solver": "lbfgs", "l2": l2, "best_epoch": None, "selection": sel.source,
                               "selection_accuracy": acc}
    head, history, best, acc = fit_head(x_fit, y_fit, n_classes, p, x_sel, y_sel,
                                        desc="select epoch" if refit else "train head", progress=progress,
                                        weight=weight)
    if refit:
        head, refit_hist, _, _ = fit_head(x, y, n_classes, p, None, None, stop_at=best, desc="refit head",
                                          weight=weight)
        history += [{**row, "phase": "refit"} for row in refit_hist]
    return head, history, {"solver": p.solver, "l2": None, "best_epoch": best, "selection": sel.source,
                           "selection_accuracy": acc}


# ---------------------------------------------------------------- through the backbone (augment / unfreeze)


class ImageBatches(torch.utils.data.Dataset):
    """Images -> uint8 HWC tensors: random resized crop + flip when training, the shared centre crop otherwise."""

    def __init__(self, dataset: Dataset, items: list[Item], card: PreprocessingCard, train: bool):
        from torchvision.transforms import v2

        from tasks.preprocess import INTERPOLATIONS, load_image

        self.dataset, self.items, self.card, self.train = dataset, items, card, train
        self.load_image = load_image
        self.augment = v2.Compose([
            v2.RandomResizedCrop(card.input_size, interpolation=INTERPOLATIONS[card.interpolation], antialias=True),
            v2.RandomHorizontalFlip(),
        ])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        path = self.dataset.resolve(item)
        if self.train:
            pixels = np.array(self.augment(decode_rgb(path, self.card.resize_size)), dtype=np.uint8)
        else:
            pixels = np.array(self.load_image(path, self.card))
        return torch.from_numpy(pixels), self.dataset.label_index(item)


@torch.no_grad()
def image_accuracy(model: nn.Module, loader, device: torch.device) -> float:
    correct = total = 0
    for pixels, target in loader:
        with autocast(device):
            logits = model(pixels.to(device))
        correct += (logits.argmax(1).cpu() == target).sum().item()
        total += len(target)
    return correct / max(total, 1)


def train_through_backbone(params: Params, layout: Layout, dataset: Dataset, sel: Selection,
                           progress: Progress | None = None) -> tuple[Classifier, list[dict], dict]:
    """AdamW-family training with the backbone in the loop; the best selection epoch is kept (no refit)."""
    p = params.classification
    device = pick_device(params.device)
    gen = seed_everything(p.seed)
    extractor = load_feature_extractor(layout)
    card = extractor.card
    head = build_head(p.head, card.feature_dim, len(dataset.classes), p.hidden_dim, p.dropout, p.feature_power)
    model = Classifier(extractor, head).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    freeze(model.features)
    trainable = unfreeze_last_blocks(model.features.network, p.unfreeze_blocks)
    groups = [{"params": head.parameters()}]
    if trainable:
        groups.append({"params": [q for b in trainable for q in b.parameters()], "lr": p.backbone_lr})
    train_items = dataset.split("train")
    if sel.on_val:
        sel_items = dataset.split("val")
    else:
        sel_items = [train_items[i] for i in sel.holdout]
        train_items = [train_items[i] for i in sel.fit]
    loader = torch.utils.data.DataLoader(ImageBatches(dataset, train_items, card, train=True), batch_size=p.batch_size,
                                         shuffle=True, generator=gen, num_workers=0)
    sel_loader = torch.utils.data.DataLoader(ImageBatches(dataset, sel_items, card, train=False), batch_size=p.batch_size)
    opt = make_optimizer(groups, p)
    sched = make_schedule(opt, p, len(loader))
    weight = class_weights(p.class_weights, dataset.classes, dataset.labels("train"))
    loss_fn = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device), label_smoothing=p.label_smoothing)
    history, stopper = [], EarlyStopping(p.patience)
    bar = tqdm(range(1, p.epochs + 1), desc="train (backbone in the loop)", unit="ep", disable=None)
    for epoch in bar:
        head.train()
        for b in trainable:
            b.train()  # the unfrozen blocks learn, BatchNorm included; the rest stays in eval()
        total_loss, correct, seen = 0.0, 0, 0
        for pixels, target in loader:
            pixels, target = pixels.to(device), target.to(device)
            with autocast(device):
                logits = model(pixels)
                loss = loss_fn(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(target)
            correct += (logits.argmax(1) == target).sum().item()
            seen += len(target)
        model.eval()
        sel_acc = image_accuracy(model, sel_loader, device)
        history.append({"step": epoch, "train_loss": total_loss / seen, "train_acc": correct / seen,
                        "select_acc": sel_acc, "lr": opt.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", sel_acc=f"{sel_acc:.3f}")
        if progress:
            progress(epoch, p.epochs)
        if stopper.update(epoch, sel_acc, {k: v.cpu() for k, v in model.state_dict().items()}):
            break
    model.load_state_dict(stopper.state)
    model.eval().cpu()
    return model, history, {"solver": p.solver, "l2": None, "best_epoch": stopper.epoch, "selection": sel.source,
                            "selection_accuracy": stopper.score}


# ---------------------------------------------------------------- the part


def train(params: Params, layout: Layout, progress: Progress | None = None) -> Trained:
    p = params.classification
    dataset = layout.dataset()
    sel = select_split(dataset, dataset.labels("train"), p.holdout_fraction, p.seed)
    meta = {"head": head_meta(p), "params": as_dict(p)}
    if p.augment or p.unfreeze_blocks:
        model, history, summary = train_through_backbone(params, layout, dataset, sel, progress)
        summary["backbone_trained"] = bool(p.unfreeze_blocks)
        save_model(layout, "classification", model.head, dataset, model.features.card, {**meta, **summary},
                   backbone_state=model.features.network.state_dict() if p.unfreeze_blocks else None)
        return Trained(summary, history, COLUMNS)  # no OOD statistics: they are fit on cached features
    card = layout.card()
    feats = layout.feature_cache().load()
    if len(feats["x_train"]) != len(dataset.split("train")):
        raise ArtifactError(f"{layout.features} does not match {layout.prepared}: re-run the features stage")
    weight = class_weights(p.class_weights, dataset.classes, feats["y_train"])
    head, history, summary = train_on_features(p, len(dataset.classes), feats, sel, progress, weight)
    summary["class_weights"] = None if weight is None else dict(zip(dataset.classes, map(float, weight.tolist())))
    x_fit, y_fit, x_sel, _ = sel.arrays(feats)
    ood, summary["ood"] = fit_ood(head[0], x_fit, y_fit, len(dataset.classes), x_sel, sel.source)
    summary["backbone_trained"] = False
    save_model(layout, "classification", head, dataset, card, {**meta, **summary}, extra={"ood": ood})
    return Trained(summary, history, COLUMNS)
