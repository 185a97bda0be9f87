"""Segmentation datasets -> images + per-pixel class masks, and the label arrays the head learns from.

Two layouts:
  masks    ROOT/<split>/images/<stem>.{jpg,png,...} + ROOT/<split>/masks/<stem>.png (one class value per pixel)
           and ROOT/labelmap.txt: `<value> <name> [r g b]` per line (`#` comments); a name `_ignore_` or the
           value 255 marks pixels that are never scored. Without <split>/ folders (ROOT/images + ROOT/masks),
           the split is assigned by hash (data.val_fraction / test_fraction / seed).
  voc_seg  Pascal VOC: JPEGImages/<id>.jpg + SegmentationClass/<id>.png (palette PNG, index = class, 255 = ignore),
           split by ImageSets/Segmentation/{train,val,test}.txt; the 21 VOC classes and colours.

Every mask is decoded once in prepare. A mask that is missing, unreadable, a colour image, of another size than
its (EXIF-oriented) image, or holding values the label map does not name is reported with the file in
data/prepared/report.json and its image skipped; the run goes on. Class indices are the label map's classes in
value order; ignore pixels become IGNORE (255) everywhere after prepare.

The features stage caches each image's mask at the loss resolution (input size /
segmentation.features.loss_stride, the majority label of each cell, ignore only where ignore is the majority;
tasks/segmentation/features.py): the loss is computed there, where it is cheap, and the metrics on the original
masks, at every original pixel.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.config import Params, UserError
from tasks.contract import IGNORE, IMAGE_EXTENSIONS, voc_colormap
from tasks.files import read_json, sha256_file, write_json
from tasks.imagefiles import Prepared, check_image, oriented_size
from tasks.layout import SPLITS, Item, Layout, stratified_split

IGNORE_NAMES = ("_ignore_", "ignore", "void", "unlabelled", "unlabeled")

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


@dataclass(frozen=True)
class LabelMap:
    """Mask value -> class index (or IGNORE); a value not in the map is invalid."""

    classes: list[str]
    values: list[int]  # the mask value of each class, index order
    ignore_values: list[int]
    palette: list[list[int]]

    def lut(self) -> np.ndarray:
        """int16 [65536]: value -> class index, IGNORE, or -1 (not in the map)."""
        lut = np.full(65536, -1, np.int16)
        lut[self.ignore_values] = IGNORE
        lut[self.values] = np.arange(len(self.values))
        return lut

    def to_dict(self) -> dict:
        return {"classes": self.classes, "values": self.values, "ignore_values": self.ignore_values,
                "palette": self.palette}


def read_labelmap(path: Path) -> LabelMap:
    """`<value> <name> [r g b]` lines; `_ignore_` (or void/unlabelled) names and the value 255 are ignored pixels."""
    if not path.is_file():
        raise UserError(f"{path} not found: a masks dataset needs labelmap.txt with `<value> <name>` per line")
    entries, ignore = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            value = int(parts[0])
            name = parts[1]
            colour = [int(v) for v in parts[2:5]] if len(parts) >= 5 else None
        except (ValueError, IndexError):
            raise UserError(f"{path}:{n}: expected `<value> <name> [r g b]`, got {line!r}") from None
        if not 0 <= value < 65536:
            raise UserError(f"{path}:{n}: value {value} out of range 0..65535")
        if name.lower() in IGNORE_NAMES or value == IGNORE:
            ignore.add(value)
            continue
        entries.append((value, name, colour))
    entries.sort()
    values = [v for v, _, _ in entries]
    if len(set(values)) != len(values) or len({n for _, n, _ in entries}) != len(entries):
        raise UserError(f"{path}: a value or a class name is listed twice")
    if len(entries) < 2:
        raise UserError(f"{path}: need at least 2 classes, found {len(entries)}")
    if len(entries) >= IGNORE:
        raise UserError(f"{path}: at most {IGNORE - 1} classes (index {IGNORE} marks ignored pixels)")
    default = voc_colormap(len(entries) + 1)[1:]  # index 0 of VOC's map is black: skipped, so no class is black
    palette = [c if c is not None else list(default[i]) for i, (_, _, c) in enumerate(entries)]
    return LabelMap([n for _, n, _ in entries], values, sorted(ignore | {IGNORE}), palette)


def voc_labelmap() -> LabelMap:
    return LabelMap(list(VOC_CLASSES), list(range(len(VOC_CLASSES))), [IGNORE],
                    [list(c) for c in voc_colormap(len(VOC_CLASSES))])


def read_mask(path: Path) -> np.ndarray:
    """The stored values of a mask PNG [H, W] (palette indices for mode P); ValueError for a colour image."""
    with Image.open(path) as img:
        if img.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV"):
            raise ValueError(f"mask is a colour image (mode {img.mode}): expected one class value per pixel (mode L or P)")
        if img.mode == "1":
            img = img.convert("L")
        arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"mask has shape {arr.shape}: expected [H, W]")
    if arr.dtype.kind == "f" or arr.min() < 0:
        raise ValueError("mask values must be non-negative integers")
    return arr


def load_mask(path: Path, lut: np.ndarray) -> np.ndarray:
    """A mask as class indices (uint8, IGNORE for ignored pixels), through a valid label map's LUT."""
    return lut[read_mask(path)].astype(np.uint8)


# ---------------------------------------------------------------- layouts


def list_masks_layout(root: Path, skipped: list[dict], seed: int, val_fraction: float, test_fraction: float
                      ) -> list[tuple[str, str, str]]:
    """(image rel path, mask rel path, split) for ROOT/<split>/images + masks, or ROOT/images + masks."""
    bases = [(s, root / s) for s in SPLITS if (root / s / "images").is_dir()]
    presplit = bool(bases)
    if not presplit:
        if not (root / "images").is_dir():
            raise UserError(f"{root} is not a masks dataset: expected <split>/images/ + <split>/masks/ (or images/ + "
                            f"masks/) and labelmap.txt (set data.root)")
        bases = [("", root)]
    out = []
    for split, base in bases:
        for img in sorted((base / "images").iterdir()):
            if img.name.startswith(".") or img.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = img.relative_to(root).as_posix()
            mask = base / "masks" / f"{img.stem}.png"
            if not mask.is_file():
                skipped.append({"path": rel, "reason": f"no mask: expected {mask.relative_to(root).as_posix()}"})
                continue
            out.append((rel, mask.relative_to(root).as_posix(), split))
    if not presplit:
        assign = stratified_split([r for r, _, _ in out], val_fraction, test_fraction, seed)
        out = [(r, m, assign[r]) for r, m, _ in out]
    return out


def list_voc_seg(root: Path, skipped: list[dict]) -> list[tuple[str, str, str]]:
    sets = root / "ImageSets" / "Segmentation"
    if not sets.is_dir() or not (root / "SegmentationClass").is_dir():
        raise UserError(f"{root} is not a Pascal VOC segmentation folder: expected JPEGImages/, SegmentationClass/ and "
                        f"ImageSets/Segmentation/{{train,val,test}}.txt (set data.root)")
    out, seen = [], set()
    for split in SPLITS:
        listing = sets / f"{split}.txt"
        if not listing.is_file():
            continue
        for name in listing.read_text().split():
            rel = f"JPEGImages/{name}.jpg"
            if rel in seen:
                skipped.append({"path": rel, "reason": f"listed twice (again in {split})"})
                continue
            seen.add(rel)
            mask = root / "SegmentationClass" / f"{name}.png"
            if not mask.is_file():
                skipped.append({"path": rel, "reason": f"no mask: expected SegmentationClass/{name}.png"})
                continue
            out.append((rel, f"SegmentationClass/{name}.png", split))
    if not out:
        raise UserError(f"no images with masks listed in {sets}/{{train,val,test}}.txt")
    return out


def check_mask(root: Path, image_rel: str, mask_rel: str, lut: np.ndarray, num_classes: int
               ) -> tuple[dict | None, np.ndarray | None, str | None]:
    """(mask entry, pixels per class, None) or (None, None, reason)."""
    try:
        values = read_mask(root / mask_rel)
    except (OSError, ValueError, SyntaxError) as exc:
        return None, None, f"unreadable mask {mask_rel}: {exc}"
    w, h = oriented_size(root / image_rel)
    if values.shape != (h, w):
        return None, None, (f"mask {mask_rel} is {values.shape[1]}x{values.shape[0]} but its image is {w}x{h} "
                            f"(width x height)")
    if values.max() >= len(lut) or (lut[np.unique(values)] < 0).any():
        bad = [int(v) for v in np.unique(values) if v >= len(lut) or lut[v] < 0]
        return None, None, f"mask {mask_rel} holds values not in the label map: {bad[:10]}"
    counts = np.bincount(lut[values].ravel().astype(np.int64), minlength=IGNORE + 1)
    return ({"mask": mask_rel, "width": w, "height": h, "sha256": sha256_file(root / mask_rel)},
            counts[:num_classes], None)


def prepare(params: Params, layout: Layout, tmp: Path, skipped: list[dict]) -> Prepared:
    """A masks or voc_seg folder: every image and its mask decoded once, masks.json written beside the manifest
    (the label map and each image's mask file, size and sha256)."""
    root, p = Path(params.data.root), params.data
    if not root.is_dir():
        raise UserError(f"dataset root {root} is not a directory: set data.root to a segmentation dataset")
    if p.dataset == "voc_seg":
        labelmap, listing = voc_labelmap(), list_voc_seg(root, skipped)
    else:
        labelmap = read_labelmap(root / "labelmap.txt")
        listing = list_masks_layout(root, skipped, p.seed, p.val_fraction, p.test_fraction)
    lut, k = labelmap.lut(), len(labelmap.classes)

    def check(entry):
        rel, mask_rel, _ = entry
        sha, reason = check_image(root / rel)
        if reason:
            return None, None, None, reason
        m, counts, reason = check_mask(root, rel, mask_rel, lut, k)
        return sha, m, counts, reason

    with ThreadPoolExecutor(4) as pool:
        checks = list(pool.map(check, listing))
    items, masks = [], {}
    pixels = {c: dict.fromkeys(SPLITS, 0) for c in labelmap.classes}
    for (rel, mask_rel, split), (sha, m, counts, reason) in zip(listing, checks):
        if reason:
            skipped.append({"path": rel, "mask": mask_rel, "reason": reason})
            continue
        masks[rel] = m
        items.append(Item(rel, "", split, sha))
        for c, n in zip(labelmap.classes, counts):
            pixels[c][split] += int(n)
    if not any(it.split == "train" for it in items):
        raise UserError(f"no usable training images with masks under {root}: see the reasons in the prepare report")
    write_json(tmp / layout.masks.name, {**labelmap.to_dict(), "ignore_index": IGNORE, "masks": masks})
    return Prepared(items, labelmap.classes, str(root), pixels, {},
                    {"masks_sha256": sha256_file(tmp / layout.masks.name)})


# ---------------------------------------------------------------- label arrays for the loss


def downsample_labels(mask: np.ndarray, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """Class indices [H0, W0] (IGNORE allowed) -> [h, w] by majority vote over each cell's area (non-integer
    ratios included); a cell is IGNORE only when ignored pixels are its majority (ties go to a class)."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(mask.astype(np.int64))
    m = torch.where(m == IGNORE, torch.tensor(num_classes), m)
    onehot = F.one_hot(m, num_classes + 1).permute(2, 0, 1)[None].float()
    votes = F.interpolate(onehot, size=size, mode="area")[0]
    out = votes.argmax(0).numpy().astype(np.uint8)  # first maximum: a class wins a tie with ignore
    out[out == num_classes] = IGNORE
    return out


def label_size(input_size: tuple[int, int], stride: int) -> tuple[int, int]:
    return input_size[0] // stride, input_size[1] // stride


def read_masks(layout: Layout) -> dict:
    """masks.json (prepare): the label map and each image's mask file; the fix when the prepared data is another
    task's."""
    task = layout.read_json(layout.prepared / "dataset.json", {}).get("task")
    if task != "segmentation" or not layout.masks.exists():
        raise UserError(f"{layout.prepared} holds a {task or 'classification'} dataset: re-run prepare with "
                        f"task: segmentation")
    return read_json(layout.masks)


def meta_lut(meta: dict) -> np.ndarray:
    """The value -> class index LUT of masks.json's label map."""
    return LabelMap(meta["classes"], meta["values"], meta["ignore_values"], meta["palette"]).lut()


def ground_truth(layout, dataset, split: str) -> tuple[list[Path], np.ndarray]:
    """The mask files of `split` (image order) and the value -> class index LUT."""
    meta = read_masks(layout)
    return [dataset.root / meta["masks"][it.path]["mask"] for it in dataset.split(split)], meta_lut(meta)
