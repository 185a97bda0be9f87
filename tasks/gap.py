"""How far the target images sit from the backbone's source data (ImageNet), without any ImageNet image.

Every BatchNorm layer stores the mean and variance of its input over the source data
(`running_mean`, `running_var`). Run target images through the frozen network and measure, per
layer and channel, the mean and variance of the same input; the divergence between the two
Gaussians, KL(target || source), averaged over channels and then over layers, is the gap. It
is the signal that test-time BatchNorm adaptation methods correct for; here it is only measured.

One cheap pass over a stratified subsample of train (`SAMPLE` images, torch, eval mode, nothing
updated). Calibrated on the data at hand (EfficientNet-Lite0): hymenoptera photos (ImageNet-like)
and the digits demo (8x8 grey digits upscaled: far). The verdict thresholds sit between them.
"""

from __future__ import annotations

import math
import numpy as np

from tasks.files import write_json
from tasks.layout import Dataset, Layout
from tasks.preprocess import PreprocessingCard, decoded_batches

SAMPLE = 64  # images; the gap moves by a few percent between subsamples of this size
CLOSE, FAR = 0.15, 0.35  # verdict thresholds on the mean per-layer KL; Lite0 measured: hymenoptera 0.056, digits 0.50


def verdict(gap: float) -> str:
    if gap < CLOSE:
        return "close to ImageNet: the frozen backbone's features should transfer well"
    if gap < FAR:
        return "moderate: frozen features usually work; compare <task>.features.layers: multi or a bigger backbone"
    return "far from ImageNet: consider multi-layer features (<task>.features.layers: multi) or unfreezing blocks (classification.unfreeze_blocks)"


def subsample(dataset: Dataset, n: int = SAMPLE) -> list:
    """Up to n train items, spread evenly over the classes, in manifest order (deterministic)."""
    train = dataset.split("train")
    by_class: dict[str, list] = {}
    for it in train:
        by_class.setdefault(it.label, []).append(it)
    per_class = max(1, math.ceil(n / max(len(by_class), 1)))
    picked = []
    for items in by_class.values():
        step = max(1, len(items) // per_class)
        picked += items[::step][:per_class]
    return picked[:n] if len(picked) > n else picked


def bn_shift(network, batches, channels_last: bool = False) -> list[dict]:
    """Per BatchNorm layer: mean over channels of KL(N(mu_t, var_t) || N(mu_s, var_s)), target vs stored."""
    import torch
    from torch import nn

    bns = [(name, m) for name, m in network.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name, _ in bns}

    def hook(name):
        def record(_module, args):
            x = args[0].detach()
            dims = [0, 2, 3] if x.dim() == 4 else [0]
            acc = sums[name]  # per-batch sums in float32, accumulated in float64
            acc[0] = acc[0] + x.sum(dims).double()
            acc[1] = acc[1] + x.square().sum(dims).double()
            acc[2] += x.numel() // x.shape[1]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in bns]
    try:
        with torch.inference_mode():
            for batch in batches:
                network(batch)
    finally:
        for h in handles:
            h.remove()
    layers = []
    for name, m in bns:
        s, sq, n = sums[name]
        if not n:
            continue
        mu_t = s / n
        var_t = (sq / n - mu_t.pow(2)).clamp_min(0) + m.eps
        mu_s, var_s = m.running_mean.double(), m.running_var.double() + m.eps
        kl = 0.5 * (torch.log(var_s / var_t) + (var_t + (mu_t - mu_s).pow(2)) / var_s - 1.0)
        layers.append({"layer": name, "kl": float(kl.mean())})
    return layers


def measure(layout: Layout, dataset: Dataset, card: PreprocessingCard, batch_size: int = 32,
            workers: int = 2) -> dict:
    """The gap of the train images under the backbone stage's weights."""
    import torch

    from tasks.pooled import load_feature_extractor

    extractor = load_feature_extractor(layout)
    items = subsample(dataset)
    batches = (extractor.normalize(torch.from_numpy(b)) for b in
               decoded_batches([dataset.resolve(it) for it in items], card, batch_size, workers))
    layers = bn_shift(extractor.network, batches)
    kls = np.array([l["kl"] for l in layers]) if layers else np.array([np.nan])
    gap = float(np.mean(kls))
    half = len(kls) // 2
    return {"domain_gap": round(gap, 4), "domain_gap_verdict": verdict(gap) if layers else "no BatchNorm layers: not measured",
            "method": "BatchNorm statistics shift: KL(target || stored running stats), mean over channels and layers",
            "images": len(items), "layers": len(layers),
            "early_layers": round(float(np.mean(kls[:half])), 4) if half else None,
            "late_layers": round(float(np.mean(kls[half:])), 4), "per_layer": [
                {"layer": l["layer"], "kl": round(l["kl"], 4)} for l in layers]}


def write_gap(layout: Layout, dataset: Dataset, card: PreprocessingCard, key: str, batch_size: int = 32,
              workers: int = 2) -> dict:
    """features/gap.json for this feature key (kept while the key holds, like the features themselves)."""
    current = layout.read_json(layout.domain_gap, None)
    if isinstance(current, dict) and current.get("key") == key:
        return current
    gap = {"key": key, **measure(layout, dataset, card, batch_size, workers)}
    write_json(layout.domain_gap, gap)
    return gap


def gap_metrics(layout: Layout) -> dict:
    """The two keys evaluate copies into metrics.json ({} when the features stage wrote no gap)."""
    g = layout.read_json(layout.domain_gap, None)
    if not isinstance(g, dict) or "domain_gap" not in g:
        return {}
    return {"domain_gap": g["domain_gap"], "domain_gap_verdict": g["domain_gap_verdict"]}
