"""features.executor: dask -- the pooled feature pass in shards on a Dask cluster, called from the features stage.

Not Prefect's DaskTaskRunner (it re-runs completed tasks when a worker dies, PrefectHQ/prefect#15442, and a
KilledWorker fails the whole flow, #12968): the stage itself is the Dask client, so `dvc repro` and the flow share
this one path.

- Shards are a pure function of the manifest order and `features.shard_size`, never across splits, with fixed
  names (`<split>-<index>`). A worker computes one shard: decodes its images, runs the network through the
  onnxruntime session it opened once (a per-process cache, as many threads as the worker has), writes
  `<name>.npy` atomically in the shard folder (on the shared file system) and returns its sha256.
- The driver keeps at most `features.dask.window` shards in flight, verifies each finished shard's sha256 and
  journals it (`journal.jsonl`, one fsynced line per shard): a restarted driver computes only what is missing.
  A worker that dies takes its shards with it; the scheduler runs them again elsewhere (each task is pure, the
  write atomic, so a shard is never present twice). A shard that fails the same way every time (an image that
  cannot be decoded) is not retried: the stage fails with one line naming the shard and its images.
- The driver then assembles every split in the feature cache exactly as the local path does (the folder swapped
  in atomically, key.json last); the shard folder is removed once the features are in place.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tasks.config import UserError
from tasks.files import atomic_file, sha256_file

_SESSIONS: dict = {}  # per worker process: (onnx path, threads) -> onnxruntime session, opened once


class DistributedError(UserError):
    """A one-line error of the Dask executor (the cluster, the shared file system, a failing shard)."""


@dataclass(frozen=True)
class Shard:
    name: str  # <split>-<index>
    split: str
    rows: np.ndarray  # positions in the split
    paths: list[str]


def make_shards(order: dict[str, list[int]], paths: dict[str, list[str]], size: int) -> list[Shard]:
    """Shards of `size` images per split, in the given order of each split's rows (a pure function of it)."""
    shards = []
    for split, rows in order.items():
        for k, start in enumerate(range(0, len(rows), size)):
            chunk = np.asarray(rows[start : start + size], dtype=np.int64)
            shards.append(Shard(f"{split}-{k:05d}", split, chunk, [paths[split][i] for i in chunk]))
    return shards


# ---------------------------------------------------------------- worker side

def _session(onnx_path: str, threads: int):
    key = (onnx_path, threads)
    if key not in _SESSIONS:
        from tasks.runtime import open_session

        _SESSIONS[key] = open_session(onnx_path, device="cpu", threads=threads, spinning=False)[0]
    return _SESSIONS[key]


def _worker_threads(default: int = 1) -> int:
    """The Dask worker's threads; `default` outside a worker."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return default


def run_shard(name: str, paths: list[str], out_dir: str, onnx_path: str, card, batch_size: int) -> dict:
    """On a worker: one shard's features -> <out_dir>/<name>.npy (atomic). Returns name, sha256, rows, pid.

    An image that cannot be decoded is returned as an error (not raised), so the scheduler does not retry what
    fails the same way every time."""
    from tasks.preprocess import load_image

    pid = note_attempt(name, out_dir)
    t0 = time.perf_counter()
    session = _session(onnx_path, _worker_threads())
    parts = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for p in paths[start : start + batch_size]:
            try:
                batch.append(load_image(p, card))
            except Exception as exc:  # noqa: BLE001 - any decode failure of this file is the file's
                return {"name": name, "error": f"cannot decode {p}: {exc}", "paths": paths, "pid": pid}
        parts.append(session.run(["features"], {"images": np.stack(batch)})[0])
    x = np.concatenate(parts).astype(np.float32, copy=False)
    final = Path(out_dir) / f"{name}.npy"
    with atomic_file(final) as f:
        np.save(f, x)
    return {"name": name, "sha256": sha256_file(final), "rows": len(x), "pid": pid,
            "seconds": round(time.perf_counter() - t0, 3)}


def note_attempt(name: str, out_dir: str) -> int:
    """One short append per attempt (who ran what: the tests and the bench read it); the worker's pid."""
    pid = os.getpid()
    with open(Path(out_dir) / "attempts.log", "a") as log:
        log.write(f"{name} {pid}\n")
    return pid


def _sees(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


# ---------------------------------------------------------------- driver side

@contextlib.contextmanager
def connect(dask_params, probe_dir: Path) -> Iterator:
    """A Client on features.dask.address or on a LocalCluster (127.0.0.1), its versions and file system checked."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise DistributedError(f"features.executor is dask but dask.distributed is not installed ({exc}): "
                               f"pip install -e '.[distributed]'") from exc
    cluster = None
    try:
        if dask_params.address:
            try:
                client = Client(dask_params.address, timeout="10s")
            except (OSError, TimeoutError) as exc:
                raise DistributedError(f"features.dask.address={dask_params.address}: no scheduler answers ({exc})") from exc
        else:
            cluster = LocalCluster(n_workers=dask_params.n_workers, threads_per_worker=dask_params.threads_per_worker,
                                   processes=True, host="127.0.0.1", dashboard_address=None,
                                   silence_logs=logging.ERROR)
            client = Client(cluster)
        try:
            client.wait_for_workers(1, timeout=60)
            try:
                client.get_versions(check=True)
            except Exception as exc:  # noqa: BLE001 - dask raises ValueError or its own mismatch error
                raise DistributedError(f"the cluster's package versions differ from this machine's: "
                                       f"{str(exc).splitlines()[0]}") from exc
            probe_dir.mkdir(parents=True, exist_ok=True)
            token, probe = uuid.uuid4().hex, probe_dir / "fs-check"
            probe.write_text(token)
            seen = client.run(_sees, str(probe.resolve()), token)
            blind = [w for w, ok in seen.items() if not ok]
            if blind:
                raise DistributedError(f"worker(s) {', '.join(blind)} do not see {probe.resolve()}: features.executor "
                                       f"dask needs the project and the data on a file system every worker mounts at "
                                       f"the same path")
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def read_journal(journal: Path, shard_dir: Path, suffix: str = ".npy") -> dict[str, str]:
    """name -> sha256 of the journalled shards whose file is still there and intact."""
    done = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a killed driver
            f = shard_dir / f"{entry.get('name')}{suffix}"
            if f.is_file() and sha256_file(f) == entry.get("sha256"):
                done[entry["name"]] = entry["sha256"]
    return done


def compute(shards: list[Shard], onnx_path: Path, card, batch_size: int, shard_dir: Path, dask_params,
            on_shard: Callable[[Shard, np.ndarray], None], progress: Callable[[int], None] | None = None) -> dict:
    """Every shard's features, each handed to `on_shard(shard, x)` once (journalled ones from disk). Returns counts."""
    work = functools.partial(run_shard, onnx_path=str(onnx_path.resolve()), card=card, batch_size=batch_size)
    return run_sharded(shards, work, shard_dir, dask_params, lambda s, f: on_shard(s, np.load(f)), progress,
                       suffix=".npy", fix="fix or remove the file and re-run prepare")


def run_sharded(shards: list[Shard], work: Callable[..., dict], shard_dir: Path, dask_params,
                on_shard: Callable[[Shard, Path], None], progress: Callable[[int], None] | None = None, *,
                suffix: str, fix: str, local: bool = False) -> dict:
    """Every shard through `work(name, paths, out_dir)` (on the cluster, or here in order when `local`), each
    finished shard's file handed to `on_shard(shard, path)` once, journalled ones from disk without recomputing.

    `work` writes <out_dir>/<name><suffix> atomically and returns {"name", "sha256", "rows"}, or {"name",
    "error", "paths"} for a failure of its input that would repeat (the run stops with one line ending in `fix`)."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    journal = shard_dir / "journal.jsonl"
    done = read_journal(journal, shard_dir, suffix)
    by_name = {s.name: s for s in shards}
    stats = {"shards": len(shards), "from_journal": len([n for n in done if n in by_name]), "computed": 0}
    for name in done:
        if name in by_name:
            on_shard(by_name[name], shard_dir / f"{name}{suffix}")
            if progress:
                progress(len(by_name[name].paths))
    todo = [s for s in shards if s.name not in done]
    if not todo:
        return stats
    out_dir = str(shard_dir.resolve())
    with open(journal, "a") as jf:
        def finish(r: dict) -> None:
            if "error" in r:
                raise DistributedError(f"shard {r['name']} fails every time: {r['error']} (its images: "
                                       f"{', '.join(r['paths'][:5])}{' ...' if len(r['paths']) > 5 else ''}); {fix}")
            f = shard_dir / f"{r['name']}{suffix}"
            if sha256_file(f) != r["sha256"]:
                raise DistributedError(f"shard {r['name']}: {f} does not match the sha256 its worker wrote")
            s = by_name[r["name"]]
            if r["rows"] != len(s.paths):
                raise DistributedError(f"shard {s.name}: {r['rows']} rows, expected {len(s.paths)}")
            on_shard(s, f)
            jf.write(json.dumps({"name": s.name, "sha256": r["sha256"]}) + "\n")
            jf.flush()
            os.fsync(jf.fileno())
            stats["computed"] += 1
            if progress:
                progress(len(s.paths))

        if local:
            for s in todo:
                finish(work(s.name, s.paths, out_dir))
            return stats
        from distributed import as_completed

        with connect(dask_params, shard_dir) as client:
            threads = sum(client.nthreads().values()) or 1
            window = dask_params.window or 2 * threads
            stats.update(workers=len(client.nthreads()), threads=threads, window=window)
            pending = iter(todo)
            key = hashlib.sha256(out_dir.encode()).hexdigest()[:10]

            def submit(s: Shard):
                return client.submit(work, s.name, s.paths, out_dir, key=f"tlcv-shard-{key}-{s.name}", pure=False)

            running = as_completed([submit(s) for s in (next(pending, None) for _ in range(window)) if s is not None])
            for future in running:
                try:
                    r = future.result()
                except Exception as exc:  # noqa: BLE001 - KilledWorker and friends: one line, nothing journalled
                    raise DistributedError(f"a shard failed on the cluster: {type(exc).__name__}: "
                                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
                finish(r)
                nxt = next(pending, None)
                if nxt is not None:
                    running.add(submit(nxt))
    return stats


def attempts(shard_dir: Path) -> list[tuple[str, int]]:
    """(shard, worker pid) of every attempt the workers started (for the tests and the bench)."""
    log = shard_dir / "attempts.log"
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        name, _, pid = line.partition(" ")
        if pid.isdigit():
            out.append((name, int(pid)))
    return out


def remove(shard_dir: Path) -> None:
    shutil.rmtree(shard_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        shard_dir.parent.rmdir()  # .features-shards/, when no other key's shards wait there
