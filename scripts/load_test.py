"""Load test of the team stack: many tiny-model pipeline runs through one Prefect deployment, a few at
once, then a check that the servers' records agree. Not part of the test suite (20 runs take
about half an hour on 2 CPU cores).

    make stack-up && set -a && . .stack/client.env && set +a
    make data && scripts/prefect-worker.sh &              # a worker on the pool `gpu`, this checkout
    python scripts/load_test.py --runs 20 --concurrency 2 --out benchmarks/results/team_stack_load.json

It deploys `qlora-pipeline/load` (the built-in tiny model, registered as `qlora-load`, at most
`--concurrency` runs at once), queues `--runs` runs with distinct `train.seed` values (each trains,
so each registers a version), samples the Running count every 2 s while they go, and then checks:
every run Completed; exactly one registry version per run (tag prefect.flow_run_id); one
`champion`; no MLflow run and no Prefect flow run of the deployment left RUNNING. Prints the wall
time, each run's time and the task retries; exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "qlora-load"
DEPLOYMENT = "load"
TINY = {  # the test suite's tiny-model schedule (tests/integration/conftest.py TINY_PARAMS)
    "model.name": "builtin:tiny-llama", "register.model_name": MODEL, "data.max_seq_len": 96,
    "train.epochs": 1, "train.max_steps": 12, "train.learning_rate": 0.003, "train.warmup_steps": 0,
    "train.logging_steps": 2, "train.save_steps": 6, "evaluate.num_samples": 3, "evaluate.max_new_tokens": 8,
    "evaluate.max_eval_rows": 24,
}


def deploy(project: Path, concurrency: int) -> None:
    """`python -m flows.deploy --name load` with the tiny model and the run limit."""
    sets = [arg for key, value in TINY.items() for arg in ("-S", f"{key}={value}")]
    cmd = [sys.executable, "-m", "flows.deploy", "--quiet", "--name", DEPLOYMENT,
           "--concurrency-limit", str(concurrency), *sets]
    subprocess.run(cmd, cwd=project, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--project", type=Path, default=ROOT)
    parser.add_argument("--timeout-s", type=float, default=3 * 3600)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        if not os.environ.get(name):
            print(f"load_test: {name} is not set: start the stack (make stack-up) and "
                  "`set -a; . .stack/client.env; set +a`", file=sys.stderr)
            return 2

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    deploy(args.project, args.concurrency)
    started = time.monotonic()
    ids = [run_deployment(f"qlora-pipeline/{DEPLOYMENT}", parameters={"overrides": {"train.seed": 1000 + i}},
                          timeout=0, as_subflow=False).id for i in range(args.runs)]
    max_running, finals = 0, {}
    with get_client(sync_client=True) as prefect:
        while len(finals) < len(ids) and time.monotonic() - started < args.timeout_s:
            runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            max_running = max(max_running, sum(r.state is not None and r.state.is_running() for r in runs))
            finals = {r.id: r for r in runs if r.state is not None and r.state.is_final()}
            time.sleep(2)
        wall_s = time.monotonic() - started
        deployment_id = prefect.read_deployment_by_name(f"qlora-pipeline/{DEPLOYMENT}").id
        open_runs = [r for r in prefect.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            if r.state is not None and not r.state.is_final() and not r.state.is_scheduled()]
        retries = {}
        for run_id in ids:
            tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            retried = {t.name.rsplit("-", 1)[0]: t.run_count - 1 for t in tasks if t.run_count > 1}
            if retried:
                retries[str(run_id)] = retried

    mlflow = MlflowClient()
    versions = mlflow.search_model_versions(f"name='{MODEL}'")
    per_run = {str(i): [v.version for v in versions if v.tags.get("prefect.flow_run_id") == str(i)] for i in ids}
    aliases = mlflow.get_registered_model(MODEL).aliases
    experiment = mlflow.get_experiment_by_name("qlora-pipeline")
    running = mlflow.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
    durations = sorted(round((r.end_time - r.start_time).total_seconds(), 1)
                       for r in finals.values() if r.start_time and r.end_time)
    figures = {
        "runs": len(ids), "concurrency_limit": args.concurrency, "wall_s": round(wall_s, 1),
        "states": {name: sum(r.state.name == name for r in finals.values()) for name in {r.state.name for r in finals.values()}},
        "not_finished": len(ids) - len(finals), "max_running_seen": max_running,
        "run_s": {"min": durations[0] if durations else None, "median": durations[len(durations) // 2] if durations else None,
                  "max": durations[-1] if durations else None},
        "versions_per_run": sorted({len(v) for v in per_run.values()}), "versions_total": len(versions),
        "champion": aliases.get("champion"), "mlflow_runs_left_running": len(running),
        "prefect_runs_left_open": len(open_runs), "task_retries": retries,
    }
    checks = {
        "all Completed": figures["states"] == {"Completed": len(ids)},
        "one version per run": figures["versions_per_run"] == [1],
        "one champion": figures["champion"] is not None,
        f"at most {args.concurrency} running at once": max_running <= args.concurrency,
        "no RUNNING MLflow run": not running,
        "no open Prefect run": not open_runs,
    }
    figures["checks"] = checks
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    failed = [name for name, ok in checks.items() if not ok]
    print(f"wall {wall_s:.0f}s for {len(ids)} runs; " + ("all checks passed" if not failed else f"FAILED: {failed}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
