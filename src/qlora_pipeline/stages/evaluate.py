"""evaluate: base (4-bit, adapter off) vs tuned on the same eval split, into the train run.

    qlora evaluate           # as `dvc repro evaluate` runs it

Writes metrics/eval.json (DVC metrics; tuned keys plain, base keys prefixed base_),
reports/samples.md and reports/samples.jsonl (prompt, reference, base output, tuned output).
"""

from __future__ import annotations

import json
import logging
import math

import mlflow
import pandas as pd
from peft import PeftModel

from qlora_pipeline import tracking
from qlora_pipeline.atomic import write_json_atomic, write_text_atomic
from qlora_pipeline.core.data.collate import make_collator
from qlora_pipeline.core.evaluate import adapter_disabled, chat_prompt, generate, sample_rows, score_model
from qlora_pipeline.core.model import load_base_model
from qlora_pipeline.errors import NonFiniteMetricError
from qlora_pipeline.stages.common import StageContext, base_tokenizer, eval_split, release_checkpoints

log = logging.getLogger(__name__)


def load_tuned_model(ctx: StageContext, resolved, tokenizer):
    """The 4-bit base with the trained adapter on top (adapter can be switched off for the base)."""
    base = load_base_model(ctx.cfg.model, ctx.cfg.quantization, resolved, vocab_size=len(tokenizer))
    return PeftModel.from_pretrained(base, str(ctx.paths.adapter))


def check_finite_metrics(metrics: dict) -> None:
    """No NaN or inf reaches eval.json: a NaN eval_loss means the adapter is broken, not a score."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        names = ", ".join(f"{k} is {v}" for k, v in bad.items())
        raise NonFiniteMetricError(
            f"evaluate: {names}; metrics/eval.json is not written. The trained adapter (models/adapter) "
            "gives non-finite outputs: retrain with a lower train.learning_rate or quantization.compute_dtype "
            "bfloat16 (or float32), and check the training data"
        )


def samples_markdown(rows: list[dict]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| source | prompt | reference | base | tuned |", "|---|---|---|---|---|"]
    lines += [f"| {cell(r['source'])} | {cell(r['prompt'])} | {cell(r['reference'])} | {cell(r['base'])} | {cell(r['tuned'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def run(ctx: StageContext) -> dict:
    cfg, paths = ctx.cfg, ctx.paths
    tracking.setup(paths, cfg.tracking.experiment)
    run_id = tracking.read_run_id(paths)
    resolved, tokenizer = base_tokenizer(ctx)
    eval_ds = eval_split(ctx, tokenizer)
    collator = make_collator(tokenizer, False, cfg.data.max_seq_len)
    samples = sample_rows(eval_ds, cfg.evaluate.num_samples)
    model = load_tuned_model(ctx, resolved, tokenizer)

    with tracking.active_run("evaluate", run_id=run_id):
        tuned = score_model(model, tokenizer, eval_ds, collator, cfg.evaluate, samples)
        free_prompts = [chat_prompt(tokenizer, p) for p in cfg.evaluate.prompts]
        tuned_free = generate(model, tokenizer, free_prompts, cfg.evaluate.max_new_tokens, cfg.evaluate.batch_size)
        with adapter_disabled(model):
            base = score_model(model, tokenizer, eval_ds, collator, cfg.evaluate, samples)
            base_free = generate(model, tokenizer, free_prompts, cfg.evaluate.max_new_tokens, cfg.evaluate.batch_size)

        metrics = {**tuned.metrics, **{f"base_{k}": v for k, v in base.metrics.items()}}
        metrics["eval_rows"] = len(eval_ds)
        check_finite_metrics(metrics)
        table = [
            {**row, "base": b, "tuned": t} for row, b, t in zip(samples, base.generations, tuned.generations)
        ] + [
            {"source": "evaluate.prompts", "prompt": p, "reference": "", "base": b, "tuned": t}
            for p, b, t in zip(cfg.evaluate.prompts, base_free, tuned_free)
        ]
        release_checkpoints(paths)  # train's outputs are recorded by now (see there)
        write_json_atomic(paths.eval_metrics, metrics)
        write_text_atomic(paths.reports / "samples.md", samples_markdown(table))
        write_text_atomic(paths.reports / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in table))
        tracking.log_metrics_once(metrics)
        if table:
            tracking.log_table_replacing(pd.DataFrame(table), "eval/samples.json")
        mlflow.log_artifact(str(paths.reports / "samples.md"), artifact_path="eval")
    log.info(
        "eval loss: base %.4f -> tuned %.4f (perplexity %.2f -> %.2f)",
        metrics["base_eval_loss"], metrics["eval_loss"], metrics["base_perplexity"], metrics["perplexity"],
    )
    return metrics
