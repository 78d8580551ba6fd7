"""Progress on stderr: a live bar on a terminal, plain log lines anywhere else.

    with progress.bar("generating", total=len(batches)) as bar:
        for batch in batches:
            ...
            bar.update(advance=1)

On a terminal, every open bar is a row of one rich display that redraws in place; log lines
written through `console` (the CLI's handler does) print above it. Anywhere else (DVC under CI,
Prefect relaying a stage's output, a file) a bar draws nothing: no frames, only the lines passed
to `Bar.report`, logged through the `qlora_pipeline.progress` logger like any other record.

Core modules use this; it must not import tracking or orchestration (mlflow, prefect, dvc).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

log = logging.getLogger(__name__)

console = Console(stderr=True)
"""The one stderr console: log lines written through it print above a live bar, not through it."""

_display: Progress | None = None
_open_bars = 0


def live() -> bool:
    """True when stderr is a terminal that can redraw a bar in place (TTY_INTERACTIVE=0/1 forces it).

    Colour settings (FORCE_COLOR, TTY_COMPATIBLE) do not count: a CI log that takes colours still
    cannot redraw, and every frame would be one more line in it.
    """
    forced = os.environ.get("TTY_INTERACTIVE")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return sys.stderr.isatty() and os.environ.get("TERM", "").lower() not in ("dumb", "unknown")
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def format_eta(seconds: float | None) -> str:
    """0:00:45, 1:02:03; ? while unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class _CountColumn(ProgressColumn):
    """12/100; nothing where the total is unknown."""

    def render(self, task: Task) -> Text:
        return Text("" if task.total is None else f"{task.completed:.0f}/{task.total:.0f}")


class _EtaColumn(ProgressColumn):
    """ETA 0:01:05 from rich's recent speed; nothing where the total is unknown."""

    def render(self, task: Task) -> Text:
        return Text("" if task.total is None else f"ETA {format_eta(task.time_remaining)}")


def _start_display() -> Progress:
    global _display
    if _display is None:
        _display = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            _CountColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            _EtaColumn(),
            console=console,
            refresh_per_second=4,
            redirect_stdout=False,  # stdout may be a file or a pipe: what is printed there stays there
        )
        _display.start()
    return _display


@atexit.register
def _stop_display() -> None:
    # A bar left open by an error must not leave the terminal's cursor hidden.
    global _display, _open_bars
    if _display is not None:
        _display.stop()
    _display, _open_bars = None, 0


PLAIN_EVERY_S = 30.0  # off a terminal, a bar's plain progress line comes at most this often


class Bar:
    """One progress bar; a row of the live display on a terminal. Elsewhere, with plain=True, a log
    line every PLAIN_EVERY_S at most (training reports its own lines through report()).

    keep=True leaves the finished bar on screen (training); otherwise it vanishes when closed.
    """

    def __init__(self, description: str, total: float | None, *, completed: float = 0, keep: bool = False,
                 plain: bool = True) -> None:
        global _open_bars
        self.description, self.total, self.completed, self.keep, self.plain = description, total, completed, keep, plain
        self._started_at, self._started_from = time.perf_counter(), completed
        self._reported_at = self._started_at
        self._task: TaskID | None = None
        if live():
            self._task = _start_display().add_task(description, total=total, completed=completed, info="")
            _open_bars += 1

    def update(self, completed: float | None = None, advance: float = 0, info: str | None = None) -> None:
        """Move the bar to `completed` (or by `advance`); `info` replaces the text shown beside it."""
        self.completed = (self.completed if completed is None else completed) + advance
        if self._task is not None and _display is not None:
            fields = {} if info is None else {"info": info}
            _display.update(self._task, completed=self.completed, **fields)
        elif self._task is None and self.plain and time.perf_counter() - self._reported_at >= PLAIN_EVERY_S:
            # Off a terminal (DVC, Prefect, CI logs): a line now and then, so a long step is not silent.
            self._reported_at = time.perf_counter()
            total = f"/{self.total:g}" if self.total else ""
            log.info("%s: %g%s, ETA %s", self.description, self.completed, total, format_eta(self.eta_s()))

    def eta_s(self) -> float | None:
        """Seconds left at the mean speed since the bar opened; None before any progress."""
        done = self.completed - self._started_from
        if not self.total or done <= 0:
            return None
        return (time.perf_counter() - self._started_at) / done * max(self.total - self.completed, 0)

    def report(self, message: str, *args) -> None:
        """A plain log line where no bar is drawn (one per training log step); nothing on a terminal,
        where the bar itself shows it."""
        if self._task is None:
            log.info(message, *args)

    def close(self) -> None:
        global _open_bars
        if self._task is None or _display is None:
            self._task = None
            return
        if not self.keep:
            _display.remove_task(self._task)
        self._task = None
        _open_bars -= 1
        if _open_bars <= 0:
            _stop_display()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(description: str, total: float | None, *, completed: float = 0, keep: bool = False, plain: bool = True) -> Bar:
    """A progress bar for a long step; use it as a context manager, or call close()."""
    return Bar(description, total, completed=completed, keep=keep, plain=plain)
