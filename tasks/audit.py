"""Stage `audit`: what the cached features say about the data -> reports/audit.json and reports/audit/.

On the feature cache (no second backbone pass), for a task with pooled features (classification, multilabel):
- label issues: out-of-sample probabilities from a stratified k-fold of the task's own head over every image,
  ranked by cleanlab (its issue mask and label quality score); reports/audit/label_scores.csv lists them all;
- near-duplicates, leaks and conflicts: feature neighbours (cosine of standardised features) at or above
  `audit.duplicate_similarity`; a pair across splits is a leak (the evaluation score is recomputed without the
  leaked evaluation images), a pair with different labels a conflict; byte-identical copies (the prepare stage's
  sha256) are marked `exact`;
- outliers: training images far from their own class (tasks.auditing.own_class_outliers);
- class balance: counts, imbalance ratio, the weights `<task>.class_weights` gives, out-of-fold recall per class;
- how many images: the head refit on nested stratified shares of train (`audit.curve_fractions`, several seeds),
  scored on the selection split, a saturating power law fitted overall and per label, the score predicted at 2x
  and 5x the data, and a check: the law fitted on the shares <= 50% predicting the measured full score.
Other tasks get a one-line report saying the audit does not apply. `audit.enabled: false` skips it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tasks import registry
from tasks.auditing import (
    law_at, fit_power_law, nested_subsets, own_class_outliers, predict_curve, similar_pairs, stratified_folds,
    unit_features,
)
from tasks.cli import stage_main
from tasks.config import Params
from tasks.contract import SPLITS
from tasks.files import atomic_dir, write_csv, write_json
from tasks.layout import ArtifactError, Layout, Progress
from tasks.selection import select_split

GAIN_SATURATED = 0.005  # a predicted gain at 2x the data below half a point: more images will not help much


@dataclass(frozen=True)
class AuditResult:
    report: dict
    path: Path
    seconds: float


def _import_cleanlab() -> None:
    try:  # cleanlab imports scikit-learn (~1 s here): started at once, it overlaps the first fits
        import cleanlab.filter  # noqa: F401
    except ImportError:
        pass


def run(params: Params, layout: Layout, progress: Progress | None = None) -> AuditResult:
    t0 = time.perf_counter()
    a = params.audit
    reason = ("audit.enabled is false" if not a.enabled else None if registry.spec(params.task).audit
              else f"the audit reads pooled features; task {params.task} caches dense maps")
    with atomic_dir(layout.audit_dir) as out:
        if reason:
            (out / "skipped.txt").write_text(f"audit skipped: {reason}\n")
            report = {"enabled": False, "task": params.task, "reason": reason}
        else:
            from tasks.head import one_thread

            with one_thread():  # many small fits (tasks.head.one_thread says why)
                report = audit(params, layout, out, progress)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(layout.audit_report, report)
    return AuditResult(report, layout.audit_report, time.perf_counter() - t0)


def audit(params: Params, layout: Layout, out: Path, progress: Progress | None) -> dict:
    threading.Thread(target=_import_cleanlab, daemon=True).start()
    p, a = params.head, params.audit
    part = registry.part(params.task, "audit")
    dataset = layout.dataset()
    feats = layout.feature_cache().load()
    classes = dataset.classes
    splits = [s for s in SPLITS if dataset.has_split(s)]
    items = [it for s in splits for it in dataset.split(s)]
    if any(f"x_{s}" not in feats or len(feats[f"x_{s}"]) != len(dataset.split(s)) for s in splits):
        raise ArtifactError(f"{layout.features} does not match {layout.prepared}: re-run the features stage")
    x = np.concatenate([feats[f"x_{s}"] for s in splits])
    y = np.concatenate([feats[f"y_{s}"] for s in splits])
    split_of = np.array([it.split for it in items])
    train = split_of == "train"
    sel = select_split(dataset, part.strata(feats["y_train"]), p.holdout_fraction, p.seed)
    x_fit, y_fit, x_sel, y_sel = sel.arrays(feats)
    fractions = sorted(set(a.curve_fractions) | {1.0})
    fits = len(p.l2) + a.folds + sum(0 if f == 1.0 else a.curve_seeds for f in fractions)
    bar = tqdm(total=fits, desc="audit (head fits)", unit="fit", disable=None)

    def fit(xs, ys, l2):
        head = part.fit(p, xs, ys, classes, l2)
        bar.update()
        if progress:
            progress(bar.n, fits)
        return head

    clock = Clock()
    # the L2 strength: the lowest log loss on the selection split of the head fit on the fit images
    best = None
    for cand in p.l2:
        head = fit(x_fit, y_fit, cand)
        loss = part.log_loss(y_sel, part.probabilities(head, x_sel))
        if best is None or loss < best[0]:
            best = (loss, cand, head)
    _, l2, full_head = best

    clock("choose_l2")
    # label issues: out-of-sample probabilities over every image
    fold = stratified_folds(part.strata(y), a.folds, a.seed)
    probs = np.zeros((len(y), len(classes)))
    for f in range(a.folds):
        held = fold == f
        if held.any():
            probs[held] = part.probabilities(fit(x[~held], y[~held], l2), x[held])
    clock("folds")
    issue_mask, quality = part.label_issues(y, probs)
    clock("cleanlab")
    label_rows = [{"path": it.path, "split": it.split, "given": part.given(y[i], classes),
                   "suggested": part.suggested(probs[i], classes), "score": round(float(quality[i]), 6),
                   "issue": bool(issue_mask[i])} for i, it in enumerate(items)]
    ranked = sorted(range(len(items)), key=lambda i: (quality[i], items[i].path))
    write_csv(out / "label_scores.csv", ["path", "split", "given", "suggested", "score", "issue"], (
        [r["path"], r["split"], _text(r["given"]), _text(r["suggested"]), r["score"], int(r["issue"])]
        for r in (label_rows[i] for i in ranked)))

    clock("tables")
    # the learning curve
    curve = learning_curve(part, a, classes, x_fit, y_fit, x_sel, y_sel, fractions,
                           lambda xs, ys: fit(xs, ys, l2), full_head, sel.source)
    bar.close()

    plot_curve(curve, out / "learning_curve.png")
    clock("curve")
    # neighbours: near-duplicates, leaks, conflicts
    z = unit_features(x, feats["x_train"], p.feature_power)
    ii, jj, ss = similar_pairs(z, a.duplicate_similarity)
    pairs = [pair(items[i], items[j], s, part.given(y[i], classes), part.given(y[j], classes))
             for i, j, s in zip(ii, jj, ss)]
    write_csv(out / "pairs.csv", ["a", "b", "split_a", "split_b", "label_a", "label_b", "similarity", "kind", "exact"],
              ([q["a"], q["b"], q["split_a"], q["split_b"], _text(q["label_a"]), _text(q["label_b"]), q["similarity"],
                q["kind"], int(q["exact"])] for q in pairs))
    eval_split = dataset.eval_split
    leaked = sorted({int(k) for i, j in zip(ii, jj) if split_of[i] != split_of[j]
                     for k in (i, j) if split_of[k] == eval_split})
    leak_effect = None
    if leaked:
        ev = np.flatnonzero(split_of == eval_split)
        keep = np.setdiff1d(ev, leaked)
        p_ev = part.probabilities(full_head, x[ev])
        p_keep = part.probabilities(full_head, x[keep]) if len(keep) else p_ev[:0]
        leak_effect = {"metric": part.METRIC, "split": eval_split, "with_leaks": round(part.score(y[ev], p_ev), 4),
                       "without_leaks": round(part.score(y[keep], p_keep), 4), "removed": len(leaked),
                       "scored_by": f"the audit's head fit on the {sel.source} fit images (L2 {l2:g})"}

    clock("neighbours")
    # outliers: training images unlike their own class (multi-label: unlike the training images)
    z_train = unit_features(feats["x_train"], feats["x_train"], p.feature_power)
    groups = feats["y_train"] if feats["y_train"].ndim == 1 else np.zeros(int(train.sum()), np.int64)
    dist, flagged = own_class_outliers(z_train.astype(np.float64), groups, int(groups.max()) + 1)
    train_items = dataset.split("train")
    outliers = sorted(({"path": train_items[i].path, "split": "train", "label": _text(part.given(feats["y_train"][i], classes)),
                        "score": round(float(dist[i]), 4)} for i in np.flatnonzero(flagged)), key=lambda r: -r["score"])

    clock("outliers")
    # class balance
    counts = part.counts(feats["y_train"], len(classes))
    nonzero = counts[counts > 0]
    from tasks.head import class_weights

    weights = class_weights(p.class_weights, classes, feats["y_train"])
    recall = part.per_label(y[train], probs[train], len(classes))

    return {
        "enabled": True, "task": params.task,
        "images": {s: int((split_of == s).sum()) for s in splits},
        "head": f"the task's head (L-BFGS, feature power {p.feature_power:g}, class_weights "
                f"{_text(p.class_weights)}), L2 {l2:g}: the lowest log loss on the {sel.source} split of {_text(list(map(str, p.l2)))}",
        "label_issues": {
            "method": f"cleanlab on {a.folds}-fold out-of-sample probabilities of the head, every split; "
                      f"score = label quality (low = likely wrong)",
            "count": int(issue_mask.sum()), "listed_in": "audit/label_scores.csv",
            "issues": [label_rows[i] for i in ranked if issue_mask[i]][: a.max_listed]},
        "duplicates": {
            "threshold": a.duplicate_similarity, "metric": "cosine of standardised pooled features",
            "counts": {k: sum(q["kind"] == k for q in pairs) for k in ("near_duplicate", "leak", "conflict")}
                      | {"labels_differ": sum(q["labels_differ"] for q in pairs), "exact": sum(q["exact"] for q in pairs)},
            "pairs": pairs[: a.max_listed], "listed_in": "audit/pairs.csv", "leak_effect": leak_effect},
        "outliers": {"method": "Mahalanobis distance to the own class's mean (shared Ledoit-Wolf covariance), "
                               "flagged beyond median + 3 MAD of the class",
                     "count": len(outliers), "items": outliers[: a.max_listed]},
        "balance": {"counts": dict(zip(classes, map(int, counts))),
                    "imbalance_ratio": round(float(nonzero.max() / nonzero.min()), 3) if len(nonzero) else None,
                    "class_weights": p.class_weights,
                    "weights": dict(zip(classes, (1.0,) * len(classes) if weights is None else map(float, weights.tolist()))),
                    part.PER_LABEL: _per_label(classes, recall), "measured_on": "train, out-of-fold"},
        "learning_curve": curve,
        "timings_s": clock.laps,
    }


def learning_curve(part, a, classes, x_fit, y_fit, x_sel, y_sel, fractions, fit, full_head, source) -> dict:
    """Scores [fractions, seeds] (and per label) of the head refit on nested stratified shares of the fit images
    (`full_head`: the one fit on all of them)."""
    strata = part.strata(y_fit)
    seeds = [a.seed + s for s in range(a.curve_seeds)]
    subsets = {s: nested_subsets(strata, fractions, s) for s in seeds}
    scores = np.full((len(fractions), len(seeds)), np.nan)
    per = np.full((len(fractions), len(seeds), len(classes)), np.nan)
    sizes = np.zeros(len(fractions))
    for fi, f in enumerate(fractions):
        for si, s in enumerate(seeds):
            if f == 1.0 and si:  # every seed's full share is the same fit
                scores[fi, si], per[fi, si] = scores[fi, 0], per[fi, 0]
                continue
            idx = subsets[s][fi]
            head = full_head if f == 1.0 else fit(x_fit[idx], y_fit[idx])
            pr = part.probabilities(head, x_sel)
            scores[fi, si], per[fi, si] = part.score(y_sel, pr), part.per_label(y_sel, pr, len(classes))
            sizes[fi] += len(idx) / (1 if f == 1.0 else len(seeds))
    n_full = sizes[-1]
    mean = np.nanmean(scores, 1)
    pred = predict_curve(sizes, scores, [2 * n_full, 5 * n_full], seed=a.seed)
    early = [i for i, f in enumerate(fractions) if f <= 0.5]
    check = None
    if len(early) >= 3:
        law = fit_power_law(sizes[early], 1.0 - mean[early])
        check = {"fit_on": [fractions[i] for i in early], "predicted_full": round(float(1 - law_at(law, n_full)[0]), 4),
                 "measured_full": round(float(mean[-1]), 4)}
    label_mean = np.nanmean(per, 1).T  # [labels, fractions]
    ok = ~np.isnan(label_mean).any(1)
    gain = np.full(len(classes), np.nan)
    if ok.any():
        law = fit_power_law(sizes, 1.0 - label_mean[ok])
        gain[ok] = (1.0 - law_at(law, 2 * n_full)) - label_mean[ok, -1]
    order = [k for k in np.argsort(-np.nan_to_num(gain, nan=-1.0)) if gain[k] > GAIN_SATURATED][:3]
    gain_2x = pred["at"][0]["score"] - float(mean[-1])
    return {
        "metric": part.METRIC, "scored_on": source, "fractions": fractions, "n_train": [int(round(n)) for n in sizes],
        "seeds": len(seeds), "scores": [[round(float(v), 4) for v in row] for row in scores],
        "mean": [round(float(v), 4) for v in mean], "law": pred["law"] | {"form": "error = e_inf + b * n^-c"},
        "predicted": [{"multiple": m, **q} for m, q in zip((2, 5), pred["at"])],
        "check": check, "per_label": {c: {"mean": [round(float(v), 4) for v in label_mean[k]],
                                          "gain_2x": None if np.isnan(gain[k]) else round(float(gain[k]), 4)}
                                      for k, c in enumerate(classes)},
        "gain_most": [classes[k] for k in order], "saturated": bool(gain_2x < GAIN_SATURATED),
        "picture": "audit/learning_curve.png",
    }


def plot_curve(curve: dict, path: Path) -> None:
    """The learning curve: each seed's score and their mean per train size, the fitted law out to 5x the data with
    the predicted scores and their intervals; per label, the mean curves (thin)."""
    from tasks.plots import new_figure, save_png

    n = np.array(curve["n_train"], dtype=np.float64)
    fig, ax = new_figure((7, 4.5))
    for k, label in enumerate(curve["per_label"]):
        ax.plot(n, curve["per_label"][label]["mean"], lw=0.7, alpha=0.35, color=f"C{k % 10}")
    for i, row in enumerate(curve["scores"]):
        ax.scatter([n[i]] * len(row), row, s=10, color="0.4", zorder=3)
    ax.plot(n, curve["mean"], "o-", color="tab:blue", lw=2, label=f"{curve['metric']} (mean of {curve['seeds']} seeds)")
    law = curve["law"]
    grid = np.geomspace(n[0], 5 * n[-1], 100)
    ax.plot(grid, 1 - (law["e_inf"] + law["b"] * grid ** -law["c"]), "--", color="tab:red",
            label=f"fit: error = {law['e_inf']:.3f} + {law['b']:.2f} n^-{law['c']:.2f}")
    for q in curve["predicted"]:
        ax.errorbar([q["n"]], [q["score"]], yerr=[[q["score"] - q["low"]], [q["high"] - q["score"]]], fmt="s",
                    color="tab:red", capsize=4)
        ax.annotate(f"{q['multiple']}x: {q['score']:.3f}", (q["n"], q["score"]), textcoords="offset points",
                    xytext=(-10, 8), ha="right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"training images (scored on {curve['scored_on']})")
    ax.set_ylabel(curve["metric"])
    ax.set_title("how many images: the head refit on shares of train" + (" (saturated)" if curve["saturated"] else ""))
    ax.legend(loc="lower right", fontsize=8)
    save_png(fig, path)


class Clock:
    """Seconds per named step (reports/audit.json "timings_s")."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.laps[step] = round(now - self.last, 3)
        self.last = now


def pair(a, b, similarity: float, label_a, label_b) -> dict:
    differ = label_a != label_b
    kind = "leak" if a.split != b.split else "conflict" if differ else "near_duplicate"
    return {"a": a.path, "b": b.path, "split_a": a.split, "split_b": b.split, "label_a": label_a, "label_b": label_b,
            "similarity": round(float(similarity), 4), "kind": kind, "labels_differ": bool(differ),
            "exact": a.sha256 == b.sha256}


def _per_label(classes: list[str], values: np.ndarray) -> dict:
    return {c: None if np.isnan(v) else round(float(v), 4) for c, v in zip(classes, values)}


def _text(value) -> str:
    return "|".join(value) if isinstance(value, list) else str(value) if not isinstance(value, dict) else \
        ", ".join(f"{k}: {v:g}" for k, v in value.items())


def describe(r: AuditResult) -> str:
    rep = r.report
    if not rep.get("enabled"):
        return f"audit: skipped ({rep.get('reason')}) -> {r.path}"
    d, lc = rep["duplicates"]["counts"], rep["learning_curve"]
    nxt = lc["predicted"][0]
    return (f"audit: {rep['label_issues']['count']} label issue(s), {d['near_duplicate']} near-duplicate / "
            f"{d['leak']} leak / {d['conflict']} conflict pair(s), {rep['outliers']['count']} outlier(s); "
            f"{lc['metric']} {lc['mean'][-1]:.3f} now, {nxt['score']:.3f} [{nxt['low']:.3f}, {nxt['high']:.3f}] "
            f"predicted with 2x the images{' (saturated)' if lc['saturated'] else ''}; {r.seconds:.1f}s -> {r.path}")


def main() -> None:
    """The console script (tlcv-audit) and `python -m tasks.audit`."""
    stage_main("audit", run, describe)


if __name__ == "__main__":
    main()
