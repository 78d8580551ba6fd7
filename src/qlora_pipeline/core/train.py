"""LoRA training with the transformers Trainer.

The Trainer owns the loop, checkpoints and resume. This module adds what it lacks: real-token
throughput in the logs and a loss history for plots. Tracking (MLflow) plugs in as a callback
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
from transformers.trainer_utils import get_last_checkpoint

from qlora_pipeline.config import TrainConfig
from qlora_pipeline.core.fast import apply_fast_path

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
        # Checkpointing is switched on by apply_lora (non-reentrant), not a second time here.
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
    # GPU fast path (core/fast.py): may change the model, micro-batch x accumulation and collator.
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
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[ThroughputCallback(), history, *(callbacks or [])],
    )
    resume = latest_checkpoint(checkpoint_dir)
    if resume:
        log.info("resuming from %s", resume)
    model.train()
    out = trainer.train(resume_from_checkpoint=resume)
    loss = float(out.training_loss)
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss}; lower train.learning_rate or check the data")
    return TrainResult(
        global_step=out.global_step,
        train_loss=loss,
        train_runtime_s=float(out.metrics.get("train_runtime", 0.0)),
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        resumed_from=resume,
        history=history.rows,
    )
