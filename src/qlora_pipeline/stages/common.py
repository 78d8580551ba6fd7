"""What every stage needs: the validated config, project paths, the base model's tokenizer."""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipeline.atomic import write_text_atomic
from qlora_pipeline.config import PipelineConfig, load_config
from qlora_pipeline.core.data.tokens import ensure_pad_token
from qlora_pipeline.core.data.store import load_prepared
from qlora_pipeline.core.model import ResolvedModel, load_tokenizer, resolve_model
from qlora_pipeline.paths import ProjectPaths


@dataclass(frozen=True)
class StageContext:
    cfg: PipelineConfig
    paths: ProjectPaths
    params_file: Path | None = None
    overrides: tuple[str, ...] = ()

    def cli_args(self, stage: str) -> list[str]:
        """The `qlora` arguments that run `stage` on these params again (as torchrun's ranks do)."""
        args = [stage, "--params", str(self.params_file or self.paths.root / "params.yaml")]
        for override in self.overrides:
            args += ["--set", override]
        return args


def context(params: str | Path = "params.yaml", overrides: list[str] | None = None) -> StageContext:
    """Load and validate params before anything else happens."""
    params = Path(params)
    cfg = load_config(params, overrides)
    return StageContext(cfg, ProjectPaths.at(params.resolve().parent), params.resolve(), tuple(overrides or ()))


def base_tokenizer(ctx: StageContext) -> tuple[ResolvedModel, Any]:
    """The resolved base model and its tokenizer, with a pad token distinct from EOS.

    When data.chat_template is set the tokenizer carries it, so every stage renders chats with the
    template training used, and every tokenizer saved with an output (adapter, merged model,
    registered model) holds it.
    """
    resolved = resolve_model(ctx.cfg.model, ctx.paths.cache, ctx.paths.root)
    tokenizer = load_tokenizer(ctx.cfg.model, resolved)
    if ctx.cfg.data.chat_template:  # before the pad token is picked: it must not be a token the template writes
        tokenizer.chat_template = ctx.cfg.data.chat_template
    ensure_pad_token(tokenizer)
    return resolved, tokenizer


def write_csv_atomic(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def release_checkpoints(paths: ProjectPaths) -> None:
    """Delete the checkpoints of the training whose adapter is in models/adapter.

    train keeps them after saving the adapter: if its process is stopped before DVC records the
    stage (a task timeout, a signal), the rerun finds the final step checkpointed and trains
    nothing. The next stage runs only once DVC has recorded train, so it deletes them.
    """
    try:
        name = json.loads(paths.run_info.read_text()).get("checkpoint_dir")
    except (OSError, ValueError):
        return
    if name and (paths.checkpoints / name).is_dir():
        shutil.rmtree(paths.checkpoints / name, ignore_errors=True)


def eval_split(ctx: StageContext, tokenizer: Any = None):
    """The prepared eval split, capped at evaluate.max_eval_rows: what evaluate and register score;
    given the tokenizer, checked to be tokenized by it (core/data/store.load_prepared)."""
    eval_ds = load_prepared(ctx.paths.prepared, "eval", tokenizer, ctx.cfg.model.name)
    if ctx.cfg.evaluate.max_eval_rows:
        eval_ds = eval_ds.select(range(min(ctx.cfg.evaluate.max_eval_rows, len(eval_ds))))
    return eval_ds
