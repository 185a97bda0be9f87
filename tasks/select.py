"""Stage `select`: which pretrained backbone to start from, measured on the user's own data (reports/select.json).

Runs its probe when `backbone.name: auto` (the backbone stage then builds the choice), or on demand:
`python -m tasks.select --probe` (the report only; a fixed backbone.name stays the choice). For each
name in `select.candidates`:

  features      of a stratified, deterministic subsample of train (`select.max_images_per_class` per
                class, at most `select.max_fraction` of all images), in onnxruntime; cached per candidate
                under select/<name>/ (like the features stage)
  probe_acc     repeated k-fold (`select.repeats` x `select.folds`, stratified) accuracy of the default head:
                L-BFGS logistic regression, the train stage's own solver (tasks/head.py); mean, fold std, s.e.
  logme         LogME (You et al. 2021), a second, hyperparameter-free score (tasks/probe.py)
  cost          parameters, GFLOPs at the card's input size, onnxruntime latency at batch 1 (ms) and
                throughput at batch 32 (img/s) on this machine

The choice (auto): the most accurate candidate whose batch-1 latency is within `select.max_latency_ms`;
candidates within one standard error of its mean count as ties and the fastest of those wins.
Outputs: reports/select.json (every number, the choice and why), reports/select.png (probe accuracy
against latency, the Pareto front marked), select/ (per-candidate caches).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.cli import stage_main
from tasks.config import BackboneParams, Params, UserError
from tasks.files import atomic_files, atomic_path, read_json, sha256_file, write_json
from tasks.layout import Dataset, FeatureCache, Item, Layout, Progress
from tasks.preprocess import PreprocessingCard
from tasks.probe import count_flops, export_features_onnx, latency, logme, one_thread, paired_gap, probe_accuracy


class SelectError(UserError):
    """No candidate can be chosen (none available, none within the latency budget)."""


@dataclass(frozen=True)
class SelectResult:
    report: dict
    seconds: float


def subsample(dataset: Dataset, per_class: int, seed: int) -> list[Item]:
    """Up to `per_class` train items of each class, in hash order (adding images keeps the others' places)."""
    by_class: dict[str, list[Item]] = {}
    for it in dataset.split("train"):
        by_class.setdefault(it.label, []).append(it)
    out = []
    for c in dataset.classes:
        items = sorted(by_class.get(c, []), key=lambda it: hashlib.sha256(f"{seed}:{it.path}".encode()).hexdigest())
        out += items[:per_class]
    return out


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def prepare_candidate(name: str, params: Params, directory: Path) -> tuple[PreprocessingCard, Path, object, float]:
    """(card, features.onnx, network, seconds): weights fetched (and checked), the extractor exported once per weights."""
    import torch

    from tasks.network import freeze
    from tasks.pooled import FeatureExtractor
    from tasks.pretrained import fetch

    t0 = time.perf_counter()
    net, fields = fetch(BackboneParams(name=name, arch=params.backbone.arch, url=params.backbone.url))
    freeze(net)
    weights_sha = hashlib.sha256(b"".join(v.detach().cpu().contiguous().numpy().tobytes()
                                          for v in net.state_dict().values())).hexdigest()
    card_path, onnx_path = directory / "card.json", directory / "features.onnx"
    card = None
    if card_path.exists() and onnx_path.exists():
        stored = PreprocessingCard.from_dict(read_json(card_path))
        if stored.weights_sha256 == weights_sha and stored.extra.get("onnx_sha256") == sha256_file(onnx_path):
            card = stored
    if card is None:
        probe = PreprocessingCard(**{**fields, "feature_dim": 0})
        h, w = probe.input_size
        with torch.no_grad():
            dim = int(FeatureExtractor(net, probe).eval()(torch.zeros(1, h, w, 3, dtype=torch.uint8)).shape[1])
        card = PreprocessingCard(**{**fields, "feature_dim": dim, "weights_sha256": weights_sha})
        directory.mkdir(parents=True, exist_ok=True)
        export_features_onnx(FeatureExtractor(net, card).eval(), card.input_size, onnx_path)
        card = PreprocessingCard(**{**card.to_dict(), "extra": {**card.extra, "onnx_sha256": sha256_file(onnx_path)}})
        write_json(card_path, card.to_dict())
    return card, onnx_path, net, time.perf_counter() - t0


def class_ranks(dataset: Dataset, items: list[Item]) -> np.ndarray:
    """Each item's place in its class's hash order: the items with rank < k are `subsample(dataset, k, seed)`,
    in the same order, so a smaller first sample is a subset of the probe sample (its features are reused)."""
    seen: dict[str, int] = {}
    ranks = []
    for it in items:
        ranks.append(seen.get(it.label, 0))
        seen[it.label] = ranks[-1] + 1
    return np.array(ranks, dtype=np.int64)


def open_caches(candidates: list[dict], dataset: Dataset, items: list[Item]) -> np.ndarray:
    """Give each candidate "x" (features of the probe sample, NaN where not computed yet), "have" (rows computed)
    and "cached" from its cache under select/<name>/features (keyed by weights, preprocessing and the sample;
    a candidate dropped after the first round holds that round's rows only). Returns the labels y."""
    y = np.array([dataset.label_index(it) for it in items], dtype=np.int64)
    for c in candidates:
        card = c["card"]
        c["cache"] = FeatureCache(c["dir"] / "features")
        c["key"] = hashlib.sha256(json.dumps({"weights": card.weights_sha256, "preprocessing": card.preprocessing_dict(),
                                              "items": [(it.sha256, it.label) for it in items]},
                                             sort_keys=True).encode()).hexdigest()
        c["x"] = np.full((len(items), card.feature_dim), np.nan, dtype=np.float32)
        c["have"] = np.zeros(len(items), dtype=bool)
        c["computed"] = False
        if c["cache"].valid_key() == c["key"]:
            stored = c["cache"].load()
            rows = stored["rows"]
            c["x"][rows], c["have"][rows] = stored["x"], True
    return y


def save_caches(candidates: list[dict], y: np.ndarray, items: list[Item]) -> None:
    for c in candidates:
        if c["computed"]:
            rows = np.flatnonzero(c["have"])
            c["cache"].save(c["key"], {"x": c["x"][rows], "rows": rows, "y": y[rows]},
                            {"candidate": c["card"].arch, "images": len(items), "rows": len(rows)})


def fill_features(candidates: list[dict], dataset: Dataset, items: list[Item], rows: np.ndarray, params: Params,
                  clock: dict) -> None:
    """Compute every candidate's missing features among `rows` (indices into the probe sample).

    Each image is decoded once (at the largest resize a candidate that needs it wants) and every candidate's
    crop is cut from that one decode, in worker threads that run ahead of the network (the next batch is
    decoded and resized while onnxruntime runs this one). `clock` sums decode, resize (thread seconds) and each
    candidate's network seconds."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tasks.preprocess import decode_rgb, load_image

    need = [(i, [c for c in candidates if not c["have"][i]]) for i in rows]
    need = [(i, cs) for i, cs in need if cs]
    if not need:
        return
    lock = threading.Lock()

    def prepare(i: int, cs: list[dict]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        img = decode_rgb(dataset.resolve(items[i]), max(c["card"].resize_size for c in cs))
        t1 = time.perf_counter()
        crops = {c["name"]: load_image(img, c["card"]) for c in cs}
        t2 = time.perf_counter()
        with lock:
            clock["decode_s"] += t1 - t0
            clock["resize_s"] += t2 - t1
        return crops

    bs = params.features.batch_size
    chunks = [need[s : s + bs] for s in range(0, len(need), bs)]
    with ThreadPoolExecutor(params.features.decode_workers) as pool:
        submit = lambda chunk: [pool.submit(prepare, i, cs) for i, cs in chunk]  # noqa: E731
        ahead = [submit(chunks[0])] + ([submit(chunks[1])] if len(chunks) > 1 else [])
        for k, chunk in enumerate(chunks):
            futures = ahead.pop(0)
            crops = [f.result() for f in futures]
            if k + 2 < len(chunks):  # two batches in flight at most: bounded memory
                ahead.append(submit(chunks[k + 2]))
            for c in candidates:
                idx = [j for j, (_, cs) in enumerate(chunk) if any(cc is c for cc in cs)]
                if not idx:
                    continue
                t0 = time.perf_counter()
                batch = np.stack([crops[j][c["name"]] for j in idx])
                out = c["session"].run(["features"], {"images": batch})[0]
                clock["network_s"][c["name"]] = clock["network_s"].get(c["name"], 0.0) + time.perf_counter() - t0
                at = [chunk[j][0] for j in idx]
                c["x"][at], c["have"][at], c["computed"] = out, True, True


def score(c: dict, rows: np.ndarray, y: np.ndarray, num_classes: int, params: Params, clock: dict,
          repeats: int) -> dict:
    """Probe accuracy (repeated k-fold, with the fold scores) and LogME of one candidate on the sample rows."""
    sp = params.select
    x = c["x"][rows]
    t0 = time.perf_counter()
    with one_thread():
        scores = probe_accuracy(x, y[rows], num_classes, sp.l2, sp.feature_power, sp.folds, params.data.seed, repeats)
        scores["logme"] = round(logme(x, y[rows]), 4)
    seconds = time.perf_counter() - t0
    clock["cv_s"][c["name"]] = clock["cv_s"].get(c["name"], 0.0) + seconds
    return scores


def clearly_worse(rows: list[dict], images: int, margin_se: float, max_latency_ms: float | None) -> dict[str, str]:
    """name -> why, for the candidates of a first round that cannot win and stop there.

    Over the latency budget: cannot be chosen. Within it: the probe accuracy is below the best's (by probe
    accuracy, then LogME, as `choose`) by more than `margin_se` standard errors of the paired fold-score
    difference (same images, same folds; `paired_gap`). With 2 s.e. a candidate truly as good as the best is
    dropped about 2-3% of the time; one that is dropped would also have to gain that much on the rest of the
    sample to be chosen. `rows` need "name", "probe_acc", "logme", "fold_accs", "latency_ms_b1"."""
    fits = [r for r in rows if max_latency_ms is None or r["latency_ms_b1"] <= max_latency_ms]
    if not fits:
        return {}  # nothing to compare against: `choose` says so after the last round
    best = max(fits, key=lambda r: (r["probe_acc"], r["logme"]))
    out = {}
    for r in rows:
        if r is best:
            continue
        if r not in fits:
            out[r["name"]] = f"over select.max_latency_ms={max_latency_ms} ({r['latency_ms_b1']} ms at batch 1): cannot be chosen"
            continue
        gap, se = paired_gap(best["fold_accs"], r["fold_accs"], images)
        if gap > margin_se * se:
            out[r["name"]] = (f"probe {r['probe_acc']:.3f} on the first {images} images is {gap:.3f} below {best['name']} "
                              f"({best['probe_acc']:.3f}): {gap / se:.1f} paired standard errors ({se:.4f}), more than "
                              f"select.drop_margin_se={margin_se:g}")
    return out


def choose(rows: list[dict], max_latency_ms: float | None) -> dict:
    """The most accurate candidate within the latency budget; ties go to the fastest.

    A tie is a probe accuracy within one standard error of the best's mean (the uncertainty of the
    mean that is compared), not within one fold-to-fold standard deviation: on a 40-image-per-class
    probe one fold's std is 2-5 points, wider than the real differences, and that rule chose the
    cheapest candidate every time (hymenoptera: Lite0, 1.3 points below the best in the full run).
    """
    fits = [r for r in rows if max_latency_ms is None or r["latency_ms_b1"] <= max_latency_ms]
    if not fits:
        fastest = min(rows, key=lambda r: r["latency_ms_b1"])
        raise SelectError(f"no candidate within select.max_latency_ms={max_latency_ms}: the fastest, {fastest['name']}, "
                          f"takes {fastest['latency_ms_b1']} ms here; raise the budget or add a smaller candidate")
    best = max(fits, key=lambda r: (r["probe_acc"], r["logme"]))
    ties = [r for r in fits if r["probe_acc"] >= best["probe_acc"] - best["probe_se"]]
    pick = min(ties, key=lambda r: (r["latency_ms_b1"], -r["probe_acc"]))
    budget = f"within {max_latency_ms} ms at batch 1" if max_latency_ms is not None else "no latency budget"
    if pick is best:
        why = f"most accurate probe ({pick['probe_acc']:.3f} ± {pick['probe_se']:.3f} s.e.), {budget}"
    else:
        why = (f"probe {pick['probe_acc']:.3f} is within one standard error ({best['probe_se']:.3f}) of the most "
               f"accurate, {best['name']} ({best['probe_acc']:.3f}), and it is faster ({pick['latency_ms_b1']} vs "
               f"{best['latency_ms_b1']} ms); {budget}")
    return {"name": pick["name"], "reason": why}


def pareto_front(rows: list[dict]) -> list[str]:
    """Names of the candidates no other beats on both probe accuracy and latency."""
    return [r["name"] for r in rows if not any(
        o["probe_acc"] >= r["probe_acc"] and o["latency_ms_b1"] <= r["latency_ms_b1"]
        and (o["probe_acc"] > r["probe_acc"] or o["latency_ms_b1"] < r["latency_ms_b1"]) for o in rows)]


def plot(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    rows = report["candidates"]
    if rows:
        front = sorted((r for r in rows if r["name"] in report["pareto_front"]), key=lambda r: r["latency_ms_b1"])
        ax.plot([r["latency_ms_b1"] for r in front], [r["probe_acc"] for r in front], "--", color="gray",
                label="Pareto front")
        for r in rows:
            chosen = report.get("choice") and r["name"] == report["choice"]["name"]
            ax.errorbar(r["latency_ms_b1"], r["probe_acc"], yerr=r["probe_se"], fmt="*" if chosen else "o",
                        markersize=14 if chosen else 7, capsize=3)
            ax.annotate(r["name"] + (" (chosen)" if chosen else ""), (r["latency_ms_b1"], r["probe_acc"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)
        if report["max_latency_ms"] is not None:
            ax.axvline(report["max_latency_ms"], color="red", linestyle=":", label="select.max_latency_ms")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, report.get("note", "no candidates probed"), ha="center", va="center", wrap=True)
    ax.set_xlabel("onnxruntime latency, batch 1 (ms, this machine)")
    ax.set_ylabel("probe accuracy (repeated k-fold, mean ± s.e.)")
    ax.set_title("backbone candidates on a subsample of train")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def run(params: Params, layout: Layout, progress: Progress | None = None, probe: bool = False) -> SelectResult:
    """Probe every candidate (when backbone.name is auto, or `probe`) and write the choice with its reason."""
    t0 = time.perf_counter()
    sp = params.select
    auto = params.backbone.name == "auto"
    report: dict = {"auto": auto, "max_latency_ms": sp.max_latency_ms, "candidates": [], "skipped": [],
                    "pareto_front": [], "choice": None}
    if not auto and not probe:
        # Deterministic content (no timings): an unchanged report leaves the backbone stage (its DVC dep) current.
        report.update(choice={"name": params.backbone.name, "reason": "backbone.name is set in params.yaml"},
                      note=f"not probed: backbone.name is {params.backbone.name!r} (auto probes; or python -m tasks.select --probe)")
        layout.select_dir.mkdir(parents=True, exist_ok=True)  # the DVC out exists either way
        (layout.select_dir / "README.txt").write_text("Per-candidate caches of the select stage (tasks/select.py).\n")
    else:
        import onnxruntime  # noqa: F401 - fail early, before any download, if the runtime is missing

        from tasks.runtime import open_session

        dataset = layout.dataset()
        # Per class: the cap, or less when that would be more than max_fraction of the data per candidate.
        per_class = min(sp.max_images_per_class,
                        max(2, int(sp.max_fraction * len(dataset.items) / max(len(dataset.classes), 1))))
        items = subsample(dataset, per_class, params.data.seed)
        report.update(images=len(items), per_class=per_class, folds=sp.folds, repeats=sp.repeats,
                      classes=len(dataset.classes))
        setup_s = cost_s = 0.0
        ready = []
        for name in sp.candidates:
            directory = layout.select_dir / safe_name(name)
            try:
                card, onnx_path, net, seconds = prepare_candidate(name, params, directory)
            except UserError as exc:  # weights not reachable here: skipped, and said so
                print(f"select: skipping {name}: {exc}", file=sys.stderr)
                report["skipped"].append({"name": name, "reason": str(exc)})
                continue
            setup_s += seconds
            # no idle spinning: onnxruntime's threads would otherwise busy-wait through the probe's own compute
            session, _ = open_session(onnx_path, device="cpu", spinning=False)
            t2 = time.perf_counter()
            # Cost first: the latency budget is known before the first round (over it: dropped there), and the
            # session's one-time warm-up (memory arena, first run) is not counted as probe time.
            cost = {"params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
                    "gflops": round(count_flops(net, card.input_size) / 1e9, 3), **latency(session, card.input_size)}
            cost_s += time.perf_counter() - t2
            ready.append({"name": name, "dir": directory, "card": card, "session": session, "cost": cost})
        if not ready:
            raise SelectError(f"none of select.candidates {sp.candidates} could be loaded: "
                              + "; ".join(f"{s['name']}: {s['reason']}" for s in report["skipped"]))
        # Successive halving: every candidate on a first sample (the first `first_images_per_class` of each class's
        # probe images), the clearly worse stop there, the rest go on to the whole probe sample.
        rank = class_ranks(dataset, items)
        first = sp.first_images_per_class
        halving = len(ready) > 1 and 0 < first < per_class
        samples = [np.flatnonzero(rank < first), np.arange(len(items))] if halving else [np.arange(len(items))]
        clock: dict = {"decode_s": 0.0, "resize_s": 0.0, "network_s": {}, "cv_s": {}}
        y = open_caches(ready, dataset, items)
        for c in ready:
            c["cached"] = bool(c["have"].all())
        features_s = 0.0
        alive, rows_of, rounds = list(ready), {}, []
        for k, sample in enumerate(samples):
            t1 = time.perf_counter()
            fill_features(alive, dataset, items, sample, params, clock)
            features_s += time.perf_counter() - t1
            last = k + 1 == len(samples)
            # The first round is a screen: one k-fold (its fits cost as much as the whole sample's, whatever its
            # size); the last round repeats it select.repeats times, as the choice's standard errors need.
            for c in alive:
                rows_of[c["name"]] = {"name": c["name"], **score(c, sample, y, len(dataset.classes), params, clock,
                                                                 sp.repeats if last else 1),
                                      "latency_ms_b1": c["cost"]["latency_ms_b1"], "probe_images": len(sample)}
            this = {"images": len(sample), "repeats": sp.repeats if last else 1, "candidates": [c["name"] for c in alive]}
            if not last:
                drop = clearly_worse([rows_of[c["name"]] for c in alive], len(sample), sp.drop_margin_se,
                                     sp.max_latency_ms)
                this["dropped"] = drop
                for name, why in drop.items():
                    rows_of[name]["dropped"] = {"after_images": len(sample), "reason": why}
                alive = [c for c in alive if c["name"] not in drop]
            rounds.append(this)
        save_caches(ready, y, items)
        for i, c in enumerate(ready):
            card, r = c["card"], rows_of[c["name"]]
            r.pop("fold_accs")
            report["candidates"].append({
                "name": c["name"], "arch": card.arch, "input_size": list(card.input_size), "feature_dim": card.feature_dim,
                **{k: v for k, v in r.items() if k not in ("name", "latency_ms_b1", "dropped")}, **c["cost"],
                "dropped": r.get("dropped"), "features_cached": c["cached"],
                "cv_s": round(clock["cv_s"].get(c["name"], 0.0), 2)})
            if progress:
                progress(i + 1, len(ready))
        cv_s = sum(clock["cv_s"].values())
        probe_s = features_s + cv_s
        report["halving"] = {
            "first_images_per_class": first if halving else None, "drop_margin_se": sp.drop_margin_se, "rounds": rounds,
            "note": ("every candidate on the first sample; those more than select.drop_margin_se paired standard "
                     "errors below the best stop there, the rest go on to the whole probe sample" if halving else
                     "one round: " + ("one candidate" if len(ready) == 1 else
                                      f"select.first_images_per_class={first} is 0 or not below {per_class}"))}
        report["probe_time"] = {"decode_s": round(clock["decode_s"], 2), "resize_s": round(clock["resize_s"], 2),
                                "network_s": {k: round(v, 2) for k, v in clock["network_s"].items()},
                                "cv_s": {k: round(v, 2) for k, v in clock["cv_s"].items()},
                                "note": "decode and resize: summed over the worker threads, which run while the "
                                        "network does; features_s is the wall time of both"}
        finalists = [r for r in report["candidates"] if not r["dropped"]]
        report["pareto_front"] = pareto_front(finalists)
        report.update(probe_s=round(probe_s, 2), features_s=round(features_s, 2), cv_s=round(cv_s, 2),
                      setup_s=round(setup_s, 2), cost_s=round(cost_s, 2))
        if auto:
            report["choice"] = choose(finalists, sp.max_latency_ms)
        else:
            report["choice"] = {"name": params.backbone.name, "reason": "backbone.name is set in params.yaml"}
            report["would_choose"] = choose(finalists, sp.max_latency_ms)
        report["seconds"] = round(time.perf_counter() - t0, 2)
    with atomic_files(layout.reports) as tmp:
        write_json(tmp / layout.select_report.name, report)
        plot(report, tmp / layout.select_plot.name)
    return SelectResult(report, time.perf_counter() - t0)


def describe(r: SelectResult) -> str:
    rep = r.report
    lines = [f"select: {rep['choice']['name']} ({rep['choice']['reason']}), {r.seconds:.1f}s"]
    for c in rep["candidates"]:
        lines.append(f"  {c['name']:<22} probe {c['probe_acc']:.3f} ± {c['probe_se']:.3f} s.e. (fold std {c['probe_std']:.3f})  LogME {c['logme']:+.3f}  "
                     f"{c['latency_ms_b1']:.1f} ms b1, {c['throughput_b32']:.0f} img/s b32, {c['gflops']:.2f} GFLOPs, "
                     f"{c['params_m']:.1f} M params")
    for s in rep["skipped"]:
        lines.append(f"  {s['name']:<22} skipped: {s['reason']}")
    return "\n".join(lines)


def main() -> None:
    """The console script (tlcv-...) and `python -m tasks.select`."""
    stage_main("select", lambda params, layout: run(params, layout, probe="--probe" in sys.argv[1:]), describe)


if __name__ == "__main__":
    main()
