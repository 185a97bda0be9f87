"""The detection parity gate: onnxruntime and PyTorch give the same detections on every evaluation image.

Per image, the detections of the two runtimes (padding dropped) are matched greedily by score: same label and
box IoU >= MATCH_IOU (the same box up to float noise; a second threshold, on boxes, because
export.parity_tolerance is a score tolerance). A matched pair must agree in score within
`export.parity_tolerance`. A detection found by one runtime only is a disagreement, unless it lies at a
cut-off, where noise far below the tolerance decides which side of the cut it falls on (a tie, forgiven,
counted in the report by kind):

  threshold  its score is within the tolerance of the score threshold;
  top_k      the other runtime's output is full (K = max_detections rows) and its score is within the
             tolerance of the other's K-th (lowest) score;
  nms        a same-label detection of either runtime overlaps it with an IoU within the tolerance of the NMS
             threshold (suppressed on one side only), or overlaps it beyond the NMS threshold with a score
             within the tolerance (NMS kept the other of the two).

  nms_chain  the other runtime kept a same-label detection that is itself a forgiven tie (on its side only), and
             it overlaps that one beyond the NMS threshold: the tie suppressed it there (repeated while the chain
             grows).

Everything else stays strict; the first disagreements are listed in the report (side, label, score, box).
(Not forgiven: a difference caused by a tie at the pre-NMS top-k, invisible in the outputs.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.detection.model import Detector

MATCH_IOU = 0.99
TIES = ("threshold", "top_k", "nms", "nms_chain")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float64)
    from torchvision.ops import box_iou as iou

    return iou(torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))).numpy()


def tie_kind(i: int, mine: tuple, theirs: tuple, own_iou: np.ndarray, cross_iou: np.ndarray, score_threshold: float,
             nms_threshold: float, max_detections: int, tolerance: float) -> str | None:
    """Why detection `i` of one runtime (`mine`: boxes, scores, labels) may be missing from the other's
    (`theirs`): the cut-off it sits at, or None (a real disagreement). own_iou [n_mine, n_mine], cross_iou
    [n_mine, n_theirs]."""
    _, s, l = mine
    _, s2, l2 = theirs
    if abs(s[i] - score_threshold) <= tolerance:
        return "threshold"
    if len(s2) >= max_detections and abs(s[i] - s2.min()) <= tolerance:
        return "top_k"
    for ious, scores, labels in ((np.delete(own_iou[i], i), np.delete(s, i), np.delete(l, i)),
                                 (cross_iou[i], s2, l2)):
        same = labels == l[i]
        if (same & (np.abs(ious - nms_threshold) <= tolerance)).any():
            return "nms"
        if (same & (ious > nms_threshold - tolerance) & (np.abs(scores - s[i]) <= tolerance)).any():
            return "nms"
    return None


def image_parity(onnx_out: tuple, torch_out: tuple, score_threshold: float, nms_threshold: float,
                 max_detections: int, tolerance: float) -> tuple[bool, dict]:
    """One image's (boxes [K, 4], scores [K], labels [K]) from each runtime -> (same detections?, details)."""
    (b1, s1, l1), (b2, s2, l2) = onnx_out, torch_out
    k1, k2 = s1 > 0, s2 > 0
    one, two = (b1[k1], s1[k1], l1[k1]), (b2[k2], s2[k2], l2[k2])
    cross = box_iou(one[0], two[0])
    used = np.zeros(len(two[1]), bool)
    matched = np.zeros(len(one[1]), bool)
    worst_iou, worst_score = 1.0, 0.0
    for i in np.argsort(-one[1], kind="stable"):
        cand = np.flatnonzero((two[2] == one[2][i]) & ~used)
        j = max(cand, key=lambda c: cross[i, c], default=None)
        if j is None or cross[i, j] < MATCH_IOU:
            continue
        used[j], matched[i] = True, True
        worst_iou, worst_score = min(worst_iou, float(cross[i, j])), max(worst_score, float(abs(one[1][i] - two[1][j])))
    ties = dict.fromkeys(TIES, 0)
    sides = ((one, two, ~matched, cross), (two, one, ~used, cross.T))
    open_ = [[], []]  # per side: indices of lone detections not (yet) forgiven
    tied = [set(), set()]  # per side: lone detections forgiven as ties
    for side, (mine, theirs, alone, iou_to_theirs) in enumerate(sides):
        own = box_iou(mine[0], mine[0])
        for i in np.flatnonzero(alone):
            kind = tie_kind(int(i), mine, theirs, own, iou_to_theirs, score_threshold, nms_threshold,
                            max_detections, tolerance)
            if kind is None:
                open_[side].append(int(i))
            else:
                ties[kind] += 1
                tied[side].add(int(i))
    grew = True
    while grew:  # a detection the other side's forgiven tie suppressed there
        grew = False
        for side, (mine, theirs, _, iou_to_theirs) in enumerate(sides):
            other = 1 - side
            for i in list(open_[side]):
                if any(theirs[2][j] == mine[2][i] and iou_to_theirs[i, j] > nms_threshold - tolerance
                       for j in tied[other]):
                    open_[side].remove(i)
                    tied[side].add(i)
                    ties["nms_chain"] += 1
                    grew = True
    unmatched = len(open_[0]) + len(open_[1])
    lone = [{"side": ("onnxruntime", "torch")[side], "label": int(sides[side][0][2][i]),
             "score": round(float(sides[side][0][1][i]), 6), "box": [round(float(v), 2) for v in sides[side][0][0][i]]}
            for side in (0, 1) for i in open_[side]]
    ok = unmatched == 0 and worst_score <= tolerance
    return ok, {"count_onnx": int(len(one[1])), "count_torch": int(len(two[1])), "min_iou": worst_iou,
                "max_score_diff": worst_score, "unmatched": unmatched, "ties": ties, "lone": lone}


def check_parity(path: Path, detector: Detector, batches, tolerance: float) -> dict:
    """Every image of `batches` (uint8 [N, H, W, 3]) through model.onnx in onnxruntime and `detector` in PyTorch;
    the cut-offs are the detector's own (its `post`)."""
    from tasks.contract import INPUT, OUTPUTS
    from tasks.runtime import open_session

    post = detector.post
    session, _ = open_session(path, device="cpu")
    n = passed = unmatched = 0
    min_iou, max_diff, ties, lone = 1.0, 0.0, dict.fromkeys(TIES, 0), []
    for pixels in batches:
        got = session.run(list(OUTPUTS["detection"]), {INPUT: pixels})
        with torch.inference_mode():
            want = [t.numpy() for t in detector(torch.from_numpy(pixels))]
        for i in range(len(pixels)):
            ok, d = image_parity(tuple(o[i] for o in got), tuple(o[i] for o in want), post.score_threshold,
                                 post.nms_threshold, post.max_detections, tolerance)
            n, passed, unmatched = n + 1, passed + ok, unmatched + d["unmatched"]
            min_iou, max_diff = min(min_iou, d["min_iou"]), max(max_diff, d["max_score_diff"])
            ties = {k: ties[k] + d["ties"][k] for k in TIES}
            lone += [{"image": n - 1, **x} for x in d["lone"]]
    return {"n": n, "images_matching": passed, "match_rate": passed / max(n, 1), "min_matched_iou": min_iou,
            "max_score_diff": max_diff, "unmatched_detections": unmatched, "ties_forgiven": sum(ties.values()),
            "ties": ties, "disagreements": lone[:10], "score_tolerance": tolerance, "match_iou": MATCH_IOU, "passed": n > 0 and passed == n}
