"""The segmentation decoder and the whole segmenter: a light FPN-style decoder on the frozen maps.

The decoder merges p3..p5 (strides 8/16/32) top-down, FPN-style, from torchvision's conv-BN-ReLU blocks, and gives
class logits at stride 8. The exported graph upsamples those logits bilinearly to the input size and takes the
argmax there:

  images uint8 [N, H, W, 3] -> mask UINT8 [N, H, W] (class index at the input size)
                               probabilities FP32 [N, C, H/8, W/8] (softmax at the head's resolution)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from tasks.dense import DenseExtractor, map_shapes

HEAD_STRIDE = 8  # the decoder's output resolution (that of p3)


class SegmentationHead(nn.Module):
    """Cached (or live) backbone maps [p3, p4, p5] -> class logits [N, C, H/8, W/8].

    FPN-style, top-down, with the width where it is cheap: p5 and p4 meet at stride 16 (1x1 laterals, `width`
    channels, one 3x3 conv-BN-ReLU), then that context meets p3 at stride 8 with a quarter of the channels (one
    3x3 conv-BN-ReLU) before a 1x1 classifier. Most of a step's work is at stride 8, so that is kept narrow.
    """

    def __init__(self, in_channels: list[int], num_classes: int, width: int = 96):
        super().__init__()
        c3, c4, c5 = in_channels
        fine = max(8, width // 3)
        self.lateral5, self.lateral4 = nn.Conv2d(c5, width, 1), nn.Conv2d(c4, width, 1)
        self.context = Conv2dNormActivation(width, width, 3)
        self.lateral3, self.down = nn.Conv2d(c3, fine, 1), nn.Conv2d(width, fine, 1)
        self.fuse = Conv2dNormActivation(fine, fine, 3)
        self.classifier = nn.Conv2d(fine, num_classes, 1)
        self.num_classes, self.width = num_classes, width

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        p3, p4, p5 = maps
        x = self.context(self.lateral4(p4) + upsample(self.lateral5(p5), p4.shape[-2:]))
        y = self.fuse(self.lateral3(p3) + upsample(self.down(x), p3.shape[-2:]))
        return self.classifier(y)


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits at the head's resolution -> `size` (the input, the loss grid or an original mask): the map covers
    the whole image at every resolution (plain resize, no crop), so bilinear with align_corners=False is exact."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class Segmenter(nn.Module):
    """uint8 pixels [N, H, W, 3] -> (mask uint8 [N, H, W], probabilities [N, C, H/8, W/8])."""

    def __init__(self, extractor: DenseExtractor | None, head: SegmentationHead, input_size: tuple[int, int]):
        super().__init__()
        self.extractor, self.head = extractor, head
        self.input_size = tuple(input_size)

    def logits(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits at the input size [N, C, H, W], at the head's resolution [N, C, H/8, W/8])."""
        logits = self.head(maps)
        return upsample(logits, self.input_size), logits

    def segment(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        full, logits = self.logits(maps)
        return full.argmax(1).to(torch.uint8), torch.softmax(logits, 1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.segment(self.extractor(pixels))


# ---------------------------------------------------------------- checkpoint (tasks/checkpoint.py)


def model_meta(segmenter: Segmenter, palette: list[list[int]]) -> dict:
    """What model.pt keeps besides the weights to rebuild this segmenter, and the colours of its classes."""
    return {"head": {"width": segmenter.head.width, "stride": HEAD_STRIDE}, "palette": palette}


def load_segmenter(layout, dataset=None, with_backbone: bool = True):
    """(segmenter, checkpoint) from model.pt (tasks.checkpoint.load_model: the task and the data version
    checked); without the backbone when only cached maps will be scored."""
    from tasks.checkpoint import backbone_network, load_model
    from tasks.network import freeze

    ckpt = load_model(layout, "segmentation", dataset)
    head = SegmentationHead([c for c, _, _ in map_shapes(ckpt.card)], len(ckpt.labels), ckpt.meta["head"]["width"])
    head.load_state_dict(ckpt.head_state)
    extractor = DenseExtractor(backbone_network(ckpt), ckpt.card) if with_backbone else None
    return freeze(Segmenter(extractor, head, ckpt.card.input_size)), ckpt
