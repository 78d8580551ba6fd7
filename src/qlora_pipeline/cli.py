"""The `qlora` command: one subcommand per pipeline stage, plus promote.

    qlora prepare | train | evaluate | register      # what dvc.yaml runs
    qlora promote --version 3 --reason "A/B test"    # move `champion` by hand
    qlora check                                      # validate params.yaml and exit
    qlora report                                     # the last run: base vs tuned, registration
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from qlora_pipeline.errors import QloraError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="4-bit QLoRA fine-tuning pipeline stages.")
err = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file; its folder is the project root")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-S", help="override a param for this call only, e.g. -S train.max_steps=10"),
]

QUIET_LOGGERS = ("httpx", "urllib3", "alembic", "mlflow.store", "mlflow.tracking", "filelock", "git")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (test runners and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging() -> None:
    level = os.environ.get("QLORA_LOG_LEVEL", "INFO").upper()
    if err.is_terminal:
        handler: logging.Handler = RichHandler(console=err, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # logs captured by DVC, Prefect or CI: one plain line per record, never wrapped
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _raise_on_sigterm() -> None:
    # SIGTERM (a worker or `kill`) unwinds like Ctrl-C, so MLflow runs end KILLED, not RUNNING.
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _run(stage: Callable, params: Path, overrides: list[str] | None, *args) -> None:
    _setup_logging()
    _raise_on_sigterm()
    try:
        from qlora_pipeline.stages.common import context

        ctx = context(params, overrides)
        stage(ctx, *args)
    except QloraError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        err.print(
            f"[bold red]error:[/] no space left on the device while writing {exc.filename or 'an output'}; "
            "free some disk space and run the stage again (outputs already in place were left unchanged)",
            highlight=False,
        )
        raise typer.Exit(28) from None


@app.command()
def check(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate params.yaml (and overrides) and print the resolved config."""
    _run(lambda ctx: err.print_json(ctx.cfg.model_dump_json()), params, set_)


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate and tokenize data/raw into train/eval splits."""
    from qlora_pipeline.stages import prepare as stage

    _run(stage.run, params, set_)


@app.command()
def train(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Train the LoRA adapter on the 4-bit base model."""
    from qlora_pipeline.stages import train as stage

    _run(stage.run, params, set_)


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Score base and tuned models on the eval split; write metrics and samples."""
    from qlora_pipeline.stages import evaluate as stage

    _run(stage.run, params, set_)


@app.command()
def register(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Merge, verify, register the model version and gate promotion."""
    from qlora_pipeline.stages import register as stage

    _run(stage.run, params, set_)


@app.command()
def report(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Print the last run's metrics (base vs tuned) and its registered version."""
    from qlora_pipeline.stages import report as stage

    _run(stage.run, params, set_)


@app.command()
def promote(
    version: Annotated[Optional[int], typer.Option(help="model version to make champion")] = None,
    alias: Annotated[Optional[str], typer.Option(help="or: promote the version this alias points to")] = None,
    reason: Annotated[str, typer.Option(help="why; recorded on the version")] = "manual promotion",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Move the `champion` alias by hand (recorded with who and why)."""
    if (version is None) == (alias is None):
        err.print("[bold red]error:[/] give exactly one of --version N or --alias NAME")
        raise typer.Exit(2)
    from qlora_pipeline.stages import register as stage

    _run(stage.promote_by_hand, params, set_, version, alias, reason)


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="qlora")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
