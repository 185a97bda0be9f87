"""Image files as the prepare stage meets them, whatever the task: each fully decoded once, refused with a reason
when it is not a usable image (never a crash mid-run), and the contract between the stage and a task's reader.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tasks.config import UserError
from tasks.layout import Item


class DataError(UserError):
    """The dataset cannot be prepared; the message says what to fix."""


@dataclass
class Prepared:
    """What a task's reader (tasks/<task>/data.py: prepare) hands the prepare stage."""

    items: list[Item]  # every usable image: path relative to `root`, its label (task-defined text), split, sha256
    classes: list[str]  # class (or tag) names in index order
    root: str  # the folder the paths are relative to
    per_class: dict  # class -> split -> count (images, objects or pixels: the task says which)
    report: dict = field(default_factory=dict)  # joins data/prepared/report.json (dropped boxes, empty classes, ...)
    meta: dict = field(default_factory=dict)  # joins dataset.json (the sha256 of the task's label files, ...)


MAX_FILE_BYTES = 256 * 2**20  # a larger "image" is refused unread: no photo is this big, a stray archive or disk image is


_FILE_KINDS = ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))


def printable(path: str | Path) -> str:
    """A path as valid UTF-8 text for the report: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    # os.walk/iterdir give undecodable bytes as lone surrogates, which no UTF-8 file (CSV, JSON) can hold
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def refusal(st: os.stat_result, max_bytes: int) -> str | None:
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
        reason = refusal(os.stat(path), max_bytes)
        if reason:
            return None, reason
        # O_NONBLOCK: should it have become a FIFO since the stat, open returns at once and fstat says so
        f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)), "rb")
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    with f:
        try:
            reason = refusal(os.fstat(f.fileno()), max_bytes)
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


def inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False



def check_images(paths: list[Path]) -> list[tuple[str | None, str | None]]:
    """check_image over many files, a few at a time (decoding is most of prepare's work)."""
    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(check_image, paths))


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is decoded for training and serving (EXIF orientation applied)."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


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
