"""The serving deployment's files: `make serve` honours HOST/PORT, the base image takes its Debian mirror
from this machine's apt sources (the repository names no package host), deploy/ stays in small files, and
the server opens exactly one onnxruntime session, through tasks.runtime.open_session."""

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


def test_the_image_gets_every_module_the_server_imports():
    build = (ROOT / "deploy" / "build-image.sh").read_text()
    docker = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'cp deploy/*.py "$CTX/deploy/"' in build and "COPY deploy/*.py /app/deploy/" in docker


# ----------------------------------------------------------------------------------------------- one session

def test_the_server_opens_one_session_through_open_session_with_spinning_off(tmp_path, monkeypatch):
    """tasks.runtime.open_session is the one place sessions are made; the server asks it for spinning off."""
    pytest.importorskip("fastapi")
    import onnxruntime as ort

    from deploy import app as app_module
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
    monkeypatch.setattr(app_module, "open_session", spy_open_session)
    model = tiny_onnx(tmp_path / "m.onnx")
    m = app_module.Model.load(str(model), "classifier", "cpu", threads=1, spinning=False)
    assert len(made) == 1 and calls == [{"device": "cpu", "threads": 1, "spinning": False}]
    assert made[0].get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert m.outputs == [{"name": "scores", "datatype": "FP32", "shape": [-1, 2]}, {"name": "mask", "datatype": "UINT8", "shape": [-1, 4, 4]}]
    # and the signature the pipeline stages use still works, spinning left on
    s, provider = runtime.open_session(model, device="cpu")
    assert provider == "CPUExecutionProvider" and len(made) == 2
    with pytest.raises(Exception, match="does not have configuration"):
        made[1].get_session_config_entry("session.intra_op.allow_spinning")


def tiny_onnx(path: Path) -> Path:
    """uint8 [N, 4, 4, 3] -> scores FP32 [N, 2] and mask UINT8 [N, 4, 4], with the metadata the server reads."""
    import json

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["s"], axes=[1, 2], keepdims=0),
        helper.make_node("Slice", ["s", "starts", "ends", "axis"], ["scores"]),
        helper.make_node("ReduceMax", ["images"], ["mask"], axes=[3], keepdims=0),
    ]
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("starts", 0), ("ends", 2), ("axis", 1))]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 4, 4, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("mask", TensorProto.UINT8, ["N", 4, 4])], initializer=consts)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    card = {"input_size": [4, 4], "resize_size": 4, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    for k, v in (("preprocessing", json.dumps(card)), ("labels", json.dumps(["a", "b"]))):
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(m, str(path))
    return path
