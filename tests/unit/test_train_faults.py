"""Training faults on the real 4-bit tiny model: divergence stops with the step named, the run's
mean loss survives a resume, and no stage writes or compares a NaN metric."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback, set_seed

from qlora_pipeline.config import RegisterConfig
from qlora_pipeline.core.data.collate import make_collator
from qlora_pipeline.core.model import apply_lora, load_base_model, resolve_compute_dtype, resolve_model
from qlora_pipeline.core.train import latest_checkpoint, train_adapter
from qlora_pipeline.errors import NonFiniteMetricError, QloraError, TrainingDivergedError
from qlora_pipeline.core.gate import Contest, beats, decide
from tests.unit.test_train_4bit import tiny_dataset


def lora_model(cfg, tokenizer, tiny_cache):
    """A fresh 4-bit base with LoRA, initialised from the seed: two calls give the same start."""
    base = load_base_model(cfg.model, cfg.quantization, resolve_model(cfg.model, tiny_cache), vocab_size=len(tokenizer))
    set_seed(cfg.train.seed)
    return apply_lora(base, cfg.lora)


def train(model, tokenizer, cfg, checkpoint_dir, callbacks=None):
    return train_adapter(
        model, tokenizer, tiny_dataset(tokenizer), make_collator(tokenizer, False, 64), cfg.train,
        checkpoint_dir, resolve_compute_dtype(cfg.quantization.compute_dtype), callbacks=callbacks,
    )


class PoisonLora(TrainerCallback):
    """Writes NaN into one LoRA weight at the given event of the given optimizer step."""

    def __init__(self, event: str, step: int) -> None:
        self.event, self.step = event, step
        setattr(self, event, self._poison)

    def _poison(self, args, state, control, model=None, **kwargs):
        current = state.global_step if self.event == "on_step_end" else state.global_step + 1
        if current == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).view(-1)[0] = float("nan")


def assert_no_nan_checkpoint(checkpoint_dir):
    """Checkpoints written before the fault hold only finite LoRA weights."""
    from safetensors.torch import load_file

    for ckpt in checkpoint_dir.glob("checkpoint-*"):
        for name, t in load_file(ckpt / "adapter_model.safetensors").items():
            assert torch.isfinite(t).all(), (ckpt, name)


def test_nan_loss_stops_at_its_step(tiny_model, tiny_cache, tmp_path, tiny_cfg):
    # NaN written into a LoRA weight after step 2's update: step 3's forward gives a NaN loss.
    cfg = tiny_cfg()
    _, tokenizer, _ = tiny_model
    model = lora_model(cfg, tokenizer, tiny_cache)
    seen = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(state.global_step)

    with pytest.raises(TrainingDivergedError, match=r"optimizer step 3 of 8: the training loss is nan;.*learning_rate.*bfloat16"):
        train(model, tokenizer, cfg, tmp_path, callbacks=[PoisonLora("on_step_end", 2), Record()])
    assert issubclass(TrainingDivergedError, QloraError)
    assert max(seen) == 2  # step 3 was never logged


def test_nan_weights_after_optimizer_step_stop_that_step(tiny_model, tiny_cache, tmp_path, tiny_cfg):
    cfg = tiny_cfg("train.save_steps=1")
    _, tokenizer, _ = tiny_model
    model = lora_model(cfg, tokenizer, tiny_cache)
    with pytest.raises(TrainingDivergedError, match=r"optimizer step 2 of 8: 1 of \d+ trainable \(LoRA\) tensors hold NaN"):
        train(model, tokenizer, cfg, tmp_path, callbacks=[PoisonLora("on_optimizer_step", 2)])
    assert latest_checkpoint(tmp_path).endswith("checkpoint-1")
    assert_no_nan_checkpoint(tmp_path)


def test_huge_learning_rate_stops_with_the_step(tiny_model, tiny_cache, tmp_path, tiny_cfg):
    cfg = tiny_cfg("train.learning_rate=1.0", "quantization.compute_dtype=float16", "train.save_steps=1")
    _, tokenizer, _ = tiny_model
    model = lora_model(cfg, tokenizer, tiny_cache)
    with pytest.raises(TrainingDivergedError, match=r"training diverged at optimizer step (\d+) of 8: .*learning_rate too high") as err:
        train(model, tokenizer, cfg, tmp_path)
    step = int(err.value.args[0].split("optimizer step ")[1].split(" ")[0])
    assert 1 <= step <= 8
    assert_no_nan_checkpoint(tmp_path)


def test_train_stage_saves_the_adapter_only_after_training_returns():
    """stages/train.py: no adapter and no metrics/train.json unless train_adapter returned."""
    import inspect

    from qlora_pipeline.stages import train as stage

    source = inspect.getsource(stage.run)
    trained = source.index("result = train_adapter(")
    assert trained < source.index("atomic_dir(paths.adapter)") and trained < source.index("write_json_atomic(paths.train_metrics")


def test_resumed_run_reports_the_whole_runs_mean_loss(tiny_model, tiny_cache, tmp_path, tiny_cfg):
    full_cfg = tiny_cfg("train.save_steps=3", "train.max_steps=8")
    _, tokenizer, _ = tiny_model
    full = train(lora_model(full_cfg, tokenizer, tiny_cache), tokenizer, full_cfg, tmp_path / "full")

    class StopAfter(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt  # a kill right after checkpoint-3 was written

    model = lora_model(full_cfg, tokenizer, tiny_cache)
    with pytest.raises(KeyboardInterrupt):
        train(model, tokenizer, full_cfg, tmp_path / "cut", callbacks=[StopAfter()])
    assert latest_checkpoint(tmp_path / "cut").endswith("checkpoint-3")
    stored = json.loads((tmp_path / "cut" / "checkpoint-3" / "trainer_state.json").read_text())["stateful_callbacks"]["RunLoss"]
    assert stored["attributes"]["steps"] == 3

    resumed = train(lora_model(full_cfg, tokenizer, tiny_cache), tokenizer, full_cfg, tmp_path / "cut")
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.global_step == full.global_step == 8

    per_step = [row["loss"] for row in full.history]  # logging_steps=1: one row per optimizer step
    assert len(per_step) == 8
    mean = sum(per_step) / len(per_step)
    print(f"uninterrupted {full.train_loss:.6f} resumed {resumed.train_loss:.6f} mean of logged steps {mean:.6f}")
    assert resumed.train_loss == pytest.approx(full.train_loss, rel=1e-4)
    assert full.train_loss == pytest.approx(mean, rel=1e-4)  # logged losses are rounded to 4 decimals
    assert resumed.train_loss == pytest.approx(sum(r["loss"] for r in resumed.history) / 8, rel=1e-4)
    # The Trainer's own figure averages only steps 4..8: the bug this guards against.
    assert not math.isclose(sum(per_step[3:]) / 5, full.train_loss, rel_tol=1e-4)


# The gate and evaluate refuse NaN.

REG = RegisterConfig(metric="eval_loss", min_improvement=0.0)


@pytest.mark.parametrize(
    "metrics, challenger, champion_score, named",
    [
        ({"eval_loss": float("nan"), "base_eval_loss": 3.0}, 2.0, None, "tuned eval_loss is nan"),
        ({"eval_loss": 2.0, "base_eval_loss": float("inf")}, 2.0, None, "base eval_loss is inf"),
        ({"eval_loss": 2.0, "base_eval_loss": 3.0}, float("nan"), None, "challenger eval_loss is nan"),
        ({"eval_loss": 2.0, "base_eval_loss": 3.0}, 2.0, float("nan"), "champion v3 eval_loss is nan"),
    ],
)
def test_gate_refuses_non_finite_metrics(metrics, challenger, champion_score, named):
    rival = Contest("3", champion_score) if champion_score is not None else Contest()
    with pytest.raises(NonFiniteMetricError, match=named + r".*cannot be compared"):
        decide(REG, metrics["eval_loss"], metrics["base_eval_loss"], challenger, rival)


def test_beats_refuses_nan():
    with pytest.raises(NonFiniteMetricError):
        beats(float("nan"), 3.0, REG)
    with pytest.raises(NonFiniteMetricError):
        beats(2.0, float("-inf"), REG)
    assert beats(2.0, 3.0, REG) and not beats(3.0, 2.0, REG)


def test_evaluate_refuses_a_nan_eval_loss(tmp_path):
    from qlora_pipeline.stages.evaluate import check_finite_metrics

    check_finite_metrics({"eval_loss": 2.5, "base_eval_loss": 3.0, "eval_rows": 4})
    with pytest.raises(NonFiniteMetricError, match=r"eval_loss is nan.*adapter.*learning_rate"):
        check_finite_metrics({"eval_loss": float("nan"), "base_eval_loss": 3.0, "perplexity": float("nan")})


@pytest.mark.parametrize("schedule", [("train.max_steps=6",), ("train.max_steps=-1", "train.epochs=1")])
def test_resume_from_the_last_steps_checkpoint_trains_nothing_more(tiny_model, tiny_cache, tmp_path, tiny_cfg, schedule):
    """A failure after the final checkpoint (adapter save, upload, signal): the resumed run has
    exactly the scheduled steps and the whole run's loss, runtime and tokens, not 0 or one more."""
    cfg = tiny_cfg("train.save_steps=3", *schedule)  # 32 rows / 4 per step: an epoch is 8 steps
    _, tokenizer, _ = tiny_model
    full = train(lora_model(cfg, tokenizer, tiny_cache), tokenizer, cfg, tmp_path / "full")

    class StopAtTheEnd(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                raise KeyboardInterrupt  # killed right after the last checkpoint was written

    with pytest.raises(KeyboardInterrupt):
        train(lora_model(cfg, tokenizer, tiny_cache), tokenizer, cfg, tmp_path / "cut", callbacks=[StopAtTheEnd()])
    last = latest_checkpoint(tmp_path / "cut")
    assert last.endswith(f"checkpoint-{full.global_step}")
    resumed = train(lora_model(cfg, tokenizer, tiny_cache), tokenizer, cfg, tmp_path / "cut")
    assert resumed.global_step == full.global_step
    assert resumed.train_loss == pytest.approx(full.train_loss, rel=1e-4)
    assert resumed.tokens_seen == full.tokens_seen
    assert resumed.train_runtime_s > 0  # the whole run's time, read from the checkpoint, not 0
    assert [r["step"] for r in resumed.history] == [r["step"] for r in full.history]


@pytest.mark.parametrize("optimizer_state", ["optimizer.pt", "optimizer.bin"])
def test_a_checkpoint_is_complete_with_each_form_of_the_optimizer_state(tmp_path, optimizer_state):
    """One rank and DDP save optimizer.pt; FSDP with FULL_STATE_DICT (core/train.py's fsdp_arguments)
    saves optimizer.bin beside the whole adapter. A complete FSDP checkpoint taken for a partial one
    is deleted and the run starts over from step 0."""
    for step, complete in ((4, True), (8, False)):  # checkpoint-8 cut short before trainer_state.json
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"x")
        (ckpt / optimizer_state).write_bytes(b"x")
        if complete:
            (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert latest_checkpoint(tmp_path).endswith("checkpoint-4")
    assert not (tmp_path / "checkpoint-8").exists() and (tmp_path / "checkpoint-4" / optimizer_state).exists()


def test_a_checkpoint_without_optimizer_state_is_not_complete(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert latest_checkpoint(tmp_path) is None
