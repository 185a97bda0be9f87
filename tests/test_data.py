import contextlib
import csv
import hashlib
import io
import os
import pickle
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import closed_port_url, draw, make_imagefolder, tiny_params
from tasks import data, imagefiles
from tasks.config import Params, parse_params
from tasks.imagefiles import DataError
from tasks.files import read_json
from tasks.layout import Layout, stratified_split


def prepare(data_params, root: Path) -> data.PrepareResult:
    """The prepare stage on a Layout rooted at `root`."""
    return data.run(Params(data=data_params), Layout(root))


def prepared(root: Path) -> Path:
    return Layout(root).prepared


def load_dataset(root: Path):
    return Layout(root).dataset()


def manifest_rows(prepared: Path) -> list[dict]:
    with open(prepared / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_digits_are_written_as_images_and_split_deterministically(tmp_path):
    params = parse_params({"data": {"max_images_per_class": 4}}).data
    a = prepare(params, tmp_path / "a")
    b = prepare(params, tmp_path / "b")
    assert a.manifest_sha256 == b.manifest_sha256
    ds = load_dataset(tmp_path / "a")
    assert ds.classes == [str(i) for i in range(10)]
    assert all(a.counts[s] == 40 for s in ("train", "val", "test"))
    img = Image.open(ds.resolve(ds.items[0]))
    assert img.size == (96, 96) and img.format == "PNG"


def test_bad_files_are_reported_and_skipped_and_the_pipeline_completes(imagefolder, workdir):
    (imagefolder / "circles" / "truncated.jpg").write_bytes((imagefolder / "circles" / "circles_01.jpg").read_bytes()[:300])
    (imagefolder / "squares" / "empty.jpg").write_bytes(b"")
    (imagefolder / "stripes" / "notes.jpg").write_text("this is not an image\n")
    params = tiny_params(imagefolder)
    metrics = workdir.run_all(params).metrics

    report = read_json(workdir.prepared / "report.json")
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.jpg"}
    assert "corrupt or truncated" in reasons["truncated.jpg"]
    assert "empty file" in reasons["empty.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    paths = {r["path"] for r in manifest_rows(workdir.prepared)}
    assert not any(p.endswith(("truncated.jpg", "empty.jpg", "notes.jpg")) for p in paths)
    assert metrics["skipped_images"] == 3
    assert (workdir.reports / "metrics.json").exists()


def test_symlinks_out_of_the_root_are_refused(imagefolder, tmp_path):
    outside = tmp_path / "secret.png"
    draw("circles", np.random.default_rng(1)).save(outside)
    (imagefolder / "circles" / "escape.png").symlink_to(outside)
    (imagefolder / "squares" / "inside.png").symlink_to(imagefolder / "squares" / "squares_00.png")
    prepare(tiny_params(imagefolder).data, tmp_path / "prepared")
    report = read_json(prepared(tmp_path / "prepared") / "report.json")
    assert [s["reason"] for s in report["skipped"]] == ["symlink points outside the dataset root"]
    paths = {r["path"] for r in manifest_rows(prepared(tmp_path / "prepared"))}
    assert "circles/escape.png" not in paths and "squares/inside.png" in paths


def test_too_few_images_is_a_clear_error(imagefolder, tmp_path):
    for f in list((imagefolder / "stripes").iterdir())[1:]:
        f.write_bytes(b"")
    with pytest.raises(DataError) as e:
        prepare(tiny_params(imagefolder).data, tmp_path / "prepared")
    msg = str(e.value)
    assert "'stripes': 1" in msg and "data.min_images_per_class" in msg and "report.json" in msg
    assert not prepared(tmp_path / "prepared").exists()  # nothing half-written
    report = read_json(Layout(tmp_path / "prepared").prepare_report)  # the report the message points to exists
    assert str(Layout(tmp_path / "prepared").prepare_report) in msg
    assert report["status"] == "failed" and report["skipped_count"] == 7


def test_same_image_in_two_classes_is_reported(imagefolder, tmp_path):
    src = imagefolder / "circles" / "circles_01.jpg"
    (imagefolder / "squares" / "copy.jpg").write_bytes(src.read_bytes())
    prepare(tiny_params(imagefolder).data, tmp_path / "prepared")
    dup = read_json(prepared(tmp_path / "prepared") / "report.json")["duplicates_across_classes"]
    assert len(dup) == 1
    assert {f["label"] for f in dup[0]["files"]} == {"circles", "squares"}


def test_presplit_folders_are_kept(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=3, splits=("train", "val"))
    r = prepare(tiny_params(root).data, tmp_path / "prepared")
    assert r.counts == {"train": 9, "val": 9, "test": 0}
    rows = manifest_rows(prepared(tmp_path / "prepared"))
    assert all(row["path"].startswith(row["split"] + "/") for row in rows)


def test_split_is_stratified_and_stable_when_files_are_added():
    names = [f"c/{i}.jpg" for i in range(40)]
    a = stratified_split(names, 0.2, 0.2, seed=0)
    b = stratified_split(names + ["c/new.jpg"], 0.2, 0.2, seed=0)
    assert sorted(a.values()).count("test") == 8 and sorted(a.values()).count("val") == 8
    moved = [n for n in names if a[n] != b[n]]
    assert len(moved) <= 2  # hash order: adding a file moves at most a boundary file
    assert stratified_split(["x.jpg", "y.jpg"], 0.15, 0.15, 0)["x.jpg"] in ("train", "test", "val")
    assert "train" in stratified_split(["x.jpg", "y.jpg"], 0.4, 0.4, 0).values()


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        prepare(tiny_params(tmp_path / "nope").data, tmp_path / "prepared")


# ---------------------------------------------------------------- CIFAR through torchvision's downloader


def cifar_archive(directory: Path) -> dict:
    """A tiny archive in CIFAR-10's exact format (pickled batches in a tar.gz) and its md5 sums."""
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def batch(n_per_class: int) -> dict:
        labels = [c for c in (0, 1) for _ in range(n_per_class)]
        return {"data": rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8), "labels": labels}

    files = {f"data_batch_{i}": batch(4 if i == 1 else 0) for i in range(1, 6)}
    files["test_batch"] = batch(2)
    files["batches.meta"] = {"label_names": names}
    blobs = {k: pickle.dumps(v) for k, v in files.items()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (directory / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    md5 = {k: hashlib.md5(v).hexdigest() for k, v in blobs.items()}
    md5["archive"] = hashlib.md5(buf.getvalue()).hexdigest()
    return md5


def point_torchvision_at(monkeypatch, md5: dict) -> None:
    # The only stand-in: torchvision pins the real archive's md5 sums, and this test serves a
    # tiny archive of the same format, so its sums replace the pinned ones. The download,
    # checksum and extraction code that runs is torchvision's own, over real HTTP.
    from torchvision import datasets

    monkeypatch.setattr(datasets.CIFAR10, "tgz_md5", md5["archive"])
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]})


def test_cifar10_downloads_from_a_mirror_with_checksums(tmp_path, monkeypatch, http_server):
    served = tmp_path / "served"
    served.mkdir()
    point_torchvision_at(monkeypatch, cifar_archive(served))
    base = http_server(served)
    params = parse_params({"data": {"dataset": "cifar10", "download_url": f"{base}/cifar-10-python.tar.gz",
                                    "download_dir": str(tmp_path / "downloads"), "val_fraction": 0.25}}).data
    r = prepare(params, tmp_path / "prepared")
    assert r.counts == {"train": 6, "val": 2, "test": 4}
    ds = load_dataset(tmp_path / "prepared")
    assert ds.classes == ["airplane", "automobile"]
    assert Image.open(ds.resolve(ds.items[0])).size == (32, 32)
    assert (tmp_path / "downloads" / "cifar-10-python.tar.gz").exists()


def test_cifar10_offline_says_which_archive_to_place_where(tmp_path, monkeypatch):
    params = parse_params({"data": {"dataset": "cifar10", "download_url": closed_port_url("cifar-10-python.tar.gz"),
                                    "download_dir": str(tmp_path / "downloads")}}).data
    with pytest.raises(DataError) as e:
        prepare(params, tmp_path / "prepared")
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and str((tmp_path / "downloads").resolve()) in msg
    assert "md5" in msg


def test_cifar10_archive_placed_by_hand_is_used_offline(tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    point_torchvision_at(monkeypatch, cifar_archive(downloads))
    params = parse_params({"data": {"dataset": "cifar10", "download_url": closed_port_url("cifar-10-python.tar.gz"),
                                    "download_dir": str(downloads)}}).data
    assert prepare(params, tmp_path / "prepared").counts["test"] == 4


# ---------------------------------------------------------------- edge cases: names, special files, sizes, empty classes


def report_of(root: Path) -> dict:
    """The run's report (written whether prepare succeeded or failed)."""
    return read_json(Layout(root).prepare_report)


def test_names_that_are_not_utf8_are_skipped_with_a_printable_path(imagefolder, tmp_path):
    jpg = (imagefolder / "circles" / "circles_01.jpg").read_bytes()
    try:
        with open(os.fsencode(imagefolder / "circles") + b"/caf\xe9.jpg", "wb") as f:
            f.write(jpg)
        bad_class = os.fsencode(imagefolder) + b"/cl\xe9s"
        os.mkdir(bad_class)
        for i in range(3):
            with open(bad_class + b"/%d.jpg" % i, "wb") as f:
                f.write(jpg)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    r = prepare(tiny_params(imagefolder).data, tmp_path / "prepared")
    assert r.skipped == 2
    skipped = read_json(prepared(tmp_path / "prepared") / "report.json")["skipped"]
    assert {s["path"]: s["reason"] for s in skipped} == {
        "circles/caf\\xe9.jpg": "file name is not valid UTF-8: rename it",
        "cl\\xe9s/": "class folder name is not valid UTF-8: rename it",
    }
    assert load_dataset(tmp_path / "prepared").classes == ["circles", "squares", "stripes"]
    assert len(manifest_rows(prepared(tmp_path / "prepared"))) == 24


@contextlib.contextmanager
def fifo_watchdog(fifo: Path):
    """Yields a list that gets an entry each time someone opened `fifo` to read it.

    A reader blocked on the FIFO (the bug these tests catch) is handed EOF, so the test fails instead of
    hanging the suite.
    """
    stop, opened = threading.Event(), []

    def unblock_readers() -> None:
        while not stop.wait(0.2):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO unless someone has it open to read
                opened.append(True)
            except OSError:
                pass

    watchdog = threading.Thread(target=unblock_readers, daemon=True)
    watchdog.start()
    try:
        yield opened
    finally:
        stop.set()
        watchdog.join()


@pytest.mark.timeout(60)
def test_fifos_and_sockets_are_skipped_and_never_opened(imagefolder, tmp_path):
    fifo = imagefolder / "circles" / "pipe.jpg"
    os.mkfifo(fifo)
    (imagefolder / "squares" / "link.jpg").symlink_to(fifo)  # inside the root, resolves to the FIFO
    sock_path = imagefolder / "stripes" / "s.png"
    with socket.socket(socket.AF_UNIX) as sock, fifo_watchdog(fifo) as opened:
        if len(os.fsencode(sock_path)) < 100:  # AF_UNIX path limit
            sock.bind(str(sock_path))
        assert imagefiles.check_image(fifo) == (None, "not a regular file (fifo)")  # the check itself, not only the scan
        r = prepare(tiny_params(imagefolder).data, tmp_path / "prepared")
    assert not opened
    reasons = {s["path"]: s["reason"] for s in read_json(prepared(tmp_path / "prepared") / "report.json")["skipped"]}
    expected = {"circles/pipe.jpg": "not a regular file (fifo)", "squares/link.jpg": "not a regular file (fifo)"}
    if sock_path.exists():
        expected["stripes/s.png"] = "not a regular file (socket)"
    assert reasons == expected and r.skipped == len(expected)


def test_huge_files_are_refused_unread_and_hashes_are_streamed(imagefolder, tmp_path):
    import tracemalloc

    from tasks.files import sha256_file

    with open(imagefolder / "circles" / "big.jpg", "wb") as f:
        f.truncate(300 * 2**20)  # sparse: no disk, no time
    with open(imagefolder / "squares" / "zeros.jpg", "wb") as f:
        f.truncate(200 * 2**20)  # under the cap, not an image
    padded = imagefolder / "stripes" / "stripes_00.png"
    with open(padded, "r+b") as f:
        f.truncate(100 * 2**20)  # a valid PNG followed by 100 MB of zeros
    tracemalloc.start()
    try:
        assert imagefiles.check_image(imagefolder / "squares" / "zeros.jpg") == (None, "not an image (Pillow cannot identify the format)")
        sha, reason = imagefiles.check_image(padded)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reason is None and sha == sha256_file(padded)  # over the whole content
    assert peak < 16 * 2**20  # neither file was held in memory

    prepare(tiny_params(imagefolder).data, tmp_path / "prepared")
    report = read_json(prepared(tmp_path / "prepared") / "report.json")
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert reasons == {
        "circles/big.jpg": f"file too large ({300 * 2**20} bytes > {imagefiles.MAX_FILE_BYTES})",
        "squares/zeros.jpg": "not an image (Pillow cannot identify the format)",
    }
    rows = {r["path"]: r["sha256"] for r in manifest_rows(prepared(tmp_path / "prepared"))}
    assert rows["stripes/stripes_00.png"] == sha


def test_an_empty_class_folder_is_reported_and_the_run_goes_on(imagefolder, tmp_path):
    (imagefolder / "empty").mkdir()
    (imagefolder / "hidden_only" / "sub").mkdir(parents=True)
    (imagefolder / "hidden_only" / ".DS_Store").write_bytes(b"x")
    r = prepare(tiny_params(imagefolder).data, tmp_path / "prepared")
    report = read_json(prepared(tmp_path / "prepared") / "report.json")
    assert report["empty_classes"] == ["empty", "hidden_only"]
    assert [(s["path"], s["reason"]) for s in report["skipped"]] == [
        ("empty/", "class folder holds no files"), ("hidden_only/", "class folder holds no files")]
    assert r.skipped == 2
    assert load_dataset(tmp_path / "prepared").classes == ["circles", "squares", "stripes"]


def test_a_class_empty_in_one_split_only_is_still_a_class(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=3, splits=("train", "val"))
    for f in (root / "val" / "circles").iterdir():
        f.unlink()
    (root / "val" / "extra").mkdir()
    prepare(tiny_params(root).data, tmp_path / "prepared")
    report = read_json(prepared(tmp_path / "prepared") / "report.json")
    assert report["empty_classes"] == ["extra"]
    assert [s["path"] for s in report["skipped"]] == ["val/extra/"]
    assert load_dataset(tmp_path / "prepared").classes == ["circles", "squares", "stripes"]


def test_empty_class_folders_leaving_one_class_is_a_clear_error(imagefolder, tmp_path):
    for c in ("squares", "stripes"):
        for f in (imagefolder / c).iterdir():
            f.unlink()
    with pytest.raises(DataError) as e:
        prepare(tiny_params(imagefolder).data, tmp_path / "prepared")
    msg = str(e.value)
    assert "at least 2 classes" in msg and "'circles'" in msg and "'squares', 'stripes'" in msg
    assert not prepared(tmp_path / "prepared").exists()
    assert [s["path"] for s in report_of(tmp_path / "prepared")["skipped"]] == ["squares/", "stripes/"]


@pytest.mark.timeout(60)
def test_a_class_whose_files_are_all_refused_is_too_few_not_empty(imagefolder, tmp_path):
    for f in (imagefolder / "stripes").iterdir():
        f.unlink()
    os.mkfifo(imagefolder / "stripes" / "pipe.png")
    (imagefolder / "stripes" / "empty.png").write_bytes(b"")
    with fifo_watchdog(imagefolder / "stripes" / "pipe.png") as opened:
        with pytest.raises(DataError, match=r"too few usable images in class\(es\) 'stripes': 0"):
            prepare(tiny_params(imagefolder).data, tmp_path / "prepared")
    assert not opened
    reasons = [s["reason"] for s in report_of(tmp_path / "prepared")["skipped"]]
    assert sorted(reasons) == ["empty file (0 bytes)", "not a regular file (fifo)"]
