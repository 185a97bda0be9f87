"""The serving deployment's files: `make serve` honours HOST/PORT, the base image takes its Debian mirror
from this machine's apt sources (the repository names no package host), deploy/ stays in small files, the
image holds everything the server imports at run time and nothing that imports torch, and the server opens
exactly one onnxruntime session, through tasks.runtime.open_session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

MAKE_BASE = ROOT / "deploy" / "make-base-image.sh"


# ----------------------------------------------------------------------------------------------- make serve

@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("args, env, want", [
    ([], {}, ["--model-path export/model.onnx", "--host 127.0.0.1", "--port 8000"]),
    (["PORT=9123", "HOST=0.0.0.0"], {}, ["--host 0.0.0.0", "--port 9123"]),
    ([], {"PORT": "9124", "HOST": "::1", "MODEL_PATH": "/m/x.onnx"}, ["--host ::1", "--port 9124", "--model-path /m/x.onnx"]),
])
def test_make_serve_honours_host_port_and_model_path(args, env, want):
    clean = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST", "MODEL_PATH")}
    out = subprocess.run(["make", "-n", "-W", ".venv/.installed", "serve", *args], cwd=ROOT, env={**clean, **env},
                         capture_output=True, text=True, timeout=60)
    line = next(x for x in out.stdout.splitlines() if "deploy.server" in x)
    for w in want:
        assert w in line, line


# ----------------------------------------------------------------------------------------------- base image mirror

SOURCES_LIST = """\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://one-line.example/debian/ bookworm main contrib
"""
DEB822 = """\
Types: deb
# a comment inside the stanza
URIs: http://deb822.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb822.example/debian-security
Suites: bookworm-security
Components: main
"""
DISABLED = """\
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no
"""
OTHER = """\
Types: deb
URIs: https://other-vendor.example/node_20.x
Suites: nodistro
Components: main
"""
TRIXIE = "deb http://trixie-host.example/debian trixie main\ndeb http://trixie-host.example/debian-security trixie-security main\n"
MIRRORS_FILE = "# mirrors\nhttp://listed.example/debian/ priority:1\nhttp://second.example/debian\n"

MIRROR_CASES = [  # files under APT_ETC -> the mirror picked ("" = none: exit 1)
    ({"sources.list": SOURCES_LIST}, "http://one-line.example/debian"),
    ({"sources.list.d/debian.sources": DEB822}, "http://deb822.example/debian"),
    ({"sources.list.d/a.sources": DISABLED, "sources.list.d/b.sources": OTHER, "sources.list.d/debian.sources": DEB822},
     "http://deb822.example/debian"),
    ({"sources.list.d/nodesource.sources": OTHER, "sources.list.d/debian.sources.disabled": DEB822}, ""),
    ({"sources.list": TRIXIE}, "http://trixie-host.example/debian"),  # no bookworm source: the host's own archive
    ({"sources.list": "deb mirror+file:MIRRORS bookworm main\n", "MIRRORS": MIRRORS_FILE}, "http://listed.example/debian"),
    ({}, ""),
]


@pytest.mark.parametrize("files, want", MIRROR_CASES, ids=range(len(MIRROR_CASES)))
def test_base_image_mirror_comes_from_the_hosts_apt_sources(tmp_path, files, want):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text.replace("MIRRORS", str(tmp_path / "MIRRORS")))
    env = {**os.environ, "APT_ETC": str(tmp_path)}
    env.pop("MIRROR", None)
    r = subprocess.run([str(MAKE_BASE), "--print-mirror"], env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.strip()) == ((0, want) if want else (1, "")), r
    r = subprocess.run([str(MAKE_BASE), "--print-mirror"], env={**env, "MIRROR": "http://override.example/d"},
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "http://override.example/d"


def committed_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


# spelled in pieces, so that this file does not name them either
REGISTRY_HOSTS = [".".join(parts) for parts in (
    ("deb", "debian", "org"), ("security", "debian", "org"), ("ftp", "debian", "org"), ("archive", "ubuntu", "com"),
    ("security", "ubuntu", "com"), ("pypi", "org"), ("files", "pythonhosted", "org"), ("registry", "npmjs", "org"),
    ("docker", "io"), ("quay", "io"), ("ghcr", "io"), ("download", "pytorch", "org"), ("conda", "anaconda", "org"),
    ("repo", "anaconda", "com"), ("proxy", "golang", "org"), ("crates", "io"), ("dl-cdn", "alpinelinux", "org"),
)]


def test_no_committed_file_names_a_package_registry_host():
    hits = []
    for f in committed_files():
        try:
            text = f.read_text(errors="ignore").lower()
        except OSError:
            continue
        hits += [f"{f.relative_to(ROOT)}: {h}" for h in REGISTRY_HOSTS if h in text]
    assert not hits, hits


def test_no_file_in_deploy_is_over_500_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "deploy").iterdir() if p.is_file()}
    assert sizes and max(sizes.values()) <= 500, sizes


TORCH = ("torch", "torchvision", "timm")


def imports_of(path: Path) -> set[str]:
    """Every module an `import` in the file names, function-level ones too (they run), relative ones resolved."""
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from tasks import contract`
    return out


def project_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def runtime_closure() -> set[str]:
    """The repository files the server needs at run time: deploy.server's imports, followed through the project,
    plus tasks.<task>.serve for every task (deploy/predict.py imports it by name), with every package's
    __init__.py on the way."""
    from tasks.contract import TASKS

    todo, seen = ["deploy.server", *(f"tasks.{t}.serve" for t in TASKS)], set()
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for i in range(1, len(parts) + 1):
            f = project_file(".".join(parts[:i]))
            if f is not None and f not in seen:
                seen.add(f)
                todo += [x for x in imports_of(f) if x.split(".")[0] in ("tasks", "deploy", "flows")]
    return {f.relative_to(ROOT).as_posix() for f in seen}


def image_files() -> set[str]:
    out = subprocess.run([str(ROOT / "deploy" / "build-image.sh"), "--print-files"], cwd="/", capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert len(out) == len(set(out)), out
    return set(out)


def dockerfile_copies() -> set[str]:
    """The repository files deploy/Dockerfile's COPY lines take (globs expanded), but the model and requirements."""
    files: set[str] = set()
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                if "$" not in src and src != "deploy/requirements.txt":
                    files |= {p.relative_to(ROOT).as_posix() for p in ROOT.glob(src)}
    return files


def test_the_image_holds_everything_the_server_imports_and_nothing_that_imports_torch():
    closure, image = runtime_closure(), image_files()
    assert {"deploy/server.py", "tasks/contract.py", "tasks/classification/serve.py", "tasks/multilabel/serve.py",
            "tasks/detection/__init__.py", "tasks/segmentation/serve.py"} <= closure
    assert closure <= image, f"the image lacks {sorted(closure - image)} (deploy/build-image.sh image_files)"
    assert dockerfile_copies() == image, (f"deploy/Dockerfile copies {sorted(dockerfile_copies() - image)} more and "
                                          f"{sorted(image - dockerfile_copies())} less than build-image.sh's context")
    torchy = {f: sorted(i for i in imports_of(ROOT / f) if i.split(".")[0] in TORCH) for f in image}
    assert not {f: i for f, i in torchy.items() if i}, torchy
    # each task's serve.py imports nothing of tasks/ but the contract
    for f in image:
        if f.endswith("/serve.py"):
            ours = {i for i in imports_of(ROOT / f) if i.split(".")[0] == "tasks"}
            assert ours <= {"tasks", "tasks.contract"}, (f, ours)


def test_every_task_serves_through_the_same_interface():
    """tasks.<task>.serve.Serving for every task in the contract, with every member of contract.Serving."""
    import importlib
    import inspect

    from tasks import contract

    members = {n for n in dir(contract.Serving) if not n.startswith("_")} | set(contract.Serving.__annotations__)
    assert members >= {"required", "resize_modes", "formats", "answer_pixels", "parameters", "fill_output_shapes",
                       "query", "answer", "overlay"}
    for task in contract.TASKS:
        cls = importlib.import_module(f"tasks.{task}.serve").Serving
        wanted = members - ({"overlay"} if "overlay" not in cls.formats else set())
        assert all(hasattr(cls, n) for n in wanted), (task, sorted(n for n in wanted if not hasattr(cls, n)))
        assert cls.formats[0] == "json" and set(cls.formats) <= {"json", "overlay"}
        assert set(cls.required) <= set(contract.OUTPUTS[task]), task
        assert list(inspect.signature(cls).parameters) == ["meta", "outputs", "input_hw"], task


def test_the_image_files_alone_import_the_server_and_every_task_without_torch(tmp_path):
    """The files the image holds, copied alone: deploy.server and every tasks.<task>.serve import from them
    (nothing from this checkout, nothing from the venv's editable install), and torch never loads."""
    import sys

    for f in image_files():
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    code = (
        "import importlib, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import deploy.server\n"
        "from tasks.contract import TASKS\n"
        "for t in TASKS: importlib.import_module(f'tasks.{t}.serve').Serving\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "ours = [m.__file__ for n, m in sys.modules.items() if n.split('.')[0] in ('tasks', 'deploy')]\n"
        f"assert all(f.startswith({str(tmp_path)!r}) for f in ours), ours\n"
        "print('ok', len(ours))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- one session

def test_the_server_opens_one_session_through_open_session_with_spinning_off(tmp_path, monkeypatch):
    """tasks.runtime.open_session is the one place sessions are made; the server asks it for spinning off."""
    pytest.importorskip("fastapi")
    import onnxruntime as ort

    from deploy import app as app_module
    from deploy import model as model_module
    from tasks import runtime

    made, calls = [], []
    real_session = ort.InferenceSession

    def counting_session(*a, **kw):
        made.append(a[1] if len(a) > 1 else kw.get("sess_options"))
        return real_session(*a, **kw)

    def spy_open_session(*a, **kw):
        calls.append(kw)
        return real_open(*a, **kw)

    real_open = runtime.open_session
    monkeypatch.setattr(ort, "InferenceSession", counting_session)
    monkeypatch.setattr(model_module, "open_session", spy_open_session)  # deploy/app.py's Model is deploy/model.py's
    model = tiny_onnx(tmp_path / "m.onnx")
    m = app_module.Model.load(str(model), "classifier", "cpu", threads=1, spinning=False)
    assert len(made) == 1 and calls == [{"device": "cpu", "threads": 1, "spinning": False}]
    assert made[0].get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert m.task == "classification"
    assert m.outputs == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
                         {"name": "mask", "datatype": "UINT8", "shape": [-1, 4, 4]}]
    # and the signature the pipeline stages use still works, spinning left on
    s, provider = runtime.open_session(model, device="cpu")
    assert provider == "CPUExecutionProvider" and len(made) == 2
    with pytest.raises(Exception, match="does not have configuration"):
        made[1].get_session_config_entry("session.intra_op.allow_spinning")


def tiny_onnx(path: Path) -> Path:
    """uint8 [N, 4, 4, 3] -> probabilities FP32 [N, 2] and mask UINT8 [N, 4, 4], with the metadata the server reads."""
    import json

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["s"], axes=[1, 2], keepdims=0),
        helper.make_node("Slice", ["s", "starts", "ends", "axis"], ["probabilities"]),
        helper.make_node("ReduceMax", ["images"], ["mask"], axes=[3], keepdims=0),
    ]
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("starts", 0), ("ends", 2), ("axis", 1))]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 4, 4, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("mask", TensorProto.UINT8, ["N", 4, 4])], initializer=consts)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    card = {"input_size": [4, 4], "resize_size": 4, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    for k, v in (("task", "classification"), ("preprocessing", json.dumps(card)), ("labels", json.dumps(["a", "b"]))):
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(m, str(path))
    return path
