"""The detection head and the whole detector: FCOS-style, anchor-free, on a small trainable FPN.

torchvision's building blocks do the work: `FeaturePyramidNetwork`, `FCOSHead` (focal loss,
GIoU loss, centerness), `FCOS.compute_loss` (center sampling and scale ranges), the anchor
generator and `ops.nms`. What is ours is post-processing written for a fixed-size, batched
graph: the same function runs in PyTorch (evaluation) and inside the ONNX file (serving), so
the exported model outputs final detections: boxes [N, K, 4], scores [N, K], labels [N, K].

The post-processing settings (score threshold, NMS threshold, top-k, K) belong to the model: they are chosen
from params once, when the detector is built for training, and from then on live in one place, the detector's
`post`, saved as the checkpoint's meta["postprocess"]; evaluation, the exported graph, its metadata and the
parity gate all read them from there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork, nms

from tasks.dense import STRIDES, DenseExtractor, map_shapes
from tasks.preprocess import PreprocessingCard


class DetectionHead(nn.Module):
    """Cached (or live) backbone maps [p3, p4, p5] -> FCOS head outputs over every location of every level."""

    def __init__(self, in_channels: list[int], num_classes: int, width: int = 64, num_convs: int = 2):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), width)
        self.head = FCOSHead(width, 1, num_classes, num_convs)
        self.out_channels = width  # what torchvision's FCOS asks of a backbone
        self.num_classes, self.num_convs = num_classes, num_convs

    def forward(self, maps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        levels = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        return self.head(list(levels.values()))  # cls_logits [N, A, C], bbox_regression [N, A, 4], bbox_ctrness [N, A, 1]


def make_anchors(input_size: tuple[int, int], map_sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, list[int]]:
    """One anchor per location (FCOS), sized by the level's stride: [A, 4] and the count per level."""
    h, w = input_size
    gen = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    maps = [torch.zeros(1, 1, mh, mw) for mh, mw in map_sizes]
    return gen(images, maps)[0], [mh * mw for mh, mw in map_sizes]


def loss_helper(head: DetectionHead, center_sampling_radius: float = 1.5) -> FCOS:
    """torchvision's FCOS, used only for its compute_loss (matching + focal/GIoU/centerness losses)."""
    return FCOS(head, head.num_classes, head=head.head, center_sampling_radius=center_sampling_radius)


@dataclass(frozen=True)
class PostProcess:
    """What turns head outputs into final detections; part of the model (and of its ONNX graph)."""

    score_threshold: float
    nms_threshold: float
    pre_nms_top_k: int
    max_detections: int

    @classmethod
    def from_params(cls, d) -> PostProcess:
        """`d`: the detection section of params (read when a detector is built for training, and only then)."""
        return cls(float(d.score_threshold), float(d.nms_threshold), int(d.pre_nms_top_k), int(d.max_detections))


def postprocess(out: dict[str, torch.Tensor], anchors: torch.Tensor, input_size: tuple[int, int],
                score_threshold: float, nms_threshold: float, pre_nms_top_k: int, max_detections: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head outputs -> (boxes [N, K, 4], scores [N, K], labels [N, K]), K = max_detections, no Python loops.

    Score = sqrt(sigmoid(class) * sigmoid(centerness)) as FCOS scores; the top `pre_nms_top_k` per image,
    class-aware NMS over the whole batch at once (boxes offset per image and class so they never meet),
    then the best K kept per image. Rows below `score_threshold` or suppressed are padding: score 0, label -1.
    """
    cls, reg, ctr = out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]
    n, a, c = cls.shape
    scores = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr)).flatten(1)  # [N, A * C]
    k = min(pre_nms_top_k, a * c)
    top, idx = scores.topk(k, dim=1)
    anchor_idx = torch.div(idx, c, rounding_mode="floor")
    labels = idx - anchor_idx * c
    picked = torch.gather(reg, 1, anchor_idx.unsqueeze(-1).expand(n, k, 4))
    boxes = BoxLinearCoder(normalize_by_size=True).decode(picked, anchors[anchor_idx])  # FCOS's own box coding
    h, w = input_size
    boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                         boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
    top = torch.where(top >= score_threshold, top, torch.zeros_like(top))
    image = torch.arange(n, device=cls.device).unsqueeze(1).expand(n, k)
    offset = ((image * c + labels).to(boxes.dtype) * float(max(h, w) + 1)).unsqueeze(-1)
    keep = nms((boxes + offset).reshape(-1, 4), top.reshape(-1), nms_threshold)
    kept = torch.zeros(n * k, dtype=top.dtype, device=top.device).index_fill(0, keep, 1.0).reshape(n, k)
    final, order = (top * kept).topk(min(max_detections, k), dim=1)
    boxes = torch.gather(boxes, 1, order.unsqueeze(-1).expand(-1, -1, 4))
    labels = torch.gather(labels, 1, order)
    labels = torch.where(final > 0, labels, torch.full_like(labels, -1))
    return boxes, final, labels


class Detector(nn.Module):
    """uint8 pixels [N, H, W, 3] -> boxes [N, K, 4] (input pixels), scores [N, K], labels [N, K] (int64, -1 = none)."""

    def __init__(self, extractor: DenseExtractor | None, head: DetectionHead, anchors: torch.Tensor,
                 input_size: tuple[int, int], post: PostProcess):
        super().__init__()
        self.extractor, self.head = extractor, head
        self.register_buffer("anchors", anchors, persistent=False)
        self.input_size = tuple(input_size)
        self.post = post

    def detect(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From backbone maps (cached ones in training and evaluation)."""
        p = self.post
        return postprocess(self.head(maps), self.anchors, self.input_size, p.score_threshold, p.nms_threshold,
                           p.pre_nms_top_k, p.max_detections)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.detect(self.extractor(pixels))


def build_detector(card: PreprocessingCard, num_classes: int, width: int, num_convs: int, post: PostProcess,
                   extractor: DenseExtractor | None = None) -> Detector:
    """A new (or, loaded into, a saved) detector for the card's input size and map shapes."""
    shapes = map_shapes(card)
    anchors, _ = make_anchors(card.input_size, [(h, w) for _, h, w in shapes])
    head = DetectionHead([c for c, _, _ in shapes], num_classes, width, num_convs)
    return Detector(extractor, head, anchors, card.input_size, post)


# ---------------------------------------------------------------- checkpoint (tasks/checkpoint.py)


def model_meta(detector: Detector) -> dict:
    """What model.pt keeps besides the weights to rebuild this detector: the head's shape, its post-processing."""
    return {"head": {"width": detector.head.out_channels, "num_convs": detector.head.num_convs},
            "postprocess": asdict(detector.post)}


def load_detector(layout, dataset=None, with_backbone: bool = True):
    """(detector, checkpoint) from model.pt (tasks.checkpoint.load_model: the task and the data version checked);
    without the backbone when only cached maps will be scored."""
    from tasks.checkpoint import backbone_network, load_model
    from tasks.network import freeze

    ckpt = load_model(layout, "detection", dataset)
    h = ckpt.meta["head"]
    extractor = DenseExtractor(backbone_network(ckpt), ckpt.card) if with_backbone else None
    detector = build_detector(ckpt.card, len(ckpt.labels), h["width"], h["num_convs"],
                              PostProcess(**ckpt.meta["postprocess"]), extractor)
    detector.head.load_state_dict(ckpt.head_state)
    return freeze(detector), ckpt
