"""The model registry by hand: list a registered model's versions, move `champion`.

    qlora versions                                 # versions, aliases, gate metric, lineage
    qlora versions --name qlora-demo --json
    qlora promote --version 3 --reason "A/B test"  # logged on the version: who, when, why
    qlora promote --alias challenger --name qlora-demo

The model name defaults to register.model_name (auto: qlora-<base model name>).
"""

from __future__ import annotations

import getpass
import logging
import time

from mlflow import MlflowClient
from rich.console import Console
from rich.table import Table

from qlora_pipeline import registry, tracking
from qlora_pipeline.errors import RegistryError
from qlora_pipeline.stages.common import StageContext

log = logging.getLogger(__name__)


def _client(ctx: StageContext, name: str):
    from mlflow.exceptions import MlflowException

    tracking.setup(ctx.paths, ctx.cfg.tracking.experiment)
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RegistryError(
            f"registered model {name!r} does not exist (registered: {', '.join(known) or 'none'}); "
            "pass --name, or check register.model_name, or run the pipeline first"
        ) from None
    return client, model


def version_rows(ctx: StageContext, name: str) -> list[dict]:
    """One row per version, newest first: aliases, the gate's metric (tuned and base), lineage."""
    client, model = _client(ctx, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    metric = ctx.cfg.register.metric
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(mv.creation_timestamp / 1000)),
            "metric": metric,
            "tuned": _number(tags.get(f"eval.{metric}")),
            "base": _number(tags.get(f"eval.base_{metric}")),
            "gate": tags.get("gate", ""),
            "base_model": tags.get("base_model", ""),
            "dvc_experiment": tags.get("dvc_experiment", ""),
            "git_commit": short_commit(tags.get("git_commit", "")),
            "run_id": mv.run_id,
        })
    return sorted(rows, key=lambda r: -r["version"])


def short_commit(commit: str) -> str:
    """A commit as a table shows it: 12 hex digits, and `-dirty` kept (tracked files differed from it)."""
    dirty = commit.endswith("-dirty")
    return commit.removesuffix("-dirty")[:12] + ("-dirty" if dirty else "")


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def versions(ctx: StageContext, name: str | None, as_json: bool, console: Console | None = None) -> list[dict]:
    """`qlora versions`: print the table (or JSON) of a registered model's versions."""
    console = console or Console()
    if not console.is_terminal:  # piped or captured: one line per version, never wrapped
        console = Console(file=console.file, width=200)
    name = name or ctx.cfg.register.model_name
    rows = version_rows(ctx, name)
    if as_json:
        console.print_json(data=rows)
        return rows
    table = Table(title=f"{name}: {len(rows)} version(s)", title_justify="left")
    for column in ("version", "aliases", "created", f"{ctx.cfg.register.metric} tuned", "base", "gate", "base model", "experiment", "commit"):
        table.add_column(column, justify="right" if column in ("version", "base") or column.endswith("tuned") else "left", no_wrap=True)
    for r in rows:
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        gate = r["gate"].split(":", 1)[0]
        table.add_row(str(r["version"]), ", ".join(r["aliases"]), r["created"], fmt(r["tuned"]), fmt(r["base"]), gate, r["base_model"], r["dvc_experiment"], r["git_commit"])
    console.print(table)
    return rows


def promote_by_hand(ctx: StageContext, version: int | None, alias: str | None, reason: str, name: str | None = None) -> dict:
    """`qlora promote`: move champion to a version (or to the version another alias points to).

    Taken under the same lock as the register stage's gate, so a manual move and an automatic
    decision never interleave.

    Raises:
        RegistryError: the model, the alias or the version does not exist.
    """
    from mlflow.exceptions import MlflowException

    name = name or ctx.cfg.register.model_name
    client, model = _client(ctx, name)
    if alias:
        target = registry.alias_version(client, name, alias)
        if target is None:
            raise RegistryError(f"{name} has no alias {alias!r}; aliases in use: {', '.join(sorted(model.aliases or {})) or 'none'}")
        version = int(target.version)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version}; list them with `qlora versions --name {name}`") from None
    with registry.promotion_lock(name):
        previous = registry.alias_version(client, name, registry.CHAMPION)
        registry.promote(client, name, str(version), f"manual by {_user()}: {reason}")
    log.info("champion of %s: %s -> v%s (manual, %s)", name, f"v{previous.version}" if previous else "none", version, reason)
    return {"model_name": name, "champion_version": int(version), "previous": int(previous.version) if previous else None}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
