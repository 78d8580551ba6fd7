"""Local store and tracking server over one store folder: an experiment made in one mode is
refused in the other with the mismatch and the fix named, before any work (never a half-run)."""

from __future__ import annotations

import pytest

from qlora_pipeline import tracking
from qlora_pipeline.errors import RegistryError
from qlora_pipeline.paths import ProjectPaths

from .conftest import SERVER_ROOTS

pytestmark = pytest.mark.integration


def test_each_mode_refuses_the_others_experiments(mlflow_server, monkeypatch, tmp_path):
    paths = ProjectPaths.at(tmp_path)
    local = f"sqlite:///{SERVER_ROOTS[mlflow_server] / 'mlflow.db'}"  # the server's own store file

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tracking.setup(paths, "made-through-the-server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local)
    tracking.setup(paths, "made-locally")
    with pytest.raises(RegistryError, match=r"'made-through-the-server' was created through a tracking server .*mlflow/server.sh.*tracking.experiment"):
        tracking.setup(paths, "made-through-the-server")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with pytest.raises(RegistryError, match=r"'made-locally' was created with a local store .*Unset MLFLOW_TRACKING_URI.*tracking.experiment"):
        tracking.setup(paths, "made-locally")
    assert tracking.setup(paths, "made-through-the-server")  # each mode keeps its own


def test_queued_and_temp_experiments_record_into_the_projects_store(tmp_path, monkeypatch):
    """DVC runs a queued or --temp experiment in a throw-away copy and says where the project is
    (DVC_ROOT): the local store is the project's, not the copy's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project, copy = tmp_path / "project", tmp_path / "tmp-executor"
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert tracking.tracking_uri(ProjectPaths.at(copy)) == f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    monkeypatch.delenv("DVC_ROOT")
    assert tracking.tracking_uri(ProjectPaths.at(copy)) == f"sqlite:///{copy / 'mlflow' / 'mlflow.db'}"


def test_a_temp_experiment_records_into_the_projects_store(tmp_path):
    """`dvc exp run --temp` runs the stages in a throw-away copy (as `dvc queue` does): the run and
    the registered version land in the project's mlflow/ store, and the next commands find them."""
    import json
    import os

    from mlflow import MlflowClient

    from .conftest import make_project, project_env, run

    project = make_project(tmp_path / "p", {"train.max_steps": 2, "evaluate.num_samples": 0, "evaluate.max_eval_rows": 8,
                                            "register.model_name": "qlora-temp"})
    env = project_env(project)
    env.pop("MLFLOW_TRACKING_URI", None)
    run(["dvc", "exp", "run", "--temp", "-n", "in-a-temp-dir", "-S", "train.learning_rate=0.002"], project, env)
    store = project / "mlflow" / "mlflow.db"
    assert store.is_file(), os.listdir(project)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}", registry_uri=f"sqlite:///{store}")
    version = client.get_model_version("qlora-temp", "1")
    assert version.tags["dvc_experiment"] == "in-a-temp-dir"
    assert client.get_run(version.run_id).info.run_name == "in-a-temp-dir"
    promoted = run(["qlora", "promote", "--version", "1", "--reason", "after a temp run"], project, env)
    assert promoted.returncode == 0
    listed = json.loads(run(["qlora", "versions", "--json"], project, env).stdout)
    assert [r["version"] for r in listed] == [1] and "champion" in listed[0]["aliases"]
