"""The command line: version, the full-disk message, which parent processes a stage ends with."""

from __future__ import annotations

import errno
import sqlite3
import subprocess
import sys

import pytest

from qlora_pipeline.cli import _disk_full, _is_orchestrator


def test_version_names_the_stack():
    out = subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("qlora-pipeline ") and "torch " in out and "bitsandbytes " in out


def _wrapped_sqlite_full() -> Exception:
    """What MLflow raises on a full disk: MlflowException from SQLAlchemy from sqlite3."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    try:
        try:
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as low:
                raise OperationalError("INSERT INTO metrics ...", {}, low) from low
        except OperationalError as mid:
            raise MlflowException(f"(raised as a result of Query-invoked autoflush) {mid}") from mid
    except MlflowException as top:
        return top


@pytest.mark.parametrize(
    "exc, full",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (_wrapped_sqlite_full(), True),
        (RuntimeError("something else"), False),
    ],
)
def test_a_full_disk_is_recognised_however_it_is_wrapped(exc, full):
    assert _disk_full(exc) is full


@pytest.mark.parametrize(
    "cmdline, expected",
    [
        (["/p/.venv/bin/python", "/p/.venv/bin/dvc", "repro"], True),
        (["dvc", "exp", "run"], True),
        (["/usr/bin/python3", "-m", "dvc", "repro", "--single-item", "train"], True),
        (["/p/.venv/bin/python", "/p/.venv/bin/prefect", "worker", "start"], True),
        (["bash", "-c", "qlora train"], False),
        (["/home/dvc/venv/bin/python", "train.py"], False),  # "dvc" in a path is not DVC
        (["nohup", "qlora", "train"], False),
    ],
)
def test_which_parents_a_stage_ends_with(cmdline, expected):
    assert _is_orchestrator(cmdline) is expected


@pytest.mark.parametrize(
    "commit, shown",
    [("0123456789abcdef0123456789abcdef01234567", "0123456789ab"),
     ("0123456789abcdef0123456789abcdef01234567-dirty", "0123456789ab-dirty"), ("", "")],
)
def test_versions_keep_a_dirty_commit_dirty(commit, shown):
    from qlora_pipeline.stages.registry import short_commit

    assert short_commit(commit) == shown


def test_loading_a_registered_model_does_not_print_where_the_alias_resolved(caplog):
    import logging

    from qlora_pipeline.cli import _silence_third_party

    _silence_third_party()
    logger = logging.getLogger("mlflow.transformers")
    with caplog.at_level(logging.INFO, logger="mlflow.transformers"):
        logger.info("'%s' resolved as '%s'", "models:/qlora-demo@champion", "mlflow-artifacts:/1/models/m-1/artifacts")
        logger.info("a message that stays")
    assert [r.getMessage() for r in caplog.records] == ["a message that stays"]


def test_check_warns_where_this_machine_could_not_train_the_params():
    """Params for a GPU worker are valid params: `qlora check` passes them and says what `qlora train`
    would refuse here (no GPU on the test machine)."""
    from tests.conftest import REPO

    run = subprocess.run(
        [sys.executable, "-m", "qlora_pipeline.cli", "check", "--params", str(REPO / "params.yaml"), "-S", "train.cuda_graphs=true"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    assert '"cuda_graphs": true' in run.stdout
    assert "on this machine `qlora train` would stop: train.cuda_graphs is true but no CUDA GPU is visible" in " ".join(run.stderr.split())
    fsdp = subprocess.run(
        [sys.executable, "-m", "qlora_pipeline.cli", "check", "--params", str(REPO / "params.yaml"), "-S", "train.num_gpus=2",
         "-S", "train.gradient_accumulation_steps=2", "-S", "train.distributed=fsdp"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert fsdp.returncode == 0 and "train.distributed is fsdp but no CUDA GPU is visible" in " ".join(fsdp.stderr.split())
    plain = subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", "check", "--params", str(REPO / "params.yaml")], capture_output=True, text=True, cwd=REPO)
    assert plain.returncode == 0 and "warning" not in plain.stderr
