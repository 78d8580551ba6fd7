"""dvc.yaml lists, for every stage, the code that makes its outputs: every module the stage imports
(directly or through others) is one of its deps, and no dep is code it does not import. A missing
dep means DVC reuses stale outputs after that code changed; a stale one re-runs a stage for nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from ..conftest import REPO

SRC = REPO / "src"
PACKAGE = "qlora_pipeline"
# Modules that shape no output: params are validated (their values are DVC params), runs are
# recorded, paths named, files written atomically, errors raised, progress shown. Packages whose
# __init__ is a docstring only run no code either.
RECORD_KEEPING = {
    "qlora_pipeline.config", "qlora_pipeline.overrides", "qlora_pipeline.tracking", "qlora_pipeline.paths", "qlora_pipeline.atomic",
    "qlora_pipeline.errors", "qlora_pipeline.progress",
}


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported(name: str) -> set[str]:
    """The package's modules that module `name` imports anywhere in its body (function-level too)."""
    path = module_file(name)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith(PACKAGE):
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}"))
    # `import a.b.c` also runs a and a.b
    for mod in list(found):
        parts = mod.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return {m for m in found if module_file(m)}


def docstring_only(name: str) -> bool:
    return docstring_only_file(module_file(name))


def docstring_only_file(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body) or not body


def closure(start: str) -> set[str]:
    """The modules start imports, directly or not; what only a record-keeping module imports (the
    figure tracking logs, say) changes the records, not the stage's outputs, and is not followed."""
    seen, todo = set(), [start]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            if mod not in RECORD_KEEPING:
                todo.extend(imported(mod) - seen)
    return seen


def stage_deps(stage: dict) -> list[Path]:
    return [REPO / d for d in stage.get("deps", []) if str(d).startswith("src/")]


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_depends_on_exactly_the_code_it_imports(stage):
    deps = stage_deps(STAGES[stage])
    code = {m: module_file(m) for m in closure(f"{PACKAGE}.stages.{stage}") - RECORD_KEEPING if not docstring_only(m)}
    missing = sorted(str(p.relative_to(REPO)) for p in code.values() if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage}: add to deps {missing}"
    unused = sorted(str(d.relative_to(REPO)) for d in deps if not any(covered(p, [d]) for p in code.values()))
    assert not unused, f"dvc.yaml stage {stage}: deps it does not import {unused}"
    # a folder dep re-runs the stage for any file in it: each of its modules must be imported
    imported_files = set(code.values())
    extra = sorted(
        str(f.relative_to(REPO)) for d in deps if d.is_dir() for f in d.rglob("*.py")
        if f not in imported_files and not docstring_only_file(f)
    )
    assert not extra, f"dvc.yaml stage {stage}: a folder dep holds modules it does not import {extra}; list the files instead"


def test_the_import_reader_sees_function_level_and_relative_imports():
    mods = closure(f"{PACKAGE}.stages.train")
    assert f"{PACKAGE}.core.train" in mods and f"{PACKAGE}.core.data.collate" in mods


def test_renaming_the_mlflow_experiment_reruns_no_stage():
    """tracking.* names where runs are recorded; it changes no output, so it is no stage's param."""
    for name, stage in STAGES.items():
        assert not [p for p in stage.get("params", []) if str(p).split(".")[0] == "tracking"], name


def test_the_outputs_paths_py_names_are_the_ones_dvc_yaml_declares():
    """Each output path in code (qlora_pipeline.paths) is declared in dvc.yaml, and each declared
    output under models/, metrics/ and reports/ has its name in code."""
    from qlora_pipeline.paths import RELATIVE

    declared = set()
    for stage in STAGES.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                declared.add(next(iter(out)) if isinstance(out, dict) else out)
    named = {RELATIVE.prepared, RELATIVE.adapter, RELATIVE.merged, RELATIVE.data_metrics, RELATIVE.train_metrics,
             RELATIVE.eval_metrics, RELATIVE.register_metrics, RELATIVE.register_record}
    assert {p.as_posix() for p in named} <= declared
    in_code = {p.as_posix() for p in named}
    assert {d for d in declared if d.startswith(("models/", "metrics/", "reports/register"))} <= in_code
