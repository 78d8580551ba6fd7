"""prepare: raw files -> validated, tokenized train/eval splits, stats and a validation report.

    qlora prepare            # as `dvc repro prepare` runs it
"""

from __future__ import annotations

import logging
from qlora_pipeline.atomic import write_json_atomic, write_text_atomic
from qlora_pipeline.core.data import prepare_data, write_prepared
from qlora_pipeline.stages.common import StageContext, base_tokenizer

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    """Validate and tokenize data/raw; every check runs before anything is written."""
    _, tokenizer = base_tokenizer(ctx)
    prepared = prepare_data(ctx.cfg.data, tokenizer, ctx.paths.root)
    write_prepared(prepared, ctx.paths.prepared)
    write_json_atomic(ctx.paths.metrics / "data.json", prepared.stats)
    write_text_atomic(ctx.paths.plots / "token_lengths.csv", (ctx.paths.prepared / "lengths.csv").read_text())
    log.info(
        "prepared %s train / %s eval rows (%s train tokens); dropped: %s",
        prepared.stats.get("rows_train"),
        prepared.stats.get("rows_eval"),
        prepared.stats.get("tokens_train"),
        prepared.stats.get("rows_dropped") or "none",
    )
    return prepared.stats
