"""Progress off a terminal (DVC, Prefect and CI logs): a long step is not silent, and not chatty."""

from __future__ import annotations

import logging

from qlora_pipeline import progress


def test_a_bar_off_a_terminal_logs_a_line_now_and_then(monkeypatch, caplog):
    monkeypatch.setattr(progress, "live", lambda: False)
    caplog.set_level(logging.INFO, logger=progress.log.name)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 3600.0)
    with progress.bar("evaluating", total=10) as bar:
        for _ in range(10):
            bar.update(advance=1)
    assert caplog.messages == []  # a short step: nothing

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    with progress.bar("evaluating", total=10) as bar:
        bar.update(advance=4)
    assert caplog.messages[-1].startswith("evaluating: 4/10, ETA 0:00:")
    caplog.clear()
    with progress.bar("training", total=10, keep=True, plain=False) as bar:  # training reports its own lines
        bar.update(advance=4)
    assert caplog.messages == []
