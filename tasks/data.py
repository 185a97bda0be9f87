"""Stage `prepare`: a dataset -> validated images + a split manifest (data/prepared/).

Outputs (one DVC-tracked directory, written atomically):
  manifest.csv   path, label, split, sha256 (path relative to dataset.json's `root`)
  dataset.json   root, classes, per-split counts, manifest sha256
  report.json    files skipped and why, duplicate images across classes and splits
  images/        only for generated datasets (digits, cifar10, cifar100)
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import stat
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.cli import stage_main
from tasks.config import DataParams, Params, UserError
from tasks.files import atomic_dir, sha256_bytes, sha256_file, write_json
from tasks.layout import SPLITS, Item, Layout, Progress, _order_key, stratified_split

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DataError(UserError):
    """The dataset cannot be prepared; the message says what to fix."""


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    counts: dict[str, int]
    skipped: int
    manifest_sha256: str


# ---------------------------------------------------------------- validation


MAX_FILE_BYTES = 256 * 2**20  # a larger "image" is refused unread: no photo is this big, a stray archive or disk image is

_FILE_KINDS = ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))


def printable(path: str | Path) -> str:
    """A path as valid UTF-8 text for the report: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    # os.walk/iterdir give undecodable bytes as lone surrogates, which no UTF-8 file (CSV, JSON) can hold
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _refusal(st: os.stat_result, max_bytes: int) -> str | None:
    """Why a file with this stat is not even opened, or None."""
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "special file")
        return f"not a regular file ({kind})"
    if st.st_size > max_bytes:
        return f"file too large ({st.st_size} bytes > {max_bytes})"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    return None


def check_image(path: Path, max_bytes: int = MAX_FILE_BYTES) -> tuple[str | None, str | None]:
    """Fully decode one file. Returns (sha256, None) or (None, reason).

    Only regular files of at most `max_bytes` are opened; the decoder reads what it needs from the file
    (a non-image fails on its first bytes), and the sha256 is streamed over the whole file: never all in memory.
    """
    try:
        reason = _refusal(os.stat(path), max_bytes)
        if reason:
            return None, reason
        # O_NONBLOCK: should it have become a FIFO since the stat, open returns at once and fstat says so
        f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)), "rb")
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    with f:
        try:
            reason = _refusal(os.fstat(f.fileno()), max_bytes)
        except OSError as exc:
            reason = f"unreadable: {exc.strerror or exc}"
        if reason:
            return None, reason
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as img:
                    if img.width < 1 or img.height < 1:
                        return None, "image has no pixels"
                    if img.format == "JPEG":  # full entropy decode at 1/8 scale: truncation still fails
                        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                    img.load()
        except Image.UnidentifiedImageError:
            return None, "not an image (Pillow cannot identify the format)"
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return None, f"too many pixels: {exc}"
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            return None, f"corrupt or truncated image: {exc}"
        try:
            f.seek(0)
            return hashlib.file_digest(f, "sha256").hexdigest(), None
        except OSError as exc:
            return None, f"unreadable: {exc.strerror or exc}"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


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
        if class_dir.is_symlink() and not _inside(class_dir.resolve(), root_real):
            skip(class_dir, "symlink points outside the dataset root")
            continue
        if not class_dir.is_dir():
            continue
        if not _is_utf8(class_dir.name):
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
                elif not _is_utf8(d):
                    skip(sub, "folder name is not valid UTF-8: rename it", label, folder=True)
                    entries += 1
                else:
                    keep.append(d)
            dirnames[:] = keep
            for name in sorted(n for n in filenames if not n.startswith(".")):
                entries += 1
                p = Path(dirpath, name)
                if not _is_utf8(name):
                    skip(p, "file name is not valid UTF-8: rename it", label)
                    continue
                if p.is_symlink() and not _inside(p.resolve(), root_real):
                    skip(p, "symlink points outside the dataset root", label)
                    continue
                try:
                    st = os.stat(p)  # through a symlink (one inside the root): what would be read
                except OSError as exc:
                    skip(p, f"unreadable: {exc.strerror or exc}", label)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    skip(p, _refusal(st, MAX_FILE_BYTES) or "", label)  # "not a regular file (fifo)"
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

    paths = [root / rel for rel, _, _ in candidates]
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        checks = list(pool.map(check_image, paths))

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
    return items, labels, {**find_duplicates(items), "empty_classes": empty_classes}


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


def find_duplicates(items: list[Item]) -> dict:
    by_hash: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_hash[it.sha256].append(it)
    cross_class, cross_split = [], []
    for sha, group in by_hash.items():
        if len(group) < 2:
            continue
        entry = {"sha256": sha, "files": [{"path": i.path, "label": i.label, "split": i.split} for i in group]}
        if len({i.label for i in group}) > 1:
            cross_class.append(entry)
        if len({i.split for i in group}) > 1:
            cross_split.append(entry)
    return {"duplicates_across_classes": cross_class, "duplicates_across_splits": cross_split}


# ---------------------------------------------------------------- datasets


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


# ---------------------------------------------------------------- stage


def manifest_csv(items: list[Item]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split", "sha256"])
    for it in items:
        w.writerow([it.path, it.label, it.split, it.sha256])
    return buf.getvalue().encode()


def run(params: Params, layout: Layout, progress: Progress | None = None) -> PrepareResult:
    """Validate and split the dataset into layout.prepared, swapped in whole only when everything succeeded.

    The run's report (skipped files and why, duplicates) is written to layout.prepare_report whether the
    run succeeds or fails; a failed run leaves the previous data/prepared in place.
    """
    p = params.data
    out_dir = layout.prepared
    skipped: list[dict] = []
    report: dict = {"status": "failed", "dataset": p.dataset, "skipped_count": 0, "skipped": skipped}
    try:
        with atomic_dir(out_dir) as tmp:
            extra: dict = {}
            if params.task == "detection":
                from tasks.detection.data import prepare_detection

                root = Path(p.root)
                items, classes, found, annotations = prepare_detection(root, p.dataset, skipped, check_image)
                write_json(tmp / layout.annotations.name, annotations)
                extra = {"task": "detection", "annotations_sha256": sha256_file(tmp / layout.annotations.name),
                         "per_class": found["objects_per_class"]}
                root_str = str(root)
            elif params.task == "segmentation":
                from tasks.segmentation.data import prepare_segmentation

                root = Path(p.root)
                items, classes, found, masks = prepare_segmentation(root, p.dataset, p, skipped, check_image)
                write_json(tmp / layout.masks.name, masks)
                extra = {"task": "segmentation", "masks_sha256": sha256_file(tmp / layout.masks.name),
                         "per_class": found["pixels_per_class"]}
                root_str = str(root)
            elif p.dataset == "imagefolder":
                root = Path(p.root)
                items, classes, found = build_manifest(root, p, skipped, layout.prepare_report)
                root_str = str(root)
            else:
                images = tmp / "images"
                if p.dataset == "digits":
                    write_digits(images)
                else:
                    write_cifar(p.dataset, p, images)
                items, classes, found = build_manifest(images, p, skipped, layout.prepare_report)
                if p.dataset != "digits":
                    items = split_off_val(items, p)
                root_str = str(out_dir / "images")
            items.sort(key=lambda it: (SPLITS.index(it.split), it.label, it.path))
            data = manifest_csv(items)
            (tmp / "manifest.csv").write_bytes(data)
            digest = sha256_bytes(data)
            counts = {s: sum(1 for it in items if it.split == s) for s in SPLITS}
            per_class = {c: {s: sum(1 for it in items if it.split == s and it.label == c) for s in SPLITS} for c in classes}
            write_json(tmp / "dataset.json", {
                "dataset": p.dataset, "root": root_str, "classes": classes, "counts": counts, "per_class": per_class,
                "skipped": len(skipped), "manifest_sha256": digest, **extra,
            })
            report.update(found, status="ok", skipped_count=len(skipped))
            write_json(tmp / "report.json", {k: v for k, v in report.items() if k != "status"})
    finally:
        report["skipped_count"] = len(skipped)
        write_json(layout.prepare_report, report)
    return PrepareResult(out_dir, counts, len(skipped), digest)


def describe(r: PrepareResult) -> str:
    skipped = f", {r.skipped} file(s) skipped (see {r.out_dir}/report.json)" if r.skipped else ""
    return "prepare: " + ", ".join(f"{k} {v}" for k, v in r.counts.items()) + skipped


if __name__ == "__main__":
    stage_main("prepare", run, describe)
