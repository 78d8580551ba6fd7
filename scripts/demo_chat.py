"""Serve a registered model with `mlflow models serve` on 127.0.0.1, send it one chat request, stop it.

    python scripts/demo_chat.py qlora-demo "Record the contact." "Hi, I'm Ines Moreau from Lyon."

The message is one user turn: the arguments after the model name joined by a blank line, the way
instruction records are rendered for training (instruction, blank line, input).

Prints the curl command a person would type and the answer the endpoint gave. The tracking store
is MLFLOW_TRACKING_URI, else the project's local one (mlflow/mlflow.db).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qlora_pipeline import progress, serving  # noqa: E402
from qlora_pipeline.paths import ProjectPaths  # noqa: E402
from qlora_pipeline.tracking import tracking_uri  # noqa: E402

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"mlflow models serve exited with {proc.returncode}; its log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    sys.exit(f"mlflow models serve did not answer within {START_TIMEOUT_S}s; its log: {log}")


def main(model_name: str, message: str, alias: str = "champion", max_tokens: int = 64) -> int:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(ProjectPaths.at(ROOT))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # uvicorn, mlflow
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    uri = f"models:/{model_name}@{alias}"
    log = ROOT / ".cache" / "demo-serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    body = serving.chat_request(message, max_tokens=max_tokens)
    print(f"serving {uri} on {url} (mlflow models serve, log in {log.relative_to(ROOT)}) ...", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        with progress.bar("starting the server", total=None):  # drawn on a terminal only
            wait_healthy(url, proc, log)
        print("\n$ curl -s " + f"{url}/invocations -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}")
        answer = serving.ask(url, body, raw=True)
        print(json.dumps(answer, indent=2))  # exactly what the curl above prints
        response = answer[0] if isinstance(answer, list) else answer
        print(f"\nchampion's answer: {serving.reply_text(response)}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    raise SystemExit(main(sys.argv[1], "\n\n".join(sys.argv[2:])))
