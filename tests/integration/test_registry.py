"""The registry under concurrency and re-runs, against a real MLflow server: the champion is the
best promoted version even when a slow server delays one registration's alias write; a finished
re-run clears the failed attempt's reason; `qlora versions` and `qlora promote --name`."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from .conftest import make_project, project_env, run, set_params, stop
from .test_reliability import finish, start

pytestmark = pytest.mark.integration

MODEL = "qlora-race"
MAX_HOLD_S = 180.0


class SlowChampionProxy(ThreadingHTTPServer):
    """Forwards every request to the MLflow server; a `champion` alias write is held until the
    test releases it (at most MAX_HOLD_S), as a slow or congested server would delay it."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.held = threading.Event()
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.path.endswith("/registered-models/alias") and self.command == "POST" and body and b'"champion"' in body:
            self.server.held.set()
            self.server.release.wait(MAX_HOLD_S)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        resp = requests.request(self.command, self.server.upstream + self.path, headers=headers, data=body, timeout=300)
        self.send_response(resp.status_code)
        for key, value in resp.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        self.wfile.write(resp.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:  # quiet
        pass


def _train_and_evaluate(project: Path, steps: int, env: dict) -> float:
    set_params(project, {"train.max_steps": steps})
    run(["dvc", "repro", "evaluate"], project, env)
    return json.loads((project / "metrics/eval.json").read_text())["eval_loss"]


@pytest.fixture(scope="module")
def champion_project(tmp_path_factory, mlflow_server):
    """A project whose first, briefly trained version (2 steps) is champion of MODEL."""
    project = make_project(tmp_path_factory.mktemp("race-base"), {"register.model_name": MODEL, "train.max_steps": 2})
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server)
    run(["dvc", "repro"], project, env)
    assert json.loads((project / "reports/register.json").read_text())["promoted"] is True
    return project, env


def test_rerun_of_the_champion_is_not_its_own_rival(champion_project):
    project, env = champion_project
    run(["qlora", "register"], project, env)
    record = json.loads((project / "reports/register.json").read_text())
    assert record["version"] == record["champion_version"] and record["promoted"] is False
    assert record["beats_champion"] is None and record["champion_score"] is None
    assert f"v{record['version']} is the champion already; not compared with itself" in record["reason"]


def test_a_failed_register_keeps_the_training_record_and_a_rerun_clears_its_reason(champion_project, tmp_path, mlflow_server):
    """A later stage records its own outcome: a register failure leaves the finished training run
    FINISHED (with stage.register tags), and the register that then succeeds clears the reason."""
    from mlflow import MlflowClient

    project, env = champion_project
    marker = tmp_path / "failed-once"
    failed = run(["qlora", "register"], project, {**env, "QLORA_FAIL_ONCE_REGISTER": str(marker)}, check=False)
    assert failed.returncode == 75, failed.stderr
    run_id = json.loads((project / "models/adapter/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)
    record = client.get_run(run_id)
    assert record.info.status == "FINISHED" and "failure_reason" not in record.data.tags
    assert record.data.tags["stage.train.status"] == "FINISHED"
    assert record.data.tags["stage.register.status"] == "FAILED"
    assert "injected transient registry failure" in record.data.tags["stage.register.failure_reason"]
    run(["qlora", "register"], project, env)
    after = client.get_run(run_id).data.tags
    assert after["stage.register.status"] == "FINISHED" and "stage.register.failure_reason" not in after
    assert "injected transient registry failure" in after["stage.register.previous_failure_reason"]


def test_rerun_evaluate_leaves_the_same_record(champion_project, mlflow_server):
    """`dvc repro -f evaluate` (what an orchestrator's retry does): one samples table, one point per metric."""
    from mlflow import MlflowClient

    project, env = champion_project
    run_id = json.loads((project / "models/adapter/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)

    def record():
        table = json.loads(Path(client.download_artifacts(run_id, "eval/samples.json", str(project / ".tmp-dl"))).read_text())
        return len(table["data"]), len(client.get_metric_history(run_id, "eval_loss")), client.get_run(run_id).data.metrics

    before = record()
    run(["dvc", "repro", "-s", "-f", "evaluate"], project, env)
    after = record()
    shutil.rmtree(project / ".tmp-dl", ignore_errors=True)
    rows = len((project / "reports/samples.jsonl").read_text().splitlines())
    assert after[0] == before[0] == rows and after[1] == before[1] == 1
    assert after[2]["eval_loss"] == before[2]["eval_loss"]
    assert client.get_run(run_id).data.tags["stage.evaluate.status"] == "FINISHED"


def test_concurrent_registrations_leave_the_best_as_champion(champion_project, tmp_path, mlflow_server):
    """A (12 steps) is better than B (5 steps), both better than champion v1. B decides first and
    its champion write is held by a slow server while A registers: without a lock A compares
    itself with v1, promotes, and B's late write makes the worse B champion."""
    from mlflow import MlflowClient

    base, env = champion_project
    projects = {}
    for name, steps in (("a", 12), ("b", 5)):
        projects[name] = tmp_path / name
        shutil.copytree(base, projects[name], symlinks=True)
    loss_a = _train_and_evaluate(projects["a"], 12, env)
    loss_b = _train_and_evaluate(projects["b"], 5, env)
    assert loss_a < loss_b, (loss_a, loss_b)

    proxy = SlowChampionProxy(mlflow_server)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    qlora = str(Path(env["PATH"].split(":")[0]) / "qlora")
    a = b = None
    try:
        b = start([qlora, "register"], projects["b"], {**env, "MLFLOW_TRACKING_URI": proxy.url})
        while not proxy.held.wait(1.0):
            if b.poll() is not None:
                pytest.fail(f"B ended ({b.returncode}) without writing the champion alias:\n{finish(b, 1)}")
        a = start([qlora, "register"], projects["a"], env)
        # Hold B's write until A has decided (without a lock) or is waiting for B's decision.
        deadline = time.monotonic() + MAX_HOLD_S
        while a.poll() is None and time.monotonic() < deadline:
            a.log.seek(0)
            if "waiting for another registration" in a.log.read():
                break
            time.sleep(0.5)
        proxy.release.set()
        outputs = {"a": finish(a, 900), "b": finish(b, 900)}
    finally:
        proxy.release.set()
        proxy.shutdown()
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                stop(proc)
    assert a.returncode == 0 and b.returncode == 0, outputs
    records = {k: json.loads((projects[k] / "reports/register.json").read_text()) for k in projects}
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert client.get_model_version_by_alias(MODEL, "champion").version == str(records["a"]["version"]), records
    # A waited for B's decision and then had to beat B, not the old v1.
    assert records["b"]["promoted"] is True and "vs champion v1 " in records["b"]["reason"]
    assert records["a"]["promoted"] is True and f"vs champion v{records['b']['version']} " in records["a"]["reason"], records


def test_versions_lists_aliases_and_promote_takes_a_name(champion_project, tmp_path):
    project, env = champion_project
    elsewhere = tmp_path / "elsewhere"  # a folder whose params name another model: --name decides
    elsewhere.mkdir()
    shutil.copy(project / "params.yaml", elsewhere / "params.yaml")
    set_params(elsewhere, {"register.model_name": "some-other-model"})
    listed = json.loads(run(["qlora", "versions", "--name", MODEL, "--json"], elsewhere, env).stdout)
    assert [r["version"] for r in listed] == sorted((r["version"] for r in listed), reverse=True)
    champion = next(r for r in listed if "champion" in r["aliases"])
    assert champion["metric"] == "eval_loss" and champion["tuned"] < champion["base"]
    assert champion["base_model"] == "builtin:tiny-llama" and champion["gate"].startswith("passed")
    oldest = listed[-1]["version"]
    run(["qlora", "promote", "--name", MODEL, "--version", str(oldest), "--reason", "rollback drill"], elsewhere, env)
    table = run(["qlora", "versions", "--name", MODEL], elsewhere, env).stdout
    assert f"{MODEL}: {len(listed)} version(s)" in table and "champion" in table
    relisted = json.loads(run(["qlora", "versions", "--name", MODEL, "--json"], elsewhere, env).stdout)
    assert "champion" in next(r for r in relisted if r["version"] == oldest)["aliases"]
    missing = run(["qlora", "versions"], elsewhere, env, check=False)
    assert missing.returncode != 0 and "'some-other-model' does not exist" in missing.stderr and MODEL in missing.stderr
    run(["qlora", "promote", "--name", MODEL, "--version", str(champion["version"])], elsewhere, env)
    version = run(["qlora", "--version"], elsewhere, env).stdout
    assert version.startswith("qlora-pipeline ") and "transformers " in version
