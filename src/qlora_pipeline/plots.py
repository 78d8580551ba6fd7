"""The pipeline's plots as static PNG images: `dvc plots show` puts them in its page as <img>, so
the page opens offline (DVC's own charts load their library from a CDN); MLflow logs the same
figures. Figures are drawn on matplotlib's Agg canvas, without pyplot, so no display is needed
and nothing global is left open.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure() -> Figure:
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def read_histogram(path: Path) -> list[tuple[int, int]]:
    """(bucket lower bound, rows) from a bucket,count CSV (data/prepared/lengths.csv)."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return [(int(row["bucket"]), int(row["count"])) for row in csv.DictReader(fh)]


def token_length_figure(histogram: list[tuple[int, int]]) -> Figure:
    """Rows per token-length bucket, one bar per bucket (equal-width buckets, lower bounds given)."""
    fig = _figure()
    ax = fig.add_subplot()
    buckets = [b for b, _ in histogram]
    width = buckets[1] - buckets[0] if len(buckets) > 1 else 1
    ax.bar(buckets, [c for _, c in histogram], width=width, align="edge", edgecolor="white")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title("Token length histogram (train + eval)")
    return fig


def loss_figure(
    history: list[dict[str, Any]], eval_history: list[dict[str, Any]] | None = None, best_step: int | None = None
) -> Figure:
    """Training loss per logged step; the eval loss per evaluation and the kept (best) step when given."""
    fig = _figure()
    ax = fig.add_subplot()
    rows = [r for r in history if "loss" in r]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss")
    if eval_history:
        ax.plot([r["step"] for r in eval_history], [r["eval_loss"] for r in eval_history], marker="o", label="eval loss")
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle=":", label=f"kept: step {best_step}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss" + (" and eval loss" if eval_history else ""))
    if eval_history or best_step is not None:
        ax.legend()
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Write the figure as a PNG, atomically (a reader never sees half an image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
