"""Print what the last pipeline run produced: the headline numbers and where the artifacts are."""

from __future__ import annotations

import sys

from tasks.files import read_json
from tasks.layout import Layout


def main(layout: Layout = Layout()) -> int:
    reports, models = layout.reports, layout.models
    if not layout.metrics.exists():
        print(f"no {layout.metrics}: run `dvc repro` first", file=sys.stderr)
        return 1
    m = read_json(layout.metrics)
    card = read_json(layout.card_json)
    data = read_json(layout.prepared / "dataset.json")
    head = [
        f"dataset   {data['dataset']}: {len(data['classes'])} classes, "
        + ", ".join(f"{k} {v}" for k, v in data["counts"].items())
        + (f", {data['skipped']} file(s) skipped (data/prepared/report.json)" if data["skipped"] else ""),
        f"backbone  {card['arch']} ({card['source']}), "
        + (f"{card['feature_dim']}-d features" + options(card["extra"]) if card["feature_dim"] else
           f"maps at strides {card['extra']['strides']}, input {card['input_size'][0]}x{card['input_size'][1]}"),
    ]
    if m.get("task", "classification") != "classification":
        print("\n".join(head + dense_lines(m, layout)))
        return 0
    lines = head + [
        f"result    {m['eval_split']} accuracy {m['accuracy']:.4f}"
        + (" [{:.3f}, {:.3f}]".format(*m["accuracy_ci95"]) if "accuracy_ci95" in m else "")
        + (f", top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else "")
        + f", macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f} (n={m['n']}; {m['solver']}, "
        + (f"L2 {m['l2']}" if m["solver"] == "lbfgs" else f"epoch {m['best_epoch']}") + f" chosen on {m['model_selected_on']})",
        f"model     {models}/model.pt  (+ model.safetensors, head.pt, labels.json)",
        f"reports   {reports}/metrics.json, {reports}/evaluation/ (per_class.csv, confusion.png, calibration.png, mistakes.json)",
    ]
    selected = card.get("extra", {}).get("selected")
    if selected:
        lines.append(f"select    {selected['name']} chosen by the select stage: {selected['reason']} (reports/select.json)")
    if "domain_gap" in m:
        lines.append(f"gap       domain gap {m['domain_gap']:.3f} (BatchNorm statistics shift, features/gap.json): "
                     f"{m['domain_gap_verdict']}")
    if "ood_threshold" in m:
        lines.append(f"ood       ood_score > {m['ood_threshold']:g} = unlike the training data; "
                     f"{m['ood_flagged']:.1%} of {m['eval_split']} flagged (about 5% by design)")
    if layout.parity.exists():
        q = read_json(layout.parity)
        lines.append(f"onnx      export/model.onnx: onnxruntime accuracy {q['onnx_accuracy']:.4f} (PyTorch {q['torch_accuracy']:.4f}), "
                     f"argmax agreement {q['argmax_agreement']:.2%}, max |dp| {q['max_abs_prob_diff']:.1e}; "
                     f"Triton repository export/triton/")
    lines += [
        "compare   dvc metrics show | dvc plots show | dvc exp run -S train.head=mlp",
    ]
    print("\n".join(lines))
    return 0


def dense_lines(m: dict, layout: Layout) -> list[str]:
    """Detection / segmentation: the headline metric, where the pictures are, the parity gate."""
    if m["task"] == "detection":
        per = ", ".join(f"{c} {v:.3f}" for c, v in m["ap50_per_class"].items())
        result = (f"result    {m['eval_split']} mAP@[.5:.95] {m['map']:.4f}, AP50 {m['ap50']:.4f} ({per}), "
                  f"AP75 {m['ap75']:.4f} (n={m['n']}; epoch {m['best_epoch']} chosen on {m['model_selected_on']})")
        pictures = "examples.png, pr.png, per_class.csv, detections.json"
    else:
        result = (f"result    {m['eval_split']} mIoU {m['miou']:.4f}, pixel accuracy {m['pixel_accuracy']:.4f} "
                  f"(n={m['n']})")
        pictures = "examples.png, per-class IoU, confusion matrix"
    lines = [result, f"model     {layout.checkpoint}  (+ model.safetensors, head.pt, labels.json)",
             f"reports   {layout.metrics}, {layout.evaluation}/ ({pictures})"]
    if layout.parity.exists():
        q = read_json(layout.parity)
        lines.append(f"onnx      {layout.model_onnx}: parity gate {'passed' if q['passed'] else 'FAILED'} on {q['n']} "
                     f"{q.get('split', '')} images; Triton repository {layout.export}/triton/")
    return lines


def options(extra: dict) -> str:
    """features.layers / features.flip, when not the plain last-layer features."""
    parts = (["multi-layer"] if extra.get("layers") == "multi" else []) + (["mean with mirror"] if extra.get("flip") else [])
    return f" ({', '.join(parts)})" if parts else ""


if __name__ == "__main__":
    sys.exit(main())

