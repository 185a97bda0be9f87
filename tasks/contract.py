"""What the pipeline's models and the server agree on, without torch: task names, ONNX tensor names, metadata keys.

The export stage writes these names into every model.onnx; deploy/ reads them back. Both import this file, and
the serving image copies it (with tasks/<task>/serve.py), so a name is spelled once.
"""

from __future__ import annotations

TASKS = ("classification", "multilabel", "detection", "segmentation")
SPLITS = ("train", "val", "test")
# Files prepare looks at in image folders (anything else is still decoded to be sure, but these are the usual).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# ---------------------------------------------------------------- the ONNX graph

INPUT = "images"  # uint8 [N, H, W, 3] RGB after tasks.preprocess.load_image
OOD_SCORE = "ood_score"  # FP32 [N]: above metadata ood_threshold = unlike the training data (pooled tasks)
OUTPUTS = {
    "classification": ("probabilities", "logits"),  # FP32 [N, C] softmax, FP32 [N, C]; + OOD_SCORE
    "multilabel": ("probabilities", "tags"),  # FP32 [N, T] sigmoid, BOOL [N, T] at the per-tag thresholds; + OOD_SCORE
    "detection": ("boxes", "scores", "labels"),  # FP32 [N, K, 4] input pixels, FP32 [N, K] (0 = padding), INT64 [N, K]
    "segmentation": ("mask", "probabilities"),  # UINT8 [N, H, W] at the input size, FP32 [N, C, H/8, W/8]
}

# ---------------------------------------------------------------- metadata_props keys

TASK = "task"  # one of TASKS; every exported model carries it
LABELS = "labels"  # JSON list: class (or tag) names in index order
PREPROCESSING = "preprocessing"  # JSON: the PreprocessingCard
OOD_THRESHOLD = "ood_threshold"  # float
THRESHOLDS = "thresholds"  # multilabel: JSON list, the decision threshold of each tag
SCORE_THRESHOLD = "score_threshold"  # detection: scores below it are padding
NMS_THRESHOLD = "nms_threshold"
MAX_DETECTIONS = "max_detections"  # detection: K
PALETTE = "palette"  # segmentation: JSON list of [r, g, b], index order

IGNORE = 255  # segmentation: the class index of pixels that are never scored


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour of each index (bit-interleaved): the palette of VOC's own mask PNGs."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def palette256(palette) -> list[tuple[int, int, int]]:
    """A model's palette (index order), then the VOC colour map for every other index up to 255."""
    own = [tuple(int(v) for v in c) for c in list(palette or ())[:256]]
    return own + voc_colormap()[len(own):]


class QueryError(ValueError):
    """A request the model cannot answer as asked (an option its task does not take): the server answers 400."""
