"""The markdown a flow run publishes: base vs tuned metrics, the registered version, and links
to the MLflow run and the DVC experiment (credentials in the tracking URI masked)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from flows.dvc_stage import StageResult
from flows.redact import redact

MLFLOW_UI_ENV = "MLFLOW_UI_URL"
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # `make ui` serves the local SQLite store here


@dataclass
class RunRecord:
    """What one flow run did, gathered from the stages' outputs."""

    flow_run_name: str
    flow_run_id: str
    commit: str
    experiment: str
    experiment_commit: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    stages: list[StageResult] = field(default_factory=list)
    run_info: dict[str, Any] = field(default_factory=dict)
    """models/adapter/run.json: the MLflow run id and experiment id."""
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    """metrics/eval.json"""
    register: dict[str, Any] = field(default_factory=dict)
    """reports/register.json: the registered name, version, gate verdict and reason (metrics/register.json,
    numbers only, where a register stage wrote no report)."""
    tracking_uri: str = ""
    git_remote: str | None = None
    reused_from: str | None = None
    """The saved experiment (or "dvc.lock") whose outputs the run reused for reused_stages."""
    reused_stages: list[str] = field(default_factory=list)


def mlflow_ui_base(tracking_uri: str) -> str:
    """Where a person opens the MLflow UI for this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return os.environ.get(MLFLOW_UI_ENV, LOCAL_MLFLOW_UI).rstrip("/")


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{mlflow_ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_version_url(tracking_uri: str, model_name: str, version: int | str) -> str:
    return f"{mlflow_ui_base(tracking_uri)}/#/models/{model_name}/versions/{version}"


def commit_url(remote: str | None, sha: str) -> str | None:
    """A web link to a commit for GitHub/GitLab-style remotes; None for anything else."""
    if not remote:
        return None
    m = re.match(r"^(?:https://|git@)([^/:]+)[/:](.+?)(?:\.git)?/?$", remote)
    if not m or not any(host in m.group(1) for host in ("github", "gitlab")):
        return None
    sep = "/-/commit/" if "gitlab" in m.group(1) else "/commit/"
    return f"https://{m.group(1)}/{m.group(2)}{sep}{sha}"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_table(eval_metrics: dict[str, Any]) -> list[str]:
    """One row per metric that has a `base_` twin: base, tuned and the change."""
    rows = ["| metric | base | tuned | change |", "|---|---:|---:|---:|"]
    for key, tuned in eval_metrics.items():
        base = eval_metrics.get(f"base_{key}")
        if key.startswith("base_") or base is None:
            continue
        change = tuned - base if isinstance(tuned, (int, float)) and isinstance(base, (int, float)) else ""
        rows.append(f"| {key} | {_number(base)} | {_number(tuned)} | {_number(change) if change != '' else ''} |")
    return rows


def render(record: RunRecord) -> str:
    """The markdown, with the credentials of any URI in it (the tracking URI's links) masked."""
    return redact(_render(record))


def _render(record: RunRecord) -> str:
    reg, info = record.register, record.run_info
    lines = [f"# QLoRA pipeline run `{record.flow_run_name}`", ""]

    if record.eval_metrics:
        lines += ["## Evaluation (base vs tuned)", "", *metrics_table(record.eval_metrics), ""]
        if "eval_rows" in record.eval_metrics:
            lines += [f"Scored on {record.eval_metrics['eval_rows']} eval rows.", ""]

    if reg:
        name, version = reg.get("model_name"), reg.get("version")
        version_link = f"[{name} v{version}]({mlflow_version_url(record.tracking_uri, name, version)})" if name else f"v{version}"
        if reg.get("promoted"):
            verdict = "**promoted to `champion`**"
        elif reg.get("champion_version") == version:
            verdict = "**already `champion`**"
        else:
            champion = reg.get("champion_version")
            verdict = f"**not promoted** (champion stays v{champion})" if champion else "**not promoted**"
        if "register" in record.reused_stages:  # the record is the earlier run's, restored with its outputs
            verdict += " by the earlier run with the same inputs; this run registered nothing"
        lines += ["## Registered model", "", f"- Version: {version_link}, alias `challenger`; {verdict}"]
        if reg.get("reason"):
            lines.append(f"- Gate: {reg['reason']}")
        lines.append("")

    lines += ["## Lineage", ""]
    if info.get("run_id"):
        url = mlflow_run_url(record.tracking_uri, str(info.get("experiment_id", "0")), info["run_id"])
        lines.append(f"- MLflow run: [{info['run_id']}]({url})")
    if record.experiment_commit:
        lines.append(
            f"- DVC experiment: `{record.experiment}` (commit `{record.experiment_commit[:10]}`): "
            f"`dvc exp show`, `dvc exp apply {record.experiment}`"
        )
    link = commit_url(record.git_remote, record.commit)
    commit = f"[`{record.commit[:10]}`]({link})" if link else f"`{record.commit[:10]}`"
    lines.append(f"- Code: git commit {commit}")
    lines.append(f"- Prefect flow run: `{record.flow_run_id}`")
    if record.overrides:
        lines.append("- Overrides: " + ", ".join(f"`{k}={v}`" for k, v in record.overrides.items()))
    if record.reused_stages:
        source = "the commit's dvc.lock" if record.reused_from == "dvc.lock" else f"DVC experiment `{record.reused_from}`"
        lines.append(f"- Reused from {source} (same data, code and params): {', '.join(record.reused_stages)}")
    lines.append("")

    if record.stages:
        lines += ["## Stages", "", "| stage | result | seconds |", "|---|---|---:|"]
        lines += [f"| {s.stage} | {s.status} | {s.duration_s:.1f} |" for s in record.stages]
        if any(s.status != "ran" for s in record.stages):
            lines += ["", "Stages that did not run were up to date (outputs reused, see Lineage) or restored from "
                      "DVC's run cache: their outputs (and MLflow run) are those of the earlier run with the same inputs."]
        lines.append("")
    return "\n".join(lines)
