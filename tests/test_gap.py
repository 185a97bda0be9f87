"""The domain gap: BatchNorm statistics of target images against the statistics stored in the weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from conftest import tiny_params
from tasks.files import read_json
from tasks.gap import CLOSE, FAR, bn_shift, verdict


def test_kl_is_zero_on_the_stored_statistics_and_grows_with_the_shift():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(4)).eval()
    x = torch.randn(64, 4, 8, 8) * 2 + 1
    net[0].running_mean.copy_(x.mean((0, 2, 3)))
    net[0].running_var.copy_(x.var((0, 2, 3), unbiased=False))
    assert abs(bn_shift(net, [x[:32], x[32:]])[0]["kl"]) < 1e-4  # two batches, one set of statistics
    # KL(N(mu+1, var) || N(mu, var)) = 1 / (2 var) per channel
    var = float(net[0].running_var.mean())
    shifted = bn_shift(net, [x + 1.0])[0]["kl"]
    assert math.isclose(shifted, float((0.5 / (net[0].running_var + net[0].eps)).mean()), rel_tol=1e-3)
    assert bn_shift(net, [x + 3.0])[0]["kl"] > shifted > 0 and var > 0


def test_nothing_moves_in_the_frozen_network():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layers = bn_shift(net, [torch.randn(8, 3, 16, 16)])
    assert [l["layer"] for l in layers] == ["1", "4"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_verdicts_are_ordered():
    assert verdict(CLOSE / 2).startswith("close") and verdict((CLOSE + FAR) / 2).startswith("moderate")
    assert verdict(FAR * 2).startswith("far")


def test_the_features_stage_measures_it_once_and_evaluate_reports_it(imagefolder, workdir):
    params = tiny_params(imagefolder)
    workdir.run_all(params)
    gap = read_json(workdir.layout.domain_gap)
    assert gap["images"] == len(workdir.layout.dataset().split("train")) and gap["layers"] > 20
    m = read_json(workdir.layout.metrics)
    assert m["domain_gap"] == gap["domain_gap"] > 0 and m["domain_gap_verdict"] == verdict(gap["domain_gap"])
    stamp = workdir.layout.domain_gap.stat().st_mtime_ns
    assert workdir.features_(params).cached
    assert workdir.layout.domain_gap.stat().st_mtime_ns == stamp  # kept while the feature key holds


def test_the_gap_measured_in_the_onnx_pass_equals_torch_hooks_on_the_same_images(imagefolder, workdir):
    # features.onnx keeps its BatchNormalization nodes; the tapped copy gives the same per-layer KL as torch hooks
    from tasks.gap import OnnxTap, subsample
    from tasks.pooled import load_feature_extractor
    from tasks.preprocess import decoded_batches

    params = tiny_params(imagefolder)
    workdir.run_all(params)
    layout = workdir.layout
    in_pass = {l["layer"]: l["kl"] for l in read_json(layout.domain_gap)["per_layer"]}
    ds, card = layout.dataset(), layout.card()
    ext = load_feature_extractor(layout)
    paths = [ds.resolve(it) for it in subsample(ds)]
    hooks = bn_shift(ext.network, (ext.normalize(torch.from_numpy(b)) for b in decoded_batches(paths, card, 8, 1)))
    assert OnnxTap.open(layout.features_onnx, "features") is not None and len(in_pass) == len(hooks) > 20
    for l in hooks:
        assert abs(in_pass[l["layer"]] - l["kl"]) <= 1e-3 + 1e-2 * abs(l["kl"]), (l, in_pass[l["layer"]])
