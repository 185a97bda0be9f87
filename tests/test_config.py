from pathlib import Path

import pytest

from tasks.config import ConfigError, Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_is_valid_and_documents_the_defaults():
    assert load_params(ROOT / "params.yaml") == Params()


@pytest.mark.parametrize("raw, words", [
    ({"clasification": {}}, ["'clasification'", "did you mean 'classification'", "valid keys here: task, device, data, backbone"]),
    ({"classification": {"epoch": 3}}, ["'classification.epoch'", "did you mean 'epochs'", "head, hidden_dim"]),
    ({"data": {"datset": "digits"}}, ["'data.datset'", "dataset, root"]),
])
def test_unknown_key_names_the_valid_ones(raw, words):
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("raw, words", [
    ({"classification": {"epochs": "ten"}}, ["classification.epochs", "expected int", "'ten'"]),
    ({"classification": {"epochs": 2.5}}, ["classification.epochs", "expected int"]),
    ({"classification": {"augment": "yes"}}, ["classification.augment", "expected bool"]),
    ({"classification": {"lr": [1]}}, ["classification.lr", "expected float"]),
    ({"classification": {"l2": ["x"]}}, ["classification.l2[0]", "expected float"]),
    ({"data": {"dataset": "mnist"}}, ["data.dataset", "'digits', 'imagefolder', 'cifar10', 'cifar100'"]),
    ({"device": "tpu"}, ["device", "'auto', 'cpu', 'cuda'"]),
    ({"classification": 3}, ["classification", "expected a mapping"]),
])
def test_wrong_type_names_key_and_expected_type(raw, words):
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("raw, word", [
    ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, "must be < 1"),
    ({"classification": {"epochs": 0}}, "classification.epochs"),
    ({"classification": {"optimizer": "lbfgs", "head": "mlp"}}, "lbfgs fits a linear head"),
    ({"classification": {"feature_power": 0}}, "feature_power"),
])
def test_out_of_range_values_fail(raw, word):
    with pytest.raises(ConfigError, match=word):
        parse_params(raw)


def test_coercions_users_meet_on_the_command_line():
    p = parse_params({"classification": {"lr": "3e-4", "l2": 0.5}, "data": {"max_images_per_class": None}})
    assert p.classification.lr == pytest.approx(3e-4)
    assert p.classification.l2 == [0.5]


def test_auto_optimizer_resolves_by_path():
    assert parse_params({}).classification.solver == "lbfgs"
    assert parse_params({"classification": {"head": "mlp"}}).classification.solver == "adamw"
    assert parse_params({"classification": {"augment": True}}).classification.solver == "adamw"
    assert parse_params({"classification": {"optimizer": "adam"}}).classification.solver == "adam"


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("classification: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("raw, words", [
    ({"train": {"epochs": 3}}, ["'train'", "it is now classification"]),
    ({"dense": {"input_size": [64, 64]}}, ["'dense'", "detection.features / segmentation.features"]),
    ({"features": {"layers": "multi"}}, ["features.layers", "classification.features.layers"]),
])
def test_renamed_sections_name_their_new_place(raw, words):
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("raw, words", [
    ({"task": "detection", "data": {"dataset": "imagefolder"}}, ["data.dataset", "voc, coco"]),
    ({"task": "segmentation", "data": {"dataset": "masks"}, "backbone": {"name": "auto"}}, ["backbone.name: auto"]),
    ({"task": "detection", "data": {"dataset": "voc"}, "export": {"quantize": "int8"}}, ["export.quantize", "detection"]),
    ({"task": "segmentation", "data": {"dataset": "masks"}, "evaluate": {"top_mistakes": 3}},
     ["evaluate.top_mistakes", "segmentation"]),
])
def test_a_param_the_task_does_not_read_is_an_error(raw, words):
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_head_is_the_chosen_tasks_section():
    p = parse_params({"task": "multilabel", "data": {"dataset": "csv"}, "multilabel": {"class_weights": "balanced"}})
    assert p.head is p.multilabel and p.head.class_weights == "balanced"
    p = parse_params({})
    assert p.head is p.classification
