"""The `qlora` command: one subcommand per pipeline stage, plus promote.

    qlora prepare | train | evaluate | register      # what dvc.yaml runs
    qlora promote --version 3 --reason "A/B test"    # move `champion` by hand
    qlora versions                                   # a registered model's versions and aliases
    qlora check                                      # validate params.yaml and exit
    qlora report                                     # the last run: base vs tuned, registration
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.logging import RichHandler
from rich.markup import escape

from qlora_pipeline import progress
from qlora_pipeline.errors import ConfigError, QloraError

log = logging.getLogger(__name__)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="4-bit QLoRA fine-tuning pipeline stages.")
err = progress.console  # log lines and messages print above a live progress bar, not through it

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file; its folder is the project root")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-S", help="override a param for this call only, e.g. -S train.max_steps=10"),
]
VerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="keep third-party logs, warnings and progress bars (or QLORA_VERBOSE=1)"),
]

# Third-party output that tells a user nothing to act on, silenced where it starts. --verbose,
# QLORA_VERBOSE=1 or QLORA_LOG_LEVEL=DEBUG leaves all of it on.
QUIET_LOGGERS = (
    "httpx", "urllib3", "alembic", "mlflow.store", "mlflow.tracking", "filelock", "git",
    "mlflow.system_metrics",  # "Started monitoring system metrics." and three more per MLflow run
)
# Read when the library is imported: _run sets them before a stage's modules load.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # load/save notices ("modules are dequantized", "new PAD/BOS/EOS tokens")
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' "Loading weights" and "Writing model shards" bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map and filter bars
    "TQDM_DISABLE": "1",  # any other tqdm bar (the GGUF conversion's); our bars are rich's
}
# Single messages, by the logger that emits them; the rest of what these loggers say still shows.
QUIET_MESSAGES = {
    # A local model has no hub card or license to fetch; MLflow says so for every logged model.
    # ... and, loading a registered model, "'models:/name@alias' resolved as '<artifact URI>'".
    "mlflow.transformers": ("The model card could not be retrieved", "Unable to find license information", "'models:/", "'runs:/"),
    # CPUs with AVX512-BF16, once per process: an optional kernel fetched from the hub, out of reach offline.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}
# warnings.filterwarnings(message, category, module): (regex, category, regex).
QUIET_WARNINGS = (
    # mlflow.data.from_pandas(source=<a local path>): two registered source classes match it, alike.
    (r"The specified dataset source can be interpreted in multiple ways", UserWarning, r"mlflow\.data\."),
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (test runners and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _silence_third_party() -> None:
    """Quiet the libraries' notices, warnings and progress bars at their source (QUIET_*)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if os.environ["TRANSFORMERS_VERBOSITY"] == "error":  # as the env var does, where transformers is loaded already
        logging.getLogger("transformers").setLevel(logging.ERROR)
    for name, starts in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))
    warnings.filterwarnings("ignore", category=FutureWarning)
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _setup_logging(verbose: bool = False) -> None:
    level = os.environ.get("QLORA_LOG_LEVEL", "INFO").upper()
    if err.is_terminal:
        handler: logging.Handler = RichHandler(console=err, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # logs captured by DVC, Prefect or CI: one plain line per record, never wrapped
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    verbose = verbose or level == "DEBUG" or os.environ.get("QLORA_VERBOSE", "").lower() in ("1", "true", "yes")
    if not verbose:
        _silence_third_party()


def _raise_on_sigterm() -> None:
    # SIGTERM (a worker or `kill`) unwinds like Ctrl-C, so MLflow runs end KILLED, not RUNNING.
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


ORCHESTRATORS = ("dvc", "prefect")
PARENT_POLL_S = 1.0


def _end_with_orchestrator() -> None:
    """SIGTERM this process when the DVC (or Prefect) process that started it ends.

    `kill -TERM` of `dvc repro` ends DVC at once without signalling its stage; the stage would run
    on as an orphan, finish, and record a training that dvc.lock never holds. Watched: the
    ancestors up to the nearest DVC or Prefect process; nothing when there is none.
    """
    import threading

    import psutil

    watched = []
    for ancestor in psutil.Process().parents():
        watched.append(ancestor)
        if _is_orchestrator(_cmdline(ancestor)):
            break
    else:
        return  # started by hand (a shell, nohup, a notebook): it is the user's to stop

    def alive(process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while all(alive(p) for p in watched):
            time.sleep(PARENT_POLL_S)
        ended = ", ".join(str(p.pid) for p in watched if not alive(p))
        log.warning("the process that started this stage (pid %s) ended; stopping", ended)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orchestrator-watch", daemon=True).start()


def _is_orchestrator(args: list[str]) -> bool:
    """`dvc ...`, `prefect ...` or `python -m dvc|prefect ...` (by program name, not any path)."""
    head = args[:3]
    if "-m" in head and head.index("-m") + 1 < len(args):
        return args[head.index("-m") + 1] in ORCHESTRATORS
    return any(os.path.basename(a) in ORCHESTRATORS for a in head[:2])


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except Exception:  # noqa: BLE001 - gone or not ours to read: nothing to match
        return []


def _stage(module: str, function: str = "run") -> Callable:
    """qlora_pipeline.stages.<module>.<function>, imported when called: after _run has set up
    logging, so what the stage's libraries print while they load is filtered like the rest."""

    def call(*args):
        return getattr(importlib.import_module(f"qlora_pipeline.stages.{module}"), function)(*args)

    return call


def _run(stage: Callable, params: Path, overrides: list[str] | None, *args, verbose: bool = False) -> None:
    from qlora_pipeline import distributed

    _setup_logging(verbose)
    distributed.setup_rank()  # a torchrun rank: its GPU, and quiet logs unless rank 0
    _raise_on_sigterm()
    _end_with_orchestrator()
    try:
        from qlora_pipeline.stages.common import context

        ctx = context(params, overrides)
        stage(ctx, *args)
    except QloraError as exc:
        distributed.record_failure(exc)
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        distributed.record_failure(exc)
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - only a full disk is handled here; the rest re-raises
        distributed.record_failure(exc)
        if not _disk_full(exc):
            raise
        where = getattr(exc, "filename", None) or ("the MLflow store (SQLite)" if "sqlite" in str(exc).lower() else "an output")
        err.print(
            f"[bold red]error:[/] no space left on the device while writing {where}; free some disk space and "
            "run the stage again (outputs already in place were left unchanged; a training resumes from its last "
            "checkpoint)",
            highlight=False,
        )
        raise typer.Exit(28) from None


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, or SQLite's "database or disk is full" wrapped by SQLAlchemy and MLflow."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "disk is full" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@app.command()
def check(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate params.yaml (and overrides) and print the resolved config; warn where this machine
    could not train them (params written for a GPU worker are still valid params)."""

    def show(ctx) -> None:
        print(json.dumps(ctx.cfg.model_dump(mode="json"), indent=2))
        for problem in machine_problems(ctx.cfg):
            err.print(f"[yellow]warning:[/] on this machine `qlora train` would stop: {escape(problem)}", highlight=False, soft_wrap=True)

    _run(show, params, set_)


def machine_problems(cfg) -> list[str]:
    """What `qlora train` would refuse on this machine before loading anything (the fast path's
    switches forced on where a feature is missing, more GPUs than visible)."""
    from qlora_pipeline import distributed
    from qlora_pipeline.core.fast.options import resolve_options

    problems = []
    try:
        resolve_options(cfg.train)
    except ConfigError as exc:
        problems.append(str(exc))
    try:  # fsdp where it cannot run (no CUDA GPU, one rank); auto is decided at train time
        distributed.strategy(cfg.train, distributed.world_size(cfg.train))
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Validate and tokenize data/raw into train/eval splits."""
    _run(_stage("prepare"), params, set_, verbose=verbose)


@app.command()
def train(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Train the LoRA adapter on the 4-bit base model."""
    _run(_stage("train"), params, set_, verbose=verbose)


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Score base and tuned models on the eval split; write metrics and samples."""
    _run(_stage("evaluate"), params, set_, verbose=verbose)


@app.command()
def register(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Merge, verify, register the model version and gate promotion."""
    _run(_stage("register"), params, set_, verbose=verbose)


@app.command()
def report(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Print the last run's metrics (base vs tuned) and its registered version."""
    _run(_stage("report"), params, set_, verbose=verbose)


@app.command()
def promote(
    version: Annotated[Optional[int], typer.Option(help="model version to make champion")] = None,
    alias: Annotated[Optional[str], typer.Option(help="or: promote the version this alias points to")] = None,
    reason: Annotated[str, typer.Option(help="why; recorded on the version")] = "manual promotion",
    name: Annotated[Optional[str], typer.Option("--name", "-n", help="registered model; default: register.model_name")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Move the `champion` alias by hand (recorded with who and why)."""
    if (version is None) == (alias is None):
        err.print("[bold red]error:[/] give exactly one of --version N or --alias NAME")
        raise typer.Exit(2)
    from qlora_pipeline.stages import registry as stage

    _run(stage.promote_by_hand, params, set_, version, alias, reason, name)


@app.command()
def versions(
    name: Annotated[Optional[str], typer.Option("--name", "-n", help="registered model; default: register.model_name")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """List a registered model's versions: aliases, gate metric (tuned and base), lineage."""
    from qlora_pipeline.stages import registry as stage

    _run(stage.versions, params, set_, name, as_json)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        def installed(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"

        stack = ", ".join(f"{n} {installed(n)}" for n in ("torch", "transformers", "peft", "bitsandbytes", "mlflow", "dvc", "prefect"))
        print(f"qlora-pipeline {installed('qlora-pipeline')} ({stack})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """4-bit QLoRA fine-tuning pipeline stages."""


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="qlora")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
