"""Several ranks (torchrun, data-parallel) on the CPU with gloo, through `dvc repro`: a killed rank
ends the job with its name, the rerun resumes from the last complete checkpoint with the whole
adapter, rank 0 alone keeps the records, and the result is that of one rank."""

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


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, mlflow_server):
    """A training on 2 CPU ranks through dvc repro, rank 1 killed hard after two checkpoints, then
    `dvc repro` again, which resumes it."""
    project = make_project(tmp_path_factory.mktemp("ranks"), {**PARAMS, "tracking.experiment": "two-ranks", "register.model_name": "qlora-ranks"})
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server)
    proc = start(["dvc", "repro", "train"], project, env)
    wait_for(lambda: len(checkpoints(project)) >= 2 and (checkpoints(project)[-1] / "trainer_state.json").exists(), 300, "two checkpoints", proc)
    ranks = rank_processes(psutil.Process(proc.pid))
    assert sorted(ranks) == [0, 1]
    for p in ranks.values():  # hold both where they are, then kill rank 1 hard: no handler runs
        p.send_signal(signal.SIGSTOP)
    ranks[1].send_signal(signal.SIGKILL)
    ranks[0].send_signal(signal.SIGCONT)
    killed = finish(proc, 120)
    run_id = json.loads(next(project.glob("checkpoints/*/mlflow_run.json")).read_text())["run_id"]
    from mlflow import MlflowClient

    after_kill = MlflowClient(tracking_uri=mlflow_server).get_run(run_id)
    state = {
        "project": project, "env": env, "killed": killed, "killed_code": proc.returncode, "run_id": run_id,
        "status_after_kill": after_kill.info.status,
        "reason_after_kill": after_kill.data.tags.get("failure_reason", ""), "last_checkpoint": checkpoints(project)[-1].name,
        "adapter_after_kill": (project / "models/adapter/adapter_model.safetensors").exists(),
    }
    again = run(["dvc", "repro", "train"], project, env)
    state.update(
        log=again.stdout + again.stderr,
        losses=losses(project),
        adapter=adapter(project),
        metrics=json.loads((project / "metrics/train.json").read_text()),
    )
    return state


def test_a_killed_rank_ends_the_job_with_its_name(two_ranks):
    assert two_ranks["killed_code"] != 0
    assert "rank 1 of 2 ended without an error of its own" in two_ranks["killed"], two_ranks["killed"][-3000:]
    assert not two_ranks["adapter_after_kill"]
    assert two_ranks["status_after_kill"] != "RUNNING"  # rank 0 was stopped, and said so
    assert two_ranks["reason_after_kill"].startswith("rank 1 of 2 ended without an error of its own")
    assert "MarkupError" not in two_ranks["killed"]


def test_the_rerun_resumes_from_the_last_complete_checkpoint(two_ranks, mlflow_server):
    from mlflow import MlflowClient

    log = two_ranks["log"]
    assert "training on 2 ranks (CPU processes, gloo, ddp)" in log
    assert "resuming from" in log and two_ranks["last_checkpoint"] in log
    assert log.count(f"training step {STEPS}/{STEPS}") == 1  # progress from rank 0 alone
    client = MlflowClient(tracking_uri=mlflow_server)
    record = client.get_run(two_ranks["run_id"])
    assert record.info.status == "FINISHED"
    assert record.data.tags["plan.ranks"] == "2"
    # one run, each step logged once: no gap, no duplicate across the kill
    assert [m.step for m in client.get_metric_history(two_ranks["run_id"], "loss")] == list(range(1, STEPS + 1))
    experiment = client.get_experiment_by_name("two-ranks")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [two_ranks["run_id"]]


def test_two_ranks_train_as_one(two_ranks):
    """The killed and resumed 2-rank run against one uninterrupted rank: the whole adapter (saved
    once, by rank 0), the same losses and weights."""
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
