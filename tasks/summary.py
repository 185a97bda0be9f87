"""Print what the last pipeline run produced: the headline numbers and where the artifacts are.

The dataset and backbone lines are the same for every task; the result lines are the task's
(tasks/<task>/summary.py: result_lines), read from reports/metrics.json and reports/parity.json.
"""

from __future__ import annotations

import sys

from tasks import registry
from tasks.files import read_json
from tasks.layout import Layout


def main(layout: Layout = Layout()) -> int:
    if not layout.metrics.exists():
        print(f"no {layout.metrics}: run `dvc repro` first", file=sys.stderr)
        return 1
    m = read_json(layout.metrics)
    task = m.get("task")
    if task not in registry.TASKS:
        print(f"{layout.metrics} was written by an older tlcv (no task): re-run `dvc repro evaluate`", file=sys.stderr)
        return 1
    card = read_json(layout.card_json)
    data = read_json(layout.prepared / "dataset.json")
    lines = [
        f"task      {task}",
        f"dataset   {data['dataset']}: {len(data['classes'])} labels, "
        + ", ".join(f"{k} {v}" for k, v in data["counts"].items())
        + (f", {data['skipped']} file(s) skipped (data/prepared/report.json)" if data["skipped"] else ""),
        f"backbone  {card['arch']} ({card['source']}), "
        + (f"{card['feature_dim']}-d features" + options(card["extra"]) if card["feature_dim"] else
           f"maps at strides {card['extra']['strides']}, input {card['input_size'][0]}x{card['input_size'][1]}"),
    ]
    parity = read_json(layout.parity) if layout.parity.exists() else None
    lines += registry.part(task, "summary").result_lines(m, parity, layout)
    selected = card.get("extra", {}).get("selected")
    if selected:
        lines.append(f"select    {selected['name']} chosen by the select stage: {selected['reason']} (reports/select.json)")
    if "domain_gap" in m:
        lines.append(f"gap       domain gap {m['domain_gap']:.3f} (BatchNorm statistics shift, features/gap.json): "
                     f"{m['domain_gap_verdict']}")
    if "ood_threshold" in m:
        lines.append(f"ood       ood_score > {m['ood_threshold']:g} = unlike the training data; "
                     f"{m['ood_flagged']:.1%} of {m['eval_split']} flagged (about 5% by design)")
    audit = layout.read_json(layout.audit_report, None)
    if isinstance(audit, dict) and audit.get("enabled"):
        d, lc = audit["duplicates"]["counts"], audit["learning_curve"]
        nxt = lc["predicted"][0]
        lines.append(f"audit     {audit['label_issues']['count']} label issue(s), {d['leak']} leak / "
                     f"{d['near_duplicate']} near-duplicate / {d['conflict']} conflict pair(s), "
                     f"{audit['outliers']['count']} outlier(s); 2x the images: {lc['metric']} {nxt['score']:.3f} "
                     f"[{nxt['low']:.3f}, {nxt['high']:.3f}] (reports/audit.json)")
    if layout.report_page.exists():
        lines.append(f"page      {layout.report_page.resolve().as_uri()}  (one self-contained page: open it in a browser)")
    lines.append(f"compare   dvc metrics show | dvc plots show | dvc exp run -S {task}.seed=1")
    print("\n".join(lines))
    return 0


def options(extra: dict) -> str:
    """<task>.features.layers / .flip, when not the plain last-layer features."""
    parts = (["multi-layer"] if extra.get("layers") == "multi" else []) + (["mean with mirror"] if extra.get("flip") else [])
    return f" ({', '.join(parts)})" if parts else ""


if __name__ == "__main__":
    sys.exit(main())
