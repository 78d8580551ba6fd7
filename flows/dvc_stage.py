"""Run one DVC stage (`dvc repro --single-item <stage>`) and stream its output to a logger.

DVC decides whether the stage runs, is restored from the run cache, or is already up to date, and
records it in dvc.lock; this module only runs it, relays its lines (credentials in URIs masked:
MLflow prints its tracking URI), and turns a failure into an exception whose message is the
stage's own error. The stage process and its children are ended
whenever the caller stops waiting (task timeout, flow cancellation, Ctrl-C).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psutil

from flows.redact import redact

TAIL_LINES = 30
PROGRESS_EVERY_S = 15.0  # progress bars redraw with \r; relay at most one frame per this interval
KILL_GRACE_S = 30.0  # SIGTERM first, so MLflow runs end KILLED and checkpoints stay whole
EX_TEMPFAIL = 75  # sysexits.h: temporary failure, the caller is invited to retry

ERROR_LINE = re.compile(r"^\s*(error|ERROR)\b|^[\w.]*(Error|Exception)\b")
# An error line that says the tracking store or registry failed for a reason that may pass.
TRANSIENT = re.compile(
    r"\b(transient|ConnectionError|ConnectionRefusedError|ConnectTimeout|ReadTimeout|TimeoutError|"
    r"RemoteDisconnected|Max retries exceeded|database is locked|cannot be reached|"
    r"Service Unavailable|Too Many Requests|failed after \d+ attempts)\b"
)
EXIT_CODE = re.compile(r"failed to run: .*, exited with (-?\d+)")
STATUS = {
    "ran": re.compile(r"^Running stage '"),
    "restored": re.compile(r"is cached - skipping run|Restored stage"),
    "up to date": re.compile(r"didn't change, skipping"),
}


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message is its error, with the last lines of its output."""

    def __init__(self, stage: str, returncode: int | None, tail: list[str]) -> None:
        self.stage, self.returncode, self.tail = stage, returncode, tail
        self.errors = [line.strip() for line in tail if ERROR_LINE.match(line)]
        headline = self.errors[0] if self.errors else (tail[-1].strip() if tail else "no output")
        code = f"exit {returncode}" if returncode is not None else "no exit code"
        super().__init__(f"stage {stage!r} failed ({code}): {headline}\n" + "\n".join(tail))

    @property
    def transient(self) -> bool:
        """True when a retry may succeed: the tracking store or registry was unreachable or busy."""
        return self.returncode == EX_TEMPFAIL or any(TRANSIENT.search(line) for line in self.errors)


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str
    """ran | restored (from DVC's run cache) | up to date"""
    duration_s: float


def stage_command(stage: str, force: bool = False) -> list[str]:
    return [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]


def stage_env(extra: dict[str, str]) -> dict[str, str]:
    """The worker's environment, plus: the venv's `qlora` on PATH, unbuffered and unwrapped output."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("COLUMNS", "160")  # rich wraps at 80 columns when not on a terminal
    env.update(extra)
    return env


def run_stage(stage: str, cwd: Path, env: dict[str, str], logger: logging.Logger | logging.LoggerAdapter, force: bool = False) -> StageResult:
    """Run the stage through DVC in cwd; raise StageFailed with its error if it fails."""
    started = time.monotonic()
    proc = subprocess.Popen(stage_command(stage, force), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    status: list[str] = []
    reader = threading.Thread(target=_relay, args=(proc, logger, tail, status), daemon=True)
    reader.start()
    try:
        # Poll rather than block, so a timeout or cancellation raised in this thread lands promptly.
        while proc.poll() is None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:
            logger.warning("stopping stage %r (pid %s) and its children", stage, proc.pid)
            terminate_tree(proc.pid)
        reader.join(timeout=10)
    if proc.returncode != 0:
        codes = [int(m.group(1)) for line in tail if (m := EXIT_CODE.search(line))]
        raise StageFailed(stage, codes[-1] if codes else proc.returncode, list(tail))
    return StageResult(stage, status[0] if status else "up to date", round(time.monotonic() - started, 1))


def _relay(proc: subprocess.Popen, logger, tail: deque[str], status: list[str]) -> None:
    assert proc.stdout is not None
    last_progress = 0.0
    pending = b""
    while chunk := proc.stdout.read1(65536):
        pending = (pending + chunk).replace(b"\r\n", b"\n")
        # Lines end in \n; progress bars redraw in place with \r.
        while (cut := _first_break(pending)) >= 0:
            raw, sep, pending = pending[:cut], pending[cut : cut + 1], pending[cut + 1 :]
            line = redact(raw.decode("utf-8", "replace").rstrip())
            if not line.strip():
                continue
            if sep == b"\r":
                now = time.monotonic()
                if now - last_progress < PROGRESS_EVERY_S:
                    continue
                last_progress = now
            tail.append(line)
            for name, pattern in STATUS.items():
                if not status and pattern.search(line):
                    status.append(name)
            logger.info("%s", line)
    if pending.strip():
        line = redact(pending.decode("utf-8", "replace").rstrip())
        tail.append(line)
        logger.info("%s", line)


def _first_break(buf: bytes) -> int:
    positions = [i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0]
    return min(positions) if positions else -1


def terminate_tree(pid: int, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the process and its descendants, then SIGKILL whatever is left after grace_s."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
