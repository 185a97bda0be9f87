"""What the stages and `python -m tasks.summary` say about a segmentation run (no torch: read from the reports)."""

from __future__ import annotations

from pathlib import Path

PICTURES = "examples.png, iou.png, confusion.png, confusion.csv, per_class.csv, per_image.csv"


def train_line(s: dict) -> str:
    return f"{s['solver']}, epoch {s['best_epoch']} chosen on {s['selection']} (mIoU {s['selection_miou']:.4f})"


def evaluate_line(m: dict, reports_dir: Path) -> str:
    worst = sorted((v, c) for c, v in m["iou_per_class"].items() if v is not None)[:3]
    return (f"{m['eval_split']} n={m['n']}: mIoU {m['miou']:.4f}, pixel accuracy {m['pixel_accuracy']:.4f}, "
            f"fw-IoU {m['fw_iou']:.4f}; weakest {', '.join(f'{c} {v:.3f}' for v, c in worst)}\n"
            f"  reports: {reports_dir}/metrics.json, evaluation/ ({PICTURES})")


def _ties(q: dict) -> str:
    return f", {q['argmax_ties']} argmax tie(s) forgiven" if q.get("argmax_ties") else ""


def export_line(q: dict) -> str:
    return (f"parity on {q['n']} {q['split']} images: {q['pixel_agreement']:.4%} of pixels agree"
            f"{_ties(q)}, max |dp| {q['max_prob_diff']:.1e}")


def parity_failure(q: dict) -> str:
    return (f"{q['pixels_disagreeing']} pixel(s) on {q['n']} {q['split']} images get another class in onnxruntime "
            f"than in PyTorch (not an argmax tie; {q['pixel_agreement']:.4%} agree{_ties(q)}), max probability "
            f"difference {q['max_prob_diff']:.1e} (tolerance {q['prob_tolerance']:.0e})")


def result_lines(m: dict, parity: dict | None, layout) -> list[str]:
    lines = [f"result    {m['eval_split']} mIoU {m['miou']:.4f}, pixel accuracy {m['pixel_accuracy']:.4f}, fw-IoU "
             f"{m['fw_iou']:.4f} (n={m['n']}; epoch {m['best_epoch']} chosen on {m['model_selected_on']})"]
    gate = None if parity is None else (f"parity gate {'passed' if parity['passed'] else 'FAILED'} on {parity['n']} "
                                        f"{parity.get('split', '')} images{_ties(parity)}")
    return lines + layout.artifact_lines(PICTURES, gate)
