"""The `train:` section of params.yaml (TrainConfig), and the base every section shares.

Re-exported by qlora_pipeline.config, which is where to import it from.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """A params.yaml section: unknown keys are refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    """-1: run `epochs` epochs; otherwise stop after this many optimizer steps."""
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit"] = "adamw_torch"
    gradient_checkpointing: bool | int | Literal["auto"] = "auto"
    """Recompute activations in the backward: true (every decoder layer), false, a number of layers,
    or auto (as few layers as memory_budget_gib needs: GPU memory, or RAM on a CPU)."""
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    eval_steps: int = Field(0, ge=0)
    """0: off. Else the loss on the eval split every eval_steps optimizer steps and at the last step
    (logged as eval_loss: MLflow, plots/train_loss.png), and the adapter saved is the checkpoint with
    the lowest eval loss, not the last one (metrics/train.json: best_step, best_eval_loss).
    save_steps must then be a multiple of eval_steps (the Trainer's rule for keeping the best
    checkpoint); a new best is saved whenever it is evaluated, so none is lost between saves."""
    seed: int = 42
    num_threads: int = Field(0, ge=0)
    """CPU threads for torch; 0 keeps torch's default."""
    num_gpus: int | Literal["auto"] = "auto"
    """Ranks to train on (torchrun, data-parallel): auto, every visible GPU; or N. The global batch
    stays per_device_batch_size x gradient_accumulation_steps (each rank accumulates 1/N of the
    steps). On a machine without a GPU, N > 1 runs N CPU ranks (gloo)."""
    distributed: Literal["ddp", "fsdp", "auto"] = "auto"
    """How several ranks share the work: ddp (each rank holds the whole 4-bit model and trains on
    its share of every batch), or fsdp (FSDP2 through accelerate: the 4-bit weights, the adapter and
    its optimizer state sharded across the GPUs, each layer gathered while it runs; needs CUDA GPUs
    and 4-bit storage in the compute dtype, see quantization.quant_storage). auto: ddp when the
    model and the smallest training plan fit one GPU, fsdp otherwise (distributed.strategy)."""
    # The fast GPU path (core/fast/). auto: on with a CUDA GPU, off on a CPU.
    use_liger: bool | Literal["auto"] = "auto"
    """Fused RMSNorm, RoPE, SwiGLU and linear+cross-entropy from liger-kernel (the `gpu` extra)."""
    fused_lora: bool | Literal["auto"] = "auto"
    """Each LoRA linear layer as one autograd node (frozen matmul, dropout, adapter, fused add);
    each decoder layer's last one runs its adapter first, so recompute skips its frozen matmul."""
    fused_dropout: bool | Literal["auto"] = "auto"
    """With fused_lora on a CUDA GPU: LoRA dropout fused into the adapter's rank-r matmuls (Triton,
    core/lowrank_dropout.py): the mask is drawn again in the backward from a seed, so neither the
    dropped-out input nor a mask is kept or written (a decoder layer not recomputed keeps what it
    keeps without dropout), and the input is read once. On an H200, 8B shape: an adapter's forward
    2.5x and backward 1.4x the bit-mask kernels' speed, the training step 1.05x (benchmarks/README.md).
    Takes precedence over dropout_mask_bits. A layer the kernels cannot take (in_features not a multiple
    of 8, rank above 128) keeps its masks as dropout_mask_bits says (bits under cuda_graphs). auto: on
    with a CUDA GPU and triton."""
    selective_recompute: bool | Literal["auto"] = "auto"
    """With fused_lora and without compile: a recomputed decoder layer may keep its MLP's gate_proj and
    up_proj outputs (2 x intermediate_size values per token), so its recompute skips those matmuls,
    most of a recompute's matmuls (core/fast/selective.py). The memory plan decides how many recomputed
    layers do, within memory_budget_gib. On an H200, 8B shape at 14.2 GiB: 1.01x the step with whole
    recomputes (benchmarks/README.md). Needs LoRA on gate_proj and up_proj in every decoder layer.
    auto: on with fused_lora and without compile where the model has them; off under FSDP. true is
    refused where it cannot run."""
    dropout_mask_bits: bool | Literal["auto"] = False
    """With fused_lora on a CUDA GPU: LoRA dropout keeps its mask as bits (a Triton kernel), not bytes:
    ~6% less peak memory at the same recompute, but no faster (Triton's launch cost); auto: on with CUDA.
    Applies where fused_dropout is off. With cuda_graphs, LoRA dropout uses the fused dropout or else the
    bit masks whatever this says (their seeded draws are what a captured recompute can repeat); the run
    record's plan_dropout_fused and plan_dropout_mask_bits say which trained."""
    padding_free: bool | Literal["auto"] = "auto"
    """Drop pad tokens: each micro-batch becomes one row of samples, attention kept per sample."""
    tune_micro_batch: bool = True
    """On a GPU, trade per_device_batch_size against gradient_accumulation_steps (same product)."""
    memory_budget_gib: float | Literal["auto"] = "auto"
    """Peak GPU memory the plan aims under, as torch allocates it (max_memory_allocated); auto: 90% of
    the GPU's memory. torch's caching allocator reserves more than that peak: on an H200, 8B shape,
    4 x 2048 tokens, 1.5-2.1 GiB more at a 14.2 GiB budget and up to 2.8 GiB more at 24-40 GiB (with
    cuda_graphs' private pool and selective recompute), so leave about 3 GiB of a card's memory
    outside the budget (benchmarks/README.md)."""
    compile: bool | Literal["auto"] = False
    """torch.compile each decoder layer (removes the per-layer Python overhead; the first step pays
    the compile). auto: on with a CUDA GPU. Off by default: no speed-up measured on an H200
    (benchmarks/README.md)."""

    cuda_graphs: bool | Literal["auto"] = "auto"
    """Replay the decoder layers' forward and backward from CUDA graphs (core/fast/graphs.py): the
    host's kernel launches leave the step. Needs fused_lora; LoRA dropout then draws its masks from
    seeds (the fused dropout, else bit masks; triton). One shape is captured, so it pays where every training row has one length (a corpus
    cut into max_seq_len chunks); SFT samples of varying length stay eager. auto: on with one
    CUDA GPU when the training rows have one length."""

    @field_validator("gradient_checkpointing")
    @classmethod
    def _layer_count(cls, v: bool | int | str) -> bool | int | str:
        if not isinstance(v, bool) and isinstance(v, int) and v < 0:
            raise ValueError("must be true, false, auto or a number of layers >= 0")
        return v

    @field_validator("num_gpus", mode="before")
    @classmethod
    def _rank_count(cls, v: int | str) -> int | str:
        if isinstance(v, bool) or (isinstance(v, int) and v < 1):
            raise ValueError("must be auto or a number of GPUs >= 1")
        return v

    @field_validator("memory_budget_gib", mode="before")
    @classmethod
    def _budget_not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # pydantic would take true for 1.0 GiB
            raise ValueError("must be auto or a positive number of GiB, e.g. 14")
        return v

    @field_validator("memory_budget_gib")
    @classmethod
    def _positive_budget(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not (0 < v < math.inf):  # NaN fails every comparison
            raise ValueError("must be auto or a positive number of GiB, e.g. 14")
        return v

    @model_validator(mode="after")
    def _fast_path_combinations(self) -> "TrainConfig":
        """Switches that cannot work together, refused at load time (qlora check), not at train start."""
        if isinstance(self.num_gpus, int) and self.num_gpus > 1 and self.gradient_accumulation_steps % self.num_gpus:
            fits, accum = (self.gradient_accumulation_steps // self.num_gpus + 1) * self.num_gpus, self.gradient_accumulation_steps
            raise ValueError(f"gradient_accumulation_steps ({accum}) must be a multiple of num_gpus ({self.num_gpus}): the global batch "
                             f"is divided among the ranks; set it to {fits}, or num_gpus to a divisor of it")
        if self.dropout_mask_bits is True and self.fused_lora is False:
            raise ValueError(
                "dropout_mask_bits: true needs fused LoRA layers (the bit masks live in their autograd node); "
                "set fused_lora to auto or true, or dropout_mask_bits to false"
            )
        if self.distributed == "fsdp" and self.compile is True:
            raise ValueError(
                "distributed: fsdp and compile: true cannot both apply: compiled decoder layers are not "
                "supported under FSDP here; set compile to false (or auto), or distributed to ddp"
            )
        if self.distributed == "fsdp" and self.num_gpus == 1:
            raise ValueError(
                "distributed: fsdp shards the model across several GPUs but num_gpus is 1; "
                "set num_gpus to auto or a number > 1, or distributed to auto"
            )
        if self.cuda_graphs is True and isinstance(self.num_gpus, int) and self.num_gpus > 1:
            raise ValueError(
                f"cuda_graphs: true runs on one GPU but num_gpus is {self.num_gpus}; set cuda_graphs to auto "
                "(off with several GPUs) or num_gpus to 1"
            )
        if self.cuda_graphs is True and (self.compile is True or self.fused_lora is False or self.distributed == "fsdp"):
            raise ValueError(
                "cuda_graphs: true needs fused LoRA layers, without compile and without fsdp (the graphs hold "
                "the whole layers); set cuda_graphs to auto or false, or fused_lora to auto/true, compile to false "
                "and distributed to ddp or auto"
            )
        for name, what in (("fused_dropout", "the dropout lives"), ("selective_recompute", "the kept outputs live")):
            if getattr(self, name) is True and (self.compile is True or self.fused_lora is False):
                raise ValueError(
                    f"{name}: true needs fused LoRA layers without compile ({what} in their autograd node); "
                    f"set fused_lora to auto or true and compile to false, or {name} to auto or false"
                )
        if self.selective_recompute is True and self.distributed == "fsdp":
            raise ValueError(
                "selective_recompute: true does not run under distributed: fsdp (its layers gather their weights "
                "again for the recompute); set selective_recompute to auto (off under fsdp) or false, or distributed to ddp"
            )
        if self.dropout_mask_bits is True and self.compile is True:
            raise ValueError(
                "dropout_mask_bits: true and compile: true cannot both apply: compiled layers fuse their own "
                "dropout and keep no mask; set one of them to false (or auto)"
            )
        return self

    @model_validator(mode="after")
    def _eval_fits_schedule(self) -> "TrainConfig":
        if not self.eval_steps:
            return self
        if self.save_steps % self.eval_steps:
            lower = self.save_steps // self.eval_steps * self.eval_steps
            options = f"{lower} or {lower + self.eval_steps}" if lower else f"{self.eval_steps}"
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}) so that the best "
                f"checkpoint can be kept; set save_steps to {options}, or eval_steps to a divisor of {self.save_steps}"
            )
        if self.max_steps > 0 and self.eval_steps > self.max_steps:
            raise ValueError(
                f"eval_steps ({self.eval_steps}) is past the last step (max_steps {self.max_steps}): the eval curve "
                f"would have one point; set eval_steps to at most {self.max_steps}, or 0 to turn it off"
            )
        return self
