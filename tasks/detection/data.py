"""Detection datasets -> per-image boxes: Pascal VOC (XML) and COCO (JSON).

Boxes are (x1, y1, x2, y2) in original image pixels, continuous coordinates (VOC's 1-based
inclusive xmin..xmax becomes xmin - 1 .. xmax). Boxes outside the image are clipped; boxes
with zero or negative width or height (before or after clipping) are dropped and reported.
VOC's `difficult` (COCO's `iscrowd`) objects are kept and marked: evaluation ignores them,
as VOC does. An image without objects stays, as a negative.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from tasks.config import Params, UserError
from tasks.files import sha256_file, write_json
from tasks.imagefiles import Prepared, check_images, oriented_size
from tasks.layout import SPLITS, Item, Layout


@dataclass
class Record:
    path: str  # relative to the dataset root
    split: str
    objects: list[dict] = field(default_factory=list)  # {"name", "box": [x1, y1, x2, y2], "difficult": bool}


def read_voc(root: Path, skipped: list[dict]) -> list[Record]:
    """Annotations/<id>.xml + JPEGImages/<file>, split by ImageSets/Main/{train,val,test}.txt."""
    sets = root / "ImageSets" / "Main"
    if not (root / "Annotations").is_dir() or not sets.is_dir():
        raise UserError(f"{root} is not a Pascal VOC folder: expected Annotations/, JPEGImages/ and "
                        f"ImageSets/Main/{{train,val,test}}.txt (set data.root)")
    records = []
    for split in SPLITS:
        listing = sets / f"{split}.txt"
        if not listing.is_file():
            continue
        for line in listing.read_text().split():
            xml = root / "Annotations" / f"{line}.xml"
            try:
                ann = ET.parse(xml).getroot()
            except (OSError, ET.ParseError) as exc:
                skipped.append({"path": f"Annotations/{line}.xml", "reason": f"unreadable annotation: {exc}"})
                continue
            filename = (ann.findtext("filename") or f"{line}.jpg").strip()
            rel = f"JPEGImages/{Path(filename).name}"
            objects = []
            for obj in ann.iter("object"):
                bb = obj.find("bndbox")
                try:
                    x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                except (AttributeError, TypeError, ValueError):
                    skipped.append({"path": rel, "reason": "object without a numeric bndbox", "object": obj.findtext("name")})
                    continue
                # A raw xmax <= xmin (ymax <= ymin) is degenerate as published: kept as it is, so it is dropped.
                box = [x1 - 1, y1 - 1, x2, y2] if x2 > x1 and y2 > y1 else [x1, y1, x2, y2]
                objects.append({"name": (obj.findtext("name") or "").strip(), "box": box,
                                "difficult": (obj.findtext("difficult") or "0").strip() == "1"})
            records.append(Record(rel, split, objects))
    if not records:
        raise UserError(f"no images listed in {sets}/{{train,val,test}}.txt")
    return records


def read_coco(root: Path, skipped: list[dict]) -> list[Record]:
    """annotations/instances_<split>.json; images in <split>/, images/<split>/ or images/ (by file_name)."""
    records = []
    for split in SPLITS:
        ann_file = root / "annotations" / f"instances_{split}.json"
        if not ann_file.is_file():
            continue
        try:
            doc = json.loads(ann_file.read_text())
            cats = {c["id"]: c["name"] for c in doc["categories"]}
            images = {im["id"]: im["file_name"] for im in doc["images"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{ann_file}: not a COCO instances file ({exc})") from None
        folder = next((d for d in (root / split, root / "images" / split, root / "images") if d.is_dir()), root)
        by_image: dict[int, list[dict]] = {i: [] for i in images}
        for a in doc.get("annotations", []):
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
                by_image[a["image_id"]].append({"name": cats[a["category_id"]], "box": [x, y, x + w, y + h],
                                                "difficult": bool(a.get("iscrowd", 0))})
            except (KeyError, TypeError, ValueError):
                skipped.append({"path": str(ann_file.relative_to(root)), "reason": f"bad annotation {a.get('id')}"})
        for image_id, name in images.items():
            records.append(Record((folder / name).relative_to(root).as_posix(), split, by_image[image_id]))
    if not records:
        raise UserError(f"no COCO annotation files under {root}/annotations/ (expected instances_<split>.json)")
    return records


def clean_boxes(rec: Record, width: int, height: int, dropped: list[dict]) -> list[dict]:
    """Clip to the image; drop (and report) boxes with no area."""
    kept = []
    for obj in rec.objects:
        x1, y1, x2, y2 = obj["box"]
        if x2 <= x1 or y2 <= y1:
            dropped.append({"path": rec.path, "object": obj["name"], "box": obj["box"],
                            "reason": "degenerate box (zero or negative width or height)"})
            continue
        c = [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
        if c[2] <= c[0] or c[3] <= c[1]:
            dropped.append({"path": rec.path, "object": obj["name"], "box": obj["box"],
                            "reason": "box lies outside the image"})
            continue
        kept.append({**obj, "box": c})
    return kept


def prepare(params: Params, layout: Layout, tmp: Path, skipped: list[dict]) -> Prepared:
    """A VOC or COCO folder: every image decoded once, its boxes cleaned, annotations.json written beside the
    manifest (boxes per image in original pixels, labels as class indices, difficult flags, the image size)."""
    root, dataset = Path(params.data.root), params.data.dataset
    if not root.is_dir():
        raise UserError(f"dataset root {root} is not a directory: set data.root to a {dataset.upper()} folder")
    records = read_voc(root, skipped) if dataset == "voc" else read_coco(root, skipped)
    checks = check_images([root / r.path for r in records])
    dropped: list[dict] = []
    items, annotations = [], {}
    for rec, (sha, reason) in zip(records, checks):
        if reason:
            skipped.append({"path": rec.path, "reason": reason})
            continue
        if rec.path in annotations:
            skipped.append({"path": rec.path, "reason": f"listed twice (again in {rec.split})"})
            continue
        w, h = oriented_size(root / rec.path)
        objects = clean_boxes(rec, w, h, dropped)
        annotations[rec.path] = {"width": w, "height": h, "boxes": [o["box"] for o in objects],
                                 "names": [o["name"] for o in objects], "difficult": [o["difficult"] for o in objects]}
        items.append(Item(rec.path, "", rec.split, sha))
    classes = sorted({n for a in annotations.values() for n in a["names"]})
    if not classes:
        raise UserError(f"no objects in any annotation under {root}")
    if not any(it.split == "train" for it in items):
        raise UserError(f"no usable training images under {root}")
    index = {c: i for i, c in enumerate(classes)}
    for a in annotations.values():
        a["labels"] = [index[n] for n in a.pop("names")]
    per_class = {c: {s: 0 for s in SPLITS} for c in classes}
    for it in items:
        for label in annotations[it.path]["labels"]:
            per_class[classes[label]][it.split] += 1
    write_json(tmp / layout.annotations.name, annotations)
    return Prepared(items, classes, str(root), per_class,
                    {"dropped_boxes": dropped, "negatives": sum(1 for a in annotations.values() if not a["boxes"])},
                    {"annotations_sha256": sha256_file(tmp / layout.annotations.name)})
