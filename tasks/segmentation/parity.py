"""The segmentation parity gate: onnxruntime and PyTorch give the same mask and probabilities on every
evaluation image.

Strict, with `export.parity_tolerance` the one tolerance: every probability within it (max |p_onnx - p_torch|
at the head's resolution), and every pixel's class the same, except at an argmax tie: a pixel where the two
classes the runtimes chose are within the tolerance of each other in PyTorch's softmax of the logits at the
input size (the graph's argmax is over those), so that float noise decides between them. Ties are forgiven,
counted and reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.segmentation.model import Segmenter


def mask_parity(got: np.ndarray, want: np.ndarray, logits: torch.Tensor, tolerance: float) -> tuple[int, int]:
    """(pixels that disagree, of them argmax ties) between masks got/want [N, H, W] (class indices), `logits`
    [N, C, H, W] the logits at the input size that `want` is the argmax of."""
    n, y, x = np.nonzero(got != want)
    if not len(n):
        return 0, 0
    at = logits[torch.from_numpy(n), :, torch.from_numpy(y), torch.from_numpy(x)]  # [P, C]
    p = torch.softmax(at.double(), 1).numpy()
    rows = np.arange(len(n))
    gap = p[rows, want[n, y, x].astype(np.int64)] - p[rows, got[n, y, x].astype(np.int64)]
    return len(n), int((np.abs(gap) <= tolerance).sum())


def check_parity(path: Path, segmenter: Segmenter, batches, tolerance: float) -> dict:
    """Every image of `batches` (uint8 [N, H, W, 3]) through model.onnx in onnxruntime and `segmenter` in PyTorch."""
    from tasks.contract import INPUT, OUTPUTS
    from tasks.runtime import open_session

    session, _ = open_session(path, device="cpu")
    n = pixels = agree = ties = 0
    worst_image, max_diff = 1.0, 0.0
    for batch in batches:
        got_mask, got_prob = session.run(list(OUTPUTS["segmentation"]), {INPUT: batch})
        with torch.inference_mode():  # what segmenter(batch) computes, keeping the logits the argmax is over
            full, logits = segmenter.logits(segmenter.extractor(torch.from_numpy(batch)))
            want_mask, want_prob = full.argmax(1).to(torch.uint8).numpy(), torch.softmax(logits, 1).numpy()
        differ, tied = mask_parity(got_mask, want_mask, full, tolerance)
        same = (got_mask == want_mask).reshape(len(batch), -1)
        n, pixels, agree, ties = n + len(batch), pixels + same.size, agree + same.size - differ, ties + tied
        worst_image = min(worst_image, float(same.mean(1).min()))
        max_diff = max(max_diff, float(np.abs(got_prob - want_prob).max()))
    disagree = pixels - agree - ties
    return {"n": n, "pixels": pixels, "pixel_agreement": agree / max(pixels, 1),
            "min_image_pixel_agreement": worst_image, "argmax_ties": ties, "pixels_disagreeing": disagree,
            "max_prob_diff": max_diff, "prob_tolerance": tolerance,
            "passed": n > 0 and disagree == 0 and max_diff <= tolerance}
