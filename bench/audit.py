"""Does the audit find what is wrong with a dataset, and what does it cost? One run, known faults injected.

    python bench/audit.py ../shared/datasets/hymenoptera
    python bench/audit.py digits        # + the learning-curve check and class_weights on an imbalanced copy

The data is copied (digits: the demo's images, split 70/15/15 into train/ val/ test/ folders), then, with a
seed: 10% of the images get a wrong label (moved to another class folder), and 10 training images get a
near-duplicate in another split (re-encoded JPEG quality 70, resized to 85%, 4% cropped off each side: a leak).
The pipeline's stage functions run in one process (prepare and backbone untimed); the audit's label issues are
scored at k = the number flipped (its ranking, reports/audit/label_scores.csv), its pairs against the injected
copies. audit_share = audit_s / (features_s + train_s + evaluate_s).

digits also prints: the learning curve's check (the law fitted on <= 50% of train predicting the measured full
score), and `classification.class_weights: balanced` against `none` on a copy with one class cut to 10% of its
training images (that class's recall, the macro recall, on the test split). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

SPLITS = ("train", "val", "test")


def copy_dataset(source: str, dest: Path) -> None:
    """dest/<split>/<class>/<file> from an image folder with split folders, or from the digits demo."""
    if source == "digits":
        from tasks.classification.data import write_digits

        flat = dest.parent / "digits-flat"
        write_digits(flat)
        for f in sorted(flat.rglob("*.png")):
            h = int(hashlib.sha256(f.name.encode()).hexdigest(), 16) % 100
            split = "train" if h < 70 else "val" if h < 85 else "test"
            (dest / split / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.move(f, dest / split / f.parent.name / f.name)
        shutil.rmtree(flat)
        return
    root = Path(source)
    if not (root / "train").is_dir():
        sys.exit(f"{root} has no train/ folder (the shared hymenoptera set lives in ../shared/datasets/)")
    for split in SPLITS:
        if (root / split).is_dir():
            shutil.copytree(root / split, dest / split)


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def inject(root: Path, seed: int, flip_share: float = 0.1, copies: int = 10) -> tuple[set[str], list[tuple[str, str]]]:
    """(relative paths of flipped images, [(source, copy)] near-duplicate pairs across splits)."""
    rng = random.Random(seed)
    all_files = files(root)
    classes = sorted({p.parent.name for p in all_files})
    flipped: set[str] = set()
    for p in rng.sample(all_files, round(flip_share * len(all_files))):
        other = rng.choice([c for c in classes if c != p.parent.name])
        target = p.parent.parent / other / p.name
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        p.rename(target)
        flipped.add(target.relative_to(root).as_posix())
    pairs = []
    train = [p for p in files(root / "train") if p.relative_to(root).as_posix() not in flipped]
    for i, src in enumerate(rng.sample(train, copies)):
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            im = im.crop((round(0.04 * w), round(0.04 * h), round(0.96 * w), round(0.96 * h)))
            im = im.resize((max(8, round(0.85 * im.width)), max(8, round(0.85 * im.height))), Image.Resampling.BICUBIC)
            out = root / "val" / src.parent.name / f"nearcopy{i:02d}_{src.stem}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            im.save(out, quality=70)
        pairs.append((src.relative_to(root).as_posix(), out.relative_to(root).as_posix()))
    return flipped, pairs


def run_pipeline(data_root: Path, work: Path, overrides: dict | None = None, audit: bool = True) -> dict:
    from tasks import audit as audit_stage
    from tasks import backbone, data, evaluate, features, train
    from tasks.config import parse_params
    from tasks.layout import Layout

    params = parse_params({"data": {"dataset": "imagefolder", "root": str(data_root)}, **(overrides or {})})
    layout = Layout(work)
    data.run(params, layout)
    backbone.run(params, layout)
    times = {}
    t = time.perf_counter()
    features.run(params, layout, force=True)
    times["features_s"] = time.perf_counter() - t
    if audit:
        t = time.perf_counter()
        audited = audit_stage.run(params, layout)
        times["audit_s"] = time.perf_counter() - t
        print(audit_stage.describe(audited), file=sys.stderr)
    t = time.perf_counter()
    train.run(params, layout)
    times["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ev = evaluate.run(params, layout)
    times["evaluate_s"] = time.perf_counter() - t
    return {"layout": layout, "metrics": ev.metrics, **times}


def per_class_recall(layout) -> dict[str, float]:
    with open(layout.evaluation / "per_class.csv", newline="") as f:
        return {r["class"]: float(r["recall"]) for r in csv.DictReader(f)}


def class_weights_arm(source: Path, work: Path, minority: str, seed: int) -> dict:
    """One class cut to 10% of its training images; classification.class_weights none vs balanced."""
    cut = work / "imbalanced"
    shutil.copytree(source, cut)
    members = sorted((cut / "train" / minority).iterdir())
    for p in random.Random(seed).sample(members, len(members) - max(2, round(0.1 * len(members)))):
        p.unlink()
    out = {"minority": minority, "minority_train_images": len(list((cut / "train" / minority).iterdir()))}
    for weights in ("none", "balanced"):
        run = run_pipeline(cut, work / f"cw-{weights}", {"classification": {"class_weights": weights}}, audit=False)
        recall = per_class_recall(run["layout"])
        out[f"minority_recall_{weights}"] = round(recall[minority], 4)
        out[f"macro_recall_{weights}"] = round(sum(recall.values()) / len(recall), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="an image folder with train/ (and val/) of class folders, or 'digits'")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        tmp = Path(tmp)
        clean = tmp / "clean"
        copy_dataset(args.data, clean)
        faulty = tmp / "faulty"
        shutil.copytree(clean, faulty)
        flipped, copies = inject(faulty, args.seed)
        run = run_pipeline(faulty, tmp / "work", {"audit": {"max_listed": 10}})
        layout = run["layout"]
        with open(layout.audit_dir / "label_scores.csv", newline="") as f:
            ranked = [r["path"] for r in csv.DictReader(f)]  # most suspect first
        top = set(ranked[: len(flipped)])
        hits = len(top & flipped)
        with open(layout.audit_dir / "pairs.csv", newline="") as f:
            found = [frozenset((r["a"], r["b"])) for r in csv.DictReader(f)]
        injected = {frozenset(c) for c in copies}
        copy_files = {c[1] for c in copies}
        report = json.loads(layout.audit_report.read_text())
        pipeline_s = run["features_s"] + run["train_s"] + run["evaluate_s"]
        result = {
            "bench": "audit", "data": args.data, "images": sum(report["images"].values()),
            "flipped": len(flipped), "label_precision": round(hits / max(len(top), 1), 4),
            "label_recall": round(hits / max(len(flipped), 1), 4),
            "cleanlab_issue_count": report["label_issues"]["count"],
            "dup_injected": len(injected), "dup_recall": round(len(injected & set(found)) / len(injected), 4),
            "false_pairs": sum(1 for pr in found if pr not in injected and not (pr & copy_files)),
            "pairs_found": len(found), "duplicate_threshold": report["duplicates"]["threshold"],
            "leak_effect": report["duplicates"]["leak_effect"],
            "audit_s": round(run["audit_s"], 3), "pipeline_s": round(pipeline_s, 3),
            "audit_share": round(run["audit_s"] / pipeline_s, 4),
            **{k: round(run[k], 3) for k in ("features_s", "train_s", "evaluate_s")},
            "accuracy": run["metrics"]["accuracy"],
            "learning_curve": {k: report["learning_curve"][k] for k in ("n_train", "mean", "predicted", "check",
                                                                          "saturated", "gain_most")},
        }
        check = report["learning_curve"]["check"]
        if check:
            result["curve_check_error_points"] = round(100 * abs(check["predicted_full"] - check["measured_full"]), 2)
        if args.data == "digits":
            result["class_weights"] = class_weights_arm(clean, tmp / "cw", "3", args.seed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
