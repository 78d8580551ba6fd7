"""The pipeline as a Prefect flow: prepare -> train -> evaluate -> register, each one `dvc repro`.

    python -m flows.run -S train.max_steps=10      # once, now, on a temporary local Prefect server
    python -m flows.deploy                         # deployment `qlora-pipeline/gpu` on work pool `gpu`

A flow run
1. removes the worktrees earlier runs left behind when they died (a killed worker), then merges its
   overrides (dotted params.yaml keys, like `dvc exp run -S`) over the deployment's defaults and
   validates them with the pipeline's config code, so a bad value fails the run with the
   validation message before anything runs;
2. checks out the commit in its own git worktree that shares the project's DVC cache
   (workspace.py), so runs triggered together never share a params.yaml, dvc.lock or output, and
   brings back the outputs of stages an earlier run already ran with the same inputs (reuse.py);
3. runs each stage as a task through DVC, which decides what is stale and records lineage in
   dvc.lock; the GPU stages hold slots of a global concurrency limit with one slot per GPU
   (slots.py; a training on N GPUs holds N), so one GPU never trains twice at once (a lease the run keeps renewing: the slot of a run that died comes back when it
   lapses);
   the MLflow run gets the DVC experiment's name (`<flow run name>-<id8>`) and the flow run's tags,
   and the flow run is tagged with the MLflow run's id;
4. saves the result as a DVC experiment (also when a later stage failed, so the next run reuses
   what this one finished) and publishes a markdown artifact with the metrics, the registered
   version, and links to the MLflow run and the experiment.

Retries only where a failure can pass (the MLflow store or registry unreachable or busy): never on
train, whose restart would redo the work; a new run with the same params resumes its checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.runtime import deployment, flow_run
from prefect.tasks import exponential_backoff

from flows import overrides as param_overrides
from flows import workspace
from flows.dvc_stage import StageFailed, StageResult, run_stage, stage_env
from flows.redact import redact
from flows.reuse import reuse_earlier_outputs
from flows.slots import DEFAULT_SLOT_TIMEOUT_S, ensure_limit, gpu_limit_name, gpu_slot, host_gpus, slots_for
from flows.summary import RunRecord, render
from flows.workspace import Workspace
from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.paths import RELATIVE

STAGES = ("prepare", "train", "evaluate", "register")
GPU_STAGES = ("train", "evaluate", "register")  # register merges and scores the model
ARTIFACT_KEY = "qlora-pipeline-run"
RUN_NAME_ENV = "QLORA_RUN_NAME"  # the train stage names its MLflow run after it
RUN_INFO = RELATIVE.run_info.as_posix()  # the train stage's MLflow run id and experiment id
# The stage outputs the summary reads, each from the first of its files that exists.
SUMMARY_INPUTS = {
    "run_info": (RUN_INFO,),
    "eval_metrics": (RELATIVE.eval_metrics.as_posix(),),
    # metrics/register.json holds numbers only; commits from before reports/ had the record there
    "register": (RELATIVE.register_record.as_posix(), RELATIVE.register_metrics.as_posix()),
}
DEFAULT_TIMEOUTS_S = {
    "prepare": 2 * 3600,
    "train": 48 * 3600,
    "evaluate": 6 * 3600,
    "register": 6 * 3600,
}
SETUP_TIMEOUT_S = 15 * 60  # checkout, tracking check, experiment save
# 10 s, 20 s, 40 s (+ up to 50% jitter): enough for a tracking server restart or a SQLite lock.
TRANSIENT_RETRIES = 3
TRANSIENT_BACKOFF_S = 10


def only_transient(task, task_run, state) -> bool:
    """Retry condition: the tracking store or registry was unreachable or busy."""
    from qlora_pipeline.errors import RegistryError

    exc = state.data if isinstance(state.data, BaseException) else None
    return isinstance(exc, RegistryError) or (isinstance(exc, StageFailed) and exc.transient)


@task(name="prune-workspaces", cache_policy=NO_CACHE, timeout_seconds=SETUP_TIMEOUT_S)
def prune_workspaces(project: Path, current_run_id: str) -> list[str]:
    """Remove the worktrees of earlier flow runs that have ended but left theirs (a killed worker or
    flow-run process never reaches its cleanup); kept ones (`keep_workspace`) stay."""
    removed = []
    for path in _finished_runs_with_worktrees(project, current_run_id):
        try:
            workspace.remove_worktree(project, path)
            removed.append(path.name)
        except workspace.WorkspaceError as exc:  # this run does not need it gone
            get_run_logger().warning("could not remove the worktree of ended flow run %s: %s", path.name, exc)
    if removed:
        get_run_logger().info("removed the worktrees of ended flow runs: %s", ", ".join(removed))
    return removed


def _finished_runs_with_worktrees(project: Path, current_run_id: str) -> list[Path]:
    paths = {}
    root = workspace.runs_dir(project)
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            run_id = UUID(path.name)
        except ValueError:
            continue  # not a flow run's worktree
        if path.name != current_run_id:
            paths[run_id] = path
    if not paths:
        return []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(paths))))
    # A run this server does not know (one of a temporary server's) is left alone.
    return [
        paths[run.id] for run in runs
        if run.state is not None and run.state.is_final() and not (run.parameters or {}).get("keep_workspace")
    ]


@task(name="validate-params", cache_policy=NO_CACHE, timeout_seconds=120)
def validate_params(project: Path, commit: str, overrides: dict[str, Any]) -> PipelineConfig:
    """Validate the overrides against params.yaml at the commit, with the pipeline's config code."""
    return workspace.validate_overrides(project, commit, overrides)


@task(name="checkout", cache_policy=NO_CACHE, timeout_seconds=SETUP_TIMEOUT_S)
def checkout(project: Path, run_id: str, commit: str, experiment: str, overrides: dict[str, Any], reuse: bool = True) -> Workspace:
    """Make this run's worktree, with the overrides written to its params.yaml and, with reuse, the
    outputs of the stages an earlier run already ran with the same inputs (DVC then skips them)."""
    ws = workspace.create(project, run_id, commit, experiment)
    try:
        workspace.write_params(ws, overrides)
        if reuse:
            ws = reuse_earlier_outputs(ws)
    except BaseException:
        workspace.remove(ws)
        raise
    logger = get_run_logger()
    logger.info("workspace %s at %s", ws.path, commit[:10])
    if ws.reused_stages:
        logger.info("reusing the outputs of %s for %s: same data, code and params", ws.reused_from, ", ".join(ws.reused_stages))
    if ws.uncommitted_data:
        logger.warning("using uncommitted %s from %s; commit it to pin the data to the code", ", ".join(ws.uncommitted_data), project)
    return ws


TRANSIENT_ONLY = dict(
    retries=TRANSIENT_RETRIES,
    retry_delay_seconds=exponential_backoff(TRANSIENT_BACKOFF_S),
    retry_jitter_factor=0.5,
    retry_condition_fn=only_transient,
)


@task(name="connect-tracking", cache_policy=NO_CACHE, timeout_seconds=SETUP_TIMEOUT_S, **TRANSIENT_ONLY)
def connect_tracking(project: Path, experiment: str) -> tuple[str, str]:
    """Reach the MLflow store and make sure the experiment exists; returns (tracking URI, experiment id).

    Done from the project root, not the run's checkout, so a new local store keeps its artifacts
    under the project's mlflow/ folder, where they outlive the checkout.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a note on an optional kernels package
    from qlora_pipeline import tracking
    from qlora_pipeline.paths import ProjectPaths

    paths = ProjectPaths.at(project)
    return tracking.tracking_uri(paths), tracking.setup(paths, experiment)


@task(name="prepare", cache_policy=NO_CACHE, **TRANSIENT_ONLY)
def prepare(ws: Workspace, extra_env: dict[str, str], force: bool) -> StageResult:
    """Validate and tokenize data/raw (`dvc repro --single-item prepare`)."""
    return run_stage("prepare", ws.path, stage_env(extra_env), get_run_logger(), force)


@task(name="train", cache_policy=NO_CACHE)  # no retries: a restart would redo the training
def train(ws: Workspace, extra_env: dict[str, str], force: bool) -> StageResult:
    """Train the LoRA adapter on the 4-bit base model (`dvc repro --single-item train`)."""
    return run_stage("train", ws.path, stage_env(extra_env), get_run_logger(), force)


@task(name="evaluate", cache_policy=NO_CACHE, **TRANSIENT_ONLY)
def evaluate(ws: Workspace, extra_env: dict[str, str], force: bool) -> StageResult:
    """Score base and tuned models on the eval split (`dvc repro --single-item evaluate`)."""
    return run_stage("evaluate", ws.path, stage_env(extra_env), get_run_logger(), force)


@task(name="register", cache_policy=NO_CACHE, **TRANSIENT_ONLY)  # idempotent: one version per training run
def register(ws: Workspace, extra_env: dict[str, str], force: bool) -> StageResult:
    """Merge, verify, register the version and gate promotion (`dvc repro --single-item register`)."""
    return run_stage("register", ws.path, stage_env(extra_env), get_run_logger(), force)


STAGE_TASKS = {"prepare": prepare, "train": train, "evaluate": evaluate, "register": register}


@task(name="save-experiment", cache_policy=NO_CACHE, timeout_seconds=SETUP_TIMEOUT_S)
def save_experiment(ws: Workspace, stages: list[str] | None = None) -> str:
    """Save params, dvc.lock and outputs (of `stages` only, if given) as a DVC experiment; returns its commit."""
    sha = workspace.save_experiment(ws, stages)
    get_run_logger().info("saved DVC experiment %s (%s)%s", ws.experiment, sha[:10],
                          f" with the finished stages {', '.join(stages)}" if stages else "")
    return sha


@task(name="publish-summary", cache_policy=NO_CACHE, timeout_seconds=300)
def publish_summary(record: RunRecord, ws: Workspace) -> dict[str, Any]:
    """Read the stages' outputs and publish the run's markdown artifact."""
    for attr, candidates in SUMMARY_INPUTS.items():
        if path := next((ws.path / rel for rel in candidates if (ws.path / rel).is_file()), None):
            setattr(record, attr, json.loads(path.read_text()))
    markdown = render(record)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description=f"QLoRA pipeline run {record.flow_run_name}")
    return {
        "eval": record.eval_metrics,
        "register": record.register,
        "mlflow_run_id": record.run_info.get("run_id"),
        "dvc_experiment": record.experiment,
        "dvc_experiment_commit": record.experiment_commit,
        "commit": record.commit,
        "stages": {s.stage: s.status for s in record.stages},
        "reused_from": record.reused_from,
    }


def _timeouts(overrides: dict[str, float] | None) -> dict[str, float]:
    unknown = set(overrides or {}) - set(STAGES)
    if unknown:
        raise ValueError(f"timeouts_s: unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
    return {**DEFAULT_TIMEOUTS_S, **(overrides or {})}


def tag_flow_run(run_id: str, ws: Workspace) -> None:
    """Tag the flow run with its DVC experiment and the MLflow run the train stage made, so each
    side names the other (the MLflow run already carries the flow run's id in QLORA_TAGS)."""
    tags = [f"dvc.experiment:{ws.experiment}"]
    if (info := ws.path / RUN_INFO).is_file():
        tags.append(f"mlflow.run_id:{json.loads(info.read_text())['run_id']}")
    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(UUID(run_id)).tags
            # the API replaces the whole list
            client.update_flow_run(UUID(run_id), tags=[*current, *(t for t in tags if t not in current)])
    except httpx.HTTPError as exc:  # a convenience: the artifact links the same runs
        get_run_logger().warning("could not tag the flow run with %s: %s", ", ".join(tags), exc)


def _flow_run_tags(run_id: str, run_name: str, experiment: str) -> dict[str, str]:
    tags = {"prefect.flow_run_id": run_id, "prefect.flow_run_name": run_name, "dvc.experiment": experiment}
    if deployment.name:
        tags["prefect.deployment"] = deployment.name
    if (url := flow_run.ui_url) and url.startswith("http"):  # None/... without PREFECT_UI_URL
        tags["prefect.flow_run_url"] = url
    return tags


@flow(name="qlora-pipeline")
def qlora_pipeline(
    overrides: dict[str, Any] | None = None,
    git_rev: str = "HEAD",
    force: bool = False,
    timeouts_s: dict[str, float] | None = None,
    keep_workspace: bool = False,
    default_overrides: dict[str, Any] | None = None,
    slot_timeout_s: float = DEFAULT_SLOT_TIMEOUT_S,
    num_gpus: int | None = None,
) -> dict[str, Any]:
    """Fine-tune, evaluate and register a QLoRA adapter: the DVC pipeline, run by Prefect.

    Args:
        overrides: params.yaml values for this run, by dotted key, e.g. {"train.learning_rate": 1e-4};
            merged over default_overrides, key by key.
        git_rev: the commit (branch, tag, sha) of the project to run; uncommitted edits are not used.
        force: reuse no earlier run's outputs, and run every stage even if DVC finds it up to date
            (`dvc repro --force`).
        timeouts_s: per-stage timeouts in seconds, e.g. {"train": 7200}; defaults in DEFAULT_TIMEOUTS_S.
        keep_workspace: keep the run's git worktree under .prefect/runs/ after the run (for debugging).
        default_overrides: the deployment's `-S` values (`python -m flows.deploy -S ...`); a run's
            `overrides` replace them per key, not as a whole.
        slot_timeout_s: how long a GPU stage waits for a slot of the GPU concurrency limit before the
            run fails (default 72 h).
        num_gpus: GPUs to train on (train.num_gpus; None keeps params'): the train stage holds that
            many slots of the host's GPU limit (one per GPU) and runs that many torchrun ranks.
    """
    logger = get_run_logger()
    project = workspace.project_root()
    if flow_run.id:
        prune_workspaces(project, flow_run.id)
    overrides = param_overrides.merge(default_overrides, overrides)
    if num_gpus is not None:
        overrides = {**overrides, "train.num_gpus": num_gpus}
    if default_overrides:
        logger.info("overrides: %s (the deployment's defaults, with this run's on top)", redact(json.dumps(overrides)))
    timeouts = _timeouts(timeouts_s)
    commit = workspace.resolve_commit(project, git_rev)
    if git_rev == "HEAD" and (dirty := workspace.uncommitted_changes(project)):
        logger.warning("running commit %s; uncommitted changes are not used: %s", commit[:10], ", ".join(dirty))

    cfg = validate_params(project, commit, overrides)
    host = host_gpus()  # GPU slots per stage, checked before anything runs
    slots = {stage: slots_for(stage, cfg.train.num_gpus, host) for stage in GPU_STAGES}
    run_id, run_name = flow_run.id or "local", flow_run.name or "local"
    experiment = f"{run_name}-{run_id[:8]}"
    uri, _ = connect_tracking(project, cfg.tracking.experiment)
    ws = checkout(project, run_id, commit, experiment, overrides, reuse=not force)
    record = RunRecord(
        flow_run_name=run_name, flow_run_id=run_id, commit=commit, experiment=experiment,
        overrides=overrides, tracking_uri=uri, git_remote=_git_remote(project),
        reused_from=ws.reused_from, reused_stages=list(ws.reused_stages),
    )
    try:
        extra_env = {
            "MLFLOW_TRACKING_URI": uri,  # the project's store, not one inside the checkout
            "QLORA_TAGS": json.dumps(_flow_run_tags(run_id, run_name, experiment)),
            RUN_NAME_ENV: experiment,  # the MLflow run is named as the DVC experiment: <flow run name>-<id8>
        }
        limit = gpu_limit_name()
        ensure_limit(limit, slots=max(1, host))
        try:
            for stage in STAGES:
                stage_task = STAGE_TASKS[stage].with_options(timeout_seconds=timeouts[stage])
                if stage in GPU_STAGES:
                    with gpu_slot(limit, stage, slot_timeout_s, occupy=slots[stage]):
                        record.stages.append(stage_task(ws, extra_env, force))
                else:
                    record.stages.append(stage_task(ws, extra_env, force))
                if stage == "train" and flow_run.id:
                    tag_flow_run(flow_run.id, ws)
        except Exception:
            save_finished_stages(ws, record.stages)
            raise
        record.experiment_commit = save_experiment(ws)
        return publish_summary(record, ws)
    finally:
        if keep_workspace:
            logger.info("kept workspace %s", ws.path)
        else:
            workspace.remove(ws)


def save_finished_stages(ws: Workspace, stages: list[StageResult]) -> None:
    """After a failed stage: save what the stages before it made as the run's DVC experiment, so the
    next run with the same inputs reuses it (a trained adapter is not trained again)."""
    if not any(s.status != "up to date" for s in stages):
        return  # nothing new: the outputs are an earlier experiment's, or there are none
    try:
        save_experiment(ws, [s.stage for s in stages])
    except Exception as exc:  # noqa: BLE001 - the stage's failure is the one to report
        get_run_logger().warning("could not save the finished stages (%s) as DVC experiment %s: %s",
                                 ", ".join(s.stage for s in stages), ws.experiment, exc)


def _git_remote(project: Path) -> str | None:
    try:
        return workspace.git(project, "remote", "get-url", "origin") or None
    except workspace.WorkspaceError:
        return None
