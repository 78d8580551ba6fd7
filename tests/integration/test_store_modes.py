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
