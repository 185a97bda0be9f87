"""What multi-label classification says about its runs (no torch: tasks/summary.py and the stages' last lines)."""

from __future__ import annotations

from pathlib import Path


def chosen(s: dict) -> str:
    return f"L2 {s['l2']}" if s["solver"] == "lbfgs" else f"epoch {s['best_epoch']}"


def train_line(s: dict) -> str:
    return (f"{s['solver']}, {chosen(s)} chosen on {s['selection']} (mAP {s['selection_map']:.4f}), "
            f"{s['thresholds_tuned']} of {s['num_tags']} tag thresholds set for the best F1 there")


def _ci(m: dict, key: str) -> str:
    return "" if f"{key}_ci95" not in m else " [{:.3f}, {:.3f}]".format(*m[f"{key}_ci95"])


def _score(m: dict) -> str:
    return (f"mAP {m['map']:.4f}{_ci(m, 'map')}, macro-F1 {m['macro_f1']:.4f}{_ci(m, 'macro_f1')} "
            f"(one global 0.5: {m['macro_f1_at_05']:.4f}), micro-F1 {m['micro_f1']:.4f}")


def weakest(m: dict, k: int = 3) -> str:
    worst = sorted((v, t) for t, v in m["ap_per_tag"].items() if v is not None)[:k]
    return ", ".join(f"{t} {v:.3f}" for v, t in worst)


def evaluate_line(m: dict, reports: Path) -> str:
    return (f"{m['eval_split']} n={m['n']}: {_score(m)}; weakest AP {weakest(m)}; skipped images "
            f"{m['skipped_images']}\n  reports: {reports}/metrics.json, evaluation/ (per_tag.csv, predictions.csv, "
            f"ap.png, mistakes.png)")


def export_line(q: dict) -> str:
    return (f"parity on {q['n']} {q['split']} images: tag agreement {q['tag_agreement']:.2%} ({q['ties']} tie(s) at a "
            f"threshold), max |dp| {q['max_abs_prob_diff']:.1e}")


def parity_failure(q: dict) -> str:
    """Why the gate failed: the tag decisions, the probabilities and the OOD score against the tolerance."""
    worst = {"tag agreement": f"{q['tag_agreement']:.4%}", "max |p_onnx - p_torch|": f"{q['max_abs_prob_diff']:.2e}",
             "ood_score relative difference": f"{q['ood_max_rel_diff']:.1e}" if "ood_max_rel_diff" in q else None}
    shown = ", ".join(f"{k} {v}" for k, v in worst.items() if v is not None)
    return f"on {q['n']} {q['split']} images {shown} (tolerance {q['tolerance']:.0e})"


def result_lines(m: dict, parity: dict | None, layout) -> list[str]:
    lines = [
        f"result    {m['eval_split']} {_score(m)} (n={m['n']}, {m['num_tags']} tags; {m['solver']}, {chosen(m)} and "
        f"the per-tag thresholds chosen on {m['model_selected_on']})",
    ]
    onnx = export_line(parity) if parity is not None and "tag_agreement" in parity else None
    return lines + layout.artifact_lines("per_tag.csv, predictions.csv, ap.png, mistakes.png", onnx)
