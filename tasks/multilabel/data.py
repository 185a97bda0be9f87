"""Multi-label data: a CSV `path,labels[,split]` (tags separated by `|`) -> manifest items whose label is the image's
tags, sorted and joined by `|` ("" for an image without tags: a negative for every tag).

data.root is the CSV itself or a folder holding labels.csv; image paths are relative to the CSV's folder. The tags
are the ones the data uses. The bad-input rules are the class folders': an unusable row or image (missing, corrupt,
outside the folder, listed twice) is reported in report.json and skipped; a CSV that is not of this form is one
DataError naming the fix. Without a split column the images are split by iterative stratification (Sechidis et
al. 2011), which keeps every tag in every split where its images allow (3 or more).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

from tasks.config import DataParams, Params
from tasks.imagefiles import DataError, Prepared, check_images, inside, printable
from tasks.layout import SPLITS, Item, Layout, _order_key

CSV_NAME = "labels.csv"
COLUMNS = ("path", "labels", "split")  # split optional
SEP = "|"


def tags_of(label: str) -> list[str]:
    """An item's tags back from its manifest label."""
    return label.split(SEP) if label else []


def csv_path(root: Path) -> Path:
    if root.is_dir():
        path = root / CSV_NAME
        if not path.is_file():
            raise DataError(f"no {CSV_NAME} in {root}: set data.root to the CSV file, or to a folder holding "
                            f"{CSV_NAME} (columns path,labels[,split]; tags separated by {SEP})")
        return path
    if not root.is_file():
        raise DataError(f"data.root {root} does not exist: set it to a CSV (path,labels[,split]) or a folder "
                        f"holding {CSV_NAME}")
    return root


def read_rows(path: Path) -> list[tuple[int, str, list[str], str | None]]:
    """(line number, path, tags, split or None) per data row; a CSV not of this form is one DataError."""
    fix = f"the columns are path,labels[,split] (tags separated by {SEP}, split train|val|test)"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return parse(path, reader, fix)
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({exc}); {fix}") from None


def parse(path: Path, reader, fix: str) -> list[tuple[int, str, list[str], str | None]]:
    header = [h.strip().lower() for h in next(reader, [])]
    if not header or header == [""]:
        raise DataError(f"{path} is empty: its first line must be the header; {fix}")
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise DataError(f"{path}: unknown column(s) {', '.join(map(repr, unknown))}; {fix}")
    missing = [c for c in COLUMNS[:2] if c not in header]
    if missing or len(set(header)) != len(header):
        what = f"no {' or '.join(map(repr, missing))} column" if missing else "a column named twice"
        raise DataError(f"{path}: {what} in the header {','.join(header)}; {fix}")
    col = {name: header.index(name) for name in header}
    rows = []
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue  # blank line
        if len(fields) != len(header):
            raise DataError(f"{path}, line {line}: {len(fields)} field(s) for {len(header)} columns (a path or tag "
                            f"with a comma must be in double quotes); {fix}")
        split = fields[col["split"]].strip() if "split" in col else None
        if split is not None and split not in SPLITS:
            raise DataError(f"{path}, line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
        tags = sorted({t.strip() for t in fields[col["labels"]].split(SEP) if t.strip()})
        rows.append((line, fields[col["path"]].strip(), tags, split))
    return rows


def prepare(params: Params, layout: Layout, tmp: Path, skipped: list[dict]) -> Prepared:
    """The CSV's rows as items (every image decoded once), split as the CSV says or stratified by tag."""
    p = params.data
    path = csv_path(Path(p.root))
    root = path.parent
    root_real = root.resolve()
    rows = read_rows(path)
    candidates: list[tuple[str, list[str], str | None]] = []
    seen: dict[str, int] = {}
    for line, rel, tags, split in rows:
        where = {"path": printable(rel), "line": line}
        target = root / rel
        if not rel or "\x00" in rel:
            skipped.append({**where, "reason": "empty path" if not rel else "path holds a NUL byte"})
        elif Path(rel).is_absolute() or not inside(target.resolve(), root_real):
            skipped.append({**where, "reason": f"path outside the CSV's folder {root}: paths are relative to it"})
        elif Path(rel).as_posix() in seen:
            skipped.append({**where, "reason": f"listed twice (first on line {seen[Path(rel).as_posix()]})"})
        else:
            seen[Path(rel).as_posix()] = line
            candidates.append((Path(rel).as_posix(), tags, split))
    if not candidates:
        raise DataError(f"{path} lists no usable image" + (f" ({len(skipped)} row(s) skipped: see {layout.prepare_report})"
                                                           if skipped else ""))
    good: list[tuple[str, list[str], str | None, str]] = []
    for (rel, tags, split), (sha, reason) in zip(candidates, check_images([root / rel for rel, _, _ in candidates])):
        if reason:
            skipped.append({"path": rel, "labels": SEP.join(tags), "reason": reason})
        else:
            good.append((rel, tags, split, sha))

    counts = Counter(t for _, tags, _, _ in good for t in tags)
    if not counts:
        raise DataError(f"no usable image in {path} carries a tag: the labels column holds each image's tags, "
                        f"separated by {SEP}. See {layout.prepare_report}")
    too_few = sorted(t for t, n in counts.items() if n < p.min_images_per_class)
    if too_few:
        detail = ", ".join(f"{t!r}: {counts[t]}" for t in too_few)
        raise DataError(f"too few usable images with tag(s) {detail}; need at least {p.min_images_per_class} "
                        f"(data.min_images_per_class). {len(skipped)} file(s) were skipped: see the reasons in "
                        f"{layout.prepare_report}")
    if any(split is None for _, _, split, _ in good):
        assignment = stratify({rel: tags for rel, tags, _, _ in good}, p)
        good = [(rel, tags, assignment[rel], sha) for rel, tags, _, sha in good]
    items = [Item(rel, SEP.join(tags), split, sha) for rel, tags, split, sha in good]  # type: ignore[arg-type]
    items = cap_per_tag(items, p.max_images_per_class, p.seed)
    if not any(it.split == "train" for it in items):
        raise DataError(f"no training images in {path}: the split column must name train for some rows")
    tags = sorted(counts)
    per_class = {t: {s: 0 for s in SPLITS} for t in tags}
    for it in items:
        for t in tags_of(it.label):
            per_class[t][it.split] += 1
    absent = {t: [s for s in SPLITS if not per_class[t][s] and any(it.split == s for it in items)] for t in tags}
    return Prepared(items, tags, str(root), per_class,
                    {"labels_csv": str(path), "untagged_images": sum(1 for it in items if not it.label),
                     "tags_missing_from_a_split": {t: s for t, s in absent.items() if s}})


def tag_quota(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """How many of a tag's n images go to each split: the fractions, at least one in each split that has a
    fraction when there are enough (3 images: one each; 2: train and test), train always at least one."""
    quota = {"val": round(n * val_fraction), "test": round(n * test_fraction)}
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction > 0 and quota[split] == 0:
            quota[split] = 1
    for split in ("val", "test"):  # give back to train, val first (test scores the model)
        while quota["val"] + quota["test"] > max(n - 1, 0) and quota[split] > 0:
            quota[split] -= 1
    return {"train": n - quota["val"] - quota["test"], **quota}


def stratify(tags: dict[str, list[str]], p: DataParams) -> dict[str, str]:
    """Iterative stratification: the rarest tag first, each of its images (in seeded hash order) to the split that
    still wants that tag most (then the split that wants the most images); every tag of the image counts as given.
    Deterministic in data.seed; images without tags fill the splits' remaining shares."""
    order = sorted(tags, key=lambda r: _order_key(p.seed, r))
    n_tag = Counter(t for ts in tags.values() for t in ts)
    want = {t: tag_quota(n, p.val_fraction, p.test_fraction) for t, n in n_tag.items()}
    total = tag_quota(len(tags), p.val_fraction, p.test_fraction)
    splits = ["train"] + [s for s, f in (("val", p.val_fraction), ("test", p.test_fraction)) if f > 0]
    rank = {s: i for i, s in enumerate(SPLITS)}
    assignment: dict[str, str] = {}

    def give(rel: str, split: str) -> None:
        assignment[rel] = split
        total[split] -= 1
        for t in tags[rel]:
            want[t][split] -= 1

    left = Counter(n_tag)
    while left:
        tag = min(left, key=lambda t: (left[t], t))
        for rel in order:
            if rel not in assignment and tag in tags[rel]:
                give(rel, max(splits, key=lambda s: (want[tag][s], total[s], -rank[s])))
                for t in tags[rel]:
                    left[t] -= 1
        left = +left  # drop the tags whose images are all placed
    for rel in order:
        if rel not in assignment:
            give(rel, max(splits, key=lambda s: (total[s], -rank[s])))
    return assignment


def cap_per_tag(items: list[Item], cap: int | None, seed: int) -> list[Item]:
    """data.max_images_per_class: at most `cap` images per tag and split (an image is kept, in seeded hash order,
    while every tag it carries is under the cap; untagged images count as one group)."""
    if cap is None:
        return items
    kept: Counter = Counter()
    keep = set()
    for it in sorted(items, key=lambda i: _order_key(seed, i.path)):
        groups = [(it.split, t) for t in tags_of(it.label)] or [(it.split, None)]
        if all(kept[g] < cap for g in groups):
            kept.update(groups)
            keep.add(it.path)
    return [it for it in items if it.path in keep]
