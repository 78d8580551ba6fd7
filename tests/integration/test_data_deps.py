"""data.raw_path and data.columns against a real git + DVC project (issue 12, items 8 and 9):
any raw_path is the prepare stage's DVC dependency, and one `-S` line sets data.columns in both
`dvc exp run` and `qlora`, replacing the mapping rather than merging into the last one."""

from __future__ import annotations

import json
import subprocess
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import make_project, project_env, run, set_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_project(tmp_path_factory) -> Path:
    """The project as a fresh git + DVC repo with the demo data in data/raw, built once."""
    return make_project(tmp_path_factory.mktemp("data-deps") / "project")


@pytest.fixture
def project(base_project, tmp_path) -> Path:
    """A copy of base_project of this test's own (git, DVC cache and all)."""
    return Path(shutil.copytree(base_project, tmp_path / "project", symlinks=True))


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def numbers(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."} for i in range(start, start + n)]


def dvc_status(project: Path, env: dict) -> dict:
    return json.loads(run(["dvc", "status", "prepare", "--json"], project, env).stdout or "{}")


def prepare_stats(project: Path) -> dict:
    return json.loads((project / "data" / "prepared" / "stats.json").read_text())


def lock_deps(project: Path) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {d["path"]: d["md5"] for d in lock["stages"]["prepare"]["deps"]}


@pytest.mark.parametrize("where", ["folder outside the repo", "file inside the repo"])
def test_any_raw_path_is_a_dependency_dvc_tracks(project, tmp_path, where):
    env = project_env(project)
    if where == "folder outside the repo":
        data = tmp_path / "elsewhere"
        data.mkdir()
        target, raw_path = data / "rows.jsonl", str(data)
    else:
        target = project / "corpus" / "rows.jsonl"
        target.parent.mkdir()
        raw_path = "corpus/rows.jsonl"
    target.write_text(jsonl(numbers(40)))
    set_params(project, {"data.raw_path": raw_path})

    run(["dvc", "repro", "prepare"], project, env)
    assert prepare_stats(project)["rows_read"] == 40
    assert raw_path in lock_deps(project) and "data/raw" not in lock_deps(project)
    assert dvc_status(project, env) == {}

    with target.open("a") as f:  # one more row: DVC must see it
        f.write(json.dumps(numbers(1, start=40)[0]) + "\n")
    assert dvc_status(project, env) == {"prepare": [{"changed deps": {raw_path: "modified"}}]}
    repro = run(["dvc", "repro", "prepare"], project, env)
    assert "Running stage 'prepare'" in repro.stdout
    assert prepare_stats(project)["rows_read"] == 41
    assert dvc_status(project, env) == {}


def sources(project: Path) -> list[str]:
    prepared = project / "data" / "prepared"
    return [s for split in ("train", "eval") for s in pq.read_table(prepared / f"{split}.parquet")["source"].to_pylist()]


def test_one_set_syntax_for_columns_in_dvc_exp_run_and_qlora(project):
    env = project_env(project)
    qa = project / "data" / "raw" / "extra" / "qa.jsonl"
    qa.parent.mkdir()
    qa.write_text(jsonl([{"question": f"Name the color {i}.", "answer": f"color {i}"} for i in range(30)]))
    run(["dvc", "add", "data/raw"], project, env)
    run(["git", "commit", "-qam", "a file whose fields have other names"], project, env)
    first = "{extra/*.jsonl: {instruction: question, output: answer}}"

    # dvc exp run -S: the quoted mapping is set whole (a plain {...} would need DVC's + prefix).
    run(["dvc", "exp", "run", "prepare", "-S", f"data.columns='{first}'"], project, env)
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["columns"] == first
    report = json.loads((project / "data" / "prepared" / "report.json").read_text())
    assert report["counts"] == {}  # the mapping applied to extra/qa.jsonl only; the demo file kept its names
    assert sum(s.startswith("data/raw/extra/qa.jsonl:") for s in sources(project)) == 30

    # The next experiment's mapping replaces the last one; nothing of it carries over (DVC's
    # `++data.columns={...}` would merge the two).
    second = '{"extra/qa.jsonl": {instruction: question, output: answer}}'
    run(["dvc", "exp", "run", "prepare", "-S", f"data.columns='{second}'"], project, env)
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["columns"] == second
    assert json.loads((project / "data" / "prepared" / "report.json").read_text())["counts"] == {}

    # qlora <stage> -S takes the same line, for one call, and replaces what params.yaml holds: merged
    # with this leftover mapping, every demo row would lose its instruction and prepare would fail.
    set_params(project, {"data.columns": "{instructions.jsonl: {instruction: nope}}"})
    run(["qlora", "prepare", "-S", f"data.columns='{first}'"], project, env)
    assert json.loads((project / "data" / "prepared" / "report.json").read_text())["counts"] == {}
    assert sum(s.startswith("data/raw/extra/qa.jsonl:") for s in sources(project)) == 30


def test_committed_raw_dvc_is_the_demo_data(tmp_path):
    """`make data` copies data/demo into data/raw: its DVC hash must be the committed data/raw.dvc's,
    or a fresh clone's checkout of the commit (Prefect workspaces) cannot find the data."""

    from .conftest import BIN, REPO

    raw = tmp_path / "data" / "raw"
    shutil.copytree(REPO / "data" / "demo", raw)
    (raw / "make_demo_data.py").unlink()
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], [str(BIN / "dvc"), "add", "-q", "data/raw"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    made = yaml.safe_load((tmp_path / "data" / "raw.dvc").read_text())["outs"][0]
    committed = yaml.safe_load((REPO / "data" / "raw.dvc").read_text())["outs"][0]
    assert (made["md5"], made["size"], made["nfiles"]) == (committed["md5"], committed["size"], committed["nfiles"])
