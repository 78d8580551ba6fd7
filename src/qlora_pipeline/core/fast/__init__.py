"""The fast GPU training path: fused kernels, a lean LoRA step, padding-free batches, a memory plan.

    model, cfg, report = apply_fast_path(model, cfg, train_dataset)

core/train.py makes this call before it builds the Trainer; the padding-free batches come from the
data collator (core/data/collate.py, `make_collator(..., padding_free=...)`). Each piece has a knob in `train:`
(params.yaml) whose default `auto` means "on with a CUDA GPU" unless said otherwise below. On the
8B shape on an H200 (benchmarks/README.md), with the memory budget at 0.6x the original recipe's
peak, the pieces together give 12,121-12,140 tokens/s at 13.7 GiB (1.53x plain transformers + peft in
the same runs; variable-length samples 8.6x the original recipe):

- per-layer gradient checkpointing: recompute only as many decoder layers as the memory budget
  needs, the first ones (their recompute runs last, when the later layers' activations are freed);
- selective recompute (`train.selective_recompute`, selective.py): a recomputed layer may keep its
  MLP's gate/up outputs, so its recompute skips those matmuls; the plan decides how many do (8B at
  14.2 GiB: 31 recomputed, 9 selectively, instead of 27 wholly: 1.01x);
- micro-batch: per_device_batch_size traded against gradient_accumulation_steps, same product,
  chosen with the memory budget by a small cost model (GPU time vs host time per micro-batch);
- liger-kernel (the `gpu` extra): fused RMSNorm, RoPE, SwiGLU and linear+cross-entropy, which never
  materialises the (tokens x vocab) logits: half the memory of checkpointed training;
- fused LoRA: each LoRA linear layer one autograd node (frozen matmul, dropout, adapter, fused
  add) instead of peft's seven, and siblings on one input (q/k/v, gate/up) one node together; the
  last one of each decoder layer runs its adapter first, so a recomputed layer stops before its
  frozen matmul (down_proj on Llama), which then adds the adapter's update in its epilogue;
- fused LoRA dropout (`train.fused_dropout`, core/lowrank_dropout.py): the dropout inside the
  adapter's rank-r matmuls (Triton), its mask drawn again in the backward from a seed, so no
  dropped-out copies are written or kept: 1.05x the step with the masks kept, less memory;
- dropout masks as bits (opt-in where the fused dropout is off, `train.dropout_mask_bits`): ~6% less
  peak at the same recompute, no faster (Triton's launch cost on the host outweighs its lighter kernels);
- padding-free batches: pad tokens dropped, samples packed into one row with per-sample position
  ids, kept apart by variable-length flash attention; unpacked full rows use cuDNN attention;
- CUDA graphs (`train.cuda_graphs`; auto: with one CUDA GPU and training rows all of one length,
  a corpus cut into max_seq_len chunks say): the decoder stack's forward and backward (recompute included) replayed as
  two CUDA graphs, so the host's launches leave the step (graphs.py); the LoRA dropout (fused, else
  bit masks) is then seeded per layer from a tensor. 1B shape: 1.16x at 0.82x the memory; 8B: 1.02x;
- compile (opt-in, `train.compile`, default false): torch.compile of each decoder layer (one
  graph, no graph breaks, ~11 s at the first step); liger then keeps only its fused
  linear+cross-entropy (inductor fuses norms, RoPE and SwiGLU). On the H200 it was slower at
  4 x 2048 tokens (10,627 vs 11,060 tokens/s before the sibling groups), though it peaked lower (9.4
  vs 13.2 GiB). Hence off by default.

On a CPU the memory plan and fused LoRA run too (their `auto` includes the CPU); the rest stays
off. SmolLM2-135M, 8 x 128 tokens, 2 cores (benchmarks/README.md, "CPU"): 199 tokens/s against 98
with every layer recomputed and peft's LoRA layers, as the CPU trained before:

- memory plan against RAM: `gradient_checkpointing: auto` recomputes as few layers as fit in
  `memory_budget_gib` (auto: half the RAM available when training starts), so with RAM to spare
  nothing is recomputed (every layer recomputed: 144 tokens/s);
- fused LoRA, its dropout masks drawn 16 random bits per element (bits16_dropout): torch's CPU
  dropout draws one 32-bit number per element in a serial loop, 24% of a step before (fused LoRA
  with torch's masks: 155 tokens/s).

Imports only torch / transformers / peft (liger-kernel and triton when installed): runs on a bare
GPU box.

options: the knobs resolved for this machine; memory: the memory plan and its cost model; nodes:
the LoRA autograd nodes and their dropout masks; layers: compile, liger and fused LoRA on the model;
attention: the attention of padding-free batches; graphs: CUDA graphs of the decoder stack;
selective: the kept outputs of selectively recomputed layers. This module: apply_fast_path and its report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from qlora_pipeline.core.fast.attention import (
    FAST_ATTENTION,
    IGNORE_INDEX,
    _varlen_call,
    cudnn_attention_works,
    enable_fast_attention,
    fast_attention,
    pack_sequences,
    varlen_attention_works,
)
from qlora_pipeline.core import bitmask_dropout, lowrank_dropout
from qlora_pipeline.core.fast.graph_blockers import graph_blocker
from qlora_pipeline.core.fast.graphs import StackRunner, disable_cuda_graphs, enable_cuda_graphs, stack_runner
from qlora_pipeline.core.fast.layers import (
    COMPILE_BACKEND,
    SIBLING_GROUPS,
    _lora_inputs,
    apply_liger,
    compile_layers,
    fuse_lora,
    selective_recompute_possible,
    unfuse_lora,
)
from qlora_pipeline.core.fast.memory import (
    GPU_HALF_RATE_TOKENS,
    GPU_PEAK_MODEL_FLOPS_PER_S,
    HOST_S_PER_LAYER_PASS,
    HOST_S_PER_LAYER_PASS_COMPILED,
    MEMORY_MARGIN,
    RECOMPUTE_COST,
    MemoryPlan,
    ModelDims,
    decoder_layers,
    estimate_peak_bytes,
    kept_output_bytes,
    layer_activation_bytes,
    model_flops_per_token,
    plan_memory,
    selective_recompute_fraction,
    set_checkpointed_layers,
    static_training_bytes,
    step_seconds,
    unwrap,
)
from qlora_pipeline.core.fast.nodes import (
    FrozenLinearAddFunction,
    LoraLinearFunction,
    LoraMember,
    _frozen_matmul,
    _frozen_weight,
    bits16_drop_count,
    bits16_dropout,
)
from qlora_pipeline.errors import ConfigError
from qlora_pipeline.core.fast.options import (
    GIB,
    FastOptions,
    _cuda,
    available_ram_bytes,
    compile_available,
    default_cpu_memory_budget_gib,
    default_memory_budget_gib,
    liger_available,
    resolve_options,
    resolve_switch,
)

if TYPE_CHECKING:
    from qlora_pipeline.config import TrainConfig

__all__ = [
    # entry point
    "FastPathReport", "apply_fast_path", "longest_example", "rows_of_one_length",
    # options
    "GIB", "FastOptions", "available_ram_bytes", "compile_available", "default_cpu_memory_budget_gib",
    "default_memory_budget_gib", "liger_available", "resolve_options", "resolve_switch",
    # memory
    "GPU_HALF_RATE_TOKENS", "GPU_PEAK_MODEL_FLOPS_PER_S", "HOST_S_PER_LAYER_PASS", "HOST_S_PER_LAYER_PASS_COMPILED", "MEMORY_MARGIN",
    "RECOMPUTE_COST", "MemoryPlan", "ModelDims", "decoder_layers", "estimate_peak_bytes",
    "kept_output_bytes", "layer_activation_bytes", "model_flops_per_token", "plan_memory",
    "selective_recompute_fraction", "set_checkpointed_layers",
    "static_training_bytes", "step_seconds", "unwrap",
    # nodes
    "FrozenLinearAddFunction", "LoraLinearFunction", "LoraMember", "bits16_drop_count", "bits16_dropout",
    "_frozen_matmul", "_frozen_weight",
    # layers
    "COMPILE_BACKEND", "SIBLING_GROUPS", "apply_liger", "compile_layers", "fuse_lora", "selective_recompute_possible",
    "unfuse_lora",
    "_lora_inputs",
    # graphs
    "StackRunner", "disable_cuda_graphs", "enable_cuda_graphs", "graph_blocker", "stack_runner",
    # attention
    "FAST_ATTENTION", "IGNORE_INDEX", "cudnn_attention_works", "enable_fast_attention",
    "fast_attention", "pack_sequences", "varlen_attention_works", "_varlen_call",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastPathReport:
    options: FastOptions
    plan: MemoryPlan
    liger: bool
    fused_lora_modules: int
    varlen_attention: bool
    padding_free: bool
    compiled_layers: int = 0
    bit_masks: bool = False
    bits16_mask: bool = False
    cuda_graphs: bool = False
    fused_dropout: bool = False

    def record(self) -> dict[str, int | float]:
        """What trained, as numbers (0/1 for switches): the values the Trainer got, which can differ
        from params (the memory plan picks micro-batch x accumulation and recomputed layers)."""
        return {
            "micro_batch_size": self.plan.micro_batch_size,
            "gradient_accumulation_steps": self.plan.gradient_accumulation_steps,
            "recomputed_layers": self.plan.checkpoint_layers,
            "selective_recompute_layers": self.plan.kept_output_layers,  # of those, keeping gate/up outputs
            "num_layers": self.plan.num_layers,
            "estimated_peak_gib": round(self.plan.estimated_peak_gib, 3),
            "liger": int(bool(self.liger)),
            "fused_lora_modules": self.fused_lora_modules,
            "padding_free": int(self.padding_free),
            "varlen_attention": int(self.varlen_attention),
            "compiled_layers": self.compiled_layers,
            "dropout_mask_bits": int(self.bit_masks),  # LoRA dropout on and its masks bits (always so with CUDA graphs)
            "cuda_graphs": int(self.cuda_graphs),  # installed; train.py adds how many passes replayed
            "dropout_fused": int(self.fused_dropout),  # LoRA dropout on, inside the adapter's matmuls
        }

    def describe(self) -> str:
        liger = ("linear+cross-entropy only" if self.compiled_layers else "on") if self.liger else "off"
        parts = [self.plan.describe(), f"liger {liger}"]
        parts.append(f"fused LoRA on {self.fused_lora_modules} layers" if self.fused_lora_modules else "fused LoRA off")
        if self.fused_dropout:
            parts.append("LoRA dropout fused into the adapter's matmuls")
        if self.bit_masks:
            parts.append("LoRA dropout masks as bits")
        if self.bits16_mask:
            parts.append("LoRA dropout masks from 16-bit draws")
        if self.padding_free:
            parts.append("padding-free batches" + (" with varlen/cuDNN attention" if self.varlen_attention else " (SDPA masks)"))
        parts.append(f"{self.compiled_layers} layers compiled" if self.compiled_layers else "not compiled")
        if self.cuda_graphs:
            parts.append("decoder stack as CUDA graphs")
        return "; ".join(parts)


def _row_lengths(dataset: Any, column: str = "input_ids") -> list[int]:
    try:
        import pyarrow.compute as pc

        return pc.list_value_length(dataset.data.column(column)).to_pylist()
    except Exception:
        return [len(row[column]) for row in dataset]


def longest_example(dataset: Any, column: str = "input_ids") -> int:
    """Tokens in the longest training row (a datasets.Dataset, or any sequence of dicts)."""
    return max(_row_lengths(dataset, column))


def rows_of_one_length(dataset: Any, column: str = "input_ids") -> bool:
    """Every training row but at most one (the last chunk of a corpus cut into chunks) has the same length, so the
    micro-batches have one shape (what CUDA graphs need to pay)."""
    lengths = _row_lengths(dataset, column)
    return len(lengths) - max(lengths.count(lengths[0]), lengths.count(lengths[-1])) <= 1 if lengths else False


def apply_fast_path(
    model: nn.Module,
    cfg: TrainConfig,
    train_dataset: Any = None,
    *,
    max_seq_len: int | None = None,
    lora_dropout: float | None = None,
    fixed_shapes: bool | None = None,
    sharded: bool = False,
) -> tuple[nn.Module, TrainConfig, FastPathReport]:
    """Apply the fast path to a peft model; returns it with the train config to use and a report.

    The config comes back with per_device_batch_size / gradient_accumulation_steps chosen by the
    memory plan (same effective batch). With padding-free batches on (report.padding_free), the
    Trainer's collator must give them: make_collator(..., padding_free=True).
    Call after the LoRA adapters are attached and before the Trainer is built. fixed_shapes: whether
    every micro-batch has one shape (train.cuda_graphs auto takes graphs only then); None: from
    train_dataset's row lengths (rows_of_one_length), False without a dataset. sharded: the model
    will train under FSDP (liger's fused linear+cross-entropy then stays off, see apply_liger).

    Raises:
        ConfigError: a switch of cfg is true where this machine lacks the feature.
    """
    device = next(model.parameters()).device
    options = resolve_options(cfg, device)
    base = unwrap(model)
    dims = ModelDims.from_config(base.config)
    if lora_dropout is None:
        lora_dropout = _lora_dropout(model)
    if fixed_shapes is None:
        fixed_shapes = train_dataset is not None and rows_of_one_length(train_dataset)
    graphs = _graphs_possible(cfg, options, lora_dropout, fixed_shapes, graph_blocker(model) if options.cuda_graphs else None)
    liger = apply_liger(model, layer_kernels=not options.compile, loss_kernel=not sharded) if options.liger else False
    # sibling groups and the Triton dropouts are eager-only: compiled layers fuse the dropout themselves;
    # CUDA graphs need a seeded dropout: the fused one, else (an input it does not take) the bit masks
    fused_dropout = options.fused_lora and options.fused_dropout and not options.compile and lora_dropout > 0
    bit_masks = options.fused_lora and (options.dropout_mask_bits or graphs) and lora_dropout > 0 and not options.compile
    bit_masks_trained = bit_masks and not fused_dropout  # the fallback of layers the fused kernels do not take
    # the CPU's 16-bit-draw dropout breaks a compiled layer's graph (Tensor.random_): compiled layers take torch's
    bits16 = options.fused_lora and not _cuda(device) and not options.compile
    fused = (
        fuse_lora(
            model, group_siblings=not options.compile, bit_masks=bit_masks, bits16_mask=bits16, fused_dropout=fused_dropout,
            keep_outputs=options.selective_recompute,
        )
        if options.fused_lora
        else 0
    )
    # not under FSDP: its layers gather their weights again for the recompute, untested with kept outputs
    selective = options.selective_recompute and not sharded and fused > 0 and selective_recompute_possible(model)
    if cfg.selective_recompute is True and not selective:
        why = "under FSDP" if sharded else "without LoRA layers on gate_proj and up_proj in every decoder layer"
        raise ConfigError(f"train.selective_recompute is true but cannot run {why}; set it to auto or false")
    varlen = enable_fast_attention(model) if options.padding_free else False
    if max_seq_len is None:
        max_seq_len = longest_example(train_dataset) if train_dataset is not None else 0
    static = static_training_bytes(model) if options.memory_budget_gib is not None else 0.0
    plan = plan_memory(
        dims,
        seq_len=max(1, max_seq_len),
        batch_size=cfg.per_device_batch_size,
        accumulation=cfg.gradient_accumulation_steps,
        static_bytes=static,
        budget_gib=options.memory_budget_gib,
        checkpointing=options.checkpointing,
        tune_micro_batch=options.tune_micro_batch,
        liger=liger,
        lora_dropout=0.0 if fused_dropout else lora_dropout,  # it keeps what a layer keeps without dropout
        compiled=options.compile,
        bit_masks=bit_masks_trained,
        element_bytes=float(base.get_input_embeddings().weight.element_size()),
        float32_masks=not _cuda(device),
        graphs=graphs,
        fused_loss=liger and not sharded,
        selective=selective,
    )
    set_checkpointed_layers(model, plan.checkpoint_layers, plan.kept_output_layers)
    compiled = compile_layers(model) if options.compile else 0
    graphed = graphs and enable_cuda_graphs(model) is not None
    if not plan.fits:
        log.warning(
            "the memory plan does not fit train.memory_budget_gib (%s); training may run out of memory: "
            "raise train.memory_budget_gib if the device has the memory, or lower train.per_device_batch_size or data.max_seq_len",
            plan.describe(),
        )
    cfg = cfg.model_copy(
        update={
            "per_device_batch_size": plan.micro_batch_size,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        }
    )
    report = FastPathReport(
        options, plan, liger, fused, varlen, options.padding_free, compiled, bit_masks_trained, bits16 and fused > 0 and lora_dropout > 0,
        graphed, fused_dropout,
    )
    log.info("fast path: %s", report.describe())
    return model, cfg, report


def _graphs_possible(cfg: TrainConfig, options: FastOptions, lora_dropout: float, fixed_shapes: bool, blocker: str | None = None) -> bool:
    """CUDA graphs on for this run: switched on, fused LoRA, not compiled, and where LoRA dropout is on,
    the bit masks available (their seeded dropout is what a captured recompute can repeat); for auto,
    also micro-batches of one shape (else the graphs would not be captured, and the bit masks they
    bring are slower eagerly: benchmarks/README.md); and no blocker (graphs.graph_blocker: the
    model's type, its own dropout, LoRA layers on peft's forward).

    Raises:
        ConfigError: train.cuda_graphs is true and one of these is missing.
    """
    if not options.cuda_graphs or (cfg.cuda_graphs == "auto" and not fixed_shapes):
        return False
    missing = None
    if not options.fused_lora or options.compile:
        missing = "fused LoRA layers without compile"
    elif lora_dropout > 0 and not (bitmask_dropout.available() or lowrank_dropout.available()):
        missing = "triton for the LoRA dropout's seeded masks (or lora.dropout: 0)"
    if missing is None and blocker is None:
        return True
    if cfg.cuda_graphs is True:
        why = f"needs {missing}" if missing else f"cannot run here: {blocker}"
        raise ConfigError(f"train.cuda_graphs is true but {why}; set it to auto or false")
    if blocker:
        log.info("CUDA graphs off: %s", blocker)
    return False


def _lora_dropout(model: nn.Module) -> float:
    for module in model.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict) and len(drop):
            layer = next(iter(drop.values()))
            return float(getattr(layer, "p", 0.0))
    return 0.0
