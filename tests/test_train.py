"""Training: the frozen backbone stays frozen byte for byte, seeds reproduce, checkpoints load safely."""

import numpy as np
import pytest
import torch

from conftest import tiny_params
from tasks.files import read_json
from tasks.checkpoint import load_model
from tasks.head import load_classifier


def backbone_bytes(state: dict) -> dict:
    """Every tensor (BatchNorm buffers included) as raw bytes."""
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in state.items()}


def classifier_backbone(models_dir) -> dict:
    ckpt = torch.load(models_dir / "model.pt", weights_only=True)
    return {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}


@pytest.mark.parametrize("train", [{}, {"optimizer": "adamw"}, {"augment": True, "epochs": 2}])
def test_backbone_state_is_byte_identical_after_training(imagefolder, workdir, backbone_dir, train):
    before = backbone_bytes(torch.load(backbone_dir / "weights.pt", weights_only=True))
    params = tiny_params(imagefolder, **train)
    workdir.prepare(params)
    workdir.features_(params)
    workdir.train(params)
    assert read_json(workdir.reports / "train.json")["solver"] == params.classification.solver
    after = backbone_bytes(classifier_backbone(workdir.models))
    assert after.keys() == before.keys()
    assert [k for k in before if before[k] != after[k]] == []
    assert any("running_var" in k for k in after)  # BatchNorm buffers are part of the check
    assert backbone_bytes(torch.load(backbone_dir / "weights.pt", weights_only=True)) == before


def test_unfreeze_trains_only_the_last_blocks(imagefolder, workdir, backbone_dir):
    before = torch.load(backbone_dir / "weights.pt", weights_only=True)
    params = tiny_params(imagefolder, unfreeze_blocks=1, epochs=2, backbone_lr=0.01)
    workdir.prepare(params)
    workdir.features_(params)
    workdir.train(params)
    after = classifier_backbone(workdir.models)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Lite0's last block is blocks.6 + conv_head + bn2; the stem and blocks.0-5 stay put.
    assert changed and all(k.startswith(("blocks.6.", "conv_head.", "bn2.")) for k in changed)
    assert any("running_mean" in k for k in changed)  # its BatchNorm learned too
    metrics = workdir.evaluate(params).metrics  # evaluation runs the whole network: features are stale
    assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("train", [{}, {"optimizer": "adamw", "head": "mlp"}])
def test_same_seed_same_model(imagefolder, tmp_path, backbone_dir, train):
    from conftest import Workdir

    params = tiny_params(imagefolder, **train)
    states = []
    for run in ("a", "b"):
        w = Workdir(tmp_path / run, backbone_dir)
        w.prepare(params)
        w.features_(params)
        w.train(params)
        states.append(torch.load(w.models / "head.pt", weights_only=True))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_classifier_checkpoint_loads_safely_and_matches_the_features_path(imagefolder, workdir):
    from safetensors.torch import load_file

    params = tiny_params(imagefolder)
    metrics = workdir.run_all(params).metrics
    assert metrics["accuracy"] >= 0.8  # three visually distinct classes
    ckpt = load_model(workdir.layout, "classification", workdir.layout.dataset())
    model = load_classifier(ckpt)
    assert ckpt.meta["labels"] == ["circles", "squares", "stripes"] and ckpt.meta["task"] == "classification"
    st = load_file(str(workdir.models / "model.safetensors"))
    state = torch.load(workdir.models / "model.pt", weights_only=True)["state_dict"]
    assert set(st) == set(state) and all(torch.equal(st[k], v) for k, v in state.items())
    assert all(torch.equal(st[f"head.{k}"], v) for k, v in model.head.state_dict().items())

    # The full classifier on pixels == the head on cached (onnxruntime) features.
    from tasks.preprocess import load_image

    ds = workdir.layout.dataset()
    items = ds.split("test")
    pixels = np.stack([load_image(ds.resolve(it), model.features.card) for it in items])
    with torch.no_grad():
        full = model(torch.from_numpy(pixels)).numpy()
        cached = model.head(torch.from_numpy(workdir.layout.feature_cache().load()["x_test"])).numpy()
    assert np.abs(full - cached).max() < 1e-3
    assert (full.argmax(1) == cached.argmax(1)).all()


def test_no_test_split_selects_on_train_holdout_and_never_sees_val(tmp_path, backbone_dir):
    from conftest import Workdir, make_imagefolder
    from tasks.files import read_json

    root = make_imagefolder(tmp_path / "data", per_class=8, splits=("train", "val"))
    params = tiny_params(root)
    w = Workdir(tmp_path / "w", backbone_dir)
    metrics = w.run_all(params).metrics
    assert metrics["eval_split"] == "val" and metrics["model_selected_on"] == "train-holdout"
    assert read_json(w.reports / "train.json")["selection"] == "train-holdout"


def test_reference_recipe_optimizer_settings_run(imagefolder, workdir):
    from tasks.files import read_json

    params = tiny_params(imagefolder, optimizer="adam", lr=0.001, weight_decay=0.0, schedule="constant",
                         epochs=10, patience=0)
    workdir.run_all(params)
    hist = (workdir.reports / "train_history.csv").read_text().splitlines()
    assert len(hist) == 1 + 10  # header + every epoch: no early stopping
    assert read_json(workdir.reports / "train.json")["solver"] == "adam"


@pytest.mark.parametrize("train, expected", [
    ({"augment": True}, "AdamW"), ({"head": "mlp"}, "AdamW"), ({"unfreeze_blocks": 1}, "AdamW"),
    ({"optimizer": "adam"}, "Adam"), ({"optimizer": "sgd"}, "SGD"),
])
def test_auto_optimizer_builds_the_optimizer_it_names(train, expected):
    from tasks.config import parse_params
    from tasks.head import make_optimizer

    opt = make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], parse_params({"classification": train}).classification)
    assert type(opt).__name__ == expected
