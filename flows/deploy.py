"""Deploy the pipeline flow to a work pool named for its hardware.

    export PREFECT_API_URL=http://127.0.0.1:4200/api      # scripts/prefect-server.sh prints it
    python -m flows.deploy                                 # process pool `gpu`, deployment `gpu`
    python -m flows.deploy -S train.epochs=2 --cron "0 3 * * 1" --activate-schedule
    python -m flows.deploy --docker-image qlora-worker:latest   # deployment `gpu-docker`, Docker pool `gpu-docker`

    prefect worker start --pool gpu                        # on the GPU box, in this checkout
    prefect deployment run qlora-pipeline/gpu -p overrides='{"train.learning_rate": 1e-4}'

The deployment runs this checkout's committed code (process pool) or the image's (Docker pool),
with at most `--concurrency-limit` runs at once (default 1; more are queued, not dropped) and an
example cron schedule that stays paused until you turn it on in the UI or pass --activate-schedule.
`-S` values are the deployment's `default_overrides`: a run's `overrides` replace them key by key.
Deploying also creates (or updates) the automation that marks a run Crashed when its heartbeats
stop (a killed worker), which frees the deployment's run slot for the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from flows import prefect_env

PROJECT = Path(__file__).resolve().parents[1]
prefect_env.apply(PROJECT)

from prefect.client.orchestration import get_client  # noqa: E402  (settings above come first)
from prefect.client.schemas.actions import WorkPoolCreate  # noqa: E402
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, StateType  # noqa: E402
from prefect.events.actions import ChangeFlowRunState  # noqa: E402
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture  # noqa: E402
from prefect.exceptions import ObjectNotFound  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

ENTRYPOINT = "flows/pipeline.py:qlora_pipeline"
FLOW_NAME = "qlora-pipeline"
CRASH_AUTOMATION = "qlora-pipeline: crash runs without heartbeats"
EXAMPLE_CRON = "0 3 * * 1"  # Mondays 03:00: a weekly retrain on whatever data/raw holds then
IMAGE_WORKDIR = "/opt/qlora"  # the Dockerfile's WORKDIR


def docker_job_variables(project_on_host: str, gpu_limit: str) -> dict[str, Any]:
    """Job variables for a Docker work pool (prefect-docker): all GPUs, the checkout mounted in.

    The host checkout (its DVC cache, mlflow/ store and .prefect/runs) is mounted over the image's
    copy of the project, so runs keep their data, cache and registry between containers.
    """
    return {
        "image_pull_policy": "IfNotPresent",
        "auto_remove": True,
        "volumes": [f"{project_on_host}:{IMAGE_WORKDIR}", "qlora-hf-cache:/home/qlora/.cache/huggingface"],
        "env": {"QLORA_GPU_LIMIT": gpu_limit, **heartbeat_env()},
        # docker-py turns each dict into a DeviceRequest: `docker run --gpus all`.
        "container_create_kwargs": {
            "device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}],
            "shm_size": "8g",  # dataloader workers share batches through /dev/shm
        },
    }


def run_in_directory(deployment_id, directory: str) -> None:
    """Flow runs start in `directory` itself (the mounted checkout), through a pull step.

    Without one, Prefect copies the container's working directory into a temporary folder for each
    flow run and runs there: the run's DVC cache, MLflow store and saved experiment would go with
    the container.
    """
    from prefect.client.schemas.actions import DeploymentUpdate

    step = {"prefect.deployments.steps.set_working_directory": {"directory": directory}}
    with get_client(sync_client=True) as client:
        client.update_deployment(deployment_id, DeploymentUpdate(pull_steps=[step]))


def heartbeat_env() -> dict[str, str]:
    """Flow runs send heartbeats as often as the crash automation expects them."""
    return {prefect_env.HEARTBEAT_ENV: str(prefect_env.HEARTBEAT_S)}


def crash_automation(crashed_after_s: float = prefect_env.CRASHED_AFTER_S) -> AutomationCore:
    """Prefect's documented zombie-run automation, for this flow's runs: a run that sent a heartbeat
    and then nothing (no heartbeat, no state change) for crashed_after_s is set Crashed."""
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=f"A {FLOW_NAME} run whose worker or process died stops sending heartbeats "
                    f"(every {prefect_env.HEARTBEAT_S}s); mark it Crashed, which frees its deployment's run slot.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crashed_after_s),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {crashed_after_s:.0f}s: the flow-run process or its worker died",
        )],
    )


def ensure_crash_automation() -> str:
    """Create the crash automation, or bring an existing one of that name up to date; returns its id."""
    automation = crash_automation()
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(automation.name)
        if existing:
            client.update_automation(existing[0].id, automation)
            return str(existing[0].id)
        return str(client.create_automation(automation))


def ensure_process_pool(name: str) -> None:
    """Create a process work pool with Prefect's default job template if it does not exist."""
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
            )


def require_docker_pool(name: str) -> None:
    """The pool must exist, be a Docker pool, and pass `container_create_kwargs` (the GPU request) on."""
    create = f"`pip install prefect-docker && prefect work-pool create {name} --type docker --overwrite`"
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            raise SystemExit(f"error: work pool {name!r} does not exist; create it with {create}") from None
    if pool.type != "docker":
        raise SystemExit(f"error: work pool {name!r} is of type {pool.type!r}, not 'docker'")
    # A pool created without prefect-docker installed gets an older template that drops this
    # variable, and with it the GPU device request.
    if "container_create_kwargs" not in pool.base_job_template.get("variables", {}).get("properties", {}):
        raise SystemExit(f"error: work pool {name!r} has no `container_create_kwargs` variable; recreate it with {create}")


def deploy(
    pool: str = "gpu",
    name: str = "gpu",
    overrides: dict[str, Any] | None = None,
    cron: str = EXAMPLE_CRON,
    timezone: str = "UTC",
    activate_schedule: bool = False,
    concurrency_limit: int | None = 1,
    docker_image: str | None = None,
    project_on_host: str | None = None,
    gpu_limit: str | None = None,
    tags: list[str] | None = None,
    quiet: bool = False,
) -> str:
    """Create or update the deployment; returns its id."""
    from flows.pipeline import qlora_pipeline
    from flows.slots import gpu_limit_name

    common: dict[str, Any] = dict(
        name=name,
        work_pool_name=pool,
        # A run's `overrides` are merged over these per key by the flow (Prefect would replace the
        # whole dict), so a run that sets lora.r keeps the deployment's model.
        parameters={"default_overrides": overrides or {}, "overrides": {}},
        schedules=[Cron(cron, timezone=timezone, active=activate_schedule, slug="example-cron")],
        concurrency_limit=(
            ConcurrencyLimitConfig(limit=concurrency_limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
            if concurrency_limit
            else None
        ),
        tags=tags or ["qlora", pool],
        description="QLoRA fine-tune: prepare -> train -> evaluate -> register, each `dvc repro`.",
        print_next_steps=not quiet,
        ignore_warnings=True,
    )
    # Prefect prints a summary table whatever print_next_steps says.
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        if docker_image:
            require_docker_pool(pool)
            variables = docker_job_variables(project_on_host or str(PROJECT), gpu_limit or gpu_limit_name())
            deployment_id = qlora_pipeline.deploy(image=docker_image, build=False, push=False, job_variables=variables, **common)
            run_in_directory(deployment_id, IMAGE_WORKDIR)
        else:
            ensure_process_pool(pool)
            source = qlora_pipeline.from_source(source=str(PROJECT), entrypoint=ENTRYPOINT)
            deployment_id = source.deploy(job_variables={"env": heartbeat_env()}, **common)
    ensure_crash_automation()
    return str(deployment_id)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", help="work pool (default: gpu, or gpu-docker with --docker-image)")
    parser.add_argument("--name", help="deployment name (default: the pool's name)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="default param override for every run, e.g. -S train.epochs=2 (repeatable)")
    parser.add_argument("--cron", default=EXAMPLE_CRON, help=f"schedule (default: {EXAMPLE_CRON!r}, paused)")
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--activate-schedule", action="store_true", help="turn the schedule on (default: paused)")
    parser.add_argument("--concurrency-limit", type=int, default=1,
                        help="runs of this deployment at once; more are queued (default: 1; 0: no limit)")
    parser.add_argument("--docker-image", help="deploy to a Docker work pool running this image (build: see Dockerfile)")
    parser.add_argument("--project-on-host", help="checkout to mount into the container (default: this one)")
    parser.add_argument("--gpu-limit", help="global concurrency limit the GPU stages hold (default: gpu-<hostname>)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qlora_pipeline.errors import ConfigError

    from flows import overrides as param_overrides
    from flows import workspace

    try:
        overrides = param_overrides.parse(args.overrides)
        workspace.validate_overrides(PROJECT, workspace.resolve_commit(PROJECT, "HEAD"), overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pool = args.pool or ("gpu-docker" if args.docker_image else "gpu")
    deployment_id = deploy(
        pool=pool, name=args.name or pool, overrides=overrides, cron=args.cron, timezone=args.timezone,
        activate_schedule=args.activate_schedule, concurrency_limit=args.concurrency_limit or None,
        docker_image=args.docker_image, project_on_host=args.project_on_host, gpu_limit=args.gpu_limit,
        quiet=args.quiet,
    )
    print(deployment_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
