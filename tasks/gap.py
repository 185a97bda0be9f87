"""How far the target images sit from the backbone's source data (ImageNet), without any ImageNet image.

Every BatchNorm layer stores the mean and variance of its input over the source data
(`running_mean`, `running_var`). Run target images through the frozen network and measure, per
layer and channel, the mean and variance of the same input; the divergence between the two
Gaussians, KL(target || source), averaged over channels and then over layers, is the gap. It
is the signal that test-time BatchNorm adaptation methods correct for; here it is only measured.

Measured inside the features pass, on a stratified subsample of train (`SAMPLE` images): the backbone
stage exports features.onnx with its BatchNormalization nodes kept (onnxruntime fuses them into the
convolutions when it loads the file, so the features run as fast), and `OnnxTap` adds, per BatchNorm
input, the per-image mean and mean square over H x W as extra outputs. The subsample goes first in the
stream the pass decodes anyway and runs through that tapped model (its features output is theirs too): no
second decode, no second network pass, no torch. The stored statistics are the BatchNorm nodes' own
initializers. Without a features.onnx that has them: the same statistics from torch hooks (`bn_shift`).
Calibrated on the data at hand (EfficientNet-Lite0): hymenoptera photos (ImageNet-like) and the digits
demo (8x8 grey digits upscaled: far). The verdict thresholds sit between them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tasks.files import write_json
from tasks.layout import Dataset, Layout
from tasks.preprocess import PreprocessingCard, decoded_batches

SAMPLE = 64  # images; the gap moves by a few percent between subsamples of this size
TAP_BATCH = 4  # images per run of the tapped model: 64 of them took 0.8 s in batches of 4, 2.9 s in batches of 32
CLOSE, FAR = 0.15, 0.35  # verdict thresholds on the mean per-layer KL; Lite0 measured: hymenoptera 0.056, digits 0.50


def verdict(gap: float) -> str:
    if gap < CLOSE:
        return "close to ImageNet: the frozen backbone's features should transfer well"
    if gap < FAR:
        return "moderate: frozen features usually work; compare <task>.features.layers: multi or a bigger backbone"
    return "far from ImageNet: consider multi-layer features (<task>.features.layers: multi) or unfreezing blocks (classification.unfreeze_blocks)"


def subsample_indices(dataset: Dataset, n: int = SAMPLE) -> list[int]:
    """Up to n positions in the train split, spread evenly over the classes, in manifest order (deterministic)."""
    by_class: dict[str, list[int]] = {}
    for i, it in enumerate(dataset.split("train")):
        by_class.setdefault(it.label, []).append(i)
    per_class = max(1, math.ceil(n / max(len(by_class), 1)))
    picked = []
    for rows in by_class.values():
        step = max(1, len(rows) // per_class)
        picked += rows[::step][:per_class]
    return sorted(picked[:n] if len(picked) > n else picked)


def subsample(dataset: Dataset, n: int = SAMPLE) -> list:
    """The train items at subsample_indices."""
    train = dataset.split("train")
    return [train[i] for i in subsample_indices(dataset, n)]


def kl_layers(names: list[str], mean_t: list[np.ndarray], sq_t: list[np.ndarray], source: list[tuple]) -> list[dict]:
    """Per layer: mean over channels of KL(N(mu_t, var_t) || N(mu_s, var_s)), from the target's mean and mean square
    per channel and the stored (running_mean, running_var, eps)."""
    layers = []
    for name, mu_t, sq, (mu_s, var_s, eps) in zip(names, mean_t, sq_t, source):
        mu_t = np.asarray(mu_t, np.float64)
        var_t = np.maximum(np.asarray(sq, np.float64) - mu_t**2, 0.0) + eps
        mu_s, var_s = np.asarray(mu_s, np.float64), np.asarray(var_s, np.float64) + eps
        kl = 0.5 * (np.log(var_s / var_t) + (var_t + (mu_t - mu_s) ** 2) / var_s - 1.0)
        layers.append({"layer": name, "kl": float(kl.mean())})
    return layers


def bn_shift(network, batches, channels_last: bool = False) -> list[dict]:
    """Per BatchNorm layer: mean over channels of KL(N(mu_t, var_t) || N(mu_s, var_s)), target vs stored (torch
    forward hooks on an nn.Module)."""
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
    seen = [(name, m) for name, m in bns if sums[name][2]]
    return kl_layers([name for name, _ in seen], [(sums[n][0] / sums[n][2]).numpy() for n, _ in seen],
                     [(sums[n][1] / sums[n][2]).numpy() for n, _ in seen],
                     [(m.running_mean.double().numpy(), m.running_var.double().numpy(), m.eps) for _, m in seen])


class OnnxTap:
    """features.onnx with every 4-D BatchNormalization input's per-image channel mean and mean square as extra
    outputs; `tap(pixels)` returns the features of those images and adds their statistics to the running sums."""

    def __init__(self, session, feature_output: str, names: list[str], source: list[tuple]):
        self.session, self.names, self.source = session, names, source
        self.outputs = [feature_output] + [f"gap_{k}_{i}" for i in range(len(names)) for k in ("mean", "sq")]
        self.sums: list[np.ndarray] | None = None
        self.images = 0

    @classmethod
    def open(cls, path: Path, feature_output: str, threads: int | None = None) -> "OnnxTap | None":
        """None when the file has no BatchNormalization node with stored statistics (an older export: they were
        fused into the convolutions) -- then bn_shift measures it in torch. `threads`: of one run (None: the
        machine's cores); runs may be concurrent (`run`)."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        from tasks.runtime import open_session

        model = onnx.load(str(path))
        inits = {i.name: i for i in model.graph.initializer}
        ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
                 for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
        names, source, added = [], [], []
        for node in list(model.graph.node):
            if (node.op_type != "BatchNormalization" or ranks.get(node.input[0], 4) != 4
                    or node.input[3] not in inits or node.input[4] not in inits):
                continue
            i, x = len(names), node.input[0]
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            mean_s, var_s = numpy_helper.to_array(inits[node.input[3]]), numpy_helper.to_array(inits[node.input[4]])
            # GlobalAveragePool, not ReduceMean: measured 1.5x faster here (it stays in onnxruntime's NCHWc layout)
            added.append(helper.make_node("Mul", [x, x], [f"gap_xx_{i}"]))
            for kind, src in (("mean", x), ("sq", f"gap_xx_{i}")):
                added.append(helper.make_node("GlobalAveragePool", [src], [f"gap_{kind}_{i}"]))
                model.graph.output.append(helper.make_tensor_value_info(f"gap_{kind}_{i}", TensorProto.FLOAT,
                                                                        ["batch", len(mean_s), 1, 1]))
            stored = node.input[3]  # e.g. network.blocks.0.0.bn1.running_mean -> blocks.0.0.bn1
            name = stored[: -len(".running_mean")] if stored.endswith(".running_mean") else node.name
            names.append(name.split(".", 1)[1] if name.startswith("network.") else name)
            source.append((mean_s, var_s, eps))
        if not names:
            return None
        model.graph.node.extend(added)
        session, _ = open_session(model.SerializeToString(), device="cpu", threads=threads, spinning=False)
        return cls(session, feature_output, names, source)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        features = []
        for lo in range(0, len(pixels), TAP_BATCH):
            out, stats = self.run(pixels[lo : lo + TAP_BATCH])
            self.add(stats, len(out))
            features.append(out)
        return np.concatenate(features)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(features, statistics) of one run; changes nothing, so runs may go on in several threads at once."""
        out = self.session.run(self.outputs, {"images": pixels})
        return out[0], [o.reshape(len(o), -1).astype(np.float64).sum(0) for o in out[1:]]

    def add(self, stats: list[np.ndarray], images: int) -> None:
        """Count one run's statistics in (add them in a fixed order: the sums are float64 but not associative)."""
        self.sums = stats if self.sums is None else [a + b for a, b in zip(self.sums, stats)]
        self.images += images

    def layers(self) -> list[dict]:
        if not self.images:
            return []
        n = self.images
        return kl_layers(self.names, [s / n for s in self.sums[0::2]], [s / n for s in self.sums[1::2]], self.source)


def summarize(layers: list[dict], images: int) -> dict:
    """gap.json's content (without the key) from per-layer KLs."""
    kls = np.array([l["kl"] for l in layers]) if layers else np.array([np.nan])
    gap = float(np.mean(kls))
    half = len(kls) // 2
    return {"domain_gap": round(gap, 4), "domain_gap_verdict": verdict(gap) if layers else "no BatchNorm layers: not measured",
            "method": "BatchNorm statistics shift: KL(target || stored running stats), mean over channels and layers",
            "images": images, "layers": len(layers),
            "early_layers": round(float(np.mean(kls[:half])), 4) if half else None,
            "late_layers": round(float(np.mean(kls[half:])), 4), "per_layer": [
                {"layer": l["layer"], "kl": round(l["kl"], 4)} for l in layers]}


def measure(layout: Layout, dataset: Dataset, card: PreprocessingCard, batch_size: int = 32,
            workers: int = 2, feature_output: str = "features") -> dict:
    """The gap of the train images under the backbone stage's weights, on its own (a features cache made before
    the gap was measured in the pass): the subsample decoded, through the tapped features.onnx, or torch."""
    items = subsample(dataset)
    paths = [dataset.resolve(it) for it in items]
    tap = OnnxTap.open(layout.features_onnx, feature_output) if layout.features_onnx.exists() else None
    if tap is not None:
        for batch in decoded_batches(paths, card, batch_size, workers):
            tap(batch)
        return summarize(tap.layers(), len(items))
    import torch

    from tasks.pooled import load_feature_extractor

    extractor = load_feature_extractor(layout)
    batches = (extractor.normalize(torch.from_numpy(b)) for b in decoded_batches(paths, card, batch_size, workers))
    return summarize(bn_shift(extractor.network, batches), len(items))


def save_gap(layout: Layout, key: str, gap: dict) -> dict:
    out = {"key": key, **gap}
    write_json(layout.domain_gap, out)
    return out


def write_gap(layout: Layout, dataset: Dataset, card: PreprocessingCard, key: str, batch_size: int = 32,
              workers: int = 2) -> dict:
    """features/gap.json for this feature key (kept while the key holds, like the features themselves)."""
    current = layout.read_json(layout.domain_gap, None)
    if isinstance(current, dict) and current.get("key") == key:
        return current
    return save_gap(layout, key, measure(layout, dataset, card, batch_size, workers))


def gap_metrics(layout: Layout) -> dict:
    """The two keys evaluate copies into metrics.json ({} when the features stage wrote no gap)."""
    g = layout.read_json(layout.domain_gap, None)
    if not isinstance(g, dict) or "domain_gap" not in g:
        return {}
    return {"domain_gap": g["domain_gap"], "domain_gap_verdict": g["domain_gap_verdict"]}
