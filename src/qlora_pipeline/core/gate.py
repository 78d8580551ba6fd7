"""The promotion gate: a challenger becomes champion only if it beats the base and the champion.

Pure: scores in, a decision out. Reading the registry, scoring models and moving aliases is the
register stage's business (stages/register.py), under a lock so two registrations cannot both
decide against the same old champion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlora_pipeline.config import RegisterConfig
from qlora_pipeline.errors import NonFiniteMetricError


@dataclass(frozen=True)
class Contest:
    """The registry's side of a decision: the champion (if any) and its score on this eval split."""

    champion_version: str | None = None
    champion_score: float | None = None
    """None with a champion_version: its registered files do not load."""
    is_champion: bool = False
    """The challenger is the champion already (a re-run): it has no rival."""


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    beats_base: bool
    beats_champion: bool | None
    """None when there is no champion to beat, or the challenger is the champion."""
    reason: str


def beats(candidate: float, reference: float, reg: RegisterConfig) -> bool:
    """True if candidate is better than reference by at least register.min_improvement (> 0)."""
    require_finite(reg.metric, candidate=candidate, reference=reference)
    gain = candidate - reference if reg.greater_is_better else reference - candidate
    return gain >= reg.min_improvement and gain > 0


def require_finite(metric: str, **scores: float | None) -> None:
    """A NaN compares false with everything, so it would pass or fail a gate silently: refuse it.

    Raises:
        NonFiniteMetricError: any given score is NaN or infinite (None means "no score").
    """
    bad = [f"{who} {metric} is {float(v)}" for who, v in scores.items() if v is not None and not math.isfinite(v)]
    if bad:
        raise NonFiniteMetricError(
            f"{'; '.join(bad)}: a non-finite metric cannot be compared, nothing is promoted. A NaN eval metric "
            "means the adapter diverged: retrain with a lower train.learning_rate or quantization.compute_dtype "
            "bfloat16 (or float32), then run evaluate again"
        )


def decide(reg: RegisterConfig, tuned: float, base: float, challenger: float, contest: Contest) -> GateDecision:
    """Promote if the tuned model beats the base and the challenger beats the champion.

    Args:
        tuned, base: register.metric of the adapter model and of the base (metrics/eval.json).
        challenger: register.metric of the merged model as registered, on the same eval split on
            which the champion was scored.
    Raises:
        NonFiniteMetricError: any score is NaN or infinite.
    """
    champion_label = f"champion v{contest.champion_version}"
    require_finite(reg.metric, tuned=tuned, base=base, challenger=challenger, **{champion_label: contest.champion_score})
    beats_base = beats(tuned, base, reg)
    head = f"{reg.metric}: tuned {tuned:.4f} vs base {base:.4f}; "
    tail = f" (min_improvement {reg.min_improvement})"
    if contest.is_champion:
        return GateDecision(False, beats_base, None, head + f"v{contest.champion_version} is the champion already; not compared with itself" + tail)
    if contest.champion_version is None:
        return GateDecision(beats_base, beats_base, None, head + f"challenger {challenger:.4f}, no champion yet" + tail)
    if contest.champion_score is None:  # a champion that cannot be served loses its place
        return GateDecision(beats_base, beats_base, None, head + f"challenger {challenger:.4f} vs {champion_label} (does not load)" + tail)
    beats_champion = beats(challenger, contest.champion_score, reg)
    reason = head + f"challenger {challenger:.4f} vs {champion_label} {contest.champion_score:.4f}" + tail
    return GateDecision(beats_base and beats_champion, beats_base, beats_champion, reason)
