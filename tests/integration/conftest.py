"""Integration fixtures: a copy of the project as a fresh git+DVC repo, a real MLflow server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from ..conftest import DEFAULT_PARAMS, REPO, SHORT_SCHEDULE

BIN = Path(sys.executable).parent
TINY_PARAMS = {
    **SHORT_SCHEDULE,
    # the built-in tiny model: what the tests change in the short schedule, and why
    "model.name": "builtin:tiny-llama",
    "register.model_name": "qlora-test",
    "data.max_seq_len": 96,
    "train.epochs": 1,
    "train.max_steps": 12,  # two saves (save_steps 6) for the resume tests
    "train.learning_rate": 0.003,  # random weights: a higher rate moves eval loss in 12 steps
    "train.warmup_steps": 0,
    "train.logging_steps": 2,
    "train.save_steps": 6,
    "evaluate.num_samples": 3,
    "evaluate.max_new_tokens": 8,
    "evaluate.max_eval_rows": 24,
}


# Where each test MLflow server keeps its store, by URL (for tests that inspect the raw files).
SERVER_ROOTS: dict[str, Path] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a process group started with start_new_session=True; kill if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow server (mlflow/server.sh) on a free localhost port with its own store."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    # Through the project's own start script, pointed at a store of its own.
    proc = subprocess.Popen(
        ["bash", str(REPO / "mlflow" / "server.sh")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_STORE": str(root), "MLFLOW_PORT": str(port), "MLFLOW_BIN": str(BIN / "mlflow")},
    )
    url = f"http://127.0.0.1:{port}"
    SERVER_ROOTS[url] = root
    try:
        wait_http(f"{url}/health", 120, proc)
        yield url
    finally:
        stop(proc)
        log.close()


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a fresh clone plus local edits holds."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return [f for f in out.stdout.splitlines() if (REPO / f).is_file()]


def set_params(project: Path, values: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in values.items():
        section, name = key.split(".", 1)
        params[section][name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: int = 600):
    """Run cmd in its own process group; on timeout the whole group is killed (a stage's process
    would otherwise keep the output pipes open) and what it printed so far is shown."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} ran over {timeout}s:\n{stdout[-4000:]}\n{stderr[-6000:]}") from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def make_project(dest: Path, params: dict | None = None) -> Path:
    """Copy the project into dest as a fresh git repo (no DVC cache), with data/raw from data/demo."""
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    shutil.copy2(DEFAULT_PARAMS, dest / "params.yaml")  # the defaults, not a demo's `-S` leftovers
    set_params(dest, {**TINY_PARAMS, **(params or {})})
    env = project_env(dest)
    run(["git", "init", "-q"], dest)
    # DVC experiments commit through libgit2, which reads the identity from git config only.
    run(["git", "config", "user.name", "qlora tests"], dest)
    run(["git", "config", "user.email", "tests@localhost"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], dest)
    run(["make", "data", f"VENV={BIN.parent}"], dest, env=env)
    return dest


def small_project(dest: Path) -> Path:
    """A bare project (params.yaml for the tiny model, 40 instruction rows), no git or DVC."""
    shutil.copy2(DEFAULT_PARAMS, dest / "params.yaml")
    set_params(dest, TINY_PARAMS)
    raw = dest / "data" / "raw"
    raw.mkdir(parents=True)
    rows = [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."} for i in range(40)]
    (raw / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def project_env(project: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    env.update(extra)
    return env


# Secrets a user has in the environment; none may end up in params, tags, artifacts, logs or files.
SECRETS = {
    "HF_TOKEN": "hf_FAKEtokenQ7w1Zr9vXy3",
    "HUGGING_FACE_HUB_TOKEN": "hf_FAKEtokenQ7w1Zr9vXy3",
    "MLFLOW_TRACKING_USERNAME": "pipeline-user",
    "MLFLOW_TRACKING_PASSWORD": "FAKEpassw0rd-9d8c7b",
}


def add_every_format(project) -> None:
    """Beside the demo's alpaca .jsonl and .txt: chat, ShareGPT, prompt/completion .csv, .parquet."""
    import pandas as pd

    raw = project / "data" / "raw"
    chats = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Count to {i}."},
                      {"role": "assistant", "content": " ".join(str(n) for n in range(1, i + 1))}]}
        for i in range(1, 16)
    ]
    (raw / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    share = [
        {"conversations": [{"from": "human", "value": f"Double {i}?"}, {"from": "gpt", "value": str(2 * i)},
                           {"from": "human", "value": "And half of that?"}, {"from": "gpt", "value": str(i)}]}
        for i in range(1, 16)
    ]
    (raw / "sharegpt.json").write_text(json.dumps(share))
    pd.DataFrame({"prompt": [f"{i} minus 1 is" for i in range(2, 17)], "completion": [f" {i - 1}" for i in range(2, 17)]}).to_csv(raw / "pc.csv", index=False)
    words = [f"{c}{n}" for c in ("red", "blue", "green") for n in range(5)]
    pd.DataFrame({"instruction": ["Repeat the word."] * 15, "input": words, "output": words}).to_parquet(raw / "alpaca.parquet")
    run(["dvc", "add", "data/raw"], project, project_env(project))
    run(["git", "commit", "-qam", "every format"], project, project_env(project))


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, mlflow_server):
    project = make_project(tmp_path_factory.mktemp("project"))
    add_every_format(project)
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server, **SECRETS)
    first = run(["dvc", "repro"], project, env)
    return project, env, first
