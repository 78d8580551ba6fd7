"""One checkout per flow run: a git worktree of the project that shares the project's DVC cache.

Two runs triggered together never write the same params.yaml, dvc.lock or outputs: each gets
`<project>/.prefect/runs/<flow-run-id>` (or `$QLORA_RUNS_DIR/<flow-run-id>`), a detached worktree
of the commit it runs. Outputs still go to the project's one DVC cache, and the finished run is
saved as a DVC experiment in the shared git refs, so `dvc exp show` in the project lists it and
`dvc exp apply <name>` brings its params, dvc.lock and outputs back.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.representer import RoundTripRepresenter

from flows.overrides import yaml_float
from qlora_pipeline.config import PipelineConfig, load_config, validate_params
from qlora_pipeline.overrides import apply_overrides
from qlora_pipeline.errors import ConfigError
from qlora_pipeline.paths import RELATIVE

RUNS_DIR_ENV = "QLORA_RUNS_DIR"
PARAMS_FILE = "params.yaml"
MAX_COMMITTED_OUTPUT_BYTES = 5 * 2**20  # metrics and reports go into git with the experiment; models never
CHECKPOINTS = RELATIVE.checkpoints.as_posix()  # the train stage's resumable state, outside DVC's outputs
GIT_TIMEOUT_S = 120
DVC_TIMEOUT_S = 600  # checkout of the raw data from the cache, or `dvc exp save`


class WorkspaceError(RuntimeError):
    """The run's checkout could not be made, saved or removed."""


@dataclass(frozen=True)
class Workspace:
    project: Path
    """The checkout the deployment points at; its DVC cache and git refs are shared."""
    path: Path
    """This run's worktree; stages run here."""
    commit: str
    """The git commit it runs (params.yaml there, plus the run's overrides)."""
    experiment: str
    """The name it is saved under with `dvc exp save`."""
    uncommitted_data: tuple[str, ...] = ()
    """`.dvc` files the commit lacks, taken from the project's working tree."""
    reused_from: str | None = None
    """The saved experiment (or "dvc.lock", the commit's own) whose outputs this run reuses."""
    reused_stages: tuple[str, ...] = ()
    """The stages whose outputs came from there: DVC found them up to date."""


def project_root() -> Path:
    """The project this code was loaded from (where dvc.yaml and params.yaml live)."""
    return Path(__file__).resolve().parents[1]


def runs_dir(project: Path) -> Path:
    configured = os.environ.get(RUNS_DIR_ENV)
    return Path(configured).expanduser().resolve() if configured else project / ".prefect" / "runs"


def _run_bytes(cmd: list[str], cwd: Path, timeout_s: float = GIT_TIMEOUT_S) -> bytes:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise WorkspaceError(f"`{' '.join(cmd)}` in {cwd} took longer than {timeout_s:.0f}s") from None
    if out.returncode != 0:
        detail = os.fsdecode(out.stderr or out.stdout).strip()
        raise WorkspaceError(f"`{' '.join(cmd)}` in {cwd} failed (exit {out.returncode}): {detail}")
    return out.stdout


def _run(cmd: list[str], cwd: Path, timeout_s: float = GIT_TIMEOUT_S) -> str:
    """stdout without surrounding whitespace: for one value (a sha, a path, JSON) or lines of refs.

    Output where blanks or columns carry meaning (`git status`, file names) goes through git_entries.
    """
    return os.fsdecode(_run_bytes(cmd, cwd, timeout_s)).strip()


def git(project: Path, *args: str) -> str:
    return _run(["git", *args], project)


def git_entries(cwd: Path, *args: str) -> list[str]:
    """The NUL-separated entries of a `git ... -z` command, unstripped and unquoted, as Python names files."""
    return [os.fsdecode(entry) for entry in _run_bytes(["git", *args], cwd).split(b"\0") if entry]


def dvc(cwd: Path, *args: str) -> str:
    # The venv's own DVC, whatever PATH the worker was started with.
    return _run([sys.executable, "-m", "dvc", *args], cwd, DVC_TIMEOUT_S)


@contextmanager
def repo_lock(project: Path) -> Iterator[None]:
    """Serialize what touches shared git state: worktree add/remove and `dvc exp save`."""
    common = Path(git(project, "rev-parse", "--git-common-dir"))
    lock_path = (common if common.is_absolute() else project / common) / "qlora-flow.lock"
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_commit(project: Path, rev: str) -> str:
    try:
        return git(project, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except WorkspaceError:
        raise WorkspaceError(f"git_rev {rev!r} is not a commit in {project}; use a branch, tag or sha") from None


def params_at(project: Path, commit: str) -> dict[str, Any]:
    """params.yaml as committed at `commit`."""
    text = git(project, "show", f"{commit}:{PARAMS_FILE}")
    return yaml.safe_load(text) or {}  # the loader load_config uses


def validate_overrides(project: Path, commit: str, overrides: dict[str, Any]) -> PipelineConfig:
    """Apply the overrides to the committed params and validate them with the pipeline's config code."""
    return validate_params(apply_overrides(params_at(project, commit), overrides))


def uncommitted_changes(project: Path) -> list[str]:
    """Tracked files with changes, staged or not, that a run of HEAD will not see."""
    return status_paths(git_entries(project, "status", "--porcelain=v1", "-z", "--untracked-files=no"))


def status_paths(entries: list[str]) -> list[str]:
    """The paths in `git status --porcelain=v1 -z` entries; for a rename or copy, the new path.

    Each entry is `XY path` (X: the index, Y: the working tree, either may be a blank); a rename
    or copy is `XY new` followed by an entry holding the path it came from.
    """
    paths = []
    rest = iter(entries)
    for entry in rest:
        if len(entry) < 4 or entry[2] != " ":
            raise WorkspaceError(f"unexpected `git status --porcelain=v1 -z` entry {entry!r}")
        paths.append(entry[3:])
        if "R" in entry[:2] or "C" in entry[:2]:
            next(rest, None)  # the path it was renamed or copied from
    return paths


def create(project: Path, run_id: str, commit: str, experiment: str) -> Workspace:
    """Check out `commit` in a new worktree that uses the project's DVC cache and raw data."""
    path = runs_dir(project) / run_id
    path.parent.mkdir(parents=True, exist_ok=True)
    with repo_lock(project):
        git(project, "worktree", "prune")
        if path.exists():  # a retried flow run of the same id: start from a clean checkout
            _remove_locked(project, path)
        git(project, "worktree", "add", "--detach", str(path), commit)
    ws = Workspace(project=project, path=path, commit=commit, experiment=experiment)
    try:
        _share_dvc_cache(ws)
        _share_checkpoints(ws)
        return replace(ws, uncommitted_data=_checkout_data(ws))
    except BaseException:
        remove(ws)
        raise


def _share_dvc_cache(ws: Workspace) -> None:
    local = ws.project / ".dvc" / "config.local"
    if local.is_file():  # remotes and credentials the user configured for this checkout
        shutil.copy2(local, ws.path / ".dvc" / "config.local")
    dvc(ws.path, "cache", "dir", "--local", dvc(ws.project, "cache", "dir"))


def _share_checkpoints(ws: Workspace) -> None:
    """Point the run's checkpoints/ at the project's, so a killed training resumes in the next run."""
    shared = ws.project / CHECKPOINTS
    shared.mkdir(exist_ok=True)
    (ws.path / CHECKPOINTS).symlink_to(shared, target_is_directory=True)


def _checkout_data(ws: Workspace) -> tuple[str, ...]:
    """Restore the DVC-tracked inputs from the shared cache; returns the `.dvc` files not committed.

    The commit's `.dvc` files win; one the commit lacks (`dvc add` without a commit yet) is taken
    from the project's working tree, and `dvc exp save` records it with the experiment.
    """
    # git pathspecs: `*` spans folders, so *.dvc finds data/raw.dvc.
    committed = set(git_entries(ws.path, "ls-files", "-z", "*.dvc"))
    in_project = set(git_entries(ws.project, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "*.dvc"))
    uncommitted = sorted(p for p in in_project - committed if (ws.project / p).is_file())
    for rel in uncommitted:
        (ws.path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ws.project / rel, ws.path / rel)
    targets = sorted(committed) + uncommitted
    if targets:
        try:
            dvc(ws.path, "checkout", "--quiet", *targets)
        except WorkspaceError as exc:
            raise WorkspaceError(
                f"the DVC-tracked data {', '.join(targets)} is not in the project's cache: run "
                f"`dvc pull` (or `dvc add`) in {ws.project}. {exc}"
            ) from None
    return tuple(uncommitted)


class _ParamsRepresenter(RoundTripRepresenter):
    """Values as every reader of params.yaml reads them back: DVC (YAML 1.2) and the pipeline (YAML 1.1).

    ruamel writes 1e-6 as `1e-06`, which YAML 1.1 reads as a string, and the string "yes" plain,
    which YAML 1.1 reads as true.
    """

    def represent_float(self, data: float) -> ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:float", yaml_float(data))

    def represent_str(self, data: str) -> ScalarNode:
        if _yaml11_reads_as_other(data):
            return self.represent_scalar("tag:yaml.org,2002:str", data, style="'")
        return super().represent_str(data)

    def represent_none(self, data: None) -> ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:null", "null")


_ParamsRepresenter.add_representer(float, _ParamsRepresenter.represent_float)
_ParamsRepresenter.add_representer(str, _ParamsRepresenter.represent_str)
_ParamsRepresenter.add_representer(type(None), _ParamsRepresenter.represent_none)


def _yaml11_reads_as_other(text: str) -> bool:
    try:
        return yaml.safe_load(text) != text
    except yaml.YAMLError:
        return False  # not a scalar YAML 1.1 reads plain; ruamel quotes what needs it


def write_params(ws: Workspace, overrides: dict[str, Any]) -> None:
    """Write the overrides into the run's params.yaml, keeping its comments, and re-validate it."""
    params = ws.path / PARAMS_FILE
    rt = YAML()  # round-trip: comments survive, so the saved experiment diffs cleanly
    rt.preserve_quotes = True
    rt.Representer = _ParamsRepresenter
    doc = rt.load(params.read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = doc
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {part} is not a section")
        node[key] = value
    with params.open("w", encoding="utf-8") as fh:
        rt.dump(doc, fh)
    load_config(params)


def uncached_outputs(ws: Workspace) -> list[str]:
    """Outputs dvc.yaml marks `cache: false` (metrics, plots, reports)."""
    stages = (yaml.safe_load((ws.path / "dvc.yaml").read_text()) or {}).get("stages", {})
    found = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                if isinstance(entry, dict):
                    (rel, options), = entry.items()
                    if (options or {}).get("cache") is False:
                        found.append(rel)
    return found


def small_uncached_outputs(ws: Workspace) -> list[str]:
    """Uncached outputs that are small files (metrics, plots, reports).

    DVC's cache does not hold them and .gitignore may hide them from git; committing them with the
    experiment is what lets `dvc exp show` list its metrics, `dvc exp apply` bring them back, and a
    later flow run reuse them (flows/reuse.py).
    """
    return [
        rel for rel in uncached_outputs(ws)
        if (path := ws.path / rel).is_file() and path.stat().st_size <= MAX_COMMITTED_OUTPUT_BYTES
    ]


def save_experiment(ws: Workspace, stages: list[str] | None = None) -> str:
    """Save the run's params, dvc.lock and outputs as a DVC experiment; returns its commit sha.

    stages: only these (the ones that finished, when a later one failed); `dvc exp save` would
    otherwise commit every stage and fail on the outputs of those that never ran.
    """
    extra = [*ws.uncommitted_data, *small_uncached_outputs(ws)]
    untracked = [arg for rel in extra for arg in ("--include-untracked", rel)]
    with repo_lock(ws.project):
        dvc(ws.path, "exp", "save", "--quiet", "--name", ws.experiment, *untracked, *(stages or []))
    refs = git(ws.project, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps")
    for line in refs.splitlines():
        ref, sha = line.split()
        if ref.endswith(f"/{ws.experiment}"):
            return sha
    raise WorkspaceError(f"`dvc exp save` reported success but no ref ends in /{ws.experiment}")


def remove(ws: Workspace) -> None:
    remove_worktree(ws.project, ws.path)


def remove_worktree(project: Path, path: Path) -> None:
    """Remove a run's worktree (its files and git's record of it)."""
    with repo_lock(project):
        _remove_locked(project, path)


def _remove_locked(project: Path, path: Path) -> None:
    try:
        git(project, "worktree", "remove", "--force", "--force", str(path))
    except WorkspaceError:
        shutil.rmtree(path, ignore_errors=True)
        git(project, "worktree", "prune")
