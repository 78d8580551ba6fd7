"""The pipeline flow on a real Prefect server and process worker, deployed with `python -m flows.deploy`.

Each run trains the built-in tiny model for a few steps in a copy of the repo, tracking to the
project's default local MLflow store. Each run gets its own train.seed, so it trains (and
registers) a model of its own, while its prepare stage reuses an earlier run's outputs; one rerun
with the first run's params reuses every stage, the merged model too, and runs none.
"""

from __future__ import annotations

import json
import re
import subprocess

import psutil
import pytest

from .conftest import BIN
from .prefect_harness import (  # noqa: F401  (prefect_env is a fixture)
    MODEL_NAME,
    artifacts,
    base_env,
    flow_logs,
    mlflow_run,
    model_versions,
    prefect_env,
    task_runs,
    trigger,
    wait_final,
)

pytestmark = pytest.mark.integration


def versions(env) -> set[str]:
    if not (env.project / "mlflow" / "mlflow.db").is_file():
        return set()
    return {str(v.version) for v in model_versions(env.tracking_uri)}


def git(env, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=env.project, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def first_run(prefect_env):
    """One run of the documented `gpu` deployment with its default parameters."""
    before = versions(prefect_env)
    flow_run = wait_final(trigger("gpu").id)
    return flow_run, before


def test_deployment_is_queued_one_at_a_time_with_a_paused_schedule(prefect_env):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("qlora-pipeline/gpu")
        pool = client.read_work_pool("gpu")
    assert deployment.work_pool_name == "gpu" and pool.type == "process"
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    assert [(s.schedule.cron, s.active) for s in deployment.schedules] == [("0 3 * * 1", False)]
    assert deployment.parameters == {"default_overrides": {}, "overrides": {}}
    assert deployment.job_variables == {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}}
    assert deployment.entrypoint == "flows/pipeline.py:qlora_pipeline"


def test_run_completes_with_artifact_mlflow_tags_and_new_version(prefect_env, first_run):
    flow_run, before = first_run
    assert flow_run.state.is_completed(), flow_run.state.message

    tasks = task_runs(flow_run.id)
    for stage in ("validate-params", "connect-tracking", "checkout", "prepare", "train", "evaluate", "register",
                  "save-experiment", "publish-summary"):
        assert tasks[stage].state.is_completed(), stage
    assert "Running stage 'train'" in flow_logs(flow_run.id)  # the stage's output reached Prefect

    [artifact] = artifacts(flow_run.id)
    assert artifact.key == "qlora-pipeline-run" and artifact.type == "markdown"
    text = artifact.data
    experiment = f"{flow_run.name}-{str(flow_run.id)[:8]}"
    assert f"/{experiment}" in git(prefect_env, "for-each-ref", "--format=%(refname)", "refs/exps")
    run_id = next(line.split("runs/")[1].rstrip(")") for line in text.splitlines() if line.startswith("- MLflow run:"))
    run = mlflow_run(prefect_env.tracking_uri, run_id)
    for metric in ("eval_loss", "perplexity"):
        assert f"| {metric} | {run.data.metrics['base_' + metric]:.4f} | {run.data.metrics[metric]:.4f} |" in text
    assert f"`dvc exp apply {experiment}`" in text

    assert run.data.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert run.data.tags["dvc.experiment"] == experiment
    assert run.info.artifact_uri.startswith((prefect_env.project / "mlflow" / "artifacts").as_uri())

    new = versions(prefect_env) - before
    assert len(new) == 1
    [version] = [v for v in model_versions(prefect_env.tracking_uri) if str(v.version) in new]
    assert version.run_id == run_id and version.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert f"[{MODEL_NAME} v{version.version}]" in text and "promoted to `champion`" in text


def test_run_leaves_the_project_checkout_alone(prefect_env, first_run):
    assert first_run[0].state.is_completed()
    assert git(prefect_env, "status", "--porcelain", "--untracked-files=no").split() in ([], ["A", "data/raw.dvc"])
    assert not (prefect_env.project / "models").exists()  # outputs stayed in the run's worktree
    assert list((prefect_env.project / ".prefect" / "runs").iterdir()) == []
    assert len(git(prefect_env, "worktree", "list").splitlines()) == 1


def test_a_rerun_with_the_same_inputs_reuses_the_outputs_and_registers_nothing_new(prefect_env, first_run):
    first, _ = first_run
    assert first.state.is_completed()
    before = versions(prefect_env)
    flow_run = wait_final(trigger("gpu").id)  # the first run's (default) params, data and code
    assert flow_run.state.is_completed(), flow_run.state.message
    [artifact] = artifacts(flow_run.id)
    text = artifact.data
    assert f"Reused from DVC experiment `{first.name}-{str(first.id)[:8]}`" in text
    assert "prepare, train, evaluate, register" in text
    for stage in ("prepare", "train", "evaluate", "register"):
        assert f"| {stage} | up to date |" in text, text
    assert "Running stage" not in flow_logs(flow_run.id)
    assert versions(prefect_env) == before
    assert "promoted to `champion`** by the earlier run with the same inputs; this run registered nothing" in text


def test_broken_parameter_fails_with_the_validation_message(prefect_env):
    """Triggered with the documented CLI command."""
    out = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "qlora-pipeline/gpu",
         "-p", 'overrides={"train.learning_rate": -1, "lora.rank": 8}', "--watch", "--watch-timeout", "300"],
        cwd=prefect_env.project, env=prefect_env.env, capture_output=True, text=True, timeout=400,
    )
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)
    assert out.returncode != 0  # --watch reports the failed run
    flow_run = wait_final(flow_run_id)
    assert flow_run.state.is_failed()
    message = flow_run.state.message
    assert "train.learning_rate: Input should be greater than 0 (got -1)" in message
    assert "lora.rank: unknown key" in message
    tasks = task_runs(flow_run.id)
    assert tasks["validate-params"].state.is_failed()
    assert "train" not in tasks and "checkout" not in tasks  # nothing ran


def test_two_runs_at_once_both_finish_isolated_and_train_one_at_a_time(prefect_env, first_run, tmp_path):
    """The first run's register fails once (a transient fault): the task is retried, training is not,
    and the run still ends with one new version."""
    marker = tmp_path / "register-failed-once"
    before = versions(prefect_env)
    runs = [trigger("gpu-parallel", {"overrides": {"train.seed": 11}}, env={"QLORA_FAIL_ONCE_REGISTER": str(marker)}),
            trigger("gpu-parallel", {"overrides": {"train.seed": 12}})]
    finished = [wait_final(r.id) for r in runs]
    for flow_run in finished:
        assert flow_run.state.is_completed(), flow_run.state.message

    assert marker.is_file()  # the injected failure happened
    register = task_runs(finished[0].id)["register"]
    assert register.run_count == 2 and register.state.is_completed()
    assert task_runs(finished[0].id)["train"].run_count == 1
    assert task_runs(finished[1].id)["register"].run_count == 1

    assert max(r.start_time for r in finished) < min(r.end_time for r in finished)  # they did overlap
    trains = sorted((task_runs(r.id)["train"] for r in finished), key=lambda t: t.start_time)
    assert trains[0].end_time <= trains[1].start_time  # one GPU slot: never two trainings at once

    new = versions(prefect_env) - before
    assert len(new) == 2
    tagged = {v.tags["prefect.flow_run_id"] for v in model_versions(prefect_env.tracking_uri) if str(v.version) in new}
    assert tagged == {str(r.id) for r in finished}
    refs = git(prefect_env, "for-each-ref", "--format=%(refname)", "refs/exps")
    assert all(str(r.id)[:8] in refs for r in finished)


def test_local_run_on_the_temporary_server_is_quiet_and_tracked(prefect_env, first_run):
    """`python -m flows.run` with no Prefect server configured: Prefect starts a temporary one."""
    assert first_run[0].state.is_completed()
    before = versions(prefect_env)
    env = base_env(prefect_env.project, PREFECT_HOME=str(prefect_env.project / ".prefect-local"))
    out = subprocess.run(
        [str(BIN / "python"), "-m", "flows.run", "-S", "train.seed=21"], cwd=prefect_env.project, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    # prepare's inputs are those of the earlier runs: its outputs are reused
    assert result["stages"] == {"prepare": "up to date", "train": "ran", "evaluate": "ran", "register": "ran"}
    assert result["reused_from"] is not None
    assert versions(prefect_env) - before == {str(result["register"]["version"])}
    run = mlflow_run(prefect_env.tracking_uri, result["mlflow_run_id"])
    assert run.data.tags["dvc.experiment"] == result["dvc_experiment"]
    assert run.data.params["train.seed"] == "21"
    noise = [line for line in out.stderr.splitlines() if "database is locked" in line or "Traceback" in line or "| ERROR" in line]
    assert noise == []
    # The experiment commit carries the run's metrics, so `dvc exp show` lists them.
    eval_json = subprocess.run(
        ["git", "show", f"{result['dvc_experiment_commit']}:metrics/eval.json"], cwd=prefect_env.project,
        capture_output=True, text=True, check=True,
    ).stdout
    assert json.loads(eval_json) == result["eval"]


def test_stage_timeout_fails_the_run_and_stops_the_stage_processes(prefect_env, first_run):
    flow_run = wait_final(trigger("gpu", {"overrides": {"train.seed": 31}, "timeouts_s": {"train": 8}}).id)
    assert flow_run.state.is_failed()
    assert "timed out after 8" in flow_run.state.message
    tasks = task_runs(flow_run.id)
    assert tasks["prepare"].state.is_completed() and tasks["train"].state.name == "TimedOut"
    assert "evaluate" not in tasks
    workdir = prefect_env.project / ".prefect" / "runs" / str(flow_run.id)
    assert not workdir.exists()  # removed on failure too
    left = [p.pid for p in psutil.process_iter(["cwd"]) if (p.info["cwd"] or "").startswith(str(workdir))]
    assert left == []  # dvc, the shell and `qlora train` were stopped with the task
