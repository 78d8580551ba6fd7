"""The promotion gate: beat the base and the champion on the configured metric, by the margin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qlora_pipeline.config import RegisterConfig
from qlora_pipeline.stages.register import gate

CHAMPION = SimpleNamespace(version="3")


@pytest.mark.parametrize(
    "metric, margin, tuned, base, challenger, champion_score, promoted",
    [
        ("eval_loss", 0.0, 2.0, 3.0, 2.0, None, True),  # first version: beats the base
        ("eval_loss", 0.0, 3.1, 3.0, 3.1, None, False),  # worse than the base
        ("eval_loss", 0.0, 2.0, 3.0, 2.0, 2.1, True),  # beats both
        ("eval_loss", 0.0, 2.0, 3.0, 2.0, 1.9, False),  # the champion is better
        ("eval_loss", 0.0, 2.0, 3.0, 2.0, 2.0, False),  # a tie is not an improvement
        ("eval_loss", 0.2, 2.0, 3.0, 2.0, 2.1, False),  # better, but by less than the margin
        ("chrf", 0.0, 40.0, 10.0, 40.0, 35.0, True),  # higher is better for chrF
        ("chrf", 5.0, 40.0, 10.0, 40.0, 36.0, False),
        ("exact_match", 0.0, 0.5, 0.6, 0.5, None, False),
    ],
)
def test_gate(metric, margin, tuned, base, challenger, champion_score, promoted):
    reg = RegisterConfig(metric=metric, min_improvement=margin)
    metrics = {metric: tuned, f"base_{metric}": base}
    champion = CHAMPION if champion_score is not None else None
    decision, beats_base, beats_champion, reason = gate(reg, metrics, challenger, champion, champion_score)
    assert decision is promoted
    assert decision == (beats_base and beats_champion)
    assert reason.startswith(f"{metric}: tuned") and ("v3" in reason) == (champion is not None)
