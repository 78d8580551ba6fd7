"""Checkpoints and the whole run's totals across resumes.

The Trainer restores weights, optimizer, scheduler, RNG and data order from a checkpoint, but its
loss and runtime cover only the process that resumed, and a checkpoint written at the final step
would be trained on past the schedule. Here: which checkpoint to resume from, totals kept in every
checkpoint, and a finished run read back from its final checkpoint without training again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint

log = logging.getLogger(__name__)


class StepLoss:
    """The loss of the current optimizer step: the sum of its micro-batch losses, unfiltered.

    The Trainer's own running loss replaces a NaN micro-batch loss by the average so far
    (logging_nan_inf_filter), so a diverged run logs plausible numbers; this one does not.
    On several ranks the value is the mean of the ranks' sums (one all-reduce per step, made by
    every rank at the same callback): each rank's loss is already scaled by the Trainer to its
    share of the global batch's tokens times the number of ranks, so the mean is the step's loss.
    """

    def __init__(self) -> None:
        self._sum: torch.Tensor | float = 0.0
        self._reduced: float | None = None

    def reset(self) -> None:
        self._sum = 0.0
        self._reduced = None

    def add(self, loss: torch.Tensor) -> None:
        self._sum = self._sum + loss.detach().float()
        self._reduced = None

    def value(self) -> float:
        if self._reduced is None:
            self._reduced = _mean_over_ranks(self._sum)
        return self._reduced


def _mean_over_ranks(value: torch.Tensor | float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    device = value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.as_tensor(value, dtype=torch.float32, device=device).clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


class RunLoss(TrainerCallback, ExportableState):
    """Sum and count of the per-step losses of the whole run, kept in every checkpoint.

    Stored in trainer_state.json (stateful_callbacks), which the Trainer writes last and atomically
    with the step it describes, so a resumed run's mean covers the steps before the resume too.
    """

    def __init__(self, step_loss: StepLoss, loss_sum: float = 0.0, steps: int = 0, runtime_s: float = 0.0) -> None:
        self.step_loss = step_loss
        self.loss_sum = loss_sum
        self.steps = steps
        self.runtime_s = runtime_s
        """Training time before this process (from the checkpoint)."""
        self._began: float | None = None

    @classmethod
    def from_checkpoint(cls, step_loss: StepLoss, checkpoint: str | None) -> RunLoss:
        if not checkpoint:
            return cls(step_loss)
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        stored = state.get("stateful_callbacks", {}).get(cls.__name__)
        if isinstance(stored, dict) and "attributes" in stored:
            attrs = stored["attributes"]
            return cls(step_loss, float(attrs["loss_sum"]), int(attrs["steps"]), float(attrs.get("runtime_s", 0.0)))
        # A checkpoint from before the sum was stored: the logged losses, exact when logging_steps is 1.
        logged = [(e["step"], e["loss"]) for e in state.get("log_history", []) if "loss" in e]
        log.warning("checkpoint %s holds no loss sum; the run's mean loss is rebuilt from the logged losses", checkpoint)
        previous, total = 0, 0.0
        for step, loss in logged:
            total += loss * (step - previous)
            previous = step
        return cls(step_loss, total, previous)

    def on_train_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.loss_sum += self.step_loss.value()
        self.steps += 1

    def mean(self) -> float:
        return self.loss_sum / self.steps if self.steps else float("nan")

    def elapsed_s(self) -> float:
        """Wall time of the whole run in seconds: before the resume plus this process's training."""
        return self.runtime_s + (time.perf_counter() - self._began if self._began is not None else 0.0)

    def state(self) -> dict:
        return {"args": {}, "attributes": {"loss_sum": self.loss_sum, "steps": self.steps, "runtime_s": self.elapsed_s()}}


# The optimizer state as the Trainer saves it: optimizer.pt on one rank and under DDP; under FSDP
# accelerate's save_fsdp_optimizer writes optimizer.bin (FULL_STATE_DICT, which core/train.py's
# fsdp_arguments sets: the adapter is then saved whole as adapter_model.safetensors).
OPTIMIZER_STATE_NAMES = ("optimizer.pt", "optimizer.bin")


def checkpoint_is_complete(path: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short.
    It must also hold the optimizer state (OPTIMIZER_STATE_NAMES) and the adapter's weights."""
    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return any((path / name).exists() for name in OPTIMIZER_STATE_NAMES) and (path / "adapter_model.safetensors").is_file()


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint, or None; partial ones (a kill during a save) are removed."""
    while checkpoint_dir.is_dir():
        newest = get_last_checkpoint(str(checkpoint_dir))
        if newest is None:
            return None
        if checkpoint_is_complete(Path(newest)):
            return newest
        log.warning("skipping incomplete checkpoint %s (interrupted while saving)", newest)
        shutil.rmtree(newest, ignore_errors=True)  # every rank prunes it; one that loses the race loops on
    return None


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def loss_rows(log_history: list[dict]) -> list[dict[str, Any]]:
    """The training log rows (step, loss, learning rate, ...) of a Trainer log history."""
    return [{"step": e["step"], **{k: v for k, v in e.items() if is_number(v) and k != "step"}} for e in log_history if "loss" in e]


def eval_rows(log_history: list[dict]) -> list[dict[str, Any]]:
    """{step, eval_loss} of each in-training evaluation in a Trainer log history."""
    return [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]


@dataclass(frozen=True)
class FinishedRun:
    """A run whose final step is checkpointed: what it trained, read back from the checkpoint."""

    state: dict
    weights_from: Path
    run_loss: RunLoss


def finished_run(checkpoint: str | None, step_loss: StepLoss, max_steps: int, epochs: float) -> FinishedRun | None:
    """The finished run in checkpoint when it holds the last step of this schedule (max_steps, or
    with max_steps -1 the epochs the checkpoint's run was planned for), else None.

    A failure after the final checkpoint (saving the adapter, an upload, a signal) leaves one;
    resuming from it would train one step past max_steps (or none, reporting zeros). With
    evaluation during training its weights come from the best checkpoint, as load_best_model_at_end
    would have left them.
    """
    if not checkpoint:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    if max_steps > 0:
        last_step = max_steps
    elif float(state.get("num_train_epochs") or 0) == float(epochs):
        last_step = int(state.get("max_steps") or 0)
    else:  # the schedule changed (an epoch count of another run): train on from the checkpoint
        return None
    if not 0 < last_step <= int(state.get("global_step") or 0):
        return None
    best = state.get("best_model_checkpoint")
    weights_from = Path(best) if best and checkpoint_is_complete(Path(best)) else Path(checkpoint)
    return FinishedRun(state, weights_from, RunLoss.from_checkpoint(step_loss, checkpoint))


def load_adapter_weights(model, checkpoint: Path) -> None:
    """Put the LoRA weights saved in checkpoint into model (a peft model, adapter `default`)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise RuntimeError(f"checkpoint {checkpoint} holds adapter weights the model lacks: {unexpected[:5]}")
