"""Crash safety: hard kills resume from the last complete checkpoint, runs never stay RUNNING,
registration is idempotent, promotions do not race."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import BIN, make_project, project_env, run

pytestmark = pytest.mark.integration

STEPS = 40
RESUME_PARAMS = {"train.max_steps": STEPS, "train.save_steps": 4, "train.logging_steps": 1, "train.save_total_limit": 3}
# Same seed, same data: resuming restores optimizer, scheduler, RNG and data order, so the only
# difference from an uninterrupted run is floating-point noise.
ADAPTER_TOLERANCE = 1e-4


def checkpoints(project: Path) -> list[Path]:
    return sorted(project.glob("checkpoints/*/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def wait_for(predicate, timeout_s: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise TimeoutError(what)


def start(cmd: list[str], project: Path, env: dict) -> subprocess.Popen:
    # Output to a file, not a pipe: nobody reads while waiting, and a full pipe would block the child.
    log = open(project.parent / f"{project.name}-{cmd[-1]}-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout_s: float) -> str:
    proc.wait(timeout=timeout_s)
    proc.log.seek(0)
    return proc.log.read()


def adapter_weights(project: Path) -> dict[str, torch.Tensor]:
    return load_file(project / "models/adapter/adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mlflow_server):
    """An uninterrupted run with the same params and seed."""
    project = make_project(tmp_path_factory.mktemp("uninterrupted"), {**RESUME_PARAMS, "register.model_name": "qlora-ref"})
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server)
    run(["dvc", "repro", "train"], project, env)
    return adapter_weights(project)


def test_sigkill_and_partial_checkpoint_resume(tmp_path, mlflow_server, reference):
    from mlflow import MlflowClient

    project = make_project(tmp_path, {**RESUME_PARAMS, "register.model_name": "qlora-resume"})
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server)
    lock_before = (project / "dvc.lock").read_text() if (project / "dvc.lock").exists() else None

    proc = start(["dvc", "repro", "train"], project, env)
    # Kill hard once three checkpoints exist (step 12 of 40): no handler runs, nothing is flushed.
    wait_for(lambda: len(checkpoints(project)) >= 3 and (checkpoints(project)[-1] / "trainer_state.json").exists(), 300, "three checkpoints", proc)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (project / "models/adapter/adapter_model.safetensors").exists()
    current = (project / "dvc.lock").read_text() if (project / "dvc.lock").exists() else None
    assert current == lock_before or "train:" not in (current or "")

    # A kill during the next save leaves a checkpoint without a readable trainer state.
    newest, previous = checkpoints(project)[-1], checkpoints(project)[-2]
    (newest / "trainer_state.json").write_text('{"global_st')
    run_info = json.loads(next(project.glob("checkpoints/*/mlflow_run.json")).read_text())

    # resumed by another attempt (a flow run's retry, another experiment): the run takes its name
    again = run(["dvc", "repro", "train"], project, project_env(project, MLFLOW_TRACKING_URI=mlflow_server, QLORA_RUN_NAME="second-attempt"))
    log = again.stdout + again.stderr
    assert f"skipping incomplete checkpoint" in log and f"resuming from" in log and previous.name in log

    resumed = adapter_weights(project)
    assert resumed.keys() == reference.keys()
    worst = max(float((resumed[k] - reference[k]).abs().max()) for k in reference)
    assert worst <= ADAPTER_TOLERANCE, worst

    client = MlflowClient(tracking_uri=mlflow_server)
    run_record = client.get_run(run_info["run_id"])
    assert run_record.info.status == "FINISHED"
    assert run_record.data.tags["resumed_from"] == previous.name
    # the whole run's mean loss, not the Trainer's figure for the resumed part only
    assert run_record.data.metrics["train_loss"] == pytest.approx(json.loads((project / "metrics/train.json").read_text())["train_loss"])
    assert run_record.info.run_name == "second-attempt"
    assert run_record.data.tags["previous_run_name"].startswith("qlora-")  # the killed attempt's default name
    steps = [m.step for m in client.get_metric_history(run_info["run_id"], "loss")]
    assert steps == list(range(1, STEPS + 1))  # no gap, no duplicate
    # kept until DVC has recorded train (the next stage deletes them)
    assert list(project.glob("checkpoints/*/finished.json"))


def test_a_training_stopped_before_dvc_recorded_it_is_not_redone(tmp_path, mlflow_server):
    """The stage's process finished, but DVC (or a Prefect task timeout) stopped before dvc.lock got
    the train entry: the rerun finds the final step checkpointed and trains nothing; the next stage,
    which runs only once train is recorded, deletes the checkpoints."""
    from mlflow import MlflowClient

    params = {"train.max_steps": 4, "train.save_steps": 2, "train.logging_steps": 1, "register.model_name": "qlora-unrecorded",
              "evaluate.num_samples": 0, "evaluate.max_eval_rows": 8}
    project = make_project(tmp_path, params)
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server)
    run(["dvc", "repro", "prepare"], project, env)
    run(["qlora", "train"], project, env)  # what DVC ran; it never wrote dvc.lock's train entry
    run_id = json.loads((project / "models/adapter/run.json").read_text())["run_id"]
    weights = adapter_weights(project)
    assert "train:" not in (project / "dvc.lock").read_text()

    again = run(["dvc", "repro", "evaluate"], project, env)
    assert "training is complete" in again.stdout + again.stderr
    assert json.loads((project / "metrics/train.json").read_text())["plan_micro_batch_size"] > 0  # the plan it trained with
    assert json.loads((project / "models/adapter/run.json").read_text())["run_id"] == run_id
    assert all(torch.equal(weights[k], v) for k, v in adapter_weights(project).items())
    client = MlflowClient(tracking_uri=mlflow_server)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]  # logged once
    assert "train:" in (project / "dvc.lock").read_text()
    assert not list(project.glob("checkpoints/*/checkpoint-*"))  # released once train was recorded


def test_sigterm_ends_the_run_killed(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    project = make_project(tmp_path, {**RESUME_PARAMS, "register.model_name": "qlora-term"})
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server)
    run(["qlora", "prepare"], project, env)
    proc = start(["qlora", "train"], project, env)
    wait_for(lambda: bool(checkpoints(project)), 300, "a checkpoint", proc)
    proc.send_signal(signal.SIGTERM)
    output = finish(proc, 60)
    assert proc.returncode != 0
    run_id = json.loads(next(project.glob("checkpoints/*/mlflow_run.json")).read_text())["run_id"]
    record = MlflowClient(tracking_uri=mlflow_server).get_run(run_id)
    assert record.info.status == "KILLED", output
    assert "interrupted" in record.data.tags["failure_reason"]


def test_killing_dvc_stops_its_stage_and_keeps_the_checkpoints(tmp_path, mlflow_server):
    """`kill -TERM` of `dvc repro` alone (DVC does not pass it on): the stage's process ends
    with it, the run ends KILLED, checkpoints stay for the next `dvc repro`, dvc.lock has no train."""
    import psutil
    from mlflow import MlflowClient

    project = make_project(tmp_path, {**RESUME_PARAMS, "register.model_name": "qlora-orphan"})
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server)
    run(["dvc", "repro", "prepare"], project, env)
    dvc = start(["dvc", "repro", "train"], project, env)
    wait_for(lambda: bool(checkpoints(project)), 300, "a checkpoint", dvc)
    stage = [p for p in psutil.Process(dvc.pid).children(recursive=True) if "train" in " ".join(p.cmdline())]
    assert stage, "no qlora train process under dvc"
    os.kill(dvc.pid, signal.SIGTERM)  # the DVC process only, not its process group
    finish(dvc, 60)
    gone, alive = psutil.wait_procs(stage, timeout=60)
    assert not alive, f"the stage outlived DVC: {alive}"
    run_id = json.loads(next(project.glob("checkpoints/*/mlflow_run.json")).read_text())["run_id"]
    record = MlflowClient(tracking_uri=mlflow_server).get_run(run_id)
    assert record.info.status == "KILLED" and record.data.tags["stage.train.status"] == "KILLED"
    assert checkpoints(project), "checkpoints were deleted"
    lock = project / "dvc.lock"
    assert not lock.is_file() or "train:" not in lock.read_text()


def test_two_trainings_of_the_same_params_never_share_checkpoints(tmp_path, mlflow_server):
    """Same params, same checkpoint key: the second waits for the first, then trains on its own:
    two MLflow runs, each with every step logged once, neither resumed from the other."""
    from mlflow import MlflowClient

    params = {"train.max_steps": 8, "train.save_steps": 2, "train.logging_steps": 1, "register.model_name": "qlora-twins"}
    project = make_project(tmp_path, params)
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server)
    run(["qlora", "prepare"], project, env)
    first = start(["qlora", "train"], project, env)
    wait_for(lambda: bool(checkpoints(project)), 300, "a checkpoint of the first", first)
    first.send_signal(signal.SIGSTOP)  # the first is mid-training while the second arrives
    try:
        second = start(["qlora", "train"], project, env)

        def second_waits() -> bool:
            second.log.seek(0)
            return "another training with the same params holds" in second.log.read()

        wait_for(second_waits, 300, "the second to wait for the first", second)
    finally:
        first.send_signal(signal.SIGCONT)
    outputs = [finish(first, 600), finish(second, 600)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("qlora-pipeline")
    runs = [r for r in client.search_runs(experiment.experiment_id) if r.data.params.get("register.model_name") == "qlora-twins"]
    assert len(runs) == 2
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == list(range(1, 9))
        assert "resumed_from" not in r.data.tags and r.info.status == "FINISHED"


@pytest.fixture
def registered(pipeline):
    """The project test_pipeline_dvc.py ran end to end (model qlora-test)."""
    project, env, _ = pipeline
    return project, env


def test_register_twice_creates_no_second_version(registered, mlflow_server):
    from mlflow import MlflowClient

    project, env = registered
    first = json.loads((project / "reports/register.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server)
    before = len(client.search_model_versions("name='qlora-test'"))
    run(["qlora", "register"], project, env)
    second = json.loads((project / "reports/register.json").read_text())
    assert second["version"] == first["version"]
    assert len(client.search_model_versions("name='qlora-test'")) == before


def test_concurrent_promotions_leave_one_champion(registered, mlflow_server):
    from mlflow import MlflowClient

    project, env = registered
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    v1 = client.get_model_version("qlora-test", "1")
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    v2 = mlflow.register_model(v1.source, "qlora-test")
    procs = [start([str(BIN / "qlora"), "promote", "--version", v, "--reason", f"race {v}"], project, env) for v in ("1", v2.version)]
    outputs = [finish(p, 120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    champion = client.get_model_version_by_alias("qlora-test", "champion")
    assert champion.version in ("1", v2.version)
    holders = [v for v in ("1", v2.version) if "champion" in client.get_model_version("qlora-test", v).aliases]
    assert holders == [champion.version]
    reason = client.get_model_version("qlora-test", champion.version).tags["promotion_reason"]
    assert reason.startswith("manual by ") and f"race {champion.version}" in reason


def test_promote_unknown_alias_or_version(registered):
    project, env = registered
    alias = run(["qlora", "promote", "--alias", "nosuch"], project, env, check=False)
    assert alias.returncode != 0 and "qlora-test has no alias 'nosuch'" in alias.stderr
    version = run(["qlora", "promote", "--version", "99"], project, env, check=False)
    assert version.returncode != 0 and "qlora-test has no version 99" in version.stderr
