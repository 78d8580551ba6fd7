"""The promotion gate: beat the base and the champion on the configured metric, by the margin;
a version is never its own rival; promotion decisions on one model name never interleave."""

from __future__ import annotations

import math
import multiprocessing
import time

import pytest

from qlora_pipeline.config import RegisterConfig, validate_params
from qlora_pipeline.core.gate import Contest, decide
from qlora_pipeline.errors import NonFiniteMetricError


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
    rival = Contest("3", champion_score) if champion_score is not None else Contest()
    decision = decide(reg, tuned, base, challenger, rival)
    assert decision.promote is promoted
    assert decision.promote == (decision.beats_base and decision.beats_champion is not False)
    assert decision.beats_champion is (None if champion_score is None else decision.beats_champion)
    assert decision.reason.startswith(f"{metric}: tuned") and ("v3" in decision.reason) == (champion_score is not None)


def test_a_version_is_never_its_own_rival():
    """Re-registering the champion's training run: no comparison with itself, no 'beats' verdict."""
    reg = RegisterConfig()
    decision = decide(reg, 6.2011, 7.0, 6.2011, Contest("1", None, is_champion=True))
    assert decision.promote is False and decision.beats_champion is None
    assert "v1 is the champion already; not compared with itself" in decision.reason


def test_a_champion_that_does_not_load_loses_to_a_challenger_that_beats_the_base():
    decision = decide(RegisterConfig(), 2.0, 3.0, 2.0, Contest("4", None))
    assert decision.promote is True and "v4 (does not load)" in decision.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scores_are_refused(bad):
    with pytest.raises(NonFiniteMetricError, match="champion v2 eval_loss is"):
        decide(RegisterConfig(), 2.0, 3.0, 2.0, Contest("2", bad))


@pytest.mark.parametrize(
    "model, expected",
    [
        ("facebook/opt-125m", "qlora-opt-125m"),
        ("builtin:tiny-llama", "qlora-tiny-llama"),
        ("base_models/SmolLM2-135M-Instruct.Q4_1.gguf", "qlora-smollm2-135m-instruct-q4_1"),
        ("/models/My Llama 3/", "qlora-my-llama-3"),
    ],
)
def test_auto_registry_name_follows_the_base_model(model, expected):
    """A toy model is never registered under a real model's name by default."""
    assert validate_params({"model": {"name": model}}).register.model_name == expected
    assert validate_params({"model": {"name": model}, "register": {"model_name": "mine"}}).register.model_name == "mine"


def _hold_lock(name: str, lock_dir: str, hold_s: float, events) -> None:
    import os

    os.environ["QLORA_LOCK_DIR"] = lock_dir
    from qlora_pipeline.registry import promotion_lock

    with promotion_lock(name):
        events.put(("in", time.monotonic()))
        time.sleep(hold_s)
        events.put(("out", time.monotonic()))


def test_promotion_lock_serialises_processes(tmp_path):
    """Two processes deciding on one model name: the second enters only after the first left."""
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    procs = [ctx.Process(target=_hold_lock, args=("qlora-x", str(tmp_path), 1.0, events)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    seen = sorted((events.get(timeout=5) for _ in range(4)), key=lambda e: e[1])
    assert [kind for kind, _ in seen] == ["in", "out", "in", "out"]


def test_a_champion_of_another_base_model_is_refused_before_any_merge():
    """Its loss on this run's tokenization says nothing: register names the two models and the fix."""
    from types import SimpleNamespace

    from qlora_pipeline.errors import RegistryError
    from qlora_pipeline.stages.register import refuse_another_base

    champion = SimpleNamespace(version="3", tags={"base_model": "base_models/SmolLM2-135M-Instruct.Q4_1.gguf"})
    with pytest.raises(RegistryError) as info:
        refuse_another_base(champion, "builtin:tiny-llama", "qlora-demo")
    message = str(info.value)
    assert "champion of qlora-demo (v3) was fine-tuned from base_models/SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert "register.model_name: auto gives qlora-tiny-llama" in message
    # the same file under another path, a champion without lineage, no champion: no objection
    refuse_another_base(champion, "/models/SmolLM2-135M-Instruct.Q4_1.gguf", "qlora-demo")
    refuse_another_base(SimpleNamespace(version="1", tags={}), "builtin:tiny-llama", "qlora-demo")
    refuse_another_base(None, "builtin:tiny-llama", "qlora-demo")


def test_register_without_an_evaluation_names_the_stage_to_run(tmp_path, tiny_cfg):
    """metrics/eval.json missing (register run before evaluate): a RegistryError naming evaluate, not
    a FileNotFoundError traceback."""
    from qlora_pipeline.errors import RegistryError
    from qlora_pipeline.paths import ProjectPaths
    from qlora_pipeline.stages.common import StageContext
    from qlora_pipeline.stages.register import read_eval_metrics

    ctx = StageContext(tiny_cfg(), ProjectPaths.at(tmp_path))
    with pytest.raises(RegistryError, match=r"eval.json not found: the tuned model has not been evaluated; run `qlora evaluate` first"):
        read_eval_metrics(ctx)
