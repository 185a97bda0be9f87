"""What the stages and `python -m tasks.summary` say about a detection run (no torch: read from the reports)."""

from __future__ import annotations

from pathlib import Path

PICTURES = "examples.png, pr.png, per_class.csv, detections.json"


def train_line(s: dict) -> str:
    return f"{s['solver']}, epoch {s['best_epoch']} chosen on {s['selection']} (mAP {s['selection_map']:.4f})"


def evaluate_line(m: dict, reports_dir: Path) -> str:
    per = ", ".join(f"{c} {v:.3f}" for c, v in m["ap50_per_class"].items())
    return (f"{m['eval_split']} n={m['n']}: mAP@[.5:.95] {m['map']:.4f}, AP50 {m['ap50']:.4f} ({per}), "
            f"AP75 {m['ap75']:.4f}\n  reports: {reports_dir}/metrics.json, evaluation/ ({PICTURES})")


def _ties(q: dict) -> str:
    ties = {k: v for k, v in q.get("ties", {}).items() if v}
    return (f", {sum(ties.values())} tie(s) at a cut-off forgiven ("
            + ", ".join(f"{k} {v}" for k, v in ties.items()) + ")") if ties else ""


def export_line(q: dict) -> str:
    return (f"parity on {q['n']} {q['split']} images: {q['match_rate']:.2%} give the same detections (min IoU "
            f"{q['min_matched_iou']:.4f}, max score diff {q['max_score_diff']:.1e}{_ties(q)})")


def parity_failure(q: dict) -> str:
    return (f"{q['images_matching']} of {q['n']} {q['split']} images give the same detections in onnxruntime and "
            f"PyTorch ({q['unmatched_detections']} detection(s) on one side only, not at a cut-off; min matched IoU "
            f"{q['min_matched_iou']:.4f}, max score difference {q['max_score_diff']:.1e}, tolerance "
            f"{q['score_tolerance']:.0e}{_ties(q)}){_first(q)}")


def _first(q: dict) -> str:
    d = (q.get("disagreements") or [None])[0]
    return "" if d is None else (f"; first: image {d['image']}, {d['side']} only, label {d['label']} score "
                                 f"{d['score']:.4f} box {d['box']}")


def result_lines(m: dict, parity: dict | None, layout) -> list[str]:
    per = ", ".join(f"{c} {v:.3f}" for c, v in m["ap50_per_class"].items())
    lines = [f"result    {m['eval_split']} mAP@[.5:.95] {m['map']:.4f}, AP50 {m['ap50']:.4f} ({per}), "
             f"AP75 {m['ap75']:.4f} (n={m['n']}; epoch {m['best_epoch']} chosen on {m['model_selected_on']})"]
    gate = None if parity is None else (f"parity gate {'passed' if parity['passed'] else 'FAILED'} on {parity['n']} "
                                        f"{parity.get('split', '')} images{_ties(parity)}")
    return lines + layout.artifact_lines(PICTURES, gate)
