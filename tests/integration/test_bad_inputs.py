"""Bad input through the real `qlora` executable: a clear message, a non-zero exit, nothing
written. The full catalogue runs in-process in test_bad_input_catalogue.py."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import BIN, project_env, small_project

pytestmark = pytest.mark.integration


@pytest.fixture
def project(tmp_path):
    return small_project(tmp_path)


def qlora(project, *args, env=None):
    return subprocess.run(
        [str(BIN / "qlora"), *args], cwd=project, capture_output=True, text=True, timeout=300,
        env=env or project_env(project, MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db"),
    )


def snapshot(project):
    return sorted(str(p.relative_to(project)) for p in project.rglob("*") if ".cache" not in p.parts)


def assert_failed_cleanly(result, before, project, *needles):
    assert result.returncode != 0
    message = result.stderr + result.stdout
    for needle in needles:
        assert needle in message, message
    assert "Traceback" not in message
    assert snapshot(project) == before


def test_unknown_param_key(project):
    text = (project / "params.yaml").read_text().replace("  r: 16", "  r: 16\n  rank: 8")
    (project / "params.yaml").write_text(text)
    before = snapshot(project)
    result = qlora(project, "prepare")
    assert_failed_cleanly(result, before, project, "lora.rank: unknown key", "allowed keys in lora")


def test_failed_prepare_keeps_previous_outputs(project):
    assert qlora(project, "prepare").returncode == 0
    previous = (project / "data" / "prepared" / "train.parquet").read_bytes()
    (project / "data" / "raw" / "a.jsonl").write_text("{broken\n" * 40)
    before = snapshot(project)
    result = qlora(project, "prepare")
    assert_failed_cleanly(result, before, project, "a.jsonl:1")
    assert (project / "data" / "prepared" / "train.parquet").read_bytes() == previous


def test_unreachable_tracking_server_fails_before_training(project):
    assert qlora(project, "prepare").returncode == 0
    before = snapshot(project)
    env = project_env(project, MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    result = qlora(project, "train", env=env)
    assert_failed_cleanly(result, before, project, "http://127.0.0.1:9 cannot be reached", "MLFLOW_TRACKING_URI")
