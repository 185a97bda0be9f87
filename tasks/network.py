"""The backbone network itself: building an architecture by name, freezing it, devices, and export-friendly padding.

Shared by every stage that touches a network (the pretrained registry, the feature extractors, the heads that
train blocks of it, the ONNX exporter); no stage's own logic lives here.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from tasks.config import UserError
from tasks.files import sha256_file
from tasks.layout import ArtifactError, Layout
from tasks.preprocess import PreprocessingCard

TORCHVISION_HEADS = {"resnet": "fc", "mobilenet": "classifier", "efficientnet": "classifier", "convnext": "classifier"}


def build_network(arch: str) -> nn.Module:
    """An untrained network that maps NCHW floats to pooled features (its classifier removed)."""
    family, _, name = arch.partition(":")
    if family == "timm":
        import timm

        # exportable: static "same" padding (fixed input size), so the ONNX graph has no shape arithmetic.
        return timm.create_model(name, pretrained=False, num_classes=0, exportable=True)
    if family == "torchvision":
        import torchvision

        if not hasattr(torchvision.models, name):
            raise ValueError(f"torchvision has no model {name!r}")
        net = getattr(torchvision.models, name)(weights=None)
        head = next((h for prefix, h in TORCHVISION_HEADS.items() if name.startswith(prefix)), None)
        if head is None:
            raise ValueError(f"don't know the classifier of torchvision:{name}; use timm:<name> instead")
        setattr(net, head, nn.Identity())
        return net
    raise ValueError(f"unknown architecture {arch!r}: expected timm:<name> or torchvision:<name>")


class PixelNetwork(nn.Module):
    """A backbone behind its input: uint8 [N, H, W, 3] RGB pixels, scaled and normalised with the card's mean/std
    inside the module (and so inside its ONNX graph). Subclasses say what comes out (pooled features, maps)."""

    def __init__(self, network: nn.Module, card: PreprocessingCard):
        super().__init__()
        self.network = network
        self.card = card
        self.register_buffer("mean", torch.tensor(card.mean).mul(255.0).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(card.std).mul(255.0).view(1, 3, 1, 1), persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        # NHWC -> NCHW is a view: the result is channels_last in memory, which CUDA convs prefer.
        x = pixels.permute(0, 3, 1, 2).to(self.mean.dtype)
        return (x - self.mean) / self.std


def load_backbone(layout: Layout) -> tuple[nn.Module, PreprocessingCard]:
    """The backbone stage's network and card (the weights checked against the card's sha256), frozen."""
    card = layout.card()
    if sha256_file(layout.weights) != card.weights_sha256:
        raise ArtifactError(f"{layout.weights} does not match card.json's sha256: re-run the backbone stage")
    net = build_network(card.arch)
    net.load_state_dict(torch.load(layout.weights, map_location="cpu", weights_only=True))
    return freeze(net), card


def freeze(module: nn.Module) -> nn.Module:
    """Frozen means frozen: no gradients and eval() (BatchNorm statistics and dropout stay put)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def backbone_blocks(network: nn.Module) -> list[nn.Module]:
    """The network as an ordered list of blocks, stem first, for `unfreeze_blocks`.

    Stage containers (timm `blocks`, torchvision `features`/`layer1..4`) are expanded;
    modules after the last stage (e.g. conv_head + bn2) join the last block.
    """
    blocks: list[list[nn.Module]] = [[]]
    stage_seen = False
    for name, child in network.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if name in ("blocks", "features", "layers", "stages") and isinstance(child, nn.Sequential):
            blocks += [[sub] for sub in child]
            stage_seen = True
        elif name.startswith("layer") and name[5:].isdigit():
            blocks.append([child])
            stage_seen = True
        elif stage_seen:
            blocks[-1].append(child)
        else:
            blocks[0].append(child)
    return [nn.ModuleList(group) for group in blocks if group]


def unfreeze_last_blocks(network: nn.Module, n: int) -> list[nn.Module]:
    """Make the last n blocks trainable (train mode, BatchNorm included). Returns them."""
    if n <= 0:
        return []
    blocks = backbone_blocks(network)
    if n > len(blocks):
        raise UserError(f"classification.unfreeze_blocks={n} but this backbone has {len(blocks)} blocks: set it to at most {len(blocks)}")
    chosen = blocks[-n:]
    for block in chosen:
        block.train()
        for p in block.parameters():
            p.requires_grad_(True)
    return chosen


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda requested but torch sees no CUDA device; set device: auto or cpu in params.yaml")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """Mixed precision on CUDA (bf16 where supported), plain fp32 on CPU."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        yield


def with_static_padding(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of `module` whose TF-style "same" convolutions (timm Conv2dSame) pad by constants.

    Conv2dSame computes its padding from the input shape at run time; exported, that is
    a chain of Shape/Gather/Ceil ops that stops onnxruntime fusing Pad into Conv. For a
    fixed input size the padding is a constant: measured here, EfficientNet-Lite0 in
    onnxruntime goes from ~100 to ~150 img/s. Same outputs, bit for bit.
    """
    import copy

    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import get_same_padding
    except ImportError:  # no timm, no Conv2dSame
        return module
    module = copy.deepcopy(module)
    shapes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: shapes.__setitem__(m, tuple(args[0].shape[-2:])))
             for m in module.modules() if isinstance(m, Conv2dSame)]
    if not hooks:
        return module
    with torch.no_grad():
        module(example)
    for h in hooks:
        h.remove()

    def replace(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, Conv2dSame):
                (ih, iw), (kh, kw), (sh, sw), (dh, dw) = shapes[child], child.kernel_size, child.stride, child.dilation
                ph, pw = get_same_padding(ih, kh, sh, dh), get_same_padding(iw, kw, sw, dw)
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                 child.dilation, child.groups, child.bias is not None)
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, nn.Sequential(nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), conv))
            else:
                replace(child)

    replace(module)
    return module.eval()

