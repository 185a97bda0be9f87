"""What classification says about its runs (no torch: tasks/summary.py and the stages' last lines)."""

from __future__ import annotations

from pathlib import Path


def chosen(s: dict) -> str:
    return f"L2 {s['l2']}" if s["solver"] == "lbfgs" else f"epoch {s['best_epoch']}"


def train_line(s: dict) -> str:
    return f"{s['solver']}, {chosen(s)} chosen on {s['selection']} (acc {s['selection_accuracy']:.4f})"


def _score(m: dict) -> str:
    ci = "" if "accuracy_ci95" not in m else " [{:.3f}, {:.3f}]".format(*m["accuracy_ci95"])
    top5 = f", top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""
    return f"accuracy {m['accuracy']:.4f}{ci}{top5}, macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f}"


def evaluate_line(m: dict, reports: Path) -> str:
    return (f"{m['eval_split']} n={m['n']}: {_score(m)}; skipped images {m['skipped_images']}\n"
            f"  reports: {reports}/metrics.json, evaluation/ (per_class.csv, confusion.png, calibration.png, "
            f"mistakes.png)")


def export_line(q: dict) -> str:
    line = (f"parity on {q['n']} {q['split']} images: argmax agreement {q['argmax_agreement']:.2%}, max |dp| "
            f"{q['max_abs_prob_diff']:.1e}, onnxruntime accuracy {q['onnx_accuracy']:.4f} (PyTorch {q['torch_accuracy']:.4f})")
    if "int8" in q:
        i = q["int8"]
        state = "written" if i["written"] else f"NOT written: {i['reason']}"
        line += (f"\n  int8: accuracy {i['accuracy']:.4f} ({i['acc_drop_pp']:+.2f} pp drop), "
                 f"{i['int8_over_fp32_b1']:.2f}x FP32 speed at batch 1 — {state}")
    return line


def parity_failure(q: dict) -> str:
    ood = f", ood_score relative difference {q['ood_max_rel_diff']:.1e}" if "ood_max_rel_diff" in q else ""
    return (f"on {q['n']} {q['split']} images argmax agreement {q['argmax_agreement']:.4%}, max |p_onnx - p_torch| "
            f"{q['max_abs_prob_diff']:.2e}{ood} (tolerance {q['tolerance']:.0e})")


def result_lines(m: dict, parity: dict | None, layout) -> list[str]:
    lines = [
        f"result    {m['eval_split']} {_score(m)} (n={m['n']}; {m['solver']}, {chosen(m)} chosen on {m['model_selected_on']})",
    ]
    onnx = None if parity is None or "onnx_accuracy" not in parity else (
        f"onnxruntime accuracy {parity['onnx_accuracy']:.4f} (PyTorch {parity['torch_accuracy']:.4f}), argmax agreement "
        f"{parity['argmax_agreement']:.2%}, max |dp| {parity['max_abs_prob_diff']:.1e}")
    return lines + layout.artifact_lines("per_class.csv, confusion.png, calibration.png, mistakes.png", onnx)
