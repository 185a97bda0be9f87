"""Print what the last pipeline run produced: the headline numbers and where the artifacts are."""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.files import read_json


def main(reports: Path = Path("reports"), models: Path = Path("models")) -> int:
    metrics_path = reports / "metrics.json"
    if not metrics_path.exists():
        print(f"no {metrics_path}: run `dvc repro` first", file=sys.stderr)
        return 1
    m = read_json(metrics_path)
    card = read_json(models / "backbone" / "card.json")
    data = read_json(Path("data/prepared/dataset.json"))
    lines = [
        f"dataset   {data['dataset']}: {len(data['classes'])} classes, "
        + ", ".join(f"{k} {v}" for k, v in data["counts"].items())
        + (f", {data['skipped']} file(s) skipped (data/prepared/report.json)" if data["skipped"] else ""),
        f"backbone  {card['arch']} ({card['source']}), {card['feature_dim']}-d features",
        f"result    {m['eval_split']} accuracy {m['accuracy']:.4f}"
        + (f", top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else "")
        + f", macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f} (n={m['n']}; {m['solver']}, "
        + (f"L2 {m['l2']}" if m["solver"] == "lbfgs" else f"epoch {m['best_epoch']}") + f" chosen on {m['model_selected_on']})",
        f"model     {models}/classifier.pt  (+ classifier.safetensors, head.pt, labels.json)",
        f"reports   {reports}/metrics.json, per_class.csv, confusion.png, calibration.png, mistakes.json",
    ]
    parity_path = reports / "parity.json"
    if parity_path.exists():
        q = read_json(parity_path)
        lines.append(f"onnx      export/model.onnx: onnxruntime accuracy {q['onnx_accuracy']:.4f} (PyTorch {q['torch_accuracy']:.4f}), "
                     f"argmax agreement {q['argmax_agreement']:.2%}, max |dp| {q['max_abs_prob_diff']:.1e}; "
                     f"Triton repository export/triton/")
    lines += [
        "compare   dvc metrics show | dvc plots show | dvc exp run -S train.head=mlp",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
