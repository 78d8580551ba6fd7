"""prepare: raw files -> validated, tokenized train/eval splits, stats and a validation report.

    qlora prepare            # as `dvc repro prepare` runs it
"""

from __future__ import annotations

from typing import Any

from qlora_pipeline.atomic import write_json_atomic, write_text_atomic
from qlora_pipeline.core.data.prepare import prepare_data
from qlora_pipeline.core.data.store import write_prepared
from qlora_pipeline.plots import read_histogram, save_png, token_length_figure
from qlora_pipeline.stages.common import StageContext, base_tokenizer


def run(ctx: StageContext) -> dict:
    """Validate and tokenize data/raw; every check runs before anything is written."""
    _, tokenizer = base_tokenizer(ctx)
    prepared = prepare_data(ctx.cfg.data, tokenizer, ctx.paths.root)
    write_prepared(prepared, ctx.paths.prepared, tokenizer, ctx.cfg.model.name)
    # DVC metrics hold numbers only (they are columns in `dvc exp show`); the full stats, with the
    # file list, format and template, are in data/prepared/stats.json.
    write_json_atomic(ctx.paths.data_metrics, numbers_only(prepared.stats))
    lengths = ctx.paths.prepared / "lengths.csv"
    write_text_atomic(ctx.paths.plots / "token_lengths.csv", lengths.read_text())
    save_png(token_length_figure(read_histogram(lengths)), ctx.paths.plots / "token_lengths.png")
    return prepared.stats


def numbers_only(stats: dict[str, Any]) -> dict[str, Any]:
    """The numeric entries of stats, nested mappings of numbers kept (e.g. rows_dropped by reason)."""
    out: dict[str, Any] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            value = numbers_only(value)
            if value or not stats[key]:
                out[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out
