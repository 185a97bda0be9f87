"""Batch prediction: the exported model over any number of images, one row per image, streaming and resumable.

    python -m tasks.predict --model export/model.onnx --images DIR_OR_CSV --out predictions.csv
        [--executor local|dask] [--address tcp://HOST:8786] [--workers 2 --threads-per-worker 1]
        [--shard-size 256] [--top-k 5] [--threshold T] [--masks DIR] [--batch-size 32] [--device auto|cpu|cuda]

--images: a folder (every image under it, by extension, in sorted order) or a CSV with a `path` column (else its
first column; relative paths are taken from the CSV's folder). --out: .csv, .jsonl or .parquet (parquet needs
pyarrow: pip install -e '.[distributed]'). The executor and its cluster come from params.yaml's `features`
section when there is one (features.executor, features.dask, features.shard_size), the flags winning.

What a row holds follows the model's metadata `task` (the same tasks/<task>/serve.py that answers /v1/predict):
every row has path, width, height (the original's, after EXIF orientation) and error (empty, or why the image
could not be read: such an image is reported, the run goes on);
  classification  label, probability, top_k (JSON: [{label, index, probability}]), ood_score, in_distribution
  multilabel      tags (JSON list of labels), top_k (JSON), ood_score, in_distribution
  detection       n_detections, detections (JSON: [{label, index, score, box [x1, y1, x2, y2] in the original's pixels}])
  segmentation    mask (the PNG written under --masks, the original's size, pixel = class index), class_fractions (JSON)

The images are cut into shards (a pure function of the image list and --shard-size) and each shard's rows are
written atomically with their sha256 under <out>.parts/ and journalled (tasks/distributed.py, on a Dask cluster
or here in order): a run killed or stopped part-way and started again with the same model, images and options
computes only the shards that are missing. The output is assembled last (streamed shard by shard), swapped in
atomically, and the parts removed. A one-line summary ends the run: counts, unreadable images, images flagged out
of distribution, throughput.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import importlib
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np

from tasks import contract
from tasks.config import UserError
from tasks.files import atomic_file, sha256_file, write_bytes

_MODELS: dict = {}  # per process (a Dask worker or this one): (model path, device, threads) -> deploy.model.Model
FORMATS = (".csv", ".jsonl", ".parquet")
COLUMNS = {
    "classification": ["label", "probability", "top_k", "ood_score", "in_distribution"],
    "multilabel": ["tags", "top_k", "ood_score", "in_distribution"],
    "detection": ["n_detections", "detections"],
    "segmentation": ["mask", "class_fractions"],
}
JOB_VERSION = 1


class PredictError(UserError):
    """A one-line error of batch prediction (its arguments, the model, the image list)."""


# ---------------------------------------------------------------- the image list

def list_images(source: Path) -> tuple[Path, list[str]]:
    """(root, paths relative to it or absolute) of the images to predict: a folder's images in sorted order, or a
    CSV's `path` column (else its first column) in the CSV's order."""
    if source.is_dir():
        found = sorted(p.relative_to(source).as_posix() for p in source.rglob("*")
                       if p.suffix.lower() in contract.IMAGE_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(source).parts))
        if not found:
            raise PredictError(f"--images {source}: no images under it (looked for {', '.join(contract.IMAGE_EXTENSIONS)})")
        return source, found
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise PredictError(f"--images {source}: the CSV is empty")
        header = [h.strip().lower() for h in rows[0]]
        col = header.index("path") if "path" in header else 0
        paths = [r[col].strip() for r in rows[1:] if len(r) > col and r[col].strip()]
        if not paths:
            raise PredictError(f"--images {source}: no paths in column {rows[0][col]!r}")
        return source.parent, paths
    raise PredictError(f"--images {source}: give a folder of images or a CSV with a `path` column")


# ---------------------------------------------------------------- worker side

def _model(model_path: str, device: str, threads: int):
    key = (model_path, device, threads)
    if key not in _MODELS:
        from deploy.model import Model

        _MODELS[key] = Model.load(model_path, "model", device, threads, spinning=False)
    return _MODELS[key]


def _threads(fixed: int) -> int:
    """onnxruntime threads: `fixed`, else the Dask worker's threads, else (here) the machine's cores."""
    from tasks.distributed import _worker_threads

    return fixed or _worker_threads(default=os.cpu_count() or 1)


def _read(root: str, rel: str, card) -> tuple[np.ndarray, tuple[int, int]]:
    """(pixels for the model, the original's (width, height) after EXIF orientation), one decode."""
    from tasks.preprocess import load_image, open_image

    img = open_image(Path(root) / rel)
    w, h = img.size  # the header's: JPEG draft decoding shrinks img.size
    pixels = load_image(img, card)
    if img.getexif().get(0x0112) in (5, 6, 7, 8):  # after the decode (a PNG's eXIf may follow its pixels)
        w, h = h, w  # rotated by 90 degrees: exif_transpose swapped the sides
    return pixels, (w, h)


def predict_shard(name: str, paths: list[str], out_dir: str, model_path: str, device: str, threads: int,
                  root: str, query: dict, masks: str | None, batch_size: int) -> dict:
    """On a worker (or here): one shard's rows -> <out_dir>/<name>.jsonl (atomic); segmentation masks under `masks`.
    Returns name, sha256, rows."""
    from tasks.distributed import note_attempt

    pid = note_attempt(name, out_dir)
    n = _threads(threads)
    model = _model(model_path, device, n)
    rows: list[dict] = []
    with ThreadPoolExecutor(max(1, min(4, n))) as pool:  # decoding beside the network
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            decoded = [_result(f) for f in [pool.submit(_read, root, rel, model.card) for rel in chunk]]
            ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
            outs = model.run(np.stack([decoded[i][0] for i in ok])) if ok else {}
            at = {i: j for j, i in enumerate(ok)}  # chunk position -> batch row
            for i, (rel, d) in enumerate(zip(chunk, decoded)):
                if isinstance(d, str):
                    rows.append({"path": rel, "width": None, "height": None, "error": d})
                    continue
                size = d[1]
                answer = model.serving.answer({k: v[at[i]] for k, v in outs.items()}, size, query)
                rows.append({"path": rel, "width": size[0], "height": size[1], "error": "",
                             **row_of(model.task, answer, rel, masks)})
    final = Path(out_dir) / f"{name}.jsonl"
    with atomic_file(final) as f:
        for r in rows:
            f.write((json.dumps(r, separators=(",", ":")) + "\n").encode())
    return {"name": name, "sha256": sha256_file(final), "rows": len(rows), "pid": pid}


def _result(future) -> tuple[np.ndarray, tuple[int, int]] | str:
    """A decode's result, or why this file could not be read (reported in its row, the run goes on)."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - whatever this file does wrong is the file's
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def row_of(task: str, answer: dict, rel: str, masks: str | None) -> dict:
    """One image's answer (tasks/<task>/serve.py's, as /v1/predict gives it) -> its row's task columns."""
    ood = {"ood_score": answer.get("ood_score"), "in_distribution": answer.get("in_distribution")}
    if task == "classification":
        top = answer["top_k"]
        return {"label": top[0]["label"], "probability": top[0]["probability"], "top_k": _js(top), **ood}
    if task == "multilabel":
        return {"tags": _js([t["label"] for t in answer["tags"]]), "top_k": _js(answer["top_k"]), **ood}
    if task == "detection":
        return {"n_detections": len(answer["detections"]), "detections": _js(answer["detections"])}
    if task == "segmentation":
        import base64

        inside = not Path(rel).is_absolute() and ".." not in Path(rel).parts  # else a name that stays in `masks`
        target = Path(masks) / (rel if inside else hashlib.sha256(rel.encode()).hexdigest()[:16] + "-" + Path(rel).name)
        target = write_bytes(target.with_name(target.name + ".png"), base64.b64decode(answer["mask_png"]))
        return {"mask": str(target), "class_fractions": _js(answer["class_fractions"])}
    raise PredictError(f"no batch prediction for task {task!r}")


def _js(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# ---------------------------------------------------------------- driver side

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tasks.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="export/model.onnx", help="the exported model (default export/model.onnx)")
    ap.add_argument("--images", required=True, help="a folder of images, or a CSV with a `path` column")
    ap.add_argument("--out", required=True, help="predictions.csv | .jsonl | .parquet")
    ap.add_argument("--executor", choices=("local", "dask"), default=None,
                    help="default: params.yaml's features.executor, else local")
    ap.add_argument("--address", default=None, help="a running Dask scheduler (default: features.dask.address; "
                                                    "none: a LocalCluster on 127.0.0.1)")
    ap.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes (features.dask.n_workers)")
    ap.add_argument("--threads-per-worker", type=int, default=None, help="(features.dask.threads_per_worker)")
    ap.add_argument("--shard-size", type=int, default=None, help="images per shard (features.shard_size)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads per process (0: the worker's "
                                                          "threads, or this machine's cores)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                    help="onnxruntime's device on each process (default cpu)")
    ap.add_argument("--top-k", default=None, help="classification, multilabel: labels per row (default 5)")
    ap.add_argument("--threshold", default=None, help="multilabel: one tag threshold for all (default: the "
                                                      "model's per tag); detection: the score threshold")
    ap.add_argument("--masks", default=None, help="segmentation: where the masks go (default <out>.masks/)")
    ap.add_argument("--params", default="params.yaml", help="where features.executor/dask/shard_size are read")
    a = ap.parse_args(argv)
    for name in ("workers", "threads_per_worker", "shard_size", "batch_size"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return a


def executor_settings(a: argparse.Namespace) -> tuple[str, Any, int]:
    """(executor, its dask params, shard size): params.yaml's `features` section when present, the flags winning."""
    executor, shard_size = "local", 256
    dask = SimpleNamespace(address=None, n_workers=2, threads_per_worker=1, window=None)
    if Path(a.params).is_file():
        from tasks.config import load_params

        f = load_params(a.params).features
        executor, shard_size = f.executor, f.shard_size
        dask = SimpleNamespace(address=f.dask.address, n_workers=f.dask.n_workers,
                               threads_per_worker=f.dask.threads_per_worker, window=f.dask.window)
    executor = a.executor or executor
    if a.address:
        dask.address, executor = a.address, a.executor or "dask"
    dask.n_workers = a.workers or dask.n_workers
    dask.threads_per_worker = a.threads_per_worker or dask.threads_per_worker
    return executor, dask, a.shard_size or shard_size


def run(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm

    from tasks.distributed import Shard, run_sharded

    a = parse_args(argv)
    out = Path(a.out)
    if out.suffix.lower() not in FORMATS:
        raise PredictError(f"--out {out}: name a {' / '.join(FORMATS)} file")
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise PredictError("--out .parquet needs pyarrow: pip install -e '.[distributed]' (or write .csv)") from None
    model_path = Path(a.model)
    if not model_path.is_file():
        raise PredictError(f"--model {model_path} does not exist: export one first (dvc repro export, or make run)")
    try:
        model = _model(str(model_path.resolve()), a.device, a.threads or (os.cpu_count() or 1))
        options = {k: v for k, v in (("top_k", a.top_k), ("threshold", a.threshold)) if v is not None}
        query = model.serving.query(dict(options))
    except (contract.ModelError, contract.QueryError) as exc:
        raise PredictError(f"{model_path}: {exc}") from None
    root, paths = list_images(Path(a.images))
    executor, dask_params, shard_size = executor_settings(a)
    masks = str(Path(a.masks or f"{out}.masks").resolve()) if model.task == "segmentation" else None

    parts = out.with_name(out.name + ".parts")
    job = {"version": JOB_VERSION, "model_sha256": sha256_file(model_path), "images": str(root.resolve()),
           "list_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(), "shard_size": shard_size,
           "query": query, "masks": masks}
    job_file = parts / "job.json"
    if parts.exists():
        try:
            same = json.loads(job_file.read_text()) == json.loads(json.dumps(job))
        except (OSError, ValueError):
            same = False
        if not same:  # parts of another model, image list or options: not this run's to resume
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if not job_file.exists():
        job_file.write_text(json.dumps(job))
    shards = [Shard(f"part-{k:05d}", "images", np.arange(s, min(s + shard_size, len(paths))), paths[s : s + shard_size])
              for k, s in enumerate(range(0, len(paths), shard_size))]
    # by its module's name: run as `python -m tasks.predict` this module is __main__, which workers cannot import
    worker_fn = importlib.import_module("tasks.predict").predict_shard
    work = functools.partial(worker_fn, model_path=str(model_path.resolve()), device=a.device,
                             threads=a.threads, root=str(root.resolve()), query=query, masks=masks,
                             batch_size=a.batch_size)
    t0 = time.perf_counter()
    with tqdm(total=len(paths), desc=f"predict ({executor})", unit="img", disable=None) as bar:
        stats = run_sharded(shards, work, parts, dask_params, lambda s, f: None, bar.update, suffix=".jsonl",
                            fix="re-run", local=executor == "local")
    seconds = time.perf_counter() - t0
    summary = assemble([parts / f"{s.name}.jsonl" for s in shards], out, ["path", "width", "height", "error",
                                                                          *COLUMNS[model.task]])
    shutil.rmtree(parts, ignore_errors=True)
    return {"task": model.task, "images": len(paths), "out": str(out), "executor": executor, "seconds": round(seconds, 2),
            "images_per_s": round(len(paths) / max(seconds, 1e-9), 1), "shards": stats["shards"],
            "shards_resumed": stats["from_journal"], "shards_computed": stats["computed"], **summary}


def read_rows(files: list[Path]) -> Iterator[list[dict]]:
    for f in files:
        with open(f, encoding="utf-8") as fh:
            yield [json.loads(line) for line in fh if line.strip()]


def assemble(files: list[Path], out: Path, columns: list[str]) -> dict:
    """The parts in order -> `out` (streamed, one shard at a time), written to a temporary and swapped in."""
    counts = {"unreadable": 0, "flagged_ood": 0}
    labels: dict[str, int] = {}
    fmt = out.suffix.lower()
    writer = None
    with atomic_file(out) as fb:
        text = io.TextIOWrapper(fb, encoding="utf-8", newline="") if fmt != ".parquet" else None
        if fmt == ".csv":
            cw = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
            cw.writeheader()
        for rows in read_rows(files):
            for r in rows:
                counts["unreadable"] += bool(r["error"])
                counts["flagged_ood"] += r.get("in_distribution") is False
                if r.get("label") is not None:
                    labels[r["label"]] = labels.get(r["label"], 0) + 1
            if fmt == ".csv":
                cw.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows)
            elif fmt == ".jsonl":
                text.writelines(json.dumps({k: r.get(k) for k in columns}) + "\n" for r in rows)
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows], schema=_schema(columns))
                writer = writer or pq.ParquetWriter(fb, table.schema)
                writer.write_table(table)
        if writer is not None:
            writer.close()
        if text is not None:
            text.flush()
            text.detach()  # atomic_file closes the file itself
    return {**counts, "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])) if labels else None}


def _schema(columns: list[str]):
    import pyarrow as pa

    types = {"width": pa.int64(), "height": pa.int64(), "probability": pa.float64(), "ood_score": pa.float64(),
             "in_distribution": pa.bool_(), "n_detections": pa.int64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in columns])


def describe(r: dict) -> str:
    extra = f", {r['flagged_ood']} flagged out of distribution" if r["task"] in ("classification", "multilabel") else ""
    labels = (", labels " + ", ".join(f"{k} {v}" for k, v in list(r["labels"].items())[:5])) if r.get("labels") else ""
    resumed = f", {r['shards_resumed']} of {r['shards']} shards resumed" if r["shards_resumed"] else ""
    return (f"predict: {r['images']} images -> {r['out']} in {r['seconds']} s ({r['images_per_s']} img/s, "
            f"{r['executor']}{resumed}): {r['unreadable']} unreadable{extra}{labels}")


def main(argv: list[str] | None = None) -> None:
    try:
        result = run(argv)
    except UserError as exc:
        sys.exit(f"predict: {exc}")
    except KeyboardInterrupt:
        sys.exit("predict: interrupted; the finished shards are kept: run the same command again to resume")
    print(describe(result))


if __name__ == "__main__":
    main()
