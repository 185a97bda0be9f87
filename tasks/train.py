"""Stage `train`: fit the new head (models/).

Default path: the head learns on the cached features (seconds on a CPU). The
frozen backbone is never touched. `train.augment` runs the frozen backbone every
epoch on randomly cropped/flipped images instead; `train.unfreeze_blocks: N`
trains the last N backbone blocks with the head (their BatchNorm included).

The default linear head is logistic regression solved with L-BFGS, its L2 strength
chosen from `train.l2`; adamw/adam/sgd train by epochs with early stopping.
Model selection is honest: L2 or epoch is chosen on val when a test split exists.
Without a test split val is the evaluation split, so the choice is made on a
stratified holdout of train and (on cached features) the head is then refit on all of train.

Outputs: models/head.pt, models/model.pt (+ .safetensors), models/labels.json,
reports/train_history.csv (a DVC plot), reports/train.json.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tasks.cli import stage_main
from tasks.config import Params, TrainParams, UserError, as_dict
from tasks.files import atomic_files, write_json, write_text
from tasks.layout import ArtifactError, Dataset, Item, Layout, Progress, holdout_split
from tasks.model import (
    Classifier, FeatureExtractor, autocast, build_head, freeze, load_feature_extractor, pick_device,
    unfreeze_last_blocks,
)
from tasks.logistic import fit_lbfgs, scores
from tasks.ood import fit_ood
from tasks.preprocess import PreprocessingCard, decode_rgb


@dataclass(frozen=True)
class TrainResult:
    classifier_path: Path
    summary: dict  # solver, l2 or best_epoch, selection ("val" | "train-holdout"), selection_accuracy
    seconds: float


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(groups: list[dict], p: TrainParams) -> torch.optim.Optimizer:
    if p.solver == "adamw":
        return torch.optim.AdamW(groups, lr=p.lr, weight_decay=p.weight_decay)
    if p.solver == "adam":  # the reference recipe: torch.optim.Adam, L2 in the gradient
        return torch.optim.Adam(groups, lr=p.lr, weight_decay=p.weight_decay)
    if p.solver == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=0.9, nesterov=True, weight_decay=p.weight_decay)
    raise ValueError(f"{p.solver} is not a gradient-descent optimizer")


def make_schedule(opt: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int):
    total = p.epochs * steps_per_epoch
    if p.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


# ---------------------------------------------------------------- head on cached features


def fit_head(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, p: TrainParams,
    x_sel: torch.Tensor | None, y_sel: torch.Tensor | None, stop_at: int | None = None, desc: str = "train head",
    progress: Progress | None = None,
) -> tuple[nn.Module, list[dict], int, float]:
    """Mini-batch training of the head; returns (head at the best selection epoch, history, best epoch, best acc)."""
    gen = seed_everything(p.seed)
    head = build_head(p.head, x.shape[1], num_classes, p.hidden_dim, p.dropout, p.feature_power)
    head[0].fit(x)
    opt = make_optimizer([{"params": head.parameters()}], p)
    steps = math.ceil(len(x) / p.batch_size)
    sched = make_schedule(opt, p, steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    history: list[dict] = []
    best = (-1.0, math.inf, 0, copy.deepcopy(head.state_dict()))
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
        if x_sel is not None:
            head.eval()
            with torch.no_grad():
                sel_logits = head(x_sel)
            sel_loss = nn.functional.cross_entropy(sel_logits, y_sel).item()
            sel_acc = (sel_logits.argmax(1) == y_sel).float().mean().item()
            row.update(select_loss=sel_loss, select_acc=sel_acc)
            # Best accuracy, ties broken by lower loss.
            if (sel_acc, -sel_loss) > (best[0], -best[1]):
                best = (sel_acc, sel_loss, epoch, copy.deepcopy(head.state_dict()))
            elif p.patience and epoch - best[2] >= p.patience:
                history.append(row)
                break
        history.append(row)
        if progress:
            progress(epoch, epochs)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}",
                        **({"sel_acc": f"{row['select_acc']:.3f}"} if x_sel is not None else {}))
    if x_sel is None:
        return head.eval(), history, epochs, float("nan")
    head.load_state_dict(best[3])
    return head.eval(), history, best[2], best[0]


def select_l2(x: torch.Tensor, y: torch.Tensor, num_classes: int, p: TrainParams,
              x_sel: torch.Tensor, y_sel: torch.Tensor, progress: Progress | None = None) -> tuple[nn.Module, list[dict], float, float]:
    """Fit one head per candidate L2 strength; keep the best on the selection split (accuracy, then loss)."""
    history, best = [], None
    for step, l2 in enumerate(tqdm(p.l2, desc="train head (lbfgs)", unit="fit", disable=None), start=1):
        head = fit_lbfgs(x, y, num_classes, l2, p)
        train_loss, train_acc = scores(head, x, y)
        sel_loss, sel_acc = scores(head, x_sel, y_sel)
        history.append({"step": step, "l2": l2, "train_loss": train_loss, "train_acc": train_acc,
                        "select_loss": sel_loss, "select_acc": sel_acc})
        if progress:
            progress(step, len(p.l2))
        if best is None or (sel_acc, -sel_loss) > (best[0], -best[1]):
            best = (sel_acc, sel_loss, l2, head)
    return best[3], history, best[2], best[0]


def train_on_features(params: Params, dataset: Dataset, feats: dict[str, np.ndarray],
                      progress: Progress | None = None) -> tuple[nn.Module, list[dict], dict]:
    """Head on cached features. Returns (head, history, summary with the chosen epoch or L2)."""
    p = params.train
    n_classes = len(dataset.classes)
    x, y = torch.from_numpy(feats["x_train"]), torch.from_numpy(feats["y_train"])
    selection = dataset.selection
    if selection == "val":
        fit_idx, x_sel, y_sel = None, torch.from_numpy(feats["x_val"]), torch.from_numpy(feats["y_val"])
    else:
        # No test split: val is the evaluation split, so choose on a slice of train and refit on all of it.
        fit_idx, hold_idx = holdout_split(feats["y_train"], p.holdout_fraction, p.seed)
        x_sel, y_sel = x[hold_idx], y[hold_idx]
        if len(hold_idx) == 0:
            raise UserError("train split too small to hold out a selection set; add images or a val/ folder")
    x_fit, y_fit = (x, y) if fit_idx is None else (x[fit_idx], y[fit_idx])

    if p.solver == "lbfgs":
        head, history, l2, acc = select_l2(x_fit, y_fit, n_classes, p, x_sel, y_sel, progress)
        if fit_idx is not None:
            head = fit_lbfgs(x, y, n_classes, l2, p)
        return head, history, {"solver": "lbfgs", "l2": l2, "best_epoch": None, "selection": selection,
                               "selection_accuracy": acc}
    head, history, best, acc = fit_head(x_fit, y_fit, n_classes, p, x_sel, y_sel,
                                        desc="select epoch" if fit_idx is not None else "train head", progress=progress)
    if fit_idx is not None:
        head, refit_hist, _, _ = fit_head(x, y, n_classes, p, None, None, stop_at=best, desc="refit head")
        history += [{**row, "phase": "refit"} for row in refit_hist]
    return head, history, {"solver": p.solver, "l2": None, "best_epoch": best, "selection": selection,
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
            img = self.augment(decode_rgb(path, self.card.resize_size))
            pixels = np.array(img, dtype=np.uint8)
        else:
            pixels = np.array(self.load_image(path, self.card))
        return torch.from_numpy(pixels), self.dataset.label_index(item)


def train_through_backbone(params: Params, dataset: Dataset, extractor: FeatureExtractor,
                           progress: Progress | None = None) -> tuple[nn.Module, list[dict], dict]:
    """AdamW-family training with the backbone in the loop; the best selection epoch is kept (no refit)."""
    p = params.train
    device = pick_device(params.device)
    gen = seed_everything(p.seed)
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
    selection = dataset.selection
    if selection == "val":
        sel_items = dataset.split("val")
    else:
        fit_idx, hold_idx = holdout_split(dataset.labels("train"), p.holdout_fraction, p.seed)
        sel_items = [train_items[i] for i in hold_idx]
        train_items = [train_items[i] for i in fit_idx]
    loader = torch.utils.data.DataLoader(ImageBatches(dataset, train_items, card, train=True), batch_size=p.batch_size,
                                         shuffle=True, generator=gen, num_workers=0)
    sel_loader = torch.utils.data.DataLoader(ImageBatches(dataset, sel_items, card, train=False), batch_size=p.batch_size)
    opt = make_optimizer(groups, p)
    sched = make_schedule(opt, p, len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    history, best = [], (-1.0, 0, None)
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
        sel_acc = evaluate_images(model, sel_loader, device)
        history.append({"step": epoch, "train_loss": total_loss / seen, "train_acc": correct / seen,
                        "select_acc": sel_acc, "lr": opt.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", sel_acc=f"{sel_acc:.3f}")
        if progress:
            progress(epoch, p.epochs)
        if sel_acc > best[0]:
            best = (sel_acc, epoch, copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()}))
        elif p.patience and epoch - best[1] >= p.patience:
            break
    model.load_state_dict(best[2])
    model.eval().cpu()
    return model, history, {"solver": p.solver, "l2": None, "best_epoch": best[1], "selection": selection,
                            "selection_accuracy": best[0]}


@torch.no_grad()
def evaluate_images(model: nn.Module, loader, device: torch.device) -> float:
    correct = total = 0
    for pixels, target in loader:
        with autocast(device):
            logits = model(pixels.to(device))
        correct += (logits.argmax(1).cpu() == target).sum().item()
        total += len(target)
    return correct / max(total, 1)


# ---------------------------------------------------------------- stage


def save_classifier(model: Classifier, card: PreprocessingCard, classes: list[str], params: Params,
                    extra: dict, out_dir: Path, ood: dict | None = None) -> Path:
    """model.pt loads with torch.load(weights_only=True): tensors and plain data only."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"card": card.to_dict(), "labels": classes, "train": as_dict(params.train), **extra,
            "head": {"kind": params.train.head, "hidden_dim": params.train.hidden_dim, "dropout": params.train.dropout,
                     "feature_power": params.train.feature_power}}
    with atomic_files(out_dir) as tmp:
        torch.save({"state_dict": state, "meta": json.loads(json.dumps(meta)), **({"ood": ood} if ood else {})},
                   tmp / "model.pt")
        save_file(state, str(tmp / "model.safetensors"), metadata={"meta": json.dumps(meta)})
        torch.save({k[5:]: v for k, v in state.items() if k.startswith("head.")}, tmp / "head.pt")
        write_json(tmp / "labels.json", classes)
    return out_dir / "model.pt"


HISTORY_COLUMNS = ["step", "phase", "l2", "train_loss", "train_acc", "select_loss", "select_acc", "lr"]


def write_history(history: list[dict], path: Path, cols: list[str] = HISTORY_COLUMNS) -> None:
    """One row per epoch (adamw/adam/sgd) or per L2 candidate (lbfgs): the DVC learning-curve plot."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({c: (round(v, 6) if isinstance(v, float) else v) for c, v in {"phase": "select", **row}.items()})
    write_text(path, buf.getvalue())


def run_dense(params: Params, layout: Layout, progress: Progress | None, t0: float) -> TrainResult:
    """Detection, segmentation: the head learns on the cached maps; same outputs as the classifier's (model.pt, ...)."""
    if params.task == "segmentation":
        from tasks.segmentation.train import HISTORY, fit_and_save
    else:
        from tasks.detection.train import HISTORY, fit_and_save

    path, history, summary = fit_and_save(params, layout, progress)
    write_history(history, layout.reports / "train_history.csv", HISTORY)
    seconds = time.perf_counter() - t0
    write_json(layout.reports / "train.json", {**summary, "steps_run": len(history), "seconds": round(seconds, 2)})
    return TrainResult(path, summary, seconds)


def run(params: Params, layout: Layout, progress: Progress | None = None) -> TrainResult:
    """Fit the head (or head + unfrozen blocks); `progress(done, total)` per epoch or per L2 candidate."""
    t0 = time.perf_counter()
    if params.task != "classification":
        return run_dense(params, layout, progress, t0)
    p = params.train
    dataset = layout.dataset()
    extractor = load_feature_extractor(layout)
    card = extractor.card
    if p.augment or p.unfreeze_blocks:
        model, history, summary = train_through_backbone(params, dataset, extractor, progress)
        ood = None  # the OOD statistics are fit on cached features; a trained backbone has none
    else:
        feats = layout.feature_cache().load()
        if len(feats["x_train"]) != len(dataset.split("train")):
            raise ArtifactError(f"{layout.features} does not match {layout.prepared}: re-run the features stage")
        head, history, summary = train_on_features(params, dataset, feats, progress)
        model = Classifier(extractor, head)
        ood, summary["ood"] = fit_ood(head[0], feats, dataset, p.holdout_fraction, p.seed)
    extra = {**summary, "backbone_trained": bool(p.unfreeze_blocks), "manifest_sha256": dataset.manifest_sha256}
    path = save_classifier(model, card, dataset.classes, params, extra, layout.models, ood)
    write_history(history, layout.reports / "train_history.csv")
    seconds = time.perf_counter() - t0
    write_json(layout.reports / "train.json", {**{k: v for k, v in extra.items() if k != "manifest_sha256"},
                                                "steps_run": len(history), "seconds": round(seconds, 2)})
    return TrainResult(path, summary, seconds)


def describe(r: TrainResult) -> str:
    s = r.summary
    chosen = f"L2 {s['l2']}" if s["solver"] == "lbfgs" else f"epoch {s['best_epoch']}"
    score = f"mAP {s['selection_map']:.4f}" if "selection_map" in s else f"mIoU {s['selection_miou']:.4f}" \
        if "selection_miou" in s else f"acc {s['selection_accuracy']:.4f}"
    return (f"train: {s['solver']}, {chosen} chosen on {s['selection']} ({score}), "
            f"{r.seconds:.1f}s -> {r.classifier_path}")


if __name__ == "__main__":
    stage_main("train", run, describe)
