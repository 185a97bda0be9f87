"""features.executor: dask on a real LocalCluster of 2 single-threaded worker processes on 127.0.0.1.

The same arrays as the local path (bit-identical: one onnxruntime thread each); a worker SIGKILLed mid-shard ->
every shard once, nothing temporary left, the lost shard run again elsewhere; the driver SIGKILLed mid-run ->
the re-run computes only the shards its journal lacks; a shard that fails every time -> one-line error, the last
good features kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, Workdir, make_imagefolder, tiny_params
from tasks.files import sha256_file



@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as c:
        with Client(c) as client:
            client.wait_for_workers(2, timeout=60)
            yield c, client


@pytest.fixture(scope="module")
def data(tmp_path_factory, backbone_dir):
    """150 generated images (75 train: 11 beyond the domain gap's 64-image subsample), prepared, and the local
    path's features as the reference."""
    base = tmp_path_factory.mktemp("dist")
    root = make_imagefolder(base / "images", per_class=50)
    ref = Workdir(base / "ref", backbone_dir)
    params = tiny_params(root)
    ref.prepare(params)
    ref.features_(params)
    return base, root, ref.layout.feature_cache().load(), backbone_dir


def dask_params(root: Path, address: str, shard_size: int = 6):
    params = tiny_params(root)
    features = params.features.model_copy(update={
        "executor": "dask", "shard_size": shard_size,
        "dask": params.features.dask.model_copy(update={"address": address})})
    return params.model_copy(update={"features": features})


def workdir(data, name: str) -> Workdir:
    base, root, _, backbone = data
    w = Workdir(base / name, backbone)
    w.prepare(tiny_params(root))
    return w


def shard_dir(w: Workdir) -> Path:
    dirs = list((w.layout.features.parent / ".features-shards").glob("*"))
    return dirs[0] if dirs else w.layout.features.parent / ".features-shards" / "none"


def assert_same(w: Workdir, ref: dict) -> None:
    got = w.layout.feature_cache().load()
    for k in ("x_train", "x_val", "x_test"):
        assert np.array_equal(got[k], ref[k]), (k, float(np.abs(got[k] - ref[k]).max()))


def assert_clean(w: Workdir) -> None:
    root = w.layout.features.parent
    assert not (root / ".features-shards").exists()  # the shards go once the features are in place
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".staging" in p.name]


def test_the_cluster_gives_the_local_arrays(cluster, data):
    c, _ = cluster
    w = workdir(data, "same")
    w.features_(dask_params(data[1], c.scheduler_address))
    assert_same(w, data[2])
    info = json.loads((w.layout.features / "key.json").read_text())
    assert info["key"] == json.loads((data[0] / "ref" / "features" / "key.json").read_text())["key"]
    assert info["dask"]["computed"] == info["dask"]["shards"] >= 8 and info["dask"]["workers"] == 2
    assert_clean(w)


def test_a_killed_worker_loses_nothing_and_doubles_nothing(cluster, data):
    c, client = cluster
    w = workdir(data, "killed")
    seen: dict = {}

    def progress(done: int, total: int) -> None:
        d = shard_dir(w)
        journal = d / "journal.jsonl"
        if not journal.exists():
            return
        from tasks.distributed import attempts

        seen["attempts"], seen["journal"] = attempts(d), journal.read_text().splitlines()
        finished = {json.loads(line)["name"] for line in seen["journal"]}
        if "victim" not in seen and len(finished) >= 2:
            running = [(n, pid) for n, pid in seen["attempts"] if n not in finished]
            if running:
                seen["victim"], seen["victim_shard"] = running[-1][1], running[-1][0]
                os.kill(running[-1][1], signal.SIGKILL)

    w.features_(dask_params(data[1], c.scheduler_address, shard_size=10), progress=progress)
    assert "victim" in seen, "no worker was killed: the test did not test anything"
    assert_same(w, data[2])
    names = [json.loads(line)["name"] for line in seen["journal"]]
    assert len(names) == len(set(names))  # every shard journalled once
    info = json.loads((w.layout.features / "key.json").read_text())["dask"]
    assert len(names) == info["shards"] == info["computed"]
    runs = [pid for n, pid in seen["attempts"] if n == seen["victim_shard"]]
    assert len(runs) >= 2 and runs[0] == seen["victim"] and runs[-1] != seen["victim"]  # ran again elsewhere
    assert_clean(w)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_a_killed_driver_resumes_from_its_journal(cluster, data):
    c, _ = cluster
    w = workdir(data, "driver")
    script = (
        "import sys; sys.path[:0] = [{tests!r}, {root!r}]\n"
        "from conftest import tiny_params\n"
        "from test_distributed import dask_params\n"
        "from tasks import features\n"
        "from tasks.layout import Layout\n"
        "features.run(dask_params(__import__('pathlib').Path({data!r}), {addr!r}, shard_size=3), Layout({base!r}))\n"
    ).format(tests=str(ROOT / "tests"), root=str(ROOT), data=str(data[1]), addr=c.scheduler_address, base=str(w.base))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        journal = shard_dir(w) / "journal.jsonl"
        if journal.exists() and len(journal.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the driver ended before it was killed: {proc.stderr.read()[-2000:]}"
    proc.kill()
    proc.wait(30)
    assert not (w.layout.features / "key.json").exists()  # killed before the features were swapped in
    from tasks.distributed import attempts, read_journal

    d = shard_dir(w)
    kept = read_journal(d / "journal.jsonl", d)
    assert len(kept) >= 4
    before = len(attempts(d))
    seen: dict = {}
    w.features_(dask_params(data[1], c.scheduler_address, shard_size=3),
                progress=lambda done, total: seen.update(attempts=attempts(d)))
    again = {n for n, _ in seen["attempts"][before:]}
    assert not again & set(kept), f"journalled shards computed again: {sorted(again & set(kept))}"
    info = json.loads((w.layout.features / "key.json").read_text())["dask"]
    assert info["from_journal"] == len(kept) and info["from_journal"] + info["computed"] == info["shards"]
    assert_same(w, data[2])
    assert_clean(w)


def test_a_shard_that_always_fails_is_reported_and_the_last_features_stay(cluster, data):
    from tasks.config import UserError

    c, _ = cluster
    w = workdir(data, "broken")
    params = dask_params(data[1], c.scheduler_address)
    w.features_(params)
    before = {p.name: sha256_file(p) for p in w.layout.features.iterdir() if p.is_file()}
    dataset = w.layout.dataset()
    victim = dataset.resolve(dataset.split("val")[3])
    victim.unlink()  # the prepared file may be a link into the source: replace it, never write through it
    victim.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(UserError) as err:
        w.features_(params, force=True)
    message = str(err.value)
    assert "\n" not in message and "fails every time" in message and str(victim) in message and "val-" in message
    assert {p.name: sha256_file(p) for p in w.layout.features.iterdir() if p.is_file()} == before


def test_an_unreachable_scheduler_is_one_line(data, tmp_path):
    import socket

    from tasks.config import UserError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = workdir(data, "unreachable")
    with pytest.raises(UserError, match=f"features.dask.address=tcp://127.0.0.1:{port}: no scheduler answers"):
        w.features_(dask_params(data[1], f"tcp://127.0.0.1:{port}"), force=True)


def test_dense_features_on_the_cluster_are_refused_in_one_line():
    """Detection/segmentation maps run in-process only: executor dask says so instead of silently running here."""
    from tasks import dense
    from tasks.config import UserError, parse_params

    params = parse_params({"task": "detection", "data": {"dataset": "voc", "root": "unused"},
                           "features": {"executor": "dask"}})
    with pytest.raises(UserError, match="set features.executor: local") as e:
        dense.compute(params, None, None, None, "", "onnxruntime", {}, None, None)
    assert "\n" not in str(e.value)
