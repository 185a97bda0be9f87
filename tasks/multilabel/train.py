"""Multi-label training: one sigmoid per tag (binary cross-entropy) on the cached pooled features, then a decision
threshold per tag.

Default: L-BFGS on the whole convex loss (tasks.head.fit_lbfgs, loss "sigmoid"), one fit per L2 candidate, the
best by the selection split's mAP kept (then the lower loss); adamw/adam/sgd (and an mlp head) train by epochs with
early stopping on the same score. `multilabel.class_weights: balanced` weighs each tag's positives by its
negatives / positives in the fitted images, so a rare tag is not drowned by its negatives (a mapping sets them).

Each tag's threshold is the one with the best F1 on the selection split (0.5 for a tag with fewer than
`multilabel.min_positives` positives there), chosen on the selected head's probabilities before any refit: with a
train holdout (no test split) the head is then refit on all of train and keeps those thresholds, so nothing is
ever chosen on the split that scores. The OOD statistics are one Gaussian over the fitted images' features.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tasks.checkpoint import Trained, save_model
from tasks.config import Params, as_dict
from tasks.head import build_head, class_weights, fit_lbfgs, head_meta, make_optimizer, make_schedule, seed_everything
from tasks.layout import ArtifactError, Layout, Progress
from tasks.multilabel.metrics import average_precision, best_thresholds, nanmean, scores_at, sigmoid
from tasks.ood import fit_ood
from tasks.selection import EarlyStopping, select_split

COLUMNS = ["step", "phase", "l2", "train_loss", "select_loss", "select_map", "lr"]


def rarest_tag(y: np.ndarray) -> np.ndarray:
    """Per image, the index of its rarest tag (T for an image without tags): what the train holdout is stratified
    by, so that the rare tags reach the selection split too."""
    freq = y.sum(0).astype(np.float64)
    masked = np.where(y > 0, freq, np.inf)
    return np.where(y.any(1), masked.argmin(1), y.shape[1]).astype(np.int64)


def score(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, np.ndarray]:
    """(mean binary cross-entropy, mAP over the tags with positives, probabilities) of the head on x."""
    with torch.no_grad():
        logits = head(x)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y.float()).item()
    probs = sigmoid(logits.numpy())
    return loss, float(nanmean(average_precision(probs, y.numpy()))), probs


def rank(loss: float, map_: float) -> tuple[float, float]:
    """Higher is better: mAP, then the lower loss (a selection split without positives ranks by loss alone)."""
    return (-1.0 if math.isnan(map_) else map_, -loss)


def select_l2(x: torch.Tensor, y: torch.Tensor, p, x_sel: torch.Tensor, y_sel: torch.Tensor,
              pos_weight: torch.Tensor | None, progress: Progress | None) -> tuple[nn.Module, list[dict], float]:
    """One L-BFGS fit per candidate L2; the best on the selection split. Returns (head, history, l2)."""
    history, best = [], None
    for step, l2 in enumerate(tqdm(p.l2, desc="train multi-label head (lbfgs)", unit="fit", disable=None), start=1):
        head = fit_lbfgs(x, y, y.shape[1], l2, p.feature_power, loss="sigmoid", pos_weight=pos_weight)
        train_loss, _, _ = score(head, x, y)
        sel_loss, sel_map, _ = score(head, x_sel, y_sel)
        history.append({"step": step, "l2": l2, "train_loss": train_loss, "select_loss": sel_loss,
                        "select_map": sel_map})
        if progress:
            progress(step, len(p.l2))
        if best is None or rank(sel_loss, sel_map) > best[0]:
            best = (rank(sel_loss, sel_map), l2, head)
    return best[2], history, best[1]


def fit_epochs(x: torch.Tensor, y: torch.Tensor, p, pos_weight: torch.Tensor | None, x_sel: torch.Tensor | None,
               y_sel: torch.Tensor | None, epochs: int, desc: str, progress: Progress | None = None
               ) -> tuple[nn.Module, list[dict], int]:
    """Mini-batch training (adamw/adam/sgd); with a selection split, the best epoch's head by its mAP (early
    stopping). Returns (head, history, best epoch)."""
    gen = seed_everything(p.seed)
    head = build_head(p.head, x.shape[1], y.shape[1], p.hidden_dim, p.dropout, p.feature_power)
    head[0].fit(x)
    opt = make_optimizer([{"params": head.parameters()}], p)
    steps = math.ceil(len(x) / p.batch_size)
    sched = make_schedule(opt, p, steps)
    target = y.float()
    history, stopper = [], EarlyStopping(p.patience)
    for epoch in tqdm(range(1, epochs + 1), desc=desc, unit="ep", disable=None):
        head.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for s in range(steps):
            idx = perm[s * p.batch_size : (s + 1) * p.batch_size]
            loss = nn.functional.binary_cross_entropy_with_logits(head(x[idx]), target[idx], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        head.eval()
        row = {"step": epoch, "train_loss": total / len(x), "lr": opt.param_groups[0]["lr"]}
        stop = False
        if x_sel is not None:
            sel_loss, sel_map, _ = score(head, x_sel, y_sel)
            row.update(select_loss=sel_loss, select_map=sel_map)
            stop = stopper.update(epoch, rank(sel_loss, sel_map), head.state_dict())
        history.append(row)
        if progress:
            progress(epoch, epochs)
        if stop:
            break
    if x_sel is None:
        return head, history, epochs
    head.load_state_dict(stopper.state)
    return head.eval(), history, stopper.epoch


def train(params: Params, layout: Layout, progress: Progress | None = None) -> Trained:
    p = params.multilabel
    dataset = layout.dataset()
    card = layout.card()
    feats = layout.feature_cache().load()
    y_train = feats.get("y_train")
    if y_train is None or y_train.ndim != 2 or y_train.shape != (len(dataset.split("train")), len(dataset.classes)):
        raise ArtifactError(f"{layout.features} does not hold this dataset's tags: re-run the features stage "
                            f"(dvc repro features) with task: multilabel")
    sel = select_split(dataset, rarest_tag(y_train), p.holdout_fraction, p.seed)
    x_fit, y_fit, x_sel, y_sel = (torch.from_numpy(np.asarray(a)) for a in sel.arrays(feats))
    y_fit, y_sel = y_fit.float(), y_sel.float()
    pos_weight = class_weights(p.class_weights, dataset.classes, y_fit.numpy())
    refit = not sel.on_val
    x_all, y_all = torch.from_numpy(feats["x_train"]), torch.from_numpy(y_train).float()
    if p.solver == "lbfgs":
        head, history, l2 = select_l2(x_fit, y_fit, p, x_sel, y_sel, pos_weight, progress)
        best_epoch = None
    else:
        head, history, best_epoch = fit_epochs(x_fit, y_fit, p, pos_weight, x_sel, y_sel, p.epochs,
                                               "select epoch" if refit else "train multi-label head", progress)
        l2 = None
    sel_loss, sel_map, sel_probs = score(head, x_sel, y_sel)
    thresholds, source = best_thresholds(sel_probs, y_sel.numpy(), p.min_positives)
    if refit:
        if p.solver == "lbfgs":
            head = fit_lbfgs(x_all, y_all, y_all.shape[1], l2, p.feature_power, loss="sigmoid",
                             pos_weight=class_weights(p.class_weights, dataset.classes, y_train))
        else:
            head, rows, _ = fit_epochs(x_all, y_all, p, class_weights(p.class_weights, dataset.classes, y_train),
                                       None, None, best_epoch,
                                       "refit head")
            history += [{**row, "phase": "refit"} for row in rows]
    tuned, at_half = scores_at(sel_probs, y_sel.numpy(), thresholds), scores_at(sel_probs, y_sel.numpy(), 0.5)
    summary = {"solver": p.solver, "l2": l2, "best_epoch": best_epoch, "selection": sel.source,
               "selection_map": sel_map, "selection_loss": sel_loss, "selection_macro_f1": tuned["macro_f1"],
               "selection_macro_f1_at_05": at_half["macro_f1"], "class_weights": p.class_weights,
               "thresholds_tuned": source.count("f1"), "num_tags": len(dataset.classes)}
    ood, summary["ood"] = fit_ood(head[0], x_fit.numpy(), np.zeros(len(x_fit), np.int64), 1, x_sel.numpy(), sel.source)
    meta = {"head": head_meta(p), "params": as_dict(p), **summary,
            "thresholds": [float(t) for t in thresholds], "threshold_source": source}
    save_model(layout, "multilabel", head.eval(), dataset, card, meta, extra={"ood": ood})
    return Trained(summary, history, COLUMNS)
