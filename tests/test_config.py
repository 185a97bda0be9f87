from pathlib import Path

import pytest

from tasks.config import ConfigError, Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_is_valid_and_documents_the_defaults():
    assert load_params(ROOT / "params.yaml") == Params()


@pytest.mark.parametrize("raw, words", [
    ({"trian": {}}, ["'trian'", "did you mean 'train'", "valid keys here: task, device, data, backbone"]),
    ({"train": {"epoch": 3}}, ["'train.epoch'", "did you mean 'epochs'", "head, hidden_dim"]),
    ({"data": {"datset": "digits"}}, ["'data.datset'", "dataset, root"]),
])
def test_unknown_key_names_the_valid_ones(raw, words):
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("raw, words", [
    ({"train": {"epochs": "ten"}}, ["train.epochs", "expected int", "'ten'"]),
    ({"train": {"epochs": 2.5}}, ["train.epochs", "expected int"]),
    ({"train": {"augment": "yes"}}, ["train.augment", "expected bool"]),
    ({"train": {"lr": [1]}}, ["train.lr", "expected float"]),
    ({"train": {"l2": ["x"]}}, ["train.l2[0]", "expected float"]),
    ({"data": {"dataset": "mnist"}}, ["data.dataset", "'digits', 'imagefolder', 'cifar10', 'cifar100'"]),
    ({"device": "tpu"}, ["device", "'auto', 'cpu', 'cuda'"]),
    ({"train": 3}, ["train", "expected a mapping"]),
])
def test_wrong_type_names_key_and_expected_type(raw, words):
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("raw, word", [
    ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, "must be < 1"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"optimizer": "lbfgs", "head": "mlp"}}, "lbfgs fits a linear head"),
    ({"train": {"feature_power": 0}}, "feature_power"),
])
def test_out_of_range_values_fail(raw, word):
    with pytest.raises(ConfigError, match=word):
        parse_params(raw)


def test_coercions_users_meet_on_the_command_line():
    p = parse_params({"train": {"lr": "3e-4", "l2": 0.5}, "data": {"max_images_per_class": None}})
    assert p.train.lr == pytest.approx(3e-4)
    assert p.train.l2 == [0.5]


def test_auto_optimizer_resolves_by_path():
    assert parse_params({}).train.solver == "lbfgs"
    assert parse_params({"train": {"head": "mlp"}}).train.solver == "adamw"
    assert parse_params({"train": {"augment": True}}).train.solver == "adamw"
    assert parse_params({"train": {"optimizer": "adam"}}).train.solver == "adam"


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
