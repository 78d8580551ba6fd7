"""Trainer callbacks for train_adapter (core/train.py).

Real-token throughput in the logs, the training progress display, the loss history for plots, the
stop at the first non-finite loss, gradient or LoRA weight, and a checkpoint at every new best eval loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from qlora_pipeline import progress
from qlora_pipeline.core.resume import StepLoss, is_number, loss_rows
from qlora_pipeline.errors import TrainingDivergedError


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


def _train_status(logs: dict[str, Any]) -> str:
    status = f"loss {logs['loss']:.4f}" if is_number(logs.get("loss")) else f"loss {logs.get('loss')}"
    if is_number(logs.get("tokens_per_second")):
        status += f", {logs['tokens_per_second']:,.0f} tokens/s"
    return status


class TrainingProgress(TrainerCallback):
    """Training progress in place of transformers' tqdm bar and the log dicts it prints.

    On a terminal: one bar (step, loss, tokens/s, ETA), and a passing one while the Trainer
    evaluates. Elsewhere: one line per logging step (step n/N, loss, tokens/s, ETA) and one per
    evaluation, nothing in between. Added after ThroughputCallback, so the logs hold its tokens/s.
    """

    def __init__(self) -> None:
        self.bar: progress.Bar | None = None
        self.eval_bar: progress.Bar | None = None
        self.status = ""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress.bar("training", total=state.max_steps, completed=state.global_step, keep=True, plain=False)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(completed=state.global_step)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bar is None:
            return
        if self.eval_bar is None:
            try:
                total = len(eval_dataloader)
            except TypeError:
                total = None
            self.eval_bar = progress.bar("evaluating", total=total)
        self.eval_bar.update(advance=1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        step = f"training step {state.global_step}/{state.max_steps}"
        if "loss" in logs:
            self.status = _train_status(logs)
            self.bar.update(completed=state.global_step, info=self.status)
            self.bar.report("%s: %s, ETA %s", step, self.status, progress.format_eta(self.bar.eta_s()))
        elif is_number(logs.get("eval_loss")):
            self.bar.update(info=f"{self.status}, eval loss {logs['eval_loss']:.4f}".lstrip(", "))
            self.bar.report("%s: eval loss %.4f", step, logs["eval_loss"])

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """End the bars; called on errors too, so a failed run leaves no live display behind."""
        for bar in (self.eval_bar, self.bar):
            if bar is not None:
                bar.close()
        self.bar = self.eval_bar = None


@dataclass
class LossHistory(TrainerCallback):
    """Keeps every training log row (step, loss, learning rate, grad norm) for plots and metrics."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume the Trainer restores the log history up to the checkpoint: keep it, so the
        # curve has no gap; steps after the checkpoint are logged again as they are re-run.
        self.rows = loss_rows(state.log_history)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, **{k: v for k, v in logs.items() if is_number(v)}})


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
            if is_number(value) and not math.isfinite(value):
                raise _diverged(state.global_step, state.max_steps, f"the logged {key} is {value}")


class SaveNewBest(TrainerCallback):
    """Saves a checkpoint at every evaluation that beats the best eval loss so far.

    The Trainer saves every save_steps only; a best found at an evaluation in between would have
    no checkpoint, and load_best_model_at_end would quietly keep a worse one (or the last).
    """

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get("eval_loss")
        # Runs before the Trainer records this evaluation: best_metric is still the previous best.
        if is_number(value) and math.isfinite(value) and (state.best_metric is None or value < state.best_metric):
            control.should_save = True
