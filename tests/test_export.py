"""ONNX export: one file, raw pixels in, named probabilities out, proven equal to PyTorch."""

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import ROOT, export_, tiny_params
from tasks.export import ExportError, check_parity, eval_batches, export_onnx
from tasks.files import read_json
from tasks.layout import Layout
from tasks.model import load_classifier
from tasks.preprocess import load_image
from tasks.runtime import CPU, open_session


def load_dataset(prepared):
    return Layout(prepared.parent.parent).dataset()


@pytest.fixture
def exported(imagefolder, workdir):
    params = tiny_params(imagefolder)
    workdir.run_all(params)
    result = export_(workdir, params)
    return workdir, params, result


def test_parity_gate_passes_and_onnx_accuracy_is_pytorch_accuracy(exported):
    w, _, r = exported
    q = read_json(w.reports / "parity.json")
    assert q["passed"] and q["argmax_agreement"] == 1.0 and q["max_abs_prob_diff"] < 1e-4
    assert q["onnx_accuracy"] == q["torch_accuracy"] == read_json(w.reports / "metrics.json")["accuracy"]
    assert q["n"] == len(load_dataset(w.prepared).split("test"))
    assert not list(r.model_path.parent.glob("*.data"))  # one self-contained file


def test_dynamic_batch_and_the_same_answers_as_pytorch(exported):
    w, _, r = exported
    model, meta = load_classifier(w.models / "model.pt")
    ds = load_dataset(w.prepared)
    pixels = np.stack([load_image(ds.resolve(it), model.features.card) for it in ds.items[:7]])
    session, provider = open_session(r.model_path, device="cpu")
    inp = session.get_inputs()[0]
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [224, 224, 3]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "logits", "ood_score"]
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).softmax(-1).numpy()
    for n in (1, 7):
        probs, logits = session.run(["probabilities", "logits"], {"images": pixels[:n]})
        assert probs.shape == (n, 3) and logits.shape == (n, 3)
        assert np.abs(probs - expected[:n]).max() < 1e-4
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_metadata_round_trips_through_onnxruntime(exported):
    w, params, r = exported
    session, _ = open_session(r.model_path, device="cpu")
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["task"] == "classification" and json.loads(meta["labels"]) == ["circles", "squares", "stripes"]
    card = json.loads(meta["preprocessing"])
    assert card["input_size"] == [224, 224] and card["resize_size"] == 256 and card["mean"] == [0.5, 0.5, 0.5]
    assert json.loads(meta["backbone"])["arch"] == "timm:tf_efficientnet_lite0"
    assert meta["dataset_sha256"] == load_dataset(w.prepared).manifest_sha256
    metrics = json.loads(meta["metrics"])
    assert metrics["onnx_accuracy"] == read_json(w.reports / "parity.json")["onnx_accuracy"]
    assert json.loads(meta["params"])["head"] == params.train.head
    assert meta["created"].endswith("+00:00") and "torch" in meta["producer"]
    assert (r.model_path.parent / "labels.txt").read_text().split() == ["circles", "squares", "stripes"]


def test_a_tampered_head_fails_the_gate_and_nothing_is_written(exported, monkeypatch):
    w, params, r = exported
    before = r.model_path.read_bytes()

    import tasks.export as ex

    real = ex.export_onnx

    def tampered(classifier, card, path, opset=17, ood=None):
        evil = __import__("copy").deepcopy(classifier)
        with torch.no_grad():
            evil.head[-1].weight.add_(0.5 * torch.randn_like(evil.head[-1].weight))
        real(evil, card, path, opset, ood)

    monkeypatch.setattr(ex, "export_onnx", tampered)
    with pytest.raises(ExportError, match="parity gate failed"):
        export_(w, params)
    assert r.model_path.read_bytes() == before  # the previous deployable model is untouched
    q = read_json(w.reports / "parity.json")
    assert not q["passed"] and q["max_abs_prob_diff"] > 1e-4


def test_check_parity_counts_disagreements(exported, tmp_path):
    w, params, r = exported
    model, _ = load_classifier(w.models / "model.pt")
    evil = __import__("copy").deepcopy(model)
    with torch.no_grad():
        evil.head[-1].bias.copy_(torch.tensor([100.0, 0.0, 0.0]))  # always "circles"
    export_onnx(evil, model.features.card, tmp_path / "evil.onnx")
    ds = load_dataset(w.prepared)
    q = check_parity(tmp_path / "evil.onnx", model, eval_batches(ds, "test", model.features.card, 8, 1), 1e-4)
    assert not q["passed"] and q["argmax_agreement"] < 1.0


def parse_pbtxt(text: str) -> dict:
    """Enough of protobuf text format to read a Triton config: top-level scalars and tensor entries."""
    scalars = dict(re.findall(r'^(\w+):\s*"?([\w.]+)"?\s*$', text, re.M))
    tensors = {}
    for kind in ("input", "output"):
        block = re.search(rf"^{kind} \[(.*?)^\]", text, re.M | re.S).group(1)
        for entry in re.findall(r"\{(.*?)\}", block, re.S):
            fields = dict(re.findall(r'(\w+):\s*"?([^"\n]+?)"?\s*$', entry, re.M))
            fields["dims"] = [int(d) for d in re.search(r"dims:\s*\[([^\]]*)\]", entry).group(1).split(",")]
            tensors.setdefault(kind, []).append(fields)
    return {**scalars, **tensors}


def test_triton_repository_matches_the_onnx_graph(exported):
    w, params, r = exported
    repo = r.triton_dir
    cfg = parse_pbtxt((repo / "config.pbtxt").read_text())
    graph = onnx.load(str(repo / "1" / "model.onnx")).graph
    assert (repo / "1" / "model.onnx").read_bytes() == r.model_path.read_bytes()
    assert cfg["name"] == params.export.triton_model_name == repo.name
    assert cfg["platform"] == "onnxruntime_onnx" and int(cfg["max_batch_size"]) == 32
    onnx_dtype = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        assert [t["name"] for t in cfg[kind]] == [v.name for v in values]
        for t, v in zip(cfg[kind], values):
            shape = v.type.tensor_type.shape.dim
            assert shape[0].dim_param  # dynamic batch in the graph, left out of Triton's dims
            assert t["dims"] == ([d.dim_value for d in shape[1:]] or [1])  # [N] (ood_score): dims [1], reshaped to []
            assert t["data_type"] == onnx_dtype[v.type.tensor_type.elem_type]
    assert cfg["output"][0]["label_filename"] == "labels.txt"
    assert (repo / "labels.txt").read_text().split() == ["circles", "squares", "stripes"]
    assert "dynamic_batching" in (repo / "config.pbtxt").read_text()


def test_int8_is_written_only_when_accuracy_holds(imagefolder, workdir):
    base = tiny_params(imagefolder)
    workdir.run_all(base)
    for max_drop in (100.0, 0.0):
        params = base.model_copy(update={"export": base.export.model_copy(update=dict(
            quantize="int8", max_int8_drop=max_drop, calibration_images=16))})
        r = export_(workdir, params)
        i = r.int8
        assert i["written"] == (i["acc_drop_pp"] <= max_drop)
        assert (r.model_path.parent / "model.int8.onnx").exists() == i["written"]
        assert i["int8_over_fp32_b1"] > 0 and "fp32_img_s_b32" in i
        if not i["written"]:
            assert "FP32 stays the deployable model" in i["reason"]
    assert read_json(workdir.reports / "parity.json")["int8"]["max_drop_pp"] == 0.0


def test_session_helper_reports_the_provider_it_really_got():
    import onnxruntime as ort

    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]), opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)
    session, provider = open_session(model.SerializeToString(), device="auto")
    assert provider == session.get_providers()[0]
    if "CUDAExecutionProvider" not in ort.get_available_providers() or provider == CPU:
        # No usable GPU here (this machine): auto gives CPU, and asking for CUDA is a clear error.
        assert provider == CPU
        with pytest.raises(RuntimeError, match="cannot run on CUDA"):
            open_session(model.SerializeToString(), device="cuda")


def test_serving_side_modules_do_not_import_torch():
    code = "import sys, tasks.preprocess, tasks.runtime; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
