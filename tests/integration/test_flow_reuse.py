"""A flow run's worktree reuses the outputs of stages already run with the same inputs.

flows/reuse.py:reuse_earlier_outputs on a real git + DVC project, without Prefect. Here the
outputs come from the commit's own dvc.lock (prepare run and committed the usual DVC way); the
saved experiments of earlier flow runs are the other source, covered end to end in
test_prefect_flow.py (a rerun with the first run's params skips prepare, train and evaluate).
"""

from __future__ import annotations

import json
import sys

import pytest

from .conftest import make_project, project_env, run

pytestmark = pytest.mark.integration

DVC = [sys.executable, "-m", "dvc"]


def test_worktrees_reuse_outputs_only_where_dvc_finds_the_inputs_unchanged(tmp_path, monkeypatch):
    from flows import workspace
    from flows.reuse import reuse_earlier_outputs

    project = make_project(tmp_path / "project")
    for key, value in project_env(project).items():
        monkeypatch.setenv(key, value)
    run([*DVC, "repro", "--single-item", "prepare"], project)
    run(["git", "add", "dvc.lock", "data/raw.dvc", "metrics/data.json", "plots/token_lengths.csv", "plots/token_lengths.png"], project)
    run(["git", "commit", "-qm", "prepared"], project)
    commit = workspace.resolve_commit(project, "HEAD")
    lock = (project / "dvc.lock").read_text()

    # another train seed: prepare's data, code and params are those of the commit's dvc.lock
    ws = workspace.create(project, "run-1", commit, "exp-one")
    workspace.write_params(ws, {"train.seed": 5})
    ws = reuse_earlier_outputs(ws)
    assert (ws.reused_from, ws.reused_stages) == ("dvc.lock", ("prepare",))
    assert (ws.path / "data" / "prepared" / "train.parquet").is_file()  # from the shared DVC cache
    changed = json.loads(run([*DVC, "status", "--json"], ws.path).stdout)
    assert "prepare" not in changed and "train" in changed
    assert "didn't change, skipping" in run([*DVC, "repro", "--single-item", "prepare"], ws.path).stdout
    workspace.remove(ws)

    # a prepare parameter changed: nothing to reuse, the checkout's own dvc.lock as it was
    ws = workspace.create(project, "run-2", commit, "exp-two")
    workspace.write_params(ws, {"data.max_seq_len": 80})
    ws = reuse_earlier_outputs(ws)
    assert (ws.reused_from, ws.reused_stages) == (None, ())
    assert (ws.path / "dvc.lock").read_text() == lock
    assert "prepare" in json.loads(run([*DVC, "status", "--json"], ws.path).stdout)
    workspace.remove(ws)
