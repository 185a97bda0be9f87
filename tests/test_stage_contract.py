"""The stage contract: one entry point per stage, stages meet only in the layout, dvc.yaml's code deps
are exactly each stage's import closure, and a user error on the command line is one line."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
STAGE_MODULES = {name: spec["cmd"].split(" -m ", 1)[1].split()[0] for name, spec in DVC.items()}


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` names anywhere in the file (function-level imports count: they run)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from tasks import data`
    return out


def module_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(module: str) -> set[str]:
    """Project files (relative paths) that `module` needs, itself included; package __init__ files left out."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        m = todo.pop()
        f = module_file(m)
        if f is None or m in seen:
            continue
        seen[m] = f
        todo += [i for i in imported_modules(f) if i.split(".")[0] in ("tasks", "deploy", "flows")]
    return {f.relative_to(ROOT).as_posix() for f in seen.values() if f.name != "__init__.py"}


def parts_called(module: str) -> set[str]:
    """The task parts a stage module looks up: every `registry.part(<task>, "<part>")` in its source."""
    out = set()
    for node in ast.walk(ast.parse(module_file(module).read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "part"
                and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)):
            out.add(node.args[1].value)
    return out


def stage_code(stage: str) -> set[str]:
    """What a stage's code is: its module's import closure, and for every task the shared files (outside
    tasks/<task>/) that the parts it calls import; tasks/<task>/ itself is one dep, `tasks/${task}`."""
    from tasks.registry import TASKS

    files = import_closure(STAGE_MODULES[stage])
    for task in TASKS:
        for part in parts_called(STAGE_MODULES[stage]):
            files |= {f for f in import_closure(f"tasks.{task}.{part}") if not f.startswith(f"tasks/{task}/")}
    return files


@pytest.mark.parametrize("stage", sorted(DVC))
def test_dvc_code_deps_are_the_stage_import_closure(stage):
    listed = {d for d in DVC[stage]["deps"] if isinstance(d, str) and d.endswith(".py")}
    closure = stage_code(stage)
    assert listed == closure, (f"dvc.yaml stage {stage!r}: missing {sorted(closure - listed)}, "
                               f"not imported {sorted(listed - closure)}")
    if parts_called(STAGE_MODULES[stage]):  # the chosen task's package, whatever it is
        assert "tasks/${task}" in DVC[stage]["deps"], f"dvc.yaml stage {stage!r}: add tasks/${{task}} to its deps"


@pytest.mark.parametrize("task", sorted(__import__("tasks.registry").registry.TASKS))
def test_every_registered_task_implements_the_whole_interface(task):
    from tasks import registry

    for part, names in registry.PARTS.items():
        module = registry.part(task, part)
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f"tasks/{task}/{part}.py lacks {missing}"
    assert registry.part(task, "features").KIND.__name__ in ("tasks.pooled", "tasks.dense")


@pytest.mark.parametrize("task", sorted(__import__("tasks.registry").registry.TASKS))
def test_task_summaries_and_serving_parts_do_not_import_torch(task):
    code = (f"import sys, tasks.{task}.summary, tasks.{task}.serve; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_no_stage_module_compares_the_task(stage):
    """Stages look the task up in the registry; they never branch on its name."""
    import re

    source = module_file(STAGE_MODULES[stage]).read_text()
    assert not re.findall(r"task\s*(==|!=)|task in |\.task\s*(==|!=)", source)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_a_stage_never_imports_another_stage(stage):
    others = {m for s, m in STAGE_MODULES.items() if s != stage}
    assert not import_closure(STAGE_MODULES[stage]) & {module_file(m).relative_to(ROOT).as_posix() for m in others}


@pytest.mark.parametrize("stage", sorted(DVC))
def test_every_stage_has_the_same_entry_point(stage):
    run = importlib.import_module(STAGE_MODULES[stage]).run
    assert list(inspect.signature(run).parameters)[:3] == ["params", "layout", "progress"]


def test_the_flow_runs_exactly_the_dvc_stages_in_order():
    from flows.pipeline import dvc_stages

    assert dvc_stages(ROOT / "dvc.yaml") == list(STAGE_MODULES.items())


def test_committed_json_schema_is_current():
    import json

    from tasks.config import json_schema

    assert json.loads((ROOT / "params.schema.json").read_text()) == json_schema(), \
        "regenerate: python -m tasks.config --schema > params.schema.json"


BROKEN_PARAMS = {
    "unknown key": ("data:\n  datset: digits\n", "did you mean 'dataset'"),
    "wrong type": ("classification:\n  epochs: many\n", "classification.epochs: expected int"),
    "yaml syntax": ("classification: [unclosed\n", "not valid YAML at line"),
}


@pytest.mark.parametrize("stage", sorted(DVC))
def test_a_broken_params_file_is_one_line_on_stderr(stage, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for case, (text, words) in BROKEN_PARAMS.items():
        (tmp_path / "params.yaml").write_text(text)
        r = subprocess.run([sys.executable, "-m", STAGE_MODULES[stage]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        err = r.stderr.strip()
        assert r.returncode != 0, f"{stage}, {case}: exit 0"
        assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, f"{stage}, {case}:\n{r.stderr}"
        assert err.startswith(f"{stage}: params.yaml: ") and words in err, f"{stage}, {case}: {err}"


def test_every_console_script_points_at_a_function():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func, None)), f"{name} = {target}: no such function"
