"""Fixtures for the Prefect tests: a copy of the project, a real `prefect server`, a real process
worker, and the deployments, all started through the project's own scripts and commands.

Import the fixtures into a test module (`from .prefect_harness import prefect_env, ...`). The fault
tests kill the server or the worker with SIGKILL and start them again (`prefect_env.services`);
the other tests get whichever is running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from .conftest import BIN, free_port, make_project, run, stop, wait_http

MODEL_NAME = "qlora-prefect-test"
FLOW_TIMEOUT_S = 900
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


@dataclass
class Services:
    """The session's server and worker, started by the project's scripts; restartable."""

    project: Path
    port: int
    logs: Path
    server: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    extra_workers: list[subprocess.Popen] = field(default_factory=list)
    server_env: dict[str, str] = field(default_factory=dict)
    """Added to the server's environment, e.g. PREFECT_SERVER_DATABASE_CONNECTION_URL (PostgreSQL)."""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start_server(self) -> None:
        """scripts/prefect-server.sh on the session's port and database; returns once it answers."""
        env = base_env(self.project, PORT=str(self.port), **self.server_env)
        self.server = start(["scripts/prefect-server.sh"], self.project, env, self.logs / "server.log")
        wait_http(f"{self.api_url}/health", 180, self.server)

    def start_worker(self, pool: str = "gpu", log: str = "worker.log", **env: str) -> subprocess.Popen:
        """scripts/prefect-worker.sh for the pool; the `gpu` pool's is the session's worker."""
        worker_env = {**base_env(self.project, PREFECT_API_URL=self.api_url), "PREFECT_WORKER_QUERY_SECONDS": "1",
                      "POOL": pool, **env}
        proc = start(["scripts/prefect-worker.sh"], self.project, worker_env, self.logs / log)
        if pool == "gpu":
            self.worker = proc
        else:
            self.extra_workers.append(proc)
        return proc

    def kill_server(self) -> None:
        """SIGKILL the server, as a crash would."""
        kill_tree(self.server)

    def kill_worker(self) -> list[int]:
        """SIGKILL the worker and everything it started (flow-run processes, DVC, the stage); returns their pids."""
        return kill_tree(self.worker)

    def stop(self) -> list[psutil.Process]:
        leftovers = []
        for proc in [*self.extra_workers, self.worker, self.server]:
            if proc is not None:
                leftovers += stop_tree(proc)
        return leftovers


@dataclass(frozen=True)
class PrefectEnv:
    project: Path
    api_url: str
    env: dict[str, str]
    """What a shell on the GPU box has: PATH with the venv, PREFECT_API_URL, a quiet Prefect."""
    services: Services

    @property
    def tracking_uri(self) -> str:
        """The project's default MLflow store, which flow runs track to when none is set."""
        return f"sqlite:///{self.project / 'mlflow' / 'mlflow.db'}"


def base_env(project: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "QLORA_"))}
    env.update(QUIET_ENV)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["PREFECT_HOME"] = str(project / ".prefect")
    env.update(extra)
    return env


def start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "a") as fh:  # a restarted process appends
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """Stop a process group and whatever it started in other sessions; returns what outlived it."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    stop(proc)
    _, alive = psutil.wait_procs(descendants, timeout=30)
    for p in alive:
        p.kill()
    return alive


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a process and all its descendants at once; returns their pids."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    proc.wait(timeout=10)
    return [p.pid for p in procs]


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory):
    """A project copy, `scripts/prefect-server.sh` on a free port, `scripts/prefect-worker.sh`, deployments."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    project = make_project(tmp_path_factory.mktemp("prefect-project"), {"register.model_name": MODEL_NAME})
    services = Services(project=project, port=free_port(), logs=tmp_path_factory.mktemp("prefect-logs"))
    api_url = services.api_url
    try:
        services.start_server()
        env = base_env(project, PREFECT_API_URL=api_url)
        # Deployments first, as a user would: `gpu` as documented, `gpu-parallel` without a run limit.
        run([str(BIN / "python"), "-m", "flows.deploy", "--quiet"], project, env)
        run([str(BIN / "python"), "-m", "flows.deploy", "--quiet", "--name", "gpu-parallel", "--concurrency-limit", "0"], project, env)
        services.start_worker()
        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_HOME: project / ".prefect"}):
            yield PrefectEnv(project=project, api_url=api_url, env=env, services=services)
    finally:
        leftovers = services.stop()
        if leftovers:
            raise AssertionError(f"processes outlived the worker and server: {[p.pid for p in leftovers]}")


def trigger(deployment: str, parameters: dict[str, Any] | None = None, env: dict[str, str] | None = None):
    """Create a flow run of `qlora-pipeline/<deployment>` through the API; returns it without waiting."""
    from prefect.deployments import run_deployment

    return run_deployment(
        f"qlora-pipeline/{deployment}",
        parameters=parameters or {},
        job_variables={"env": env} if env else None,
        timeout=0,
        as_subflow=False,
    )


def wait_final(flow_run_id, timeout_s: float = FLOW_TIMEOUT_S):
    """Poll the API until the flow run is Completed, Failed, Crashed or Cancelled."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout_s}s (state {flow_run.state})")


def wait_for_log(flow_run_id, text: str, timeout_s: float = FLOW_TIMEOUT_S) -> None:
    """Poll the flow run's logs until a line holds `text`; fail early if the run ends first."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in flow_logs(flow_run_id):
            return
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            raise AssertionError(f"flow run {flow_run_id} ended {state.name} before logging {text!r}: {state.message}")
        time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} did not log {text!r} within {timeout_s}s")


def active_slots(limit_name: str) -> int:
    """Slots of a global concurrency limit held now."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit_name).active_slots


def task_runs(flow_run_id) -> dict[str, Any]:
    """The flow run's task runs by task name (`train`, `register`, ...)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def artifacts(flow_run_id) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def flow_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    logs = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=log_filter, limit=200, offset=len(logs)):  # the API's page size
            logs += page
    return "\n".join(log.message for log in logs)


def model_versions(tracking_uri: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return client.search_model_versions(f"name='{MODEL_NAME}'")


def mlflow_run(tracking_uri: str, run_id: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
