"""MLflow tracking: where runs go, one run per pipeline execution across stages, lineage, what a
training run logs (its metrics at each step, the prepared data's report), retries of transient errors.

Default store: SQLite under mlflow/ with artifacts beside it; MLFLOW_TRACKING_URI overrides it.
Credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD, hub tokens) are read by MLflow and the hub
client from the environment and are never logged: params come from params.yaml only.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import yaml
from qlora_pipeline.atomic import write_json_atomic
from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import RegistryError, TransientError
from qlora_pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)

EXTRA_TAGS_ENV = "QLORA_TAGS"
T = TypeVar("T")


def tracking_uri(paths: ProjectPaths) -> str:
    """MLFLOW_TRACKING_URI, else the project's SQLite store under mlflow/.

    The project is DVC's repository root (DVC_ROOT, which `dvc exp run --temp` and `dvc queue`
    point at the real repository while the stage runs in a throw-away copy), else the folder of
    params.yaml: every way DVC runs a stage records into one store.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else paths.root
    return f"sqlite:///{ProjectPaths.at(root).mlflow_dir / 'mlflow.db'}"


def _redacted(uri: str) -> str:
    # user:password@host never reaches a message or a log line.
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def setup(paths: ProjectPaths, experiment: str) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id.

    Fails fast, before any training, when the tracking server cannot be reached or the
    experiment's artifact location belongs to the other mode (artifact_mismatch).
    """
    import mlflow

    uri = tracking_uri(paths)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    try:
        if uri.startswith(("http://", "https://")):
            _probe(uri)
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):  # artifacts beside the database, wherever it is
                artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
            try:
                return mlflow.create_experiment(experiment, artifact_location=artifact_location)
            except Exception as exc:  # noqa: BLE001 - only a lost creation race is handled here
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                # two runs started at once on a new store: the other one created it first
                found = mlflow.get_experiment_by_name(experiment)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot reach the store"
        refused = access_refused(exc, uri, experiment)
        if refused:
            raise RegistryError(refused) from None
        raise TransientError(
            f"MLflow tracking store {_redacted(uri)} cannot be reached ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); start it with mlflow/server.sh, "
            f"or set MLFLOW_TRACKING_URI to a reachable server (unset it for the local store under mlflow/)"
        ) from None
    mismatch = artifact_mismatch(uri, experiment, found.artifact_location)
    if mismatch:
        raise RegistryError(mismatch)
    return found.experiment_id


def access_refused(exc: BaseException, uri: str, experiment: str) -> str | None:
    """What to do when a tracking server with authentication (`mlflow server --app-name basic-auth`)
    refused the credentials (401) or the user's rights (403), else None. Not transient: a retry
    with the same credentials fails the same way."""
    code, user, server = getattr(exc, "error_code", None), os.environ.get("MLFLOW_TRACKING_USERNAME"), _redacted(uri)
    if code == "UNAUTHENTICATED":
        given = f"the user {user!r} and its password were not accepted" if user else "none were given"
        return (f"MLflow tracking server {server} refused the credentials (401): {given}. Set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD to a user of that server (its admin creates users); nothing was written")
    if code == "PERMISSION_DENIED":
        return (f"MLflow tracking server {server} denied the user {user!r} access to experiment {experiment!r} (403). Ask the server's "
                "admin for EDIT permission on it, or set tracking.experiment to a new name (its creator may write to it); nothing was written")
    return None


def artifact_mismatch(uri: str, experiment: str, location: str) -> str | None:
    """Why this client cannot use the experiment's artifact location, or None.

    An experiment created through a server (mlflow/server.sh) keeps artifacts at
    `mlflow-artifacts:/...`, which only a server resolves; one created with the local store keeps
    them at a file path, which a server's clients would write to around its proxy
    (--artifacts-destination). Either way the fix is the matching mode or a new experiment.
    """
    remote = uri.startswith(("http://", "https://"))
    if not remote and location.startswith("mlflow-artifacts:"):
        return (
            f"MLflow experiment {experiment!r} was created through a tracking server (artifacts at {location}); "
            "the local store cannot read or write them. Start the server over this store (mlflow/server.sh) and "
            "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000, or set tracking.experiment to a new name"
        )
    if remote and location.startswith("file:"):
        return (
            f"MLflow experiment {experiment!r} was created with a local store (artifacts at {location}); through "
            f"the server {_redacted(uri)} its artifacts would be written to that path around the server. Unset "
            "MLFLOW_TRACKING_URI to keep using the local store, or set tracking.experiment to a new name "
            "(created through the server)"
        )
    return None


def _probe(uri: str, timeout_s: float = 10.0) -> None:
    """One quick request, so a server that is down fails in seconds, not after MLflow's retries."""
    import requests

    requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)


def extra_tags() -> dict[str, str]:
    """Tags passed in by an orchestrator (e.g. the Prefect flow-run id) as JSON in QLORA_TAGS."""
    raw = os.environ.get(EXTRA_TAGS_ENV, "").strip()
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
    except json.JSONDecodeError:
        raise RegistryError(f"{EXTRA_TAGS_ENV} is not valid JSON; set it to an object such as '{{\"k\": \"v\"}}'") from None
    return {str(k): str(v) for k, v in tags.items()}


def git_commit(root: Path, captured_by: str | None = None) -> str:
    """HEAD's commit, with `-dirty` when tracked files differ from it, unless captured_by names
    the DVC experiment that commits those changes (its commit holds exactly what ran)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    if captured_by:
        return out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def dvc_experiment() -> str | None:
    """The DVC experiment this stage runs in: DVC's DVC_EXP_NAME under `dvc exp run` (workspace,
    --temp or queue), or the name an orchestrator saves the run under (QLORA_TAGS["dvc.experiment"])."""
    return os.environ.get("DVC_EXP_NAME") or extra_tags().get("dvc.experiment") or None


def run_name(default: str) -> str:
    """The MLflow run's name: the orchestrator's (QLORA_RUN_NAME), else the DVC experiment's."""
    return os.environ.get("QLORA_RUN_NAME") or dvc_experiment() or default


def dvc_data_hash(root: Path, stage: str = "prepare", dep: str = "data/raw") -> str:
    """The md5 DVC recorded in dvc.lock for the raw data the pipeline ran on."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return "unknown"
    data = yaml.safe_load(lock.read_text()) or {}
    for entry in data.get("stages", {}).get(stage, {}).get("deps", []):
        if entry.get("path") == dep:
            return str(entry.get("md5", "unknown"))
    return "unknown"


def lineage_tags(paths: ProjectPaths, cfg: PipelineConfig, base_revision: str) -> dict[str, str]:
    """git commit (+ DVC experiment), data hash, base model and revision, orchestrator tags.

    Under `dvc exp run` the experiment's params change the work tree: the commit recorded is the
    experiment's baseline (DVC_EXP_BASELINE_REV) and `dvc_experiment` names the experiment, whose
    commit (`dvc exp show`, `dvc exp apply <name>`) holds the exact params and dvc.lock.
    """
    experiment = dvc_experiment()
    baseline = os.environ.get("DVC_EXP_BASELINE_REV") if os.environ.get("DVC_EXP_NAME") else None
    tags = {"dvc_experiment": experiment} if experiment else {}
    return {
        **tags,
        "git_commit": baseline or git_commit(paths.root, captured_by=experiment),
        "dvc_data_hash": dvc_data_hash(paths.root, dep=cfg.data.raw_path),
        "base_model": cfg.model.name,
        "base_model_revision": base_revision,
        **extra_tags(),
    }


def write_run_info(paths: ProjectPaths, run_id: str, experiment_id: str, target: Path | None = None,
                   checkpoint_dir: Path | None = None) -> None:
    """models/adapter/run.json: the MLflow run, and the checkpoints the training left for a rerun."""
    info = {"run_id": run_id, "experiment_id": experiment_id}
    if checkpoint_dir is not None:
        info["checkpoint_dir"] = checkpoint_dir.name
    write_json_atomic(target or paths.run_info, info)


def read_run_id(paths: ProjectPaths) -> str:
    if not paths.run_info.is_file():
        raise RegistryError(f"{paths.run_info} is missing: run the train stage first (`dvc repro train`)")
    return json.loads(paths.run_info.read_text())["run_id"]


@contextmanager
def active_run(stage: str, run_id: str | None = None, **start_kwargs: Any) -> Iterator[Any]:
    """Start or resume the pipeline's run for one stage, recording that stage's outcome on its own.

    Tags `stage.<name>.status` (FINISHED, FAILED, KILLED) and, on failure,
    `stage.<name>.failure_reason`; a stage that then succeeds moves its old reason to
    `stage.<name>.previous_failure_reason`. The run's own status and `failure_reason` belong to
    the stage that opened it (train, also when it resumes after a crash): a later stage (evaluate,
    register) that fails leaves the finished training run FINISHED.
    """
    import mlflow

    previous = _status(run_id) if run_id else None
    run = mlflow.start_run(run_id=run_id, **start_kwargs)
    owner = previous != "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:
        _end(run.info.run_id, stage, "KILLED", "interrupted", owner)
        raise
    except BaseException as exc:
        _end(run.info.run_id, stage, "FAILED", f"{type(exc).__name__}: {exc}"[:5000], owner)
        raise
    else:
        _end(run.info.run_id, stage, "FINISHED", None, owner)


def _status(run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id).info.status


def _end(run_id: str, stage: str, status: str, reason: str | None, owner: bool) -> None:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        tags = client.get_run(run_id).data.tags
        prefix = f"stage.{stage}."
        client.set_tag(run_id, prefix + "status", status)
        _move_reason(client, run_id, tags, prefix + "failure_reason", reason)
        if owner:
            _move_reason(client, run_id, tags, "failure_reason", reason)
    except Exception as exc:  # noqa: BLE001 - a store that cannot take tags (full disk) must still end the run
        if reason is None:
            raise
        log.warning("could not record the failure on MLflow run %s (%s)", run_id, str(exc).splitlines()[0][:200])
    finally:
        mlflow.end_run(status if owner else "FINISHED")


def _move_reason(client, run_id: str, tags: dict, key: str, reason: str | None) -> None:
    """Set the failure reason; on success an old one is kept as previous_failure_reason only."""
    if reason is not None:
        client.set_tag(run_id, key, reason)
    elif key in tags:
        client.set_tag(run_id, key.replace("failure_reason", "previous_failure_reason"), tags[key])
        client.delete_tag(run_id, key)


def log_metrics_once(metrics: dict[str, float], step: int = 0) -> None:
    """Log metrics unless the active run holds the same latest value already: a re-run or retried
    stage leaves the record as it was, not a second point per metric."""
    import mlflow
    from mlflow import MlflowClient

    current = MlflowClient().get_run(mlflow.active_run().info.run_id).data.metrics
    fresh = {k: float(v) for k, v in metrics.items() if k not in current or current[k] != float(v)}
    if fresh:
        mlflow.log_metrics(fresh, step=step)


def log_table_replacing(table, artifact_file: str) -> None:
    """mlflow.log_table, but replacing the table an earlier attempt logged (log_table appends)."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    run_id = mlflow.active_run().info.run_id
    folder = os.path.dirname(artifact_file) or None
    if artifact_file not in {f.path for f in MlflowClient().list_artifacts(run_id, folder)}:
        mlflow.log_table(table, artifact_file=artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:  # the file log_table writes, in its format
        path = Path(tmp) / os.path.basename(artifact_file)
        table.to_json(path, orient="split", index=False, date_format="iso")
        mlflow.log_artifact(str(path), artifact_path=folder)


TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


def is_transient(exc: BaseException) -> bool:
    """Connection trouble and server-side 5xx are worth retrying; bad requests are not."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith(("requests", "urllib3"))


def retry(fn: Callable[[], T], what: str, attempts: int = 4, first_delay_s: float = 1.0) -> T:
    """Call fn, retrying transient failures with exponential backoff."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for a flaky server
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise TransientError(f"{what} failed after {attempts} attempts (transient): {exc}") from None
            log.warning("%s failed (%s); retrying in %.0fs", what, exc, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# ---- what a training run logs ----------------------------------------------------------------


TRAINER_SUMMARY = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_tokens_per_second", "total_flos")


def metrics_callback(run_id: str | None = None):
    """A transformers TrainerCallback that logs every Trainer log row (loss, learning rate, grad
    norm, tokens/s) to the active MLflow run at its global step, from the main process only.

    run_id: the run being resumed, if any. Steps it already holds (logged before the kill, re-run
    since the last checkpoint) are not logged twice, so the history has neither gaps nor duplicates.
    transformers is imported here, not with this module, which orchestration imports too.
    """
    from transformers import TrainerCallback

    logged_up_to = -1
    if run_id:
        from mlflow import MlflowClient

        logged_up_to = max((m.step for m in MlflowClient().get_metric_history(run_id, "loss")), default=-1)

    class MlflowMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            import mlflow

            if not state.is_world_process_zero or not logs or state.global_step <= logged_up_to:
                return
            # The Trainer's end-of-training summary covers only this process's steps (after a
            # resume, the resumed part): the stage logs the whole run's figures instead.
            numbers = {
                k: float(v) for k, v in logs.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in TRAINER_SUMMARY
            }
            if numbers:
                mlflow.log_metrics(numbers, step=state.global_step)

    return MlflowMetrics()


def log_data_report(paths: ProjectPaths) -> None:
    """The prepare stage's stats, validation report and token-length histogram, into the active run."""
    import mlflow

    from qlora_pipeline.plots import read_histogram, token_length_figure

    stats = json.loads((paths.prepared / "stats.json").read_text())
    mlflow.log_metrics({f"data_{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name in ("stats.json", "report.json", "lengths.csv"):
        mlflow.log_artifact(str(paths.prepared / name), artifact_path="data")
    mlflow.log_figure(token_length_figure(read_histogram(paths.prepared / "lengths.csv")), "data/token_lengths.png")
