"""Classification data: class folders (an image folder, or train/ val/ [test/] of class folders), the digits demo
and CIFAR, as manifest items whose label is the class name."""

from __future__ import annotations

import os
import stat
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.config import DataParams, Params
from tasks.imagefiles import (
    MAX_FILE_BYTES, DataError, Prepared, check_images, inside, is_utf8, printable, refusal,
)
from tasks.layout import SPLITS, Item, Layout, _order_key, stratified_split


def prepare(params: Params, layout: Layout, tmp: Path, skipped: list[dict]) -> Prepared:
    """imagefolder reads data.root in place; digits and CIFAR are written as class folders into tmp/images
    (which becomes data/prepared/images)."""
    p = params.data
    if p.dataset == "imagefolder":
        root, root_str = Path(p.root), p.root
    else:
        root, root_str = tmp / "images", str(layout.prepared / "images")
        if p.dataset == "digits":
            write_digits(root)
        else:
            write_cifar(p.dataset, p, root)
    items, classes, report = build_manifest(root, p, skipped, layout.prepare_report)
    if p.dataset in ("cifar10", "cifar100"):
        items = split_off_val(items, p)
    per_class = {c: {s: sum(1 for it in items if it.split == s and it.label == c) for s in SPLITS} for c in classes}
    return Prepared(items, classes, root_str, per_class, report)


def scan_class_dirs(root: Path, base: Path, root_real: Path, skipped: list[dict]) -> tuple[dict[str, list[Path]], list[str]]:
    """Class name -> candidate files under base/<class>/ (recursively), and the class folders that hold no files.

    Refused here and never opened, each reported in `skipped` (paths relative to `root`): entries that
    escape the root, names that are not UTF-8, anything that is not a regular file (a FIFO would block
    the read forever). A class whose files were all refused is still a class (with no usable images).
    """

    def skip(path: Path, reason: str, label: str | None = None, folder: bool = False) -> None:
        entry: dict = {"path": printable(path.relative_to(root)) + ("/" if folder else "")}
        if label is not None:
            entry["label"] = label
        skipped.append({**entry, "reason": reason})

    found: dict[str, list[Path]] = {}
    empty: list[str] = []
    for class_dir in sorted(p for p in base.iterdir() if not p.name.startswith(".")):
        if class_dir.is_symlink() and not inside(class_dir.resolve(), root_real):
            skip(class_dir, "symlink points outside the dataset root")
            continue
        if not class_dir.is_dir():
            continue
        if not is_utf8(class_dir.name):
            skip(class_dir, "class folder name is not valid UTF-8: rename it", folder=True)
            continue
        label = class_dir.name
        files: list[Path] = []
        entries = 0  # visible entries, refused ones included: none at all means an empty class
        errors: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(class_dir, onerror=errors.append, followlinks=False):
            keep = []
            for d in sorted(d for d in dirnames if not d.startswith(".")):
                sub = Path(dirpath, d)
                if sub.is_symlink():
                    skip(sub, "symlinked directory not followed", label, folder=True)
                    entries += 1
                elif not is_utf8(d):
                    skip(sub, "folder name is not valid UTF-8: rename it", label, folder=True)
                    entries += 1
                else:
                    keep.append(d)
            dirnames[:] = keep
            for name in sorted(n for n in filenames if not n.startswith(".")):
                entries += 1
                p = Path(dirpath, name)
                if not is_utf8(name):
                    skip(p, "file name is not valid UTF-8: rename it", label)
                    continue
                if p.is_symlink() and not inside(p.resolve(), root_real):
                    skip(p, "symlink points outside the dataset root", label)
                    continue
                try:
                    st = os.stat(p)  # through a symlink (one inside the root): what would be read
                except OSError as exc:
                    skip(p, f"unreadable: {exc.strerror or exc}", label)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    skip(p, refusal(st, MAX_FILE_BYTES) or "", label)  # "not a regular file (fifo)"
                    continue
                files.append(p)
        for exc in errors:
            skip(Path(exc.filename or class_dir), f"unreadable folder: {exc.strerror or exc}", label, folder=True)
        entries += len(errors)
        if entries:
            found[label] = files
        else:
            empty.append(label)
    return found, empty


def build_manifest(root: Path, params: DataParams, skipped: list[dict], report_path: Path) -> tuple[list[Item], list[str], dict]:
    """Scan an image folder (class folders, or train/val/test of class folders) into manifest items.

    Skipped files are appended to `skipped` as they are found, so the report exists even when this fails.
    The returned dict (duplicates, empty class folders) joins the report.
    """
    if not root.is_dir():
        raise DataError(
            f"dataset root {root} is not a directory. Set data.root to a folder of class sub-folders "
            f"(or of train/ val/ test/ each holding class sub-folders)."
        )
    root_real = root.resolve()
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    presplit = "train" in split_dirs and len(split_dirs) >= 2
    candidates: list[tuple[str, str, str | None]] = []  # (rel path, label, split or None)
    classes: set[str] = set()
    empty_dirs: list[tuple[Path, str]] = []
    for split, base in (split_dirs.items() if presplit else [(None, root)]):
        found, empty = scan_class_dirs(root, base, root_real, skipped)
        classes.update(found)
        empty_dirs += [(base / label, label) for label in empty]
        for label, files in found.items():
            candidates += [(p.relative_to(root).as_posix(), label, split) for p in files]
    # An empty class folder is no class (reported); a class empty in one split only is still a class.
    empty_classes = sorted({label for _, label in empty_dirs} - classes)
    skipped += [{"path": printable(d.relative_to(root)) + "/", "label": label, "reason": "class folder holds no files"}
                for d, label in empty_dirs if label in empty_classes]
    labels = sorted(classes)
    if not labels and not empty_classes:
        raise DataError(f"no files found under {root}: expected class sub-folders holding images")
    if len(labels) < 2:
        found_ = f"only {', '.join(map(repr, labels))}" if labels else "none"
        why = f"; empty class folder(s) {', '.join(map(repr, empty_classes))} hold no files" if empty_classes else ""
        raise DataError(
            f"need at least 2 classes (class sub-folders holding images) under {root}, found {found_}{why}. "
            f"See {report_path}"
        )

    checks = check_images([root / rel for rel, _, _ in candidates])

    good: list[tuple[str, str, str | None, str]] = []
    for (rel, label, split), (sha, reason) in zip(candidates, checks):
        if reason:
            skipped.append({"path": rel, "label": label, "reason": reason})
        else:
            good.append((rel, label, split, sha))

    counts = Counter(label for _, label, _, _ in good)
    too_few = [c for c in labels if counts[c] < params.min_images_per_class]
    if too_few:
        detail = ", ".join(f"{c!r}: {counts[c]}" for c in too_few)
        raise DataError(
            f"too few usable images in class(es) {detail}; need at least {params.min_images_per_class} "
            f"(data.min_images_per_class). {len(skipped)} file(s) were skipped: see the reasons in "
            f"{report_path}"
        )

    if not presplit:
        by_label: dict[str, list[str]] = defaultdict(list)
        for rel, label, _, _ in good:
            by_label[label].append(rel)
        assignment: dict[str, str] = {}
        for rels in by_label.values():
            assignment.update(stratified_split(rels, params.val_fraction, params.test_fraction, params.seed))
        good = [(rel, label, assignment[rel], sha) for rel, label, _, sha in good]

    items = [Item(rel, label, split, sha) for rel, label, split, sha in good]  # type: ignore[arg-type]
    items = cap_per_class(items, params.max_images_per_class, params.seed)
    if not any(it.split == "train" for it in items):
        raise DataError(f"no training images under {root}")
    return items, labels, {"empty_classes": empty_classes}


def cap_per_class(items: list[Item], cap: int | None, seed: int) -> list[Item]:
    if cap is None:
        return items
    groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for it in items:
        groups[(it.split, it.label)].append(it)
    keep = set()
    for group in groups.values():
        keep.update(it.path for it in sorted(group, key=lambda i: _order_key(seed, i.path))[:cap])
    return [it for it in items if it.path in keep]


def write_digits(images_dir: Path) -> None:
    """scikit-learn's 1797 bundled 8x8 handwritten digits as 96x96 PNG class folders.

    Dark ink on white, a 2-pixel margin (the centre crop would cut ink at the edge),
    upsampled 8x with bicubic so an ImageNet net sees strokes, not a pixel grid:
    test accuracy of a linear probe 0.91 (raw 8x8) -> 0.97 (this), measured on Lite0 features.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (img, target) in enumerate(zip(digits.images, digits.target)):
        pixels = np.pad(255 - np.round(img * (255.0 / 16.0)).astype(np.uint8), 2, constant_values=255)
        out = images_dir / str(target) / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").resize((96, 96), Image.Resampling.BICUBIC).save(out)


def cifar_class(name: str, url: str | None):
    """torchvision's CIFAR dataset class, pointed at a mirror when one is given (checksums stay)."""
    from torchvision import datasets

    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    if url is None:
        return base
    return type(f"Mirrored{base.__name__}", (base,), {"url": url})


def download_cifar(name: str, download_dir: Path, url: str | None):
    cls = cifar_class(name, url)
    download_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cls(str(download_dir), train=True, download=True), cls(str(download_dir), train=False, download=True)
    except (OSError, RuntimeError) as exc:
        raise DataError(
            f"could not get {name} from {cls.url}: {exc}. For offline use, place {cls.filename} "
            f"(md5 {cls.tgz_md5}) in {download_dir.resolve()}/ and run again, or set data.download_url to a mirror."
        ) from exc


def write_cifar(name: str, params: DataParams, images_dir: Path) -> None:
    train, test = download_cifar(name, Path(params.download_dir), params.download_url)
    for split, ds in (("train", train), ("test", test)):
        for i, (pixels, target) in enumerate(zip(ds.data, ds.targets)):
            out = images_dir / split / ds.classes[target] / f"{i:05d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(out)


def split_off_val(items: list[Item], params: DataParams) -> list[Item]:
    """Pre-split data with train/test only: carve val out of train, stratified."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for it in items:
        if it.split == "train":
            by_label[it.label].append(it.path)
    assignment = {}
    for rels in by_label.values():
        assignment.update(stratified_split(rels, params.val_fraction, 0.0, params.seed))
    return [Item(it.path, it.label, assignment.get(it.path, it.split), it.sha256) for it in items]

