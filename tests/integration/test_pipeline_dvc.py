"""The whole pipeline through `dvc repro` in a fresh copy of the repo, tracked by a real MLflow server."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from .conftest import SECRETS, SERVER_ROOTS, run

pytestmark = pytest.mark.integration

# metrics/register.json holds numbers only (so `dvc exp show` shows comparable columns); the text
# (model name, run id, reason) is in reports/register.json.
NUMERIC_REGISTER_KEYS = {
    "version", "promoted", "champion_version", "challenger_score", "champion_score", "beats_base",
    "beats_champion", "merge_max_abs_logit_diff", "merge_relative_diff",
}


def test_every_format_went_through(pipeline):
    project, _, _ = pipeline
    stats = json.loads((project / "data/prepared/stats.json").read_text())
    assert set(stats["formats"]) == {"instruction", "text", "chat", "sharegpt"}
    assert stats["rows_dropped"] == {} and stats["format"] == "mixed"
    assert len(stats["files"]) == 6


def test_repro_writes_every_output(pipeline):
    project, _, first = pipeline
    for stage in ("prepare", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    for rel in (
        "data/prepared/train.parquet", "data/prepared/eval.parquet", "metrics/data.json",
        "models/adapter/adapter_model.safetensors", "models/adapter/adapter_config.json",
        "models/adapter/tokenizer.json", "models/adapter/run.json", "metrics/train.json",
        "plots/train_loss.csv", "plots/token_lengths.csv", "metrics/eval.json", "reports/samples.md",
        "models/merged/model.safetensors", "metrics/register.json", "reports/register.json", "dvc.lock",
    ):
        assert (project / rel).is_file(), rel
    assert not list((project / "models").rglob("*.bin")) and not list((project / "models").rglob("*.pt"))


def test_tuned_beats_base_and_metrics_are_finite(pipeline):
    project, _, _ = pipeline
    metrics = json.loads((project / "metrics/eval.json").read_text())
    for key in ("eval_loss", "base_eval_loss", "perplexity", "base_perplexity", "chrf", "exact_match"):
        assert math.isfinite(metrics[key]), key
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["global_step"] == 12 and train["run_tokens_per_second"] > 0
    # the plan that trained (core/fast/ may change micro-batch and recompute), in the file and the run
    assert train["plan_micro_batch_size"] * train["plan_gradient_accumulation_steps"] == 8
    assert train["plan_num_layers"] == 2 and 0 <= train["plan_recomputed_layers"] <= 2 and train["plan_measured_peak_gib"] > 0
    from mlflow import MlflowClient

    run_id = json.loads((project / "models/adapter/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=pipeline[1]["MLFLOW_TRACKING_URI"])
    tags = client.get_run(run_id).data.tags
    assert tags["plan.recomputed_layers"] == str(train["plan_recomputed_layers"]) and tags["plan.attention"]
    # the per-step rate is one series of training steps; the run's mean has a name of its own
    assert min(m.step for m in client.get_metric_history(run_id, "tokens_per_second")) >= 1
    assert [m.value for m in client.get_metric_history(run_id, "run_tokens_per_second")] == [train["run_tokens_per_second"]]
    assert client.get_metric_history(run_id, "train_tokens_per_second") == []  # the Trainer's, this process only
    lines = (project / "plots/train_loss.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss") and len(lines) == 1 + 7  # first step + every 2nd of 12


def test_registered_version_has_aliases_and_lineage(pipeline, mlflow_server):
    from mlflow import MlflowClient

    project, _, _ = pipeline
    register = json.loads((project / "reports/register.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version("qlora-test", str(register["version"]))
    assert client.get_model_version_by_alias("qlora-test", "challenger").version == version.version
    assert register["promoted"] is True  # first version, beats the base
    assert client.get_model_version_by_alias("qlora-test", "champion").version == version.version
    tags = version.tags
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    raw_md5 = next(d["md5"] for d in lock["stages"]["prepare"]["deps"] if d["path"] == "data/raw")
    assert tags["dvc_data_hash"] == raw_md5
    assert len(tags["git_commit"].split("-")[0]) == 40
    assert tags["base_model"] == "builtin:tiny-llama" and tags["base_model_revision"] == "builtin-v1"
    assert json.loads(tags["params"])["lora"]["r"] == 16
    assert float(tags["merge_relative_diff"]) <= float(tags["merge_tolerance"])
    run_data = client.get_run(register["run_id"]).data
    assert run_data.params["lora.r"] == "16" and "eval_loss" in run_data.metrics
    artifacts = {a.path for a in client.list_artifacts(register["run_id"], "data")}
    assert {"data/report.json", "data/stats.json", "data/token_lengths.png"} <= artifacts
    assert run_data.metrics["data_rows_train"] > 0
    history = client.get_metric_history(register["run_id"], "loss")
    assert [m.step for m in history] == [1, 2, 4, 6, 8, 10, 12]


def test_registered_model_loads_by_alias(pipeline, mlflow_server):
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    components = mlflow.transformers.load_model("models:/qlora-test@champion", return_type="components")
    assert components["model"].config.model_type == "llama"
    assert components["tokenizer"].eos_token == "</s>"


def test_no_secret_is_recorded_anywhere(pipeline, mlflow_server):
    from mlflow import MlflowClient

    project, _, first = pipeline
    needles = [SECRETS["HF_TOKEN"], SECRETS["MLFLOW_TRACKING_PASSWORD"]]
    # Everything the pipeline wrote (the copied test sources hold the fake secrets by design).
    places = [p for p in project.rglob("*") if p.is_file() and not {".git", "tests"} & set(p.relative_to(project).parts)]
    places += [p for p in SERVER_ROOTS[mlflow_server].rglob("*") if p.is_file()]
    assert len(places) > 30
    for path in places:
        data = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, f"secret found in {path}"
    for needle in needles:
        assert needle not in first.stdout + first.stderr
    client = MlflowClient(tracking_uri=mlflow_server)
    register = json.loads((project / "reports/register.json").read_text())
    record = client.get_run(register["run_id"]).data
    dumped = json.dumps([record.params, record.tags, client.get_model_version("qlora-test", str(register["version"])).tags])
    for needle in needles:
        assert needle not in dumped


def test_report_summarises_the_run(pipeline):
    project, env, _ = pipeline
    out = run(["qlora", "report"], project, env).stdout
    assert "eval_loss" in out and "base" in out and "registered qlora-test v1" in out


def test_second_repro_runs_nothing(pipeline, mlflow_server):
    from mlflow import MlflowClient

    project, env, _ = pipeline
    client = MlflowClient(tracking_uri=mlflow_server)
    runs_before = len(client.search_runs(client.search_experiments()[0].experiment_id))
    again = run(["dvc", "repro"], project, env)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    assert len(client.search_runs(client.search_experiments()[0].experiment_id)) == runs_before


def test_changing_a_train_param_reruns_train_not_prepare(pipeline, mlflow_server):
    from mlflow import MlflowClient

    project, env, _ = pipeline
    head = run(["git", "rev-parse", "HEAD"], project, env).stdout.strip()
    result = run(["dvc", "exp", "run", "-n", "lr-002", "-S", "train.learning_rate=0.002"], project, env)
    out = result.stdout
    assert "Running stage 'prepare'" not in out
    for stage in ("train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    register = json.loads((project / "reports/register.json").read_text())
    assert register["version"] == 2
    assert register["champion_version"] == (2 if register["promoted"] else 1)
    assert set(json.loads((project / "metrics/register.json").read_text())) <= NUMERIC_REGISTER_KEYS
    # Lineage that resolves: the run is named after the experiment, the commit is its baseline.
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    mlflow_run = client.get_run(register["run_id"])
    assert mlflow_run.info.run_name == "lr-002"
    assert mlflow_run.data.tags["dvc_experiment"] == "lr-002"
    assert mlflow_run.data.tags["git_commit"] == head  # not "-dirty": the experiment holds the params
    version_tags = client.get_model_version("qlora-test", "2").tags
    assert version_tags["dvc_experiment"] == "lr-002" and version_tags["git_commit"] == head
    assert "lr-002" in run(["dvc", "exp", "list", "--name-only"], project, env).stdout.split()
