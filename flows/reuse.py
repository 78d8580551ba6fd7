"""Reuse of earlier runs' outputs in a flow run's worktree (see reuse_earlier_outputs).

Tries the commit's own dvc.lock and the newest saved DVC experiments, and keeps the one with which
`dvc status` finds the most leading stages up to date.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from flows.workspace import Workspace, WorkspaceError, _run_bytes, dvc, git, git_entries, uncached_outputs

REUSE_CANDIDATES = 5  # the newest saved experiments a run looks at for outputs it can reuse
OWN_LOCK = "dvc.lock"  # the candidate that is the checkout's own dvc.lock


def reuse_earlier_outputs(ws: Workspace, candidates: int = REUSE_CANDIDATES) -> Workspace:
    """Bring back the outputs of the stages an earlier run already ran with this run's inputs.

    The outputs are `persist: true`, which turns DVC's run cache off, so a fresh worktree cannot
    restore them by itself. Candidates, in turn: the commit's own dvc.lock, then the newest saved
    experiments (each one's dvc.lock and the small outputs committed with it). Each is written
    here, its cached outputs checked out from the shared cache, and `dvc status` says how many
    leading stages are then up to date: DVC compares every dependency, parameter and output with
    the lock as usual, so nothing stale is kept. The candidate that makes the most leading stages
    up to date stays, and `dvc repro` skips those stages. Returns the workspace with reused_from
    (an experiment's name, or "dvc.lock") and reused_stages set; where nothing is reusable, as it
    was, with the checkout's own dvc.lock back in place.
    """
    lock = ws.path / "dvc.lock"
    own = lock.read_text() if lock.is_file() else None
    order = list((yaml.safe_load((ws.path / "dvc.yaml").read_text()) or {}).get("stages", {}))
    refs = git(ws.project, "for-each-ref", "--sort=-creatordate", f"--count={candidates}", "--format=%(objectname) %(refname)", "refs/exps")
    names = {OWN_LOCK: OWN_LOCK} if own is not None else {}
    names.update((sha, ref.rsplit("/", 1)[-1]) for sha, ref in (line.split() for line in refs.splitlines()))
    best: tuple[int, str] | None = None
    last = None
    for source in names:
        last = source
        leading = _try_lock(ws, source, own, order)
        if leading and (best is None or leading > best[0]):
            best = (leading, source)
        # the training is reused: good enough to stop looking (register, if not up to date, only re-merges)
        if best and best[0] >= len(order) - 1:
            break
    if best is None:
        if own is not None:
            lock.write_text(own)
        else:
            lock.unlink(missing_ok=True)
        return ws
    if last != best[1]:
        _try_lock(ws, best[1], own, order)
    return replace(ws, reused_from=names[best[1]], reused_stages=tuple(order[: best[0]]))


def _try_lock(ws: Workspace, source: str, own: str | None, order: list[str]) -> int:
    """Put the candidate's dvc.lock and outputs here; returns how many leading stages are up to date."""
    try:
        if source == OWN_LOCK:
            text = own or ""
        else:
            text = git(ws.project, "show", f"{source}:dvc.lock") + "\n"
            committed = set(git_entries(ws.project, "ls-tree", "-r", "-z", "--name-only", source))
            for rel in uncached_outputs(ws):
                if rel in committed:
                    (ws.path / rel).parent.mkdir(parents=True, exist_ok=True)
                    (ws.path / rel).write_bytes(_blob(ws.project, source, rel))
        (ws.path / "dvc.lock").write_text(text)
        # outputs are only checked out where the first stage's inputs match (checkouts copy data)
        if _leading(json.loads(dvc(ws.path, "status", "--json") or "{}"), order, missing_outs_ok=True) == 0:
            return 0
        dvc(ws.path, "checkout", "--quiet", "--allow-missing")
        return _leading(json.loads(dvc(ws.path, "status", "--json") or "{}"), order)
    except (WorkspaceError, ValueError):  # no dvc.lock there, or DVC could not read it: not reusable
        return 0


def _leading(changed: dict[str, Any], order: list[str], missing_outs_ok: bool = False) -> int:
    """How many stages, in pipeline order, `dvc status --json` finds up to date (with
    missing_outs_ok: up to date but for outputs not there yet)."""
    leading = 0
    for stage in order:
        if stage in changed and not (missing_outs_ok and _only_missing_outputs(changed[stage])):
            break
        leading += 1
    return leading


def _only_missing_outputs(changes: Any) -> bool:
    return isinstance(changes, list) and all(
        isinstance(c, dict) and set(c) == {"changed outs"} and set(c["changed outs"].values()) <= {"deleted", "not in cache"}
        for c in changes
    )


def _blob(project: Path, sha: str, rel: str) -> bytes:
    return _run_bytes(["git", "show", f"{sha}:{rel}"], project)
