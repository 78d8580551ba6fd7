"""LoRA training with the transformers Trainer.

The Trainer owns the loop, checkpoints and resume. This module adds what it lacks: real-token
throughput in the logs, a loss history for plots, a stop at the first non-finite loss, gradient or
LoRA weight (the Trainer would carry on and save an all-NaN adapter), and the mean loss of the
whole run, also after a resume (the Trainer averages only the steps run in this process). Tracking (MLflow) plugs in as a callback
from the stage layer, so nothing here imports it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint

from qlora_pipeline.config import TrainConfig
from qlora_pipeline.core.fast import apply_fast_path
from qlora_pipeline.errors import TrainingDivergedError

log = logging.getLogger(__name__)

MODEL_INPUT_COLUMNS = ("input_ids", "labels")


class ThroughputCallback(TrainerCallback):
    """Adds tokens_per_second (non-pad tokens, since the last log) to each training log."""

    def __init__(self) -> None:
        self._last_time = time.perf_counter()
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen - self._last_tokens
        if now > self._last_time and tokens > 0:
            logs["tokens_per_second"] = round(tokens / (now - self._last_time), 2)
        self._last_time, self._last_tokens = now, state.num_input_tokens_seen


@dataclass
class LossHistory(TrainerCallback):
    """Keeps every training log row (step, loss, learning rate, grad norm) for plots and metrics."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume the Trainer restores the log history up to the checkpoint: keep it, so the
        # curve has no gap; steps after the checkpoint are logged again as they are re-run.
        self.rows = [
            {"step": e["step"], **{k: v for k, v in e.items() if _is_number(v) and k != "step"}}
            for e in state.log_history
            if "loss" in e
        ]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, **{k: v for k, v in logs.items() if _is_number(v)}})


class StepLoss:
    """The loss of the current optimizer step: the sum of its micro-batch losses, unfiltered.

    The Trainer's own running loss replaces a NaN micro-batch loss by the average so far
    (logging_nan_inf_filter), so a diverged run logs plausible numbers; this one does not.
    """

    def __init__(self) -> None:
        self._sum: torch.Tensor | float = 0.0

    def reset(self) -> None:
        self._sum = 0.0

    def add(self, loss: torch.Tensor) -> None:
        self._sum = self._sum + loss.detach().float()

    def value(self) -> float:
        return float(self._sum)


class StepLossTrainer(Trainer):
    """The Trainer, with each micro-batch loss also added to step_loss."""

    def __init__(self, *args, step_loss: StepLoss, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_loss = step_loss

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.step_loss.add(loss)
        return loss


DIVERGENCE_FIXES = (
    "likely causes: train.learning_rate too high (lower it), float16 overflow "
    "(set quantization.compute_dtype to bfloat16, or float32), or bad training rows "
    "(check data/prepared); nothing was saved from this step on"
)


def _diverged(step: int, max_steps: int, what: str) -> TrainingDivergedError:
    return TrainingDivergedError(f"training diverged at optimizer step {step} of {max_steps}: {what}; {DIVERGENCE_FIXES}")


class NonFiniteGuard(TrainerCallback):
    """Stops training at the first non-finite loss, gradient norm or trainable weight, every step.

    Checked before the optimizer step (loss, gradients: the weights are still clean, no checkpoint
    holds NaN) and after it (the LoRA weights). Only trainable parameters are read: LoRA is small.
    Under fp16 mixed precision an infinite gradient is the loss scaler's business (it skips the
    step and lowers the scale), so only the loss and the weights are checked there.
    """

    def __init__(self, step_loss: StepLoss) -> None:
        self.step_loss = step_loss
        self.params: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = [p for p in model.parameters() if p.requires_grad] if model is not None else []

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_loss.reset()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1  # counted once the optimizer has stepped
        loss = self.step_loss.value()
        if not math.isfinite(loss):
            raise _diverged(step, state.max_steps, f"the training loss is {loss}")
        if args.fp16:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
            if not math.isfinite(norm):
                raise _diverged(step, state.max_steps, f"the gradient norm is {norm}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.params and not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):
            bad = sum(1 for p in self.params if not bool(torch.isfinite(p).all()))
            raise _diverged(
                state.global_step, state.max_steps, f"{bad} of {len(self.params)} trainable (LoRA) tensors hold NaN or inf after the optimizer step"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if key == "grad_norm" and args.fp16:
                continue
            if _is_number(value) and not math.isfinite(value):
                raise _diverged(state.global_step, state.max_steps, f"the logged {key} is {value}")


class RunLoss(TrainerCallback, ExportableState):
    """Sum and count of the per-step losses of the whole run, kept in every checkpoint.

    Stored in trainer_state.json (stateful_callbacks), which the Trainer writes last and atomically
    with the step it describes, so a resumed run's mean covers the steps before the resume too.
    """

    def __init__(self, step_loss: StepLoss, loss_sum: float = 0.0, steps: int = 0) -> None:
        self.step_loss = step_loss
        self.loss_sum = loss_sum
        self.steps = steps

    @classmethod
    def from_checkpoint(cls, step_loss: StepLoss, checkpoint: str | None) -> RunLoss:
        if not checkpoint:
            return cls(step_loss)
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        stored = state.get("stateful_callbacks", {}).get(cls.__name__)
        if isinstance(stored, dict) and "attributes" in stored:
            return cls(step_loss, float(stored["attributes"]["loss_sum"]), int(stored["attributes"]["steps"]))
        # A checkpoint from before the sum was stored: the logged losses, exact when logging_steps is 1.
        logged = [(e["step"], e["loss"]) for e in state.get("log_history", []) if "loss" in e]
        log.warning("checkpoint %s holds no loss sum; the run's mean loss is rebuilt from the logged losses", checkpoint)
        previous, total = 0, 0.0
        for step, loss in logged:
            total += loss * (step - previous)
            previous = step
        return cls(step_loss, total, previous)

    def on_step_end(self, args, state, control, **kwargs):
        self.loss_sum += self.step_loss.value()
        self.steps += 1

    def mean(self) -> float:
        return self.loss_sum / self.steps if self.steps else float("nan")

    def state(self) -> dict:
        return {"args": {}, "attributes": {"loss_sum": self.loss_sum, "steps": self.steps}}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def training_arguments(cfg: TrainConfig, checkpoint_dir: Path, use_bf16: bool, use_fp16: bool) -> TrainingArguments:
    """TrainingArguments from params: every knob comes from TrainConfig."""
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        save_only_model=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=use_bf16,
        fp16=use_fp16,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        eval_strategy="no",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=False,
        # Which layers recompute is set on the model (core/fast.py's memory plan), not a second time here.
        gradient_checkpointing=False,
    )


def checkpoint_is_complete(path: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short."""
    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return (path / "optimizer.pt").is_file() and any(path.glob("adapter_model.safetensors"))


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint, or None; partial ones (a kill during a save) are removed."""
    while checkpoint_dir.is_dir():
        newest = get_last_checkpoint(str(checkpoint_dir))
        if newest is None:
            return None
        if checkpoint_is_complete(Path(newest)):
            return newest
        log.warning("skipping incomplete checkpoint %s (interrupted while saving)", newest)
        shutil.rmtree(newest)
    return None


@dataclass
class TrainResult:
    global_step: int
    train_loss: float
    train_runtime_s: float
    tokens_seen: int
    resumed_from: str | None
    history: list[dict[str, Any]]


def train_adapter(
    model,
    tokenizer,
    train_dataset,
    collator,
    cfg: TrainConfig,
    checkpoint_dir: Path,
    compute_dtype: torch.dtype,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Train the LoRA adapter, resuming from the last complete checkpoint in checkpoint_dir."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    columns = [c for c in train_dataset.column_names if c not in MODEL_INPUT_COLUMNS]
    train_dataset = train_dataset.remove_columns(columns)
    # Fast path (core/fast.py): may change the model, micro-batch x accumulation and collator. On a
    # CPU it plans recompute against RAM and fuses the LoRA layers; the GPU-only pieces stay off.
    model, cfg, collator, _ = apply_fast_path(model, cfg, collator, train_dataset)
    # Mixed precision only where the compute dtype asks for it; CPU autocast to bf16 is slower.
    on_gpu = torch.cuda.is_available()
    args = training_arguments(
        cfg,
        checkpoint_dir,
        use_bf16=on_gpu and compute_dtype == torch.bfloat16,
        use_fp16=on_gpu and compute_dtype == torch.float16,
    )
    history = LossHistory()
    resume = latest_checkpoint(checkpoint_dir)
    if resume:
        log.info("resuming from %s", resume)
    step_loss = StepLoss()
    run_loss = RunLoss.from_checkpoint(step_loss, resume)
    trainer = StepLossTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        # The guard first: a diverged step raises before any other callback logs or saves it.
        callbacks=[NonFiniteGuard(step_loss), run_loss, ThroughputCallback(), history, *(callbacks or [])],
        step_loss=step_loss,
    )
    model.train()
    out = trainer.train(resume_from_checkpoint=resume)
    # The mean over every optimizer step of the run; out.training_loss covers this process only.
    loss = run_loss.mean()
    if not math.isfinite(loss):
        raise _diverged(out.global_step, out.global_step, f"the run's mean training loss is {loss}")
    return TrainResult(
        global_step=out.global_step,
        train_loss=loss,
        train_runtime_s=float(out.metrics.get("train_runtime", 0.0)),
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        resumed_from=resume,
        history=history.rows,
    )
