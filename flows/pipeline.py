"""The whole pipeline as one Prefect flow, each DVC stage a Prefect task. Wiring only: the work is in tasks/.

Every stage asks DVC first: an up-to-date stage is skipped (reported as cached);
otherwise its stage function runs here and `dvc commit` records its deps, params and
outputs in dvc.lock, exactly as `dvc repro` would. So after a flow run `dvc status`
is clean and `dvc repro` does nothing. Parameter overrides are validated before any
work and written into params.yaml (comments kept), where DVC sees them. The run ends
with `dvc push` to the default remote: the tasks exchange files, never memory, so
they can run on other machines that share the remote.
"""

from __future__ import annotations

import importlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from tasks.config import Params


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[leaf] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"classification": {"lr": 0.1}} -> {"classification.lr": 0.1}"""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def apply_overrides(overrides: dict[str, Any], params_file: Path = Path("params.yaml")):
    """Validate dotted overrides ({"classification.l2": [0.01]}) with params.yaml, then write them into it (comments kept).

    An unknown key or a wrong type raises ConfigError naming it, before any work runs.
    """
    from ruamel.yaml import YAML

    from tasks.config import parse_params
    from tasks.files import write_text

    yaml = YAML()
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = yaml.load(params_file.read_text())
    plain = json.loads(json.dumps(doc))
    current = flatten(plain)
    overrides = {k: v for k, v in overrides.items() if k not in current or current[k] != v}  # only real changes
    for dotted, value in overrides.items():
        set_dotted(plain, dotted, value)
    params = parse_params(plain)
    if overrides:
        for dotted, value in overrides.items():
            set_dotted(doc, dotted, value)
        buf = io.StringIO()
        yaml.dump(doc, buf)
        write_text(params_file, buf.getvalue())
    return params


def stage_is_current(stage: str) -> bool:
    from dvc.repo import Repo

    with Repo(".") as repo:
        return not repo.status(targets=[stage])


def record_stage(stage: str) -> None:
    """dvc commit: write the stage's deps, params and outs into dvc.lock and the DVC cache."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        repo.commit(stage, force=True)


def dvc_stages(dvc_file: Path = Path("dvc.yaml")) -> list[tuple[str, str]]:
    """(stage name, module) in dvc.yaml's order: the flow runs the very stages `dvc repro` runs."""
    import yaml

    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    return [(name, spec["cmd"].split(" -m ", 1)[1].split()[0]) for name, spec in stages.items()]


def progress_reporter(key: str, description: str) -> Callable[[int, int], None]:
    artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
    last = [-1.0]

    def report(done: int, total: int) -> None:
        pct = round(100.0 * done / max(total, 1), 1)
        if pct - last[0] >= 5 or done == total:  # a handful of API calls, not one per batch
            update_progress_artifact(artifact_id, progress=pct)
            last[0] = pct

    return report


# Stages that fetch over the network retry with exponential backoff (a user error is not retried).
RETRIES = {"prepare": 3, "backbone": 3}
PROGRESS = {"features": "frozen-backbone features", "train": "head training"}


def _retry_unless_user_error(task, task_run, state) -> bool:
    from tasks.config import UserError

    try:
        state.result()
    except UserError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return False


@task
def run_stage(stage: str, module: str) -> dict:
    """One DVC stage: skipped when DVC says it is current; else run, then recorded in dvc.lock.

    A stage writes its outputs atomically, so when it fails nothing is committed and the
    previous outputs (the last good data and model) stay in place.
    """
    from tasks.config import load_params
    from tasks.layout import Layout

    logger = get_run_logger()
    if stage_is_current(stage):
        logger.info("stage %s is up to date in DVC: cached, skipped", stage)
        return {"stage": stage, "cached": True}
    progress = progress_reporter(f"{stage}-progress", PROGRESS[stage]) if stage in PROGRESS else None
    result = importlib.import_module(module).run(load_params(), Layout(), progress)
    record_stage(stage)
    logger.info("stage %s ran and was committed to dvc.lock", stage)
    return {"stage": stage, "cached": False, "result": repr(result)[:500]}


def stage_task(stage: str):
    return run_stage.with_options(
        name=stage, retries=RETRIES.get(stage, 0), retry_delay_seconds=exponential_backoff(backoff_factor=5),
        retry_condition_fn=_retry_unless_user_error)


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push_task() -> int:
    from dvc.repo import Repo

    with Repo(".") as repo:
        return int(repo.push())


def model_card(params, metrics: dict, parity: dict, dataset: dict, card: dict,
               page: str = "reports/index.html") -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    head = f"{params.task} head"
    return f"""# Model card: {params.backbone.name} + {head}

**Data**: `{dataset['dataset']}` ({len(dataset['classes'])} classes: {", ".join(dataset['classes'][:20])}{" ..." if len(dataset['classes']) > 20 else ""}),
splits {dataset['counts']}, manifest sha256 `{dataset['manifest_sha256']}`, skipped files {dataset['skipped']}.

**Backbone**: `{card['arch']}` from {card['source']} (weights sha256 `{card['weights_sha256'][:16]}...`), frozen, {f"{card['feature_dim']}-d features" if card['feature_dim'] else "maps at strides 8/16/32"};
input {card['input_size'][0]}x{card['input_size'][1]}, resize {card['resize_size']} ({card['interpolation']}), mean {card['mean']}, std {card['std']}.

**Training**: solver {metrics.get('solver')}, chosen on {metrics.get('model_selected_on')}; params: `{json.dumps(params.head.model_dump(mode='json'))}`.

**Evaluation** on the {metrics.get('eval_split')} split:

| metric | value |
|---|---|
{rows}

**Parity** (onnxruntime vs PyTorch, {parity.get('n')} images): {", ".join(f"{k} {v}" for k, v in parity.items() if k not in ("n", "split") and not isinstance(v, dict))}.

**Artifacts**: `export/model.onnx` (deployable), `export/triton/{params.export.triton_model_name}/` (Triton repository),
`models/model.pt`, `reports/` — all versioned by DVC (`dvc.lock`) and pushed to the DVC remote.

**Report page**: [{page}]({page}) — summary, metrics with intervals, confusion matrix, mistakes, label issues,
duplicates and leaks, learning curve; one self-contained file.
"""


@flow(name="transfer-learning", log_prints=True)
def transfer_learning(params: Params | None = None, overrides: dict[str, Any] | None = None, push: bool = True) -> dict:
    """The stages of dvc.yaml in order, each skipped when DVC says it is current.

    params: the whole typed parameter set (the Prefect UI shows it as a form); written into params.yaml.
    overrides: dotted keys on top, e.g. {"classification.head": "mlp"}. Both are validated before any work runs.
    """
    from tasks.files import read_json
    from tasks.layout import Layout

    logger = get_run_logger()
    params = apply_overrides({**flatten(params.model_dump(mode="json") if params else {}), **(overrides or {})})
    logger.info("params validated%s", f"; written to params.yaml: {overrides}" if overrides else "")
    results = [stage_task(stage)(stage, module) for stage, module in dvc_stages()]
    layout = Layout()
    metrics, parity = read_json(layout.metrics), read_json(layout.parity)
    create_table_artifact(
        key="metrics", table=[{"metric": k, "value": v} for k, v in {**metrics, **{f"parity_{k}": v for k, v in parity.items()
                                                                                  if not isinstance(v, dict)}}.items()],
        description=f"evaluation on the {metrics['eval_split']} split",
    )
    chosen = layout.read_json(layout.select_report, {})
    if chosen.get("candidates"):  # backbone.name: auto (or python -m tasks.select --probe) probed the candidates
        keys = ("name", "probe_acc", "probe_std", "logme", "latency_ms_b1", "throughput_b32", "gflops", "params_m")
        create_table_artifact(key="select", table=[{k: c[k] for k in keys} for c in chosen["candidates"]],
                              description=f"backbone candidates; chosen {chosen['choice']['name']}: {chosen['choice']['reason']}")
    create_markdown_artifact(
        key="model-card", markdown=model_card(params, metrics, parity, read_json(layout.prepared / "dataset.json"),
                                              read_json(layout.card_json), layout.report_page.resolve().as_uri()),
        description="data, backbone, params, metrics, parity, artifacts, the report page",
    )
    pushed = push_task() if push else 0
    cached = [r["stage"] for r in results if r["cached"]]
    logger.info("done: %s cached, %s ran; %s file(s) pushed to the DVC remote", cached,
                [r["stage"] for r in results if not r["cached"]], pushed)
    return {"stages": results, "metrics": metrics, "parity": parity, "pushed": pushed, "cwd": os.getcwd()}


if __name__ == "__main__":
    transfer_learning()
