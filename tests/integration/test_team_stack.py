"""The team stack, for real: PostgreSQL, an S3 object store (SeaweedFS), the MLflow server with basic
auth on both (scripts/stack.py), a DVC remote on the store, and a Prefect server on PostgreSQL
with a worker. The pipeline runs against them, and each server fails once while it works:

- PostgreSQL restarts while training logs to MLflow: the run finishes, no logged step lost or doubled;
- the MLflow server is killed while register uploads, and started again: one version, not two;
- the object store is down for `dvc push`: a clear error; pushed once it is back;
- wrong MLflow or S3 credentials: a clear error, and nothing is written.

A fresh clone's `dvc pull` then restores data, adapter and merged model, and `dvc repro` there runs nothing.

One stack and one project for the module; the tests run in file order and build on each other.
Without PostgreSQL's server or the `team`/`stack` extras the module is skipped, saying what is
missing (QLORA_REQUIRE_STACK=1, as CI sets it where it installed PostgreSQL, fails instead).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import BIN, REPO, free_port, make_project, project_env, run
from .prefect_harness import Services, base_env, task_runs, trigger, wait_final

pytestmark = pytest.mark.integration

MODEL = "qlora-team"
EXPERIMENT = "qlora-pipeline"  # params.yaml tracking.experiment
FAKE_HF_TOKEN = "hf_FAKEteamTOKEN8k2Lq"
REQUIRED_PACKAGES = ("boto3", "psycopg2", "flask_wtf", "dvc_s3")


def _load_stack_module():
    spec = importlib.util.spec_from_file_location("qlora_stack", REPO / "scripts" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["qlora_stack"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


stack_mod = _load_stack_module()


def _unavailable(reason: str):
    if os.environ.get("QLORA_REQUIRE_STACK") == "1":
        pytest.fail(f"team stack required (QLORA_REQUIRE_STACK=1) but unavailable: {reason}")
    print(f"\nSKIP test_team_stack: {reason}", file=sys.stderr)
    pytest.skip(f"team stack unavailable: {reason}")


@pytest.fixture(scope="module")
def stack():
    """PostgreSQL, SeaweedFS and the MLflow server (basic auth) on free 127.0.0.1 ports."""
    missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        _unavailable(f"Python packages {missing} are missing: pip install -e '.[team,stack]' (make setup installs them)")
    # Not under pytest's tmp folder: that is private to this user, and PostgreSQL runs as `postgres` under root.
    root = Path(tempfile.mkdtemp(prefix="qlora-team-stack-"))
    root.chmod(0o755)
    s = stack_mod.Stack.load(root / "stack", free_ports=True)
    try:
        try:
            started = time.monotonic()
            s.up(("postgres", "s3", "mlflow"))
            print(f"\nteam stack up in {time.monotonic() - started:.1f}s", file=sys.stderr)
        except stack_mod.StackError as exc:
            _unavailable(str(exc))
        yield s
    finally:
        s.down(fast=True)  # its data goes next
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Team:
    project: Path
    env: dict[str, str]
    logs: Path


@pytest.fixture(scope="module")
def team(stack, tmp_path_factory):
    """A project whose MLflow is the stack's server (user `pipeline`) and whose DVC remote is the store."""
    project = make_project(tmp_path_factory.mktemp("team-project"), {"register.model_name": MODEL})
    env = project_env(project, HF_TOKEN=FAKE_HF_TOKEN, **stack.client_env())
    env.pop("PREFECT_API_URL")
    # MLflow's client retries 7 times; backoff 1 s (default 2) still spans 60 s, a server restart, in half the wait
    env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    stack.configure_dvc_remote(project, env=env)
    run(["git", "add", ".dvc/config"], project, env)
    run(["git", "commit", "-qm", "DVC remote team"], project, env)
    return Team(project, env, tmp_path_factory.mktemp("team-logs"))


@pytest.fixture(autouse=True)
def as_admin(request):
    """This process reads MLflow as the server's admin (the env is restored after each test)."""
    if "stack" in request.fixturenames:
        s = request.getfixturevalue("stack")
        os.environ.update(MLFLOW_TRACKING_URI=s.mlflow_url, MLFLOW_TRACKING_USERNAME="admin",
                          MLFLOW_TRACKING_PASSWORD=s.secrets["mlflow_admin"])


def client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)


def start_bg(cmd: list[str], team: Team, log_name: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log = team.logs / log_name
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=team.project, env=env or team.env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


def wait_until(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"ended ({proc.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.3)
    raise AssertionError(f"no {what} within {timeout_s}s")


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise AssertionError(f"still running after {timeout_s}s:\n{log.read_text()[-3000:]}") from None


def the_run(stack):
    exp = client(stack).get_experiment_by_name(EXPERIMENT)
    runs = client(stack).search_runs([exp.experiment_id]) if exp else []
    return runs[0] if runs else None


def versions(stack) -> list:
    return client(stack).search_model_versions(f"name='{MODEL}'")


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def bucket_keys(stack, bucket: str) -> list[str]:
    keys, token = [], None
    s3 = stack.s3_client()
    while True:
        page = s3.list_objects_v2(Bucket=bucket, **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


# ---- the pipeline on the stack, with its faults ----------------------------------------------------


def test_training_goes_on_through_a_postgresql_restart(stack, team):
    """PostgreSQL stops (connections cut) and starts again while training logs its loss through the server."""
    proc, log = start_bg(["dvc", "repro", "train"], team, "train.log")

    def first_loss():
        found = the_run(stack)
        return found if found and client(stack).get_metric_history(found.info.run_id, "loss") else None

    run_ = wait_until(first_loss, 300, "loss logged to MLflow", proc, log)
    server_log = stack.root / "mlflow" / "mlflow.log"
    offset = server_log.stat().st_size
    started = time.monotonic()
    stack.stop_postgres()
    time.sleep(3)  # an outage longer than a logging interval of the tiny model
    stack.start_postgres()
    outage_s = time.monotonic() - started
    rc = finish(proc, log)
    failed_requests = sum(" 500 " in line or " 503 " in line for line in server_log.read_text()[offset:].splitlines())
    print(f"\nPostgreSQL down {outage_s:.1f}s during training: {failed_requests} requests failed on the server "
          f"and were retried; train exit {rc}", file=sys.stderr)
    assert rc == 0, log.read_text()[-3000:]
    done = client(stack).get_run(run_.info.run_id)
    assert done.info.status == "FINISHED"
    assert done.data.tags["stage.train.status"] == "FINISHED"
    steps = [m.step for m in client(stack).get_metric_history(run_.info.run_id, "loss")]
    assert len(steps) == len(set(steps))  # none twice
    assert set(range(2, 13, 2)) <= set(steps)  # logging_steps 2 of max_steps 12: none lost
    assert stack.psql("SELECT count(*) FROM runs WHERE status = 'RUNNING'", "mlflow").strip() == "0"


def test_register_survives_the_mlflow_server_killed_mid_upload(stack, team):
    """The server is SIGKILLed while register uploads the merged model, then started again: the stage
    rides it out (or its rerun does) and the training run has exactly one version."""
    mlflow_log = stack.root / "mlflow" / "mlflow.log"
    proc, log = start_bg(["dvc", "repro"], team, "evaluate-register.log")
    wait_until(lambda: "Running stage 'register'" in log.read_text(), 600, "the register stage", proc, log)
    offset = mlflow_log.stat().st_size
    wait_until(lambda: "PUT /api/2.0/mlflow-artifacts/artifacts" in mlflow_log.read_text()[offset:], 300,
               "an artifact upload by register", proc, log)
    stack.stop_mlflow(kill=True)
    killed = time.monotonic()
    time.sleep(2)
    stack.start_mlflow()
    back_s = time.monotonic() - killed
    rc = finish(proc, log)
    reruns = 0
    if rc != 0:  # what the Prefect task's retry does: run the stage again
        reruns = 1
        run(["dvc", "repro"], team.project, team.env)
    print(f"\nMLflow server killed mid-upload, back after {back_s:.1f}s; register exit {rc}, reruns {reruns}",
          file=sys.stderr)
    run_id = json.loads((team.project / "models" / "adapter" / "run.json").read_text())["run_id"]
    mine = [v for v in versions(stack) if v.tags.get("train_run_id") == run_id]
    assert len(mine) == 1, [(v.version, v.tags.get("train_run_id")) for v in versions(stack)]
    record = json.loads((team.project / "reports" / "register.json").read_text())
    assert str(record["version"]) == mine[0].version
    model = client(stack).get_registered_model(MODEL)
    assert model.aliases.get("challenger") == mine[0].version


def test_records_are_in_postgresql_and_s3_and_hold_no_secret(stack, team):
    run_ = the_run(stack)
    assert run_.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: clients hold no S3 keys
    assert stack.psql(f"SELECT status FROM runs WHERE run_uuid = '{run_.info.run_id}'", "mlflow").strip() == "FINISHED"
    keys = bucket_keys(stack, "mlflow")
    assert any(run_.info.run_id in k for k in keys), keys[:20]
    assert any(k.endswith("model.safetensors") for k in keys)  # the merged model, registered from S3
    assert "AWS_ACCESS_KEY_ID" not in team.env and "AWS_SECRET_ACCESS_KEY" not in team.env

    secret_values = [v for v in stack.secrets.values()] + [FAKE_HF_TOKEN]
    version = [v for v in versions(stack) if v.tags.get("train_run_id") == run_.info.run_id][0]
    recorded = json.dumps([run_.data.params, run_.data.tags, version.tags])
    for table, column in (("params", "value"), ("tags", "value"), ("model_version_tags", "value"), ("metrics", "key")):
        recorded += stack.psql(f"SELECT {column} FROM {table}", "mlflow")
    small = [k for k in keys if not k.endswith((".safetensors", ".parquet"))]
    s3 = stack.s3_client()
    recorded += "".join(s3.get_object(Bucket="mlflow", Key=k)["Body"].read().decode("utf-8", "replace") for k in small)
    files = [p for p in team.project.rglob("*") if p.is_file() and p.suffix != ".safetensors"
             and not {".git", "tests"} & set(p.relative_to(team.project).parts)  # tests/: this file's copy
             and p.relative_to(team.project).as_posix() != ".dvc/config.local"]
    recorded += "".join(p.read_text(errors="replace") for p in files)
    recorded += "".join(p.read_text(errors="replace") for p in team.logs.glob("*.log"))
    recorded += "".join(p.read_text(errors="replace") for p in stack.root.rglob("*.log"))
    leaked = [v[:4] + "..." for v in secret_values if v in recorded]
    assert not leaked, f"secrets found in MLflow, S3, the project or a log: {leaked}"
    # the DVC keys sit in the git-ignored .dvc/config.local only
    assert run(["git", "check-ignore", "-q", ".dvc/config.local"], team.project, team.env, check=False).returncode == 0


def test_dvc_push_with_the_store_down_fails_clearly_and_a_retry_pushes(stack, team):
    run(["git", "add", "-A"], team.project, team.env)
    run(["git", "commit", "-qm", "a run on the team stack"], team.project, team.env)
    stack.stop_s3(kill=True)  # the store crashes
    started = time.monotonic()
    down = run(["dvc", "push"], team.project, team.env, check=False, timeout=300)
    failed_s = time.monotonic() - started
    stack.start_s3()
    message = down.stdout + down.stderr
    error = next((line for line in message.splitlines() if line.startswith("ERROR")), "")
    print(f"\ndvc push with the store down: exit {down.returncode} after {failed_s:.1f}s: {error[:300]}", file=sys.stderr)
    assert down.returncode != 0
    assert stack.s3_url in message or "Could not connect" in message, message[-2000:]
    pushed = run(["dvc", "push"], team.project, team.env, timeout=300)
    assert "pushed" in pushed.stdout + pushed.stderr
    assert json.loads(run(["dvc", "status", "--cloud", "--json"], team.project, team.env).stdout or "{}") == {}
    assert bucket_keys(stack, "dvc")


def test_wrong_credentials_fail_clearly_and_write_nothing(stack, team):
    # MLflow: a wrong password stops `qlora train` before it loads anything
    runs_before = len(client(stack).search_runs([client(stack).get_experiment_by_name(EXPERIMENT).experiment_id]))
    adapter_before = tree_digest(team.project / "models" / "adapter")
    bad = {**team.env, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    out = run(["qlora", "train"], team.project, bad, check=False, timeout=300)
    message = out.stdout + out.stderr
    assert out.returncode == 2, message[-2000:]
    print(f"\nwrong MLflow password: exit {out.returncode}: {message.strip().splitlines()[-1][:300]}", file=sys.stderr)
    assert "refused the credentials (401)" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "not-the-password" not in message
    assert len(client(stack).search_runs([client(stack).get_experiment_by_name(EXPERIMENT).experiment_id])) == runs_before
    assert tree_digest(team.project / "models" / "adapter") == adapter_before

    # S3: a wrong secret key fails `dvc push` and leaves the bucket as it was
    (team.project / "notes.txt").write_text("a file only this test pushes\n")
    run(["dvc", "add", "notes.txt"], team.project, team.env)
    keys_before = set(bucket_keys(stack, "dvc"))
    run(["dvc", "remote", "modify", "--local", "team", "secret_access_key", "not-the-key"], team.project, team.env)
    try:
        out = run(["dvc", "push"], team.project, team.env, check=False, timeout=300)
    finally:
        stack.configure_dvc_remote(team.project, env=team.env)
    message = out.stdout + out.stderr
    assert out.returncode != 0
    error = next((line for line in message.splitlines() if line.startswith("ERROR")), "")
    print(f"\nwrong S3 key: dvc push exit {out.returncode}: {error[:300]}", file=sys.stderr)
    assert "SignatureDoesNotMatch" in message or "AccessDenied" in message or "Forbidden" in message, message[-2000:]
    assert "not-the-key" not in message
    assert set(bucket_keys(stack, "dvc")) == keys_before
    run(["dvc", "push"], team.project, team.env)
    assert len(set(bucket_keys(stack, "dvc")) - keys_before) == 1


def test_a_fresh_clone_pulls_what_the_run_made(stack, team, tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(team.project), str(clone)], tmp_path, team.env)
    env = project_env(clone, **{k: v for k, v in team.env.items() if k.startswith("MLFLOW_")})
    stack.configure_dvc_remote(clone, env=env)  # a teammate's `python scripts/stack.py dvc-remote`
    run(["dvc", "pull"], clone, env, timeout=300)
    for rel in ("data/raw", "data/prepared", "models/adapter", "models/merged"):
        assert tree_digest(clone / rel) == tree_digest(team.project / rel), rel
    assert (clone / "models" / "merged" / "model.safetensors").is_file()
    # every stage is up to date: a `dvc repro` there runs nothing, registers nothing
    assert json.loads(run(["dvc", "status", "--json"], clone, env).stdout or "{}") == {}
    before = {v.version for v in versions(stack)}
    repro = run(["dvc", "repro"], clone, env, timeout=300)
    out = repro.stdout + repro.stderr
    assert "Running stage" not in out and "Data and pipelines are up to date." in out, out[-2000:]
    for stage in ("prepare", "train", "evaluate", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out[-2000:]
    assert {v.version for v in versions(stack)} == before
    assert run(["git", "status", "--porcelain"], clone, env).stdout == ""  # dvc.lock untouched


# ---- Prefect on PostgreSQL ------------------------------------------------------------------------


def test_a_flow_run_through_prefect_on_postgresql(stack, team, tmp_path_factory):
    """Prefect's server keeps its state in the stack's PostgreSQL; a worker on `gpu` runs the flow through
    the MLflow server as the user `pipeline`. Same inputs as the committed run: prepare, train and evaluate
    are reused from the DVC cache, register runs and finds the version already there."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    services = Services(project=team.project, port=free_port(), logs=tmp_path_factory.mktemp("prefect-logs"),
                        server_env={"PREFECT_SERVER_DATABASE_CONNECTION_URL": stack.pg_url("prefect", "prefect", "postgresql+asyncpg")})
    mlflow_env = {k: v for k, v in team.env.items() if k.startswith("MLFLOW_")}
    try:
        services.start_server()
        env = base_env(team.project, PREFECT_API_URL=services.api_url)
        run([str(BIN / "python"), "-m", "flows.deploy", "--quiet"], team.project, env)
        services.start_worker(**mlflow_env)
        before = {v.version for v in versions(stack)}
        with temporary_settings({PREFECT_API_URL: services.api_url, PREFECT_HOME: team.project / ".prefect"}):
            flow_run = trigger("gpu")
            final = wait_final(flow_run.id, 600)
            assert final.state.is_completed(), final.state.message
            assert set(task_runs(flow_run.id)) >= {"connect-tracking", "checkout", "register", "publish-summary"}
        row = stack.psql(f"SELECT state_type FROM flow_run WHERE id = '{flow_run.id}'", "prefect").strip()
        assert row == "COMPLETED"  # the server's record is in PostgreSQL
        assert {v.version for v in versions(stack)} == before  # one version per training run
    finally:
        leftovers = services.stop()
    assert not leftovers, f"processes outlived the worker and server: {[p.pid for p in leftovers]}"
    assert stack.psql("SELECT count(*) FROM runs WHERE status = 'RUNNING'", "mlflow").strip() == "0"
