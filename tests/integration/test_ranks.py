"""Several ranks (torchrun, data-parallel) on the CPU with gloo, through `dvc repro`: the same
result as one rank, records kept by rank 0 alone, and a killed rank resumed from the last complete
checkpoint with the whole adapter."""

from __future__ import annotations

import csv
import json
import signal

import psutil
import pytest
import torch
from safetensors.torch import load_file

from .conftest import make_project, project_env, run
from .test_reliability import checkpoints, finish, start, wait_for

pytestmark = pytest.mark.integration

STEPS = 24
# 36 training rows, 2 x 2 per step: every epoch ends on a step for 1 and for 2 ranks alike, so
# both see the same micro-batches in every step. No LoRA dropout: its masks come from each rank's
# own generator, the one thing that differs between 1 and 2 ranks.
PARAMS = {
    "train.num_gpus": 2,
    "train.per_device_batch_size": 2,
    "train.gradient_accumulation_steps": 2,
    "train.max_steps": STEPS,
    "train.save_steps": 4,
    "train.save_total_limit": 3,
    "train.logging_steps": 1,
    "lora.dropout": 0.0,
    "evaluate.num_samples": 0,
}
# Measured: 1 and 2 ranks give bit-identical losses and adapters on this machine (gloo sums two
# gradients; the one rank adds the same two micro-batches). The tolerance leaves room for another
# reduction order elsewhere.
TOLERANCE = 1e-5


def losses(project) -> dict[int, float]:
    with open(project / "plots/train_loss.csv") as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


def adapter(project) -> dict[str, torch.Tensor]:
    return load_file(project / "models/adapter/adapter_model.safetensors")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, mlflow_server):
    """An uninterrupted training on 2 CPU ranks, through dvc repro."""
    project = make_project(tmp_path_factory.mktemp("ranks"), {**PARAMS, "tracking.experiment": "two-ranks", "register.model_name": "qlora-ranks"})
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server)
    out = run(["dvc", "repro", "train"], project, env)
    return {
        "project": project,
        "env": env,
        "log": out.stdout + out.stderr,
        "run_id": json.loads((project / "models/adapter/run.json").read_text())["run_id"],
        "losses": losses(project),
        "adapter": adapter(project),
        "metrics": json.loads((project / "metrics/train.json").read_text()),
    }


def test_two_ranks_train_as_one(two_ranks):
    project, env = two_ranks["project"], two_ranks["env"]
    run(["qlora", "train", "-S", "train.num_gpus=1"], project, env)
    one, two = losses(project), two_ranks["losses"]
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    assert all(abs(one[s] - two[s]) <= TOLERANCE * abs(one[s]) for s in one), (one, two)
    single = adapter(project)
    assert single.keys() == two_ranks["adapter"].keys()
    assert max(float((single[k] - two_ranks["adapter"][k]).abs().max()) for k in single) <= TOLERANCE
    # the same global batch: 2 x 2 on one rank, 2 x 1 on each of two
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert (metrics["plan_ranks"], metrics["plan_gradient_accumulation_steps"]) == (1, 2)
    assert (two_ranks["metrics"]["plan_ranks"], two_ranks["metrics"]["plan_gradient_accumulation_steps"]) == (2, 1)


def test_only_rank_zero_keeps_records(two_ranks, mlflow_server):
    from mlflow import MlflowClient

    log = two_ranks["log"]
    assert "training on 2 ranks (CPU processes, gloo)" in log
    assert log.count(f"training step {STEPS}/{STEPS}") == 1  # progress from rank 0 alone
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("two-ranks")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs if r.data.params.get("train.num_gpus") == "2"] == [two_ranks["run_id"]]
    record = client.get_run(two_ranks["run_id"])
    assert record.info.status == "FINISHED"
    assert record.data.tags["plan.ranks"] == "2"
    assert [m.step for m in client.get_metric_history(two_ranks["run_id"], "loss")] == list(range(1, STEPS + 1))


def rank_processes(root: psutil.Process) -> dict[int, psutil.Process]:
    """The ranks torchrun started under root, by rank."""
    ranks = {}
    for proc in root.children(recursive=True):
        try:
            environ = proc.environ()
        except psutil.Error:
            continue
        if "RANK" in environ and "qlora_pipeline.cli" in " ".join(proc.cmdline()):
            ranks[int(environ["RANK"])] = proc
    return ranks


def test_a_killed_rank_resumes_from_the_last_complete_checkpoint(tmp_path, mlflow_server, two_ranks):
    from mlflow import MlflowClient

    project = make_project(tmp_path, {**PARAMS, "tracking.experiment": "killed-rank", "register.model_name": "qlora-killed-rank"})
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server)
    proc = start(["dvc", "repro", "train"], project, env)
    wait_for(lambda: len(checkpoints(project)) >= 2 and (checkpoints(project)[-1] / "trainer_state.json").exists(), 300, "two checkpoints", proc)
    ranks = rank_processes(psutil.Process(proc.pid))
    assert sorted(ranks) == [0, 1]
    for p in ranks.values():  # hold both where they are, then kill rank 1 hard: no handler runs
        p.send_signal(signal.SIGSTOP)
    ranks[1].send_signal(signal.SIGKILL)
    ranks[0].send_signal(signal.SIGCONT)
    out = finish(proc, 120)
    assert proc.returncode != 0
    assert "rank 1 of 2 ended without an error of its own" in out, out[-3000:]
    assert not (project / "models/adapter/adapter_model.safetensors").exists()
    run_id = json.loads(next(project.glob("checkpoints/*/mlflow_run.json")).read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(run_id).info.status != "RUNNING"  # rank 0 was stopped, and said so
    last = checkpoints(project)[-1].name

    again = run(["dvc", "repro", "train"], project, env)
    assert "resuming from" in again.stdout + again.stderr and last in again.stdout + again.stderr
    resumed, reference = adapter(project), two_ranks["adapter"]
    assert resumed.keys() == reference.keys()  # the whole adapter, from one save on rank 0
    assert max(float((resumed[k] - reference[k]).abs().max()) for k in reference) <= TOLERANCE
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, STEPS + 1))  # no gap, no duplicate
