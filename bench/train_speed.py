"""This pipeline vs the reference fine-tuning loop, same data, same backbone, one run.

    python bench/train_speed.py ../shared/datasets/hymenoptera [--epochs 10]

The reference is the recipe as it is usually written (the PyTorch transfer-learning
tutorial's shape): torchvision ImageFolder + RandomResizedCrop/flip, model.train(),
all backbone parameters frozen, a new Linear head, Adam(lr=1e-3), cross-entropy,
10 epochs with a full backbone forward every epoch, then one val pass. It gets the
backbone's own mean/std (the kind reading of "usually").

The pipeline is this project's features + train + evaluate stage functions with the
default params, on the dataset's own train/val split (prepare and backbone run first,
untimed; their times are printed too). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_page_cache(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            p.read_bytes()


def run_pipeline(data_root: Path, work: Path) -> dict:
    from tasks import backbone as backbone_stage
    from tasks import data, evaluate, features, train
    from tasks.config import parse_params
    from tasks.layout import Layout

    params = parse_params({"data": {"dataset": "imagefolder", "root": str(data_root)}})
    layout = Layout(work)
    t = time.perf_counter()
    prep = data.run(params, layout)
    prepare_s = time.perf_counter() - t
    backbone = backbone_stage.run(params, layout)

    t0 = time.perf_counter()
    feats = features.run(params, layout, force=True)
    t1 = time.perf_counter()
    trained = train.run(params, layout)
    t2 = time.perf_counter()
    ev = evaluate.run(params, layout)
    t3 = time.perf_counter()
    return {
        "pipeline_s": t3 - t0, "features_s": t1 - t0, "train_s": t2 - t1, "evaluate_s": t3 - t2,
        "features_img_s": feats.images_per_s, "features_engine": feats.engine,
        "prepare_s": prepare_s, "backbone_s": backbone.seconds, "skipped_images": prep.skipped,
        "pipeline_acc": ev.metrics["accuracy"], "pipeline_eval_split": ev.metrics["eval_split"],
        **{k: trained.summary[k] for k in ("solver", "l2", "best_epoch", "selection")},
        "card": backbone.card, "layout": layout,
    }


def run_reference(data_root: Path, layout, epochs: int, batch_size: int, workers: int) -> dict:
    from torchvision import datasets, transforms

    from tasks.pooled import load_feature_extractor

    extractor = load_feature_extractor(layout)
    card = extractor.card
    normalize = transforms.Normalize(card.mean, card.std)
    interp = transforms.InterpolationMode(card.interpolation)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(card.input_size, interpolation=interp),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(card.resize_size, interpolation=interp),
                                 transforms.CenterCrop(card.input_size), transforms.ToTensor(), normalize])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    train_set = datasets.ImageFolder(str(data_root / "train"), train_tf)
    val_set = datasets.ImageFolder(str(data_root / "val"), val_tf)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=workers)

    model = extractor.network  # the same pretrained network, its classifier replaced below
    for p in model.parameters():
        p.requires_grad = False
    model.classifier = nn.Linear(card.feature_dim, len(train_set.classes))
    opt = torch.optim.Adam(model.classifier.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()  # as usually written: BatchNorm statistics drift although the weights are "frozen"
        for x, y in train_loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        print(f"reference: epoch {epoch + 1}/{epochs} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)",
              file=sys.stderr, flush=True)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return {"reference_s": time.perf_counter() - t0, "reference_acc": correct / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="an image folder with train/ and val/ of class folders")
    ap.add_argument("--epochs", type=int, default=10, help="reference epochs (the recipe: 10)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reference DataLoader workers")
    args = ap.parse_args()
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        sys.exit(f"{args.data} has no train/ and val/ folders (the shared hymenoptera set lives in ../shared/datasets/; "
                 f"it is not in a fresh clone)")
    warm_page_cache(args.data)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        pipe = run_pipeline(args.data, Path(tmp))
        pipeline_rss = peak_rss_mb()
        ref = run_reference(args.data, pipe["layout"], args.epochs, args.batch_size, args.workers)
    card = pipe.pop("card")
    pipe.pop("layout")
    result = {
        "speedup": round(ref["reference_s"] / pipe["pipeline_s"], 2),
        "pipeline_acc": round(pipe["pipeline_acc"], 4),
        "reference_acc": round(ref["reference_acc"], 4),
        "pipeline_s": round(pipe["pipeline_s"], 2),
        "reference_s": round(ref["reference_s"], 2),
        "peak_rss_mb": round(pipeline_rss, 1),
        "peak_rss_mb_with_reference": round(peak_rss_mb(), 1),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in pipe.items() if k not in ("pipeline_s", "pipeline_acc")},
        "backbone": card.arch, "threads": torch.get_num_threads(), "reference_workers": args.workers,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
