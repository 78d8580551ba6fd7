"""Faults a Prefect deployment of the pipeline meets, on the real server and worker of the harness.

- the UI of a server on another port than 4200 calls its own API;
- the server is killed (SIGKILL) and restarted while a run trains, then the run and its worker are
  killed: the run ends Crashed once its heartbeats stop, its GPU slot comes back when its lease
  lapses, the next run gets the deployment's slot and removes the dead run's worktree;
- a GPU stage waits for a slot at most `slot_timeout_s`;
- with credentials in MLFLOW_TRACKING_URI, none reach Prefect's database or the worker's log;
- register fails after train finished: the rerun reuses the trained adapter;
- a run's overrides merge with the deployment's `-S` defaults.

Each run trains the built-in tiny model for a few steps; the killed one longer, to be killed in train.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from types import SimpleNamespace

import psutil
import pytest

from .conftest import BIN, run
from .prefect_harness import (  # noqa: F401  (prefect_env is a fixture)
    active_slots,
    artifacts,
    flow_logs,
    mlflow_run,
    prefect_env,
    stop_tree,
    task_runs,
    trigger,
    wait_final,
    wait_for_log,
)

pytestmark = pytest.mark.integration

LEASE_S = 60  # the GPU slot's lease in the killed run (QLORA_GPU_LEASE_S): the least Prefect takes
REPOSSESSOR_S = 15  # how often the server takes back lapsed leases (Prefect's default)
USER, SECRET = "qlora-ci", "FAKEsecret-4f7e2a9c"


def read_flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def wait_until(condition, timeout_s: float, every_s: float = 2.0) -> float | None:
    """Seconds until condition() held, or None if it did not within timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(every_s)
    return None


def trainers_in(path) -> list[psutil.Process]:
    """The `qlora train` processes working in path."""
    found = []
    for p in psutil.process_iter(["cwd", "cmdline"]):
        if (p.info["cwd"] or "").startswith(str(path)) and "train" in (p.info["cmdline"] or [])[-1:]:
            found.append(p)
    return found


def test_the_ui_calls_the_api_of_its_own_server(prefect_env):
    """scripts/prefect-server.sh on a port other than 4200 (the harness picks a free one)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{prefect_env.services.port}/ui-settings", timeout=10) as resp:
        settings = json.load(resp)
    assert settings["api_url"] == prefect_env.api_url


def test_a_gpu_stage_waits_for_a_slot_at_most_slot_timeout_s(prefect_env):
    from prefect.concurrency.sync import concurrency

    from flows.slots import SlotTimeout, ensure_limit, gpu_slot

    name = "gpu-slot-timeout-test"
    ensure_limit(name)
    logger = logging.getLogger("test")
    with concurrency(name, occupy=1, strict=True):  # another run trains
        started = time.monotonic()
        with pytest.raises(SlotTimeout) as failed:
            with gpu_slot(name, "train", timeout_s=3, logger=logger):
                pass
        assert time.monotonic() - started < 30
    assert str(failed.value).startswith(
        f"train: no slot of concurrency limit {name!r} came free within 3s (slot_timeout_s); 1 of its 1 slot(s) are held."
    )
    with gpu_slot(name, "train", timeout_s=30, logger=logger):  # given back: the next one gets it
        assert active_slots(name) == 1
    assert active_slots(name) == 0


@pytest.fixture(scope="module")
def killed_run(prefect_env):
    """A run of `gpu` in train: the server is killed and restarted, then the worker and the run are
    killed; then the next run of `gpu` (which fails its validation at once)."""
    from flows.slots import gpu_limit_name
    from flows.prefect_env import CRASHED_AFTER_S

    services, limit = prefect_env.services, gpu_limit_name()
    flow_run = trigger("gpu", {"overrides": {"train.seed": 51, "train.max_steps": 2000}}, env={"QLORA_GPU_LEASE_S": str(LEASE_S)})
    workdir = prefect_env.project / ".prefect" / "runs" / str(flow_run.id)
    wait_for_log(flow_run.id, "train: got the slot", 600)
    acquired = time.monotonic()
    wait_until(lambda: bool(trainers_in(workdir)), 120, every_s=0.5)
    trainers = trainers_in(workdir)

    services.kill_server()
    services.start_server()
    # From here on the test waits for leases and heartbeats, not for training: the trainer pauses
    # (SIGSTOP) so that it does not take the CPU from the tests running beside this one.
    for p in trainers:
        p.suspend()
    # past the lease's first renewal (at 3/4 of it), which goes to the restarted server
    time.sleep(max(0.0, acquired + 0.75 * LEASE_S + 10 - time.monotonic()))
    survived = bool(trainers) and all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in trainers)
    state_before_kill = read_flow_run(flow_run.id).state

    killed = services.kill_worker()
    services.start_worker()
    killed_at = time.monotonic()
    crashed_after_s = wait_until(lambda: read_flow_run(flow_run.id).state.is_final(), CRASHED_AFTER_S + 90)
    # the lease was last renewed before the kill: it lapses within LEASE_S, and is taken back
    slot_deadline = killed_at + LEASE_S + 2 * REPOSSESSOR_S + 30
    slot_back = wait_until(lambda: active_slots(limit) == 0, slot_deadline - time.monotonic()) is not None
    following = trigger("gpu", {"overrides": {"train.learning_rate": -1}})
    try:
        following = wait_final(following.id, 180)
    except TimeoutError:
        following = read_flow_run(following.id)
    return SimpleNamespace(
        flow_run=read_flow_run(flow_run.id), workdir=workdir, survived=survived, state_before_kill=state_before_kill,
        killed=killed, crashed_after_s=crashed_after_s, slot_back=slot_back, following=following,
        limit=limit,
    )


def test_a_server_restart_keeps_the_slots_and_the_slot_of_a_dead_run_comes_back(prefect_env, killed_run):
    assert killed_run.survived  # the restart alone did not stop the training
    assert killed_run.state_before_kill.is_running()
    # the run's GPU slot: its lease outlived the server's restart and lapsed after the run died
    assert killed_run.slot_back, f"{killed_run.limit}: {active_slots(killed_run.limit)} slot(s) still held"
    assert active_slots(killed_run.limit) == 0
    # the deployment's one slot came back too: the next run of `gpu` ran (and failed its validation)
    following = killed_run.following
    assert following.state.is_failed(), (following.state.name, following.state.message)
    assert "train.learning_rate: Input should be greater than 0" in following.state.message


def test_a_run_whose_worker_was_killed_ends_crashed_and_its_worktree_is_removed(prefect_env, killed_run):
    from flows.prefect_env import CRASHED_AFTER_S

    assert len(killed_run.killed) >= 3  # the worker, the flow-run process, DVC and the stage
    flow_run = killed_run.flow_run
    assert flow_run.state.name == "Crashed", (flow_run.state.name, flow_run.state.message)
    assert killed_run.crashed_after_s < CRASHED_AFTER_S + 60
    assert f"no heartbeat for {CRASHED_AFTER_S}s" in flow_run.state.message
    # the next run removed the dead run's worktree
    assert task_runs(killed_run.following.id)["prune-workspaces"].state.is_completed()
    assert not killed_run.workdir.exists()
    worktrees = run(["git", "worktree", "list"], prefect_env.project).stdout
    assert str(flow_run.id) not in worktrees


@pytest.fixture(scope="module")
def auth_runs(prefect_env, mlflow_server):
    """A worker whose MLFLOW_TRACKING_URI carries user:password, a deployment with a `-S` default;
    a run whose register fails (a merge tolerance no merge meets), then the same run without that."""
    uri = mlflow_server.replace("http://", f"http://{USER}:{SECRET}@")
    run([str(BIN / "python"), "-m", "flows.deploy", "--quiet", "--pool", "gpu-auth", "--concurrency-limit", "0",
         "-S", "train.max_steps=8"], prefect_env.project, prefect_env.env)
    services = prefect_env.services
    worker = services.start_worker("gpu-auth", "worker-auth.log", MLFLOW_TRACKING_URI=uri)
    try:
        failed = wait_final(trigger("gpu-auth", {"overrides": {"train.seed": 41, "register.merge_tolerance": 1e-12}}).id)
        rerun = wait_final(trigger("gpu-auth", {"overrides": {"train.seed": 41}}).id)
    finally:
        stop_tree(worker)
        services.extra_workers.remove(worker)
    return SimpleNamespace(failed=failed, rerun=rerun, worker_log=services.logs / "worker-auth.log", mlflow=mlflow_server)


def test_a_rerun_after_a_failed_register_does_not_train_again(prefect_env, auth_runs):
    failed, rerun = auth_runs.failed, auth_runs.rerun
    assert failed.state.is_failed() and "merged model differs from the adapter model" in failed.state.message
    tasks = task_runs(failed.id)
    assert tasks["train"].state.is_completed() and tasks["register"].state.is_failed()
    assert "Running stage 'train'" in flow_logs(failed.id)

    assert rerun.state.is_completed(), rerun.state.message
    [artifact] = artifacts(rerun.id)
    assert f"Reused from DVC experiment `{failed.name}-{str(failed.id)[:8]}`" in artifact.data
    for stage in ("prepare", "train", "evaluate"):
        assert f"| {stage} | up to date |" in artifact.data
    assert "Running stage 'train'" not in flow_logs(rerun.id)


def test_a_runs_overrides_merge_with_the_deployments_defaults(prefect_env, auth_runs):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("qlora-pipeline/gpu-auth")
    assert deployment.parameters == {"default_overrides": {"train.max_steps": 8}, "overrides": {}}
    [artifact] = artifacts(auth_runs.rerun.id)
    run_id = next(line.split("runs/")[1].rstrip(")") for line in artifact.data.splitlines() if line.startswith("- MLflow run:"))
    params = mlflow_run(auth_runs.mlflow, run_id).data.params
    assert (params["train.max_steps"], params["train.seed"]) == ("8", "41")  # the default kept, the run's added


def test_tracking_credentials_reach_neither_prefect_nor_the_worker_log(prefect_env, auth_runs):
    runs = [auth_runs.failed, auth_runs.rerun]
    host = auth_runs.mlflow.removeprefix("http://")
    logs = "\n".join(flow_logs(r.id) for r in runs)
    assert f"http://***@{host}/#/experiments/" in logs  # MLflow's "View run at" line, relayed masked
    [artifact] = artifacts(auth_runs.rerun.id)
    assert f"(http://***@{host}/#/experiments/" in artifact.data  # the link to the MLflow run
    worker_log = auth_runs.worker_log.read_text()
    assert f"http://***@{host}" in worker_log

    assert SECRET not in logs and SECRET not in artifact.data and SECRET not in worker_log
    for flow_run in runs:
        assert SECRET not in read_flow_run(flow_run.id).model_dump_json()
    # everything the server stored: flow and task runs, states, logs, artifacts, events
    stored = sorted((prefect_env.project / ".prefect").glob("prefect.db*"))
    assert stored
    for path in stored:
        assert SECRET.encode() not in path.read_bytes(), path
