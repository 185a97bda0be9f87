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
from tasks.probe import count_flops, export_features_onnx, latency, logme, one_thread, probe_accuracy


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


def subsample_features(candidates: list[dict], dataset: Dataset, items: list[Item], params: Params) -> float:
    """Fill each candidate's "x" (features of the subsample) from its cache under select/<name>/features, or
    compute them: each image is decoded once (at the largest resize any candidate needs) and every
    candidate's crop is cut from that one decode; big JPEGs make decoding most of the cost. Returns seconds."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.preprocess import decode_rgb, load_image

    t0 = time.perf_counter()
    y = np.array([dataset.label_index(it) for it in items], dtype=np.int64)
    todo = []
    for c in candidates:
        card = c["card"]
        c["cache"] = FeatureCache(c["dir"] / "features")
        c["key"] = hashlib.sha256(json.dumps({"weights": card.weights_sha256, "preprocessing": card.preprocessing_dict(),
                                              "items": [(it.sha256, it.label) for it in items]},
                                             sort_keys=True).encode()).hexdigest()
        c["cached"] = c["cache"].valid_key() == c["key"]
        if c["cached"]:
            c["x"] = c["cache"].load()["x"]
        else:
            todo.append(c)
            c["parts"] = []
    if todo:
        side = max(c["card"].resize_size for c in todo)
        paths = [dataset.resolve(it) for it in items]
        bs = params.features.batch_size
        with ThreadPoolExecutor(params.features.decode_workers) as pool:
            for start in range(0, len(paths), bs):
                images = list(pool.map(lambda p: decode_rgb(p, side), paths[start : start + bs]))
                for c in todo:
                    batch = np.stack([load_image(img, c["card"]) for img in images])
                    c["parts"].append(c["session"].run(["features"], {"images": batch})[0])
        for c in todo:
            c["x"] = np.concatenate(c.pop("parts")).astype(np.float32)
            c["cache"].save(c["key"], {"x": c["x"], "y": y}, {"candidate": c["card"].arch, "images": len(items)})
    for c in candidates:
        c["y"] = y
    return time.perf_counter() - t0


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
        setup_s = cost_s = cv_s = 0.0
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
            ready.append({"name": name, "dir": directory, "card": card, "net": net, "session": session})
        features_s = subsample_features(ready, dataset, items, params) if ready else 0.0
        for i, c in enumerate(ready):
            card, x, y = c["card"], c["x"], c["y"]
            t1 = time.perf_counter()
            with one_thread():
                scores = probe_accuracy(x, y, len(dataset.classes), sp.l2, sp.feature_power, sp.folds, params.data.seed,
                                        sp.repeats)
                score_logme = logme(x, y)
            cv_s += time.perf_counter() - t1
            t2 = time.perf_counter()
            cost = {"params_m": round(sum(p.numel() for p in c["net"].parameters()) / 1e6, 3),
                    "gflops": round(count_flops(c["net"], card.input_size) / 1e9, 3),
                    **latency(c["session"], card.input_size)}
            cost_s += time.perf_counter() - t2
            report["candidates"].append({
                "name": c["name"], "arch": card.arch, "input_size": list(card.input_size), "feature_dim": card.feature_dim,
                **scores, "logme": round(score_logme, 4), **cost, "features_cached": c["cached"],
                "cv_s": round(t2 - t1, 2)})
            if progress:
                progress(i + 1, len(ready))
        probe_s = features_s + cv_s
        if not report["candidates"]:
            raise SelectError(f"none of select.candidates {sp.candidates} could be loaded: "
                              + "; ".join(f"{s['name']}: {s['reason']}" for s in report["skipped"]))
        report["pareto_front"] = pareto_front(report["candidates"])
        report.update(probe_s=round(probe_s, 2), features_s=round(features_s, 2), cv_s=round(cv_s, 2),
                      setup_s=round(setup_s, 2), cost_s=round(cost_s, 2))
        if auto:
            report["choice"] = choose(report["candidates"], sp.max_latency_ms)
        else:
            report["choice"] = {"name": params.backbone.name, "reason": "backbone.name is set in params.yaml"}
            report["would_choose"] = choose(report["candidates"], sp.max_latency_ms)
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
