"""report: the last pipeline run at a glance (base vs tuned, the registered version).

    qlora report
"""

from __future__ import annotations

import json
import re

from rich.console import Console
from rich.table import Table

from qlora_pipeline.errors import QloraError
from qlora_pipeline.stages.common import StageContext

METRICS = ("eval_loss", "perplexity", "exact_match", "chrf")
SHOWN_SAMPLES = 3


def _load(path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _samples(path, count: int) -> list[dict]:
    """The first `count` eval rows with a reference, from reports/samples.jsonl."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("reference")][:count]


_MARKUP = re.compile(r"<\|[^|>]*\|>|</?s>")


def display_prompt(prompt: str) -> str:
    """The last user turn of a rendered chat prompt, without template markup (the whole prompt
    when it has no user marker, e.g. an alpaca prompt)."""
    lines = prompt.splitlines()
    marks = [i for i, line in enumerate(lines) if "user" in line and _MARKUP.sub("", line).strip() in ("", "user")]
    if marks:
        lines = lines[marks[-1] + 1 :]
    kept = [_MARKUP.sub("", line).strip() for line in lines]
    return "\n".join(line for line in kept if line and line != "assistant") or prompt


def samples_table(rows: list[dict]) -> Table:
    table = Table(title="Held-out examples: base vs tuned (greedy)", show_lines=True)
    for column in ("prompt", "reference", "base", "tuned"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(display_prompt(row["prompt"]), row["reference"], row["base"], row["tuned"])
    return table


def run(ctx: StageContext, console: Console | None = None) -> dict:
    console = console or Console()
    evaluation, train = _load(ctx.paths.eval_metrics), _load(ctx.paths.train_metrics)
    # The full record (model name, reason) is in reports/; metrics/register.json holds its numbers.
    register = _load(ctx.paths.register_record) or _load(ctx.paths.register_metrics)
    if not evaluation:
        raise QloraError(f"{ctx.paths.eval_metrics} not found: run the pipeline first (`dvc repro`)")
    title = f"{ctx.cfg.model.name}: base vs tuned ({evaluation.get('eval_rows', '?')} eval rows)"
    table = Table(title=title, min_width=min(len(title) + 4, console.width))  # the title on one line
    for column in ("metric", "base", "tuned"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key in METRICS:
        if key in evaluation:
            table.add_row(key, f"{evaluation['base_' + key]:.4f}", f"{evaluation[key]:.4f}")
    console.print(table)
    shown = _samples(ctx.paths.reports / "samples.jsonl", SHOWN_SAMPLES)
    if shown:
        console.print(samples_table(shown))
    if train:
        console.print(
            f"train: {train['global_step']} steps, loss {train['train_loss']:.4f}, "
            f"{train['run_tokens_per_second']:.0f} tokens/s, {train['train_runtime_s']:.0f} s"
            + (f"; adapter from step {train['best_step']} (lowest eval loss, {train['best_eval_loss']:.4f})" if "best_step" in train else "")
        )
    if register:
        state = "promoted to champion" if register["promoted"] else f"not promoted (champion: v{register['champion_version']})"
        reason = f"; {register['reason']}" if register.get("reason") else ""
        console.print(f"registered {register.get('model_name', ctx.cfg.register.model_name)} v{register['version']}: {state}{reason}")
    return {"eval": evaluation, "train": train, "register": register}
