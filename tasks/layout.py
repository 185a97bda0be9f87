"""Where every artifact lives, and the readers of each: the one place stages meet.

A stage never imports another stage. It takes a `Layout` (every path under one
root), reads what earlier stages wrote through the readers here, and writes its own
outputs under the same layout. The DVC graph (dvc.yaml), the Prefect flow, the tests
and the benches all build a Layout; nobody else spells a path.

The readers here are torch-free (numpy and json); the checkpoint reader, which needs
torch, is tasks/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tasks.config import UserError
from tasks.contract import SPLITS  # noqa: F401 - re-exported
from tasks.files import atomic_dir, read_json, sha256_file, write_json
from tasks.preprocess import PreprocessingCard

Progress = Callable[[int, int], None]  # progress(done, total)


class ArtifactError(UserError):
    """An artifact is missing, stale or corrupt; the message names the stage to re-run."""


# ---------------------------------------------------------------- the prepared dataset


@dataclass(frozen=True)
class Item:
    path: str  # relative to the dataset root, POSIX separators
    label: str
    split: str
    sha256: str


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset as the later stages read it, and the one rule for which split does what."""

    root: Path
    classes: list[str]
    items: list[Item]
    manifest_sha256: str
    version: str = ""  # the manifest and the task's label files (annotations, masks): what a model was trained on

    def split(self, name: str) -> list[Item]:
        return [it for it in self.items if it.split == name]

    def has_split(self, name: str) -> bool:
        return any(it.split == name for it in self.items)

    def label_index(self, item: Item) -> int:
        return self.classes.index(item.label)

    def labels(self, split: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[it.label] for it in self.split(split)], dtype=np.int64)

    def resolve(self, item: Item) -> Path:
        return self.root / item.path

    @property
    def eval_split(self) -> str:
        """The split that scores the model: test when there is one, else val."""
        return "test" if self.has_split("test") else "val"

    @property
    def selection(self) -> str:
        """Where L2/epoch/threshold are chosen: val when test scores, else a stratified holdout of train
        ("train-holdout"), so nothing is ever chosen on the split that scores."""
        return "val" if self.has_split("test") and self.has_split("val") else "train-holdout"


def _order_key(seed: int, rel: str) -> str:
    # Hash order: a file keeps its split when others are added or removed.
    return hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest()


def stratified_split(rels: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Assign one class's files to train/val/test deterministically; train always gets at least one."""
    ordered = sorted(rels, key=lambda r: _order_key(seed, r))
    n = len(ordered)
    n_test = min(round(n * test_fraction), max(0, n - 1))
    n_val = min(round(n * val_fraction), max(0, n - 1 - n_test))
    if val_fraction > 0 and n_val == 0 and n - n_test >= 3:
        n_val = 1
    return {rel: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, rel in enumerate(ordered)}


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit, holdout) index arrays over the training set, deterministic in seed."""
    hold: set[str] = set()
    by_class: dict[int, list[str]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(str(i))
    for rels in by_class.values():
        hold.update(r for r, s in stratified_split(rels, fraction, 0.0, seed).items() if s == "val")
    mask = np.array([str(i) in hold for i in range(len(labels))], dtype=bool)
    idx = np.arange(len(labels))
    return idx[~mask], idx[mask]


# ---------------------------------------------------------------- cached features


class FeatureCache:
    """features/: one .npy per array (x_<split>, y_<split>) and key.json holding the cache key and every
    array's sha256. Valid only while the key matches *and* every file still hashes as recorded, so a
    corrupted or edited array is recomputed instead of reused."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.meta = self.dir / "key.json"

    def _info(self) -> dict | None:
        try:
            info = read_json(self.meta)
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and isinstance(info.get("arrays"), dict) else None

    def corrupt(self, info: dict) -> list[str]:
        """Array files that are missing or no longer hash as key.json says."""
        bad = []
        for name, digest in info["arrays"].items():
            path = self.dir / name
            if not path.is_file() or sha256_file(path) != digest:
                bad.append(name)
        return bad

    def valid_key(self) -> str | None:
        """The stored key if the cache is complete and intact, else None."""
        info = self._info()
        if info is None or self.corrupt(info):
            return None
        return info.get("key")

    def save(self, key: str, arrays: dict[str, np.ndarray], info: dict) -> None:
        """Write every array and key.json, swapped in as one directory (a killed run leaves the old cache)."""
        with self.writer(key, info) as create:
            for name, arr in arrays.items():
                create(name, arr.shape, arr.dtype)[...] = arr

    @contextlib.contextmanager
    def writer(self, key: str, info: dict) -> Iterator[Callable[[str, tuple, np.dtype], np.ndarray]]:
        """Yield `create(name, shape, dtype)` -> a writable memmap; arrays larger than memory stream to disk.
        On success every file is hashed into key.json and the directory swapped in whole."""
        with atomic_dir(self.dir) as tmp:
            made: dict[str, np.ndarray] = {}

            def create(name: str, shape: tuple, dtype) -> np.ndarray:
                made[name] = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(shape))
                return made[name]

            yield create
            for arr in made.values():
                arr.flush()
            made.clear()
            digests = {f"{n}.npy": sha256_file(tmp / f"{n}.npy") for n in sorted(p.stem for p in tmp.glob("*.npy"))}
            write_json(tmp / "key.json", {"key": key, "arrays": digests, **info})

    def load(self, mmap: bool = False) -> dict[str, np.ndarray]:
        info = self._info()
        if info is None:
            raise ArtifactError(f"{self.meta} not found or unreadable: run the features stage (dvc repro features)")
        bad = self.corrupt(info)
        if bad:
            raise ArtifactError(f"{self.dir}: {', '.join(bad)} missing or corrupt (sha256 differs from key.json): "
                                f"re-run the features stage (dvc repro features)")
        return {name[:-4]: np.load(self.dir / name, mmap_mode="r" if mmap else None) for name in info["arrays"]}


# ---------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Layout:
    """Every artifact path under `root` (the project directory for DVC and Prefect; a tmp dir in tests)."""

    root: Path = Path(".")

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # stage output directories (the DVC outs)
    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def prepare_report(self) -> Path:
        """The report of the last prepare run, also when it failed (outside data/prepared, which keeps the last good data)."""
        return self.root / "data" / "prepare-report.json"

    @property
    def annotations(self) -> Path:
        """Detection: boxes per image (input of the prepared dataset, beside manifest.csv)."""
        return self.prepared / "annotations.json"

    @property
    def masks(self) -> Path:
        """Segmentation: the label map (classes, values, ignore, palette) and each image's mask file."""
        return self.prepared / "masks.json"

    @property
    def backbone(self) -> Path:
        return self.root / "models" / "backbone"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def select_dir(self) -> Path:
        """The select stage's per-candidate caches: card, features.onnx, subsample features (a DVC out)."""
        return self.root / "select"

    @property
    def select_report(self) -> Path:
        """reports/select.json: every candidate's probe scores and cost, and the choice with its reason."""
        return self.reports / "select.json"

    @property
    def select_plot(self) -> Path:
        return self.reports / "select.png"

    @property
    def audit_report(self) -> Path:
        """reports/audit.json: label issues, duplicates and leaks, outliers, balance, learning curve (tasks/audit.py)."""
        return self.reports / "audit.json"

    @property
    def audit_dir(self) -> Path:
        """reports/audit/: the audit's full tables (label_scores.csv, pairs.csv) and its learning-curve picture."""
        return self.reports / "audit"

    @property
    def report_page(self) -> Path:
        """reports/index.html: the one self-contained page of the run (tasks/report.py)."""
        return self.reports / "index.html"

    @property
    def domain_gap(self) -> Path:
        """features/gap.json: how far the train images sit from the backbone's source data (tasks/gap.py)."""
        return self.features / "gap.json"

    # files
    @property
    def card_json(self) -> Path:
        return self.backbone / "card.json"

    @property
    def weights(self) -> Path:
        return self.backbone / "weights.pt"

    @property
    def features_onnx(self) -> Path:
        return self.backbone / "features.onnx"

    @property
    def checkpoint(self) -> Path:
        """The trained model, backbone + head, whatever the task (plus model.safetensors, head.pt, labels.json)."""
        return self.models / "model.pt"

    @property
    def classifier(self) -> Path:
        return self.checkpoint

    @property
    def head(self) -> Path:
        return self.models / "head.pt"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def evaluation(self) -> Path:
        """The evaluate stage's tables and pictures (one folder: what is in it depends on the task)."""
        return self.reports / "evaluation"

    @property
    def parity(self) -> Path:
        return self.reports / "parity.json"

    @property
    def model_onnx(self) -> Path:
        return self.export / "model.onnx"

    # readers
    def dataset(self) -> Dataset:
        meta_path = self.prepared / "dataset.json"
        if not meta_path.exists():
            raise ArtifactError(f"{meta_path} not found: run the prepare stage first (dvc repro prepare)")
        meta = read_json(meta_path)
        with open(self.prepared / "manifest.csv", newline="") as f:
            items = [Item(r["path"], r["label"], r["split"], r["sha256"]) for r in csv.DictReader(f)]
        digest = sha256_file(self.prepared / "manifest.csv")
        if digest != meta["manifest_sha256"]:
            raise ArtifactError(f"{self.prepared}/manifest.csv does not match dataset.json: re-run prepare")
        version = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k.endswith("_sha256")},
                                            sort_keys=True).encode()).hexdigest()
        return Dataset(Path(meta["root"]), list(meta["classes"]), items, digest, version)

    def card(self) -> PreprocessingCard:
        if not self.card_json.exists():
            raise ArtifactError(f"{self.card_json} not found: run the backbone stage first (dvc repro backbone)")
        return PreprocessingCard.from_dict(read_json(self.card_json))

    def feature_cache(self) -> FeatureCache:
        return FeatureCache(self.features)

    def selected_backbone(self) -> dict:
        """The select stage's choice ({"name": ..., "reason": ...}) for `backbone.name: auto`."""
        report = self.read_json(self.select_report, None)
        if not isinstance(report, dict) or not isinstance(report.get("choice"), dict):
            raise ArtifactError(f"backbone.name is auto but {self.select_report} holds no choice: "
                                f"run the select stage first (dvc repro select)")
        return report["choice"]

    def artifact_lines(self, pictures: str, onnx: str | None = None) -> list[str]:
        """What every task's summary ends with: the model files, the reports (`pictures`: what evaluation/ holds)
        and, after an export, the exported model (`onnx`: what its parity gate says)."""
        lines = [f"model     {self.checkpoint}  (+ model.safetensors, head.pt, labels.json)",
                 f"reports   {self.metrics}, {self.evaluation}/ ({pictures})"]
        if onnx is not None:
            lines.append(f"onnx      {self.model_onnx}: {onnx}; Triton repository {self.export}/triton/")
        return lines

    def read_json(self, path: Path, default=None):
        """An optional JSON artifact (metrics, parity, reports): `default` when it is not there."""
        return read_json(path) if Path(path).exists() else default
