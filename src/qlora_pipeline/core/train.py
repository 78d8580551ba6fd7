"""LoRA training with the transformers Trainer.

The Trainer owns the loop, checkpoints and resume. This module adds what it lacks: real-token
throughput in the logs, a loss history for plots, a stop at the first non-finite loss, gradient or
LoRA weight (the Trainer would carry on and save an all-NaN adapter), and the mean loss of the
whole run, also after a resume (the Trainer averages only the steps run in this process). The
callbacks doing most of that are in core/callbacks.py. Tracking (MLflow) plugs in as a callback
from the stage layer, so nothing here imports it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from qlora_pipeline.config import TrainConfig
from qlora_pipeline.core.callbacks import LossHistory, NonFiniteGuard, SaveNewBest, ThroughputCallback, TrainingProgress, _diverged
from qlora_pipeline.core.fast import apply_fast_path, decoder_layers
from qlora_pipeline.core.resume import RunLoss, StepLoss, eval_rows, finished_run, latest_checkpoint, load_adapter_weights, loss_rows
from qlora_pipeline.errors import DataError

log = logging.getLogger(__name__)

MODEL_INPUT_COLUMNS = ("input_ids", "labels")


class StepLossTrainer(Trainer):
    """The Trainer, with each micro-batch loss also added to step_loss, and the eval split batched
    by eval_collator (plain padded batches) whatever the fast path made of the training collator."""

    def __init__(self, *args, step_loss: StepLoss, eval_collator=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_loss = step_loss
        self.eval_collator = eval_collator

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        # The DataLoader keeps the collator it was built with; training's is put back at once.
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.step_loss.add(loss)
        return loss


def fsdp_arguments(layer_class: str) -> dict[str, Any]:
    """The Trainer's FSDP2 settings (accelerate's fsdp2_prepare_model): one unit per decoder layer,
    resharded after its forward; checkpoints with the full adapter state gathered on rank 0."""
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": [layer_class],
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        },
    }


def training_arguments(
    cfg: TrainConfig, checkpoint_dir: Path, use_bf16: bool, use_fp16: bool, fsdp_layer_class: str | None = None
) -> TrainingArguments:
    """TrainingArguments from params: every knob comes from TrainConfig. fsdp_layer_class: shard
    the model with FSDP2, one unit per layer of this class (fsdp_arguments)."""
    return TrainingArguments(
        **(fsdp_arguments(fsdp_layer_class) if fsdp_layer_class else {}),
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
        # train.eval_steps > 0: the eval split's loss every eval_steps steps, and the checkpoint with
        # the lowest one loaded at the end (config.py checks save_steps is a multiple of eval_steps).
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        prediction_loss_only=True,  # the loss only: no logits (tokens x vocab) kept across the eval set
        label_names=["labels"],  # peft models hide the signature the Trainer reads label names from
        load_best_model_at_end=bool(cfg.eval_steps),
        metric_for_best_model="eval_loss" if cfg.eval_steps else None,
        greater_is_better=False if cfg.eval_steps else None,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=False,
        # the Trainer sets transformers' verbosity to warning on ranks > 0 by default; keep the one the CLI set
        log_level_replica="passive",
        # Which layers recompute is set on the model (core/fast/memory.py's memory plan), not a second time here.
        gradient_checkpointing=False,
        # Several ranks (torchrun): every LoRA parameter takes part in every step, so DDP need not
        # search the graph for unused ones each step.
        ddp_find_unused_parameters=False,
    )


@dataclass
class TrainResult:
    global_step: int
    train_loss: float
    train_runtime_s: float
    tokens_seen: int
    resumed_from: str | None
    history: list[dict[str, Any]]
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    """{step, eval_loss} at each evaluation (train.eval_steps > 0)."""
    best_step: int | None = None
    """The step of the checkpoint with the lowest eval loss: the weights the model holds at the end."""
    best_eval_loss: float | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    """What trained (FastPathReport.record, the attention implementation, the measured peak
    memory); empty when nothing trained (the final step was checkpointed already)."""
    adapter_state: dict[str, torch.Tensor] | None = None
    """After an FSDP training: the adapter's parameters gathered whole (peft names), to save with
    model.save_pretrained(..., state_dict=adapter_state); the model's own are shards."""


def graph_counts(model: torch.nn.Module) -> dict[str, int]:
    """With CUDA graphs installed, StackRunner.counts as cuda_graph_*: the record says whether they ran."""
    from qlora_pipeline.core.fast import stack_runner

    runner = stack_runner(model)
    return {f"cuda_graph_{k}": v for k, v in runner.counts().items()} if runner is not None else {}


def gather_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (the adapter) as whole tensors on the CPU, gathered from FSDP2 shards.

    Every rank must call it: each DTensor.full_tensor() is an all-gather. Only the adapter's
    weights travel, never the 4-bit base.
    """
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def train_adapter(
    model,
    tokenizer,
    train_dataset,
    collator,
    cfg: TrainConfig,
    checkpoint_dir: Path,
    compute_dtype: torch.dtype,
    callbacks: list[TrainerCallback] | None = None,
    eval_dataset=None,
    eval_collator=None,
    sharded: bool = False,
) -> TrainResult:
    """Train the LoRA adapter, resuming from the last complete checkpoint in checkpoint_dir.

    sharded: under torchrun, shard the model with FSDP2 (load it with 4-bit storage in the compute
    dtype: core.model.load_base_model(..., sharded=True)); the result then carries the gathered
    adapter (adapter_state). Every rank calls this function.

    collator: the Trainer's data collator; for the fast path's padding-free batches build it with
    make_collator(..., padding_free=resolve_options(cfg).padding_free) (core/data/collate.py).
    With cfg.eval_steps > 0, eval_dataset's loss is computed every eval_steps steps, batched by
    eval_collator (default: the training collator), and the model ends with the weights of the
    evaluation with the lowest loss.

    Raises:
        DataError: eval_steps is set and the eval split is empty.
        TrainingDivergedError: a loss or gradient norm went non-finite (core/callbacks.py).
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    columns = [c for c in train_dataset.column_names if c not in MODEL_INPUT_COLUMNS]
    train_dataset = train_dataset.remove_columns(columns)
    if cfg.eval_steps:
        if eval_dataset is None or not len(eval_dataset):
            raise DataError("train.eval_steps is set but the eval split is empty; set train.eval_steps: 0 or prepare an eval split")
        eval_dataset = eval_dataset.remove_columns([c for c in eval_dataset.column_names if c not in MODEL_INPUT_COLUMNS])
        # The stage passes padded batches, as the evaluate stage uses: an eval loss should not
        # depend on a training-speed measure such as padding-free batches.
        eval_collator = eval_collator or collator
    else:
        eval_dataset = eval_collator = None
    step_loss = StepLoss()
    resume = latest_checkpoint(checkpoint_dir)
    done = finished_run(resume, step_loss, cfg.max_steps, cfg.epochs)
    if done is not None:  # the final step is checkpointed: nothing left to train
        log.info("%s holds the final step %s; training is complete, weights from %s", resume, done.state["global_step"], done.weights_from.name)
        load_adapter_weights(model, done.weights_from)
        return _result(done.state, done.run_loss, resume, loss_rows(done.state.get("log_history", [])), eval_dataset is not None)
    # Fast path (core/fast/): may change the model and micro-batch x accumulation. On a CPU it
    # plans recompute against RAM and fuses the LoRA layers; the GPU-only pieces stay off.
    model, cfg, report = apply_fast_path(model, cfg, train_dataset, sharded=sharded)
    if report.padding_free and not getattr(collator, "attention_boundaries", False):
        log.warning("train.padding_free is on but the collator pads its batches; build it with make_collator(..., padding_free=True)")
        report = dataclasses.replace(report, padding_free=False)  # the record says what trained
    # Mixed precision only where the compute dtype asks for it; CPU autocast to bf16 is slower.
    on_gpu = torch.cuda.is_available()
    args = training_arguments(
        cfg,
        checkpoint_dir,
        use_bf16=on_gpu and compute_dtype == torch.bfloat16,
        use_fp16=on_gpu and compute_dtype == torch.float16,
        fsdp_layer_class=type(decoder_layers(model)[0]).__name__ if sharded else None,
    )
    history = LossHistory()
    if resume:
        log.info("resuming from %s", resume)
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
        eval_dataset=eval_dataset,
        eval_collator=eval_collator,
    )
    if eval_dataset is not None:
        trainer.add_callback(SaveNewBest())
    # Our progress display replaces transformers' (a tqdm bar, or printed log dicts with disable_tqdm).
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    display = TrainingProgress()
    trainer.add_callback(display)
    model.train()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        display.close()
    state = trainer.state
    fields = ("global_step", "num_input_tokens_seen", "log_history", "best_model_checkpoint", "best_global_step", "best_metric")
    result = _result({k: getattr(state, k, None) for k in fields}, run_loss, resume, history.rows, eval_dataset is not None)
    result.plan = {**report.record(), **graph_counts(model), "attention": _attention(model), **measured_peak_memory()}
    if sharded:
        result.adapter_state = gather_trainable(trainer.model)
    return result


def _attention(model) -> str:
    config = getattr(getattr(model, "base_model", model), "config", None) or getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def measured_peak_memory() -> dict[str, float | str]:
    """The peak memory this process used: on a GPU the CUDA allocator's peak (torch's
    max_memory_allocated, GiB), on a CPU the process's peak resident set (getrusage ru_maxrss,
    KiB on Linux), which also holds the Python runtime and the data."""
    if torch.cuda.is_available():
        return {"measured_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "measured_peak_of": "cuda allocator"}
    import resource

    return {"measured_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "measured_peak_of": "process rss"}


def _result(state: dict, run_loss: RunLoss, resume: str | None, history: list[dict], evaluated: bool) -> TrainResult:
    """Whole-run figures: the mean loss over every optimizer step and the training time of every
    process (the Trainer's own cover the steps run since the resume only)."""
    loss = run_loss.mean()
    if not math.isfinite(loss):
        raise _diverged(state["global_step"], state["global_step"], f"the run's mean training loss is {loss}")
    best = evaluated and state.get("best_model_checkpoint") is not None
    return TrainResult(
        global_step=int(state["global_step"]),
        train_loss=loss,
        train_runtime_s=run_loss.elapsed_s(),
        tokens_seen=int(state.get("num_input_tokens_seen") or 0),
        resumed_from=resume,
        history=history,
        eval_history=eval_rows(state.get("log_history", [])),
        best_step=state.get("best_global_step") if best else None,
        best_eval_loss=float(state["best_metric"]) if best else None,
    )
