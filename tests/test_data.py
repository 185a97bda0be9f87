import csv
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import closed_port_url, draw, make_imagefolder, tiny_params
from tasks import data
from tasks.config import Params, parse_params
from tasks.data import DataError
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
