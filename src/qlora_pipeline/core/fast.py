"""The fast GPU training path: fused kernels, a lean LoRA step, padding-free batches, a memory plan.

    model, cfg, collator, report = apply_fast_path(model, cfg, collator, train_dataset)

core/train.py makes this call before it builds the Trainer. Each piece has a knob in `train:`
(params.yaml) whose default `auto` means "on with a CUDA GPU" unless said otherwise below. On the
8B shape on an H200 (benchmarks/README.md), with the memory budget at 0.6x the original recipe's
peak, the pieces together give 11,501 tokens/s at 13.2 GiB:

- per-layer gradient checkpointing: recompute only as many decoder layers as the memory budget
  needs, the first ones (their recompute runs last, when the later layers' activations are freed);
- micro-batch: per_device_batch_size traded against gradient_accumulation_steps, same product,
  chosen with the memory budget by a small cost model (GPU time vs host time per micro-batch);
- liger-kernel (the `gpu` extra): fused RMSNorm, RoPE, SwiGLU and linear+cross-entropy, which never
  materialises the (tokens x vocab) logits: half the memory of checkpointed training;
- fused LoRA: each LoRA linear layer one autograd node (frozen matmul, dropout, adapter, fused
  add) instead of peft's seven, and siblings on one input (q/k/v, gate/up) one node together; the
  last one of each decoder layer runs its adapter first, so a recomputed layer stops before its
  frozen matmul (down_proj on Llama), which then adds the adapter's update in its epilogue;
- dropout masks as bits (opt-in, `train.dropout_mask_bits`): ~6% less peak at the same recompute,
  no faster (Triton's launch cost on the host outweighs its lighter kernels);
- padding-free batches: pad tokens dropped, samples packed into one row with per-sample position
  ids, kept apart by variable-length flash attention; unpacked full rows use cuDNN attention;
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
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass
from types import MethodType
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from qlora_pipeline.core import packed_dropout

if TYPE_CHECKING:
    from qlora_pipeline.config import TrainConfig

log = logging.getLogger(__name__)

GIB = 1024**3
FAST_ATTENTION = "sdpa_fast"
IGNORE_INDEX = -100

# Cost model for choosing micro-batch and recomputed layers, calibrated on an H200 with the 8B shape
# (benchmarks/results/explore_fused_8b_h200.json, gpu_train_bench_h200.json): a step is GPU-bound or
# host-bound, whichever is longer. GPU: 4 x 2048 tokens without recompute took 0.555 s -> 8192 * 31.6e9
# FLOP / 0.555 s = 466 TFLOP/s of model FLOPs; recomputing all 32 layers (down_proj's frozen matmul
# skipped, see _lora_tail_forward) made it 0.74 s -> RECOMPUTE_COST = 0.74 / 0.555 - 1 = 0.33.
GPU_MODEL_FLOPS_PER_S = 466e12
RECOMPUTE_COST = 0.33
# Host: 1 x 128 tokens (next to nothing for the GPU) took 0.22 s without and 0.35 s with recompute
# (explore_group_8b_h200.json), i.e. the Python of transformers, liger, the LoRA nodes and autograd:
# 0.22 s / (32 layers * 2 passes) = 3.4 ms per layer and pass, and a recomputed layer costs about a
# forward and a backward pass more (the checkpoint's hooks and RNG state).
HOST_S_PER_LAYER_PASS = 3.4e-3
# With the decoder layers compiled (train.compile): 1 x 2048 tokens with 15/32 layers recomputed took
# 0.295 s per micro-batch (benchmarks/results/gpu_train_bench_compile_h200.json), i.e. 0.295 s /
# (32 layers * 2 passes * (1 + 15/32)) = 3.1 ms per layer and pass, as an effective host cost (a 0.5 ms
# guess made the plan pick 1 x 2048 micro-batches, 32% slower than 4 x 2048, which compile left as is).
HOST_S_PER_LAYER_PASS_COMPILED = 3.1e-3
# The estimate already runs 1-5% above the measured peaks (8B, 1-4 x 2048 tokens, 0-32 layers).
MEMORY_MARGIN = 1.0


# ---------------------------------------------------------------------------------------------
# Knobs


def _cuda(device: torch.device | str | None = None) -> bool:
    if device is not None:
        return torch.device(device).type == "cuda"
    return torch.cuda.is_available()


@functools.cache
def liger_available() -> bool:
    """True when liger-kernel (the `gpu` extra) and its triton import cleanly."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # ImportError, or triton failing to find a GPU driver
        return False
    return True


def resolve_switch(value: bool | str, name: str, *, on_gpu: bool, available: bool = True) -> bool:
    """auto -> on with a CUDA GPU (and the feature available); true where unavailable fails clearly."""
    if value == "auto":
        return on_gpu and available
    if value and not available:
        raise RuntimeError(f"train.{name} is true but it is not available here; set it to auto or false")
    return bool(value)


@dataclass(frozen=True)
class FastOptions:
    """The resolved knobs: what the fast path will do on this machine."""

    liger: bool
    fused_lora: bool
    padding_free: bool
    checkpointing: bool | int | str  # "auto", True (every layer), False (none) or a layer count
    tune_micro_batch: bool
    memory_budget_gib: float | None  # GiB of GPU memory, or of RAM on a CPU; None: no limit
    compile: bool = False
    dropout_mask_bits: bool = False


def resolve_options(cfg: TrainConfig, device: torch.device | str | None = None) -> FastOptions:
    """What the fast path does on this device. The memory plan (checkpointing, budget) and fused
    LoRA apply on a CPU too: there the budget is RAM (default_cpu_memory_budget_gib)."""
    on_gpu = _cuda(device)
    if cfg.memory_budget_gib != "auto":
        budget = float(cfg.memory_budget_gib)
    else:
        budget = default_memory_budget_gib() if on_gpu else default_cpu_memory_budget_gib()
    return FastOptions(
        liger=resolve_switch(cfg.use_liger, "use_liger", on_gpu=on_gpu, available=liger_available()),
        fused_lora=resolve_switch(cfg.fused_lora, "fused_lora", on_gpu=True),
        padding_free=resolve_switch(cfg.padding_free, "padding_free", on_gpu=on_gpu),
        checkpointing=cfg.gradient_checkpointing,
        tune_micro_batch=bool(cfg.tune_micro_batch) and on_gpu,
        memory_budget_gib=budget,
        compile=resolve_switch(cfg.compile, "compile", on_gpu=on_gpu, available=compile_available()),
        dropout_mask_bits=resolve_switch(cfg.dropout_mask_bits, "dropout_mask_bits", on_gpu=on_gpu, available=packed_dropout.available()),
    )


def compile_available() -> bool:
    """torch.compile exists and is not switched off (TORCHDYNAMO_DISABLE=1)."""
    import os

    return hasattr(torch, "compile") and hasattr(nn.Module, "compile") and os.environ.get("TORCHDYNAMO_DISABLE", "") not in ("1", "true", "True")


def default_memory_budget_gib(fraction: float = 0.9) -> float:
    """90% of what this process can have of the current GPU."""
    free, total = torch.cuda.mem_get_info()
    usable = min(total, free + torch.cuda.memory_reserved())
    return fraction * usable / GIB


def available_ram_bytes() -> int:
    """RAM this process can still take: psutil's `available` (free plus reclaimable page cache),
    lowered to the cgroup v2 limit's headroom inside a container that sets one."""
    import psutil

    available = int(psutil.virtual_memory().available)
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
    except (OSError, ValueError):
        return available
    return available if limit == "max" else min(available, max(0, int(limit) - used))


def default_cpu_memory_budget_gib(fraction: float = 0.5) -> float:
    """Half the RAM available now: what a CPU training step may add to the loaded model's RSS.

    The plan's estimate came within 3% of the RSS that training added with fused LoRA (SmolLM2-135M,
    8 x 128 tokens: 3.25 GiB estimated, 3.17 measured with no layer recomputed; 0.79 and 0.80 with
    all), but peft's own LoRA layers added 2.54 GiB where 0.79 was estimated: freed memory the
    allocator keeps (benchmarks/README.md, "CPU"). The other half covers that and other processes.
    """
    return fraction * available_ram_bytes() / GIB


# ---------------------------------------------------------------------------------------------
# Memory plan: micro-batch size and how many decoder layers recompute


@dataclass(frozen=True)
class ModelDims:
    """The sizes that decide activation memory."""

    num_layers: int
    hidden: int
    ffn: int
    q_dim: int
    kv_dim: int
    vocab: int
    largest_linear: int  # parameters of the largest linear layer (its dequantized copy is a temporary)

    @classmethod
    def from_config(cls, config: Any) -> "ModelDims":
        hidden = config.hidden_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=hidden,
            ffn=ffn,
            q_dim=heads * head_dim,
            kv_dim=kv_heads * head_dim,
            vocab=config.vocab_size,
            largest_linear=max(hidden * ffn, hidden * heads * head_dim),
        )


def layer_activation_bytes(
    dims: ModelDims,
    *,
    liger: bool,
    lora_dropout: float,
    packed_mask: bool = False,
    element_bytes: float = 2.0,
    float32_masks: bool = False,
) -> float:
    """Bytes per token that one decoder layer keeps for its backward when it is not recomputed.

    Counted from what autograd saves in a Llama layer with LoRA on every linear: RMSNorm inputs and
    outputs (the outputs are the LoRA-A inputs), q/k/v after RoPE, attention output, o_proj input,
    gate, up and their product (the down_proj input); frozen 4-bit weights need no saved input.
    element_bytes: 2 for a bf16/fp16 compute dtype, 4 for float32 (the CPU's). float32_masks: the
    LoRA dropout keeps float32 masks (on a CPU: torch's dropout and bits16_dropout alike).
    8B, bf16: 147 KB counted, 139 KB measured (dropout 0).
    """
    d, f, q, kv = dims.hidden, dims.ffn, dims.q_dim, dims.kv_dim
    elems = 4 * d + 3 * q + 2 * kv + 3 * f
    if not liger:
        elems += 4 * d + f  # fp32 copies inside the eager RMSNorms; silu(gate) kept beside gate and up
    total = element_bytes * elems
    dropped = 5 * d + q + f  # elements of the adapters' inputs: q/k/v/gate/up on d, o on q, down on f
    if lora_dropout > 0 and float32_masks:
        total += (element_bytes + 4.0) * dropped  # each adapter's dropped-out input and its mask
    elif lora_dropout > 0:
        # each adapter keeps its own dropped-out input; 8B: 69 KB measured = 1.75 bytes per element,
        # of which the mask is a byte: 7/8 of it go when the mask is kept as bits
        total += (1.75 - (0.875 if packed_mask else 0.0)) * dropped
    return total


def model_flops_per_token(dims: ModelDims, seq_len: int) -> float:
    """Forward + activation-gradient backward of the frozen base: 4 x matmul params + causal attention."""
    d, f, q, kv = dims.hidden, dims.ffn, dims.q_dim, dims.kv_dim
    matmul_params = dims.num_layers * (2 * d * q + 2 * d * kv + 3 * d * f) + d * dims.vocab
    return 4.0 * matmul_params + 6.0 * seq_len * q * dims.num_layers


def step_seconds(dims: ModelDims, tokens: int, seq_len: int, checkpoint_layers: int, *, compiled: bool = False) -> float:
    """Estimated time of one micro-batch: the longer of GPU and host time, plus part of the shorter
    (they overlap less the closer they are)."""
    share = checkpoint_layers / dims.num_layers
    gpu = tokens * model_flops_per_token(dims, seq_len) * (1 + RECOMPUTE_COST * share) / GPU_MODEL_FLOPS_PER_S
    per_pass = HOST_S_PER_LAYER_PASS_COMPILED if compiled else HOST_S_PER_LAYER_PASS
    host = dims.num_layers * per_pass * 2 * (1 + share)
    longer, shorter = max(gpu, host), min(gpu, host)
    return longer + 0.2 * shorter * (shorter / longer) ** 2


def estimate_peak_bytes(
    dims: ModelDims,
    tokens: int,
    checkpoint_layers: int,
    static_bytes: float,
    *,
    liger: bool,
    lora_dropout: float,
    packed_mask: bool = False,
    element_bytes: float = 2.0,
    float32_masks: bool = False,
) -> float:
    """Peak memory of one training step with `tokens` tokens per micro-batch: GPU memory, or on a CPU
    what the step adds to the process's RSS (static_bytes then counts only what training adds).

    The peak is the larger of two moments: the end of the forward (every kept layer's activations
    plus the recomputed layers' inputs) and the backward of the recomputed layers (their inputs
    plus the one layer being recomputed; the kept layers, the last ones, are freed by then).
    element_bytes, float32_masks: as for layer_activation_bytes.
    """
    per_layer = layer_activation_bytes(
        dims, liger=liger, lora_dropout=lora_dropout, packed_mask=packed_mask, element_bytes=element_bytes,
        float32_masks=float32_masks,
    )
    checkpoint_layers = min(checkpoint_layers, dims.num_layers)
    kept = dims.num_layers - checkpoint_layers
    inputs = checkpoint_layers * element_bytes * dims.hidden
    activations = tokens * (inputs + max(kept, 1 if checkpoint_layers else 0) * per_layer)
    if liger:
        loss = 0.0  # logits are never materialised; chunks fit in the misc term below
    else:
        loss = tokens * dims.vocab * (element_bytes + 4.0 + 4.0)  # logits, fp32 upcast (or log-softmax), fp32 grad
    misc = tokens * dims.hidden * element_bytes * 5  # residual-stream grads, embeddings out; 8B: 40 KB measured
    dequantized = 2 * dims.largest_linear * element_bytes
    return MEMORY_MARGIN * (static_bytes + activations + loss + misc + dequantized)


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch_size: int
    gradient_accumulation_steps: int
    checkpoint_layers: int
    num_layers: int
    estimated_peak_gib: float
    budget_gib: float | None
    fits: bool

    def describe(self) -> str:
        budget = f" of a {self.budget_gib:.1f} GiB budget" if self.budget_gib else ""
        return (
            f"micro-batch {self.micro_batch_size} x {self.gradient_accumulation_steps} accumulation, "
            f"{self.checkpoint_layers}/{self.num_layers} layers recompute, "
            f"~{self.estimated_peak_gib:.1f} GiB{budget}"
        )


def _divisors(n: int) -> list[int]:
    return [b for b in range(1, n + 1) if n % b == 0]


def _checkpoint_choices(setting: bool | int | str, num_layers: int) -> list[int]:
    if setting == "auto":
        return list(range(num_layers + 1))
    if isinstance(setting, bool):
        return [num_layers if setting else 0]
    return [min(int(setting), num_layers)]


def plan_memory(
    dims: ModelDims,
    *,
    seq_len: int,
    batch_size: int,
    accumulation: int,
    static_bytes: float,
    budget_gib: float | None,
    checkpointing: bool | int | str,
    tune_micro_batch: bool,
    liger: bool,
    lora_dropout: float,
    compiled: bool = False,
    packed_mask: bool = False,
    element_bytes: float = 2.0,
    float32_masks: bool = False,
) -> MemoryPlan:
    """The fastest (micro-batch, recomputed layers) whose estimated peak fits the budget.

    Keeps the effective batch (batch_size x accumulation) fixed; speed from step_seconds (a GPU cost
    model: on a CPU the micro-batch is not tuned, and fewer recomputed layers are always faster).
    budget_gib None: no limit.
    """
    effective = batch_size * accumulation
    sizes = _divisors(effective) if tune_micro_batch else [batch_size]
    layer_choices = _checkpoint_choices(checkpointing, dims.num_layers)
    budget = math.inf if budget_gib is None else budget_gib * GIB

    def peak(b: int, k: int) -> float:
        return estimate_peak_bytes(
            dims, b * seq_len, k, static_bytes, liger=liger, lora_dropout=lora_dropout, packed_mask=packed_mask,
            element_bytes=element_bytes, float32_masks=float32_masks,
        )

    best: tuple[float, int, int] | None = None
    for b in sizes:
        k = next((k for k in layer_choices if peak(b, k) <= budget), None)
        if k is None:
            continue
        cost = step_seconds(dims, b * seq_len, seq_len, k, compiled=compiled) / b
        if best is None or cost < best[0] - 1e-9:
            best = (cost, b, k)
    if best is None:  # nothing fits: the leanest choice, and say so
        b, k = min(sizes), max(layer_choices)
        fits = False
    else:
        _, b, k = best
        fits = True
    return MemoryPlan(
        micro_batch_size=b,
        gradient_accumulation_steps=effective // b,
        checkpoint_layers=k,
        num_layers=dims.num_layers,
        estimated_peak_gib=peak(b, k) / GIB,
        budget_gib=budget_gib,
        fits=fits,
    )


def static_training_bytes(model: nn.Module) -> float:
    """Bytes held through every step: the trainable parameters' grads and AdamW's two states, plus on
    a GPU the model as allocated now (on a CPU it is already in the RSS that the budget leaves out)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    resident = float(torch.cuda.memory_allocated()) if _cuda(next(model.parameters()).device) else 0.0
    return resident + 3.0 * trainable


# ---------------------------------------------------------------------------------------------
# Model changes


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: nn.Module, count: int) -> int:
    """Recompute the first `count` decoder layers in the backward and keep the others' activations.

    The first ones, because their recompute runs at the end of the backward, when the later layers'
    activations have been freed: the peak is one layer lower than with the last ones.
    """
    layers = decoder_layers(model)
    count = max(0, min(count, len(layers)))
    if count and not all(getattr(layer, "_gradient_checkpointing_func", None) for layer in layers):
        base = unwrap(model)
        if hasattr(base, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
    return count


COMPILE_BACKEND = "inductor"  # tests use aot_eager: the same tracing, no kernels to build


def compile_layers(model: nn.Module, *, mode: str | None = None) -> int:
    """torch.compile each decoder layer in place (regional compilation); returns how many.

    The layers share one compiled graph (same code, parameters are graph inputs), so the compile
    costs one layer's, paid at the first step. Checkpointing stays where transformers puts it: a
    recomputed layer runs its compiled graph again in the backward. bitsandbytes' 4-bit matmul is
    a torch.library custom op from 0.45 on and traces; peft's LoRA (or the fused addmm) is inlined.
    Shapes are static until a second shape comes, then dynamic (torch's default), so packed rows of
    varying length recompile once, not at every step.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=COMPILE_BACKEND, mode=mode)
    return len(layers)


def apply_liger(model: nn.Module, *, layer_kernels: bool = True) -> bool:
    """Fused RMSNorm, RoPE, SwiGLU and linear+cross-entropy from liger-kernel, on this instance.

    layer_kernels=False: the fused linear+cross-entropy alone (for compiled decoder layers, where
    inductor fuses the norms, RoPE and SwiGLU itself and liger's kernels would only break its graph).
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers.integrations.liger import apply_liger_kernel

    model_type = getattr(unwrap(model).config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.info("liger-kernel has no kernels for model type %r; skipped", model_type)
        return False
    apply_liger_kernel(model, {} if layer_kernels else {"rope": False, "rms_norm": False, "swiglu": False})
    return True


def _single_plain_adapter(module: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """The adapter name when the layer runs one plain LoRA adapter, else None (peft's forward then).

    Anything but one plain adapter (DoRA, several adapters, merged, disabled, a LoRA bias, extra
    forward arguments) goes to peft's own forward.
    """
    active = module.active_adapters
    name = active[0] if len(active) == 1 else None
    if (
        args
        or kwargs
        or name is None
        or module.disable_adapters
        or module.merged
        or name not in module.lora_A
        or name in getattr(module, "lora_variant", {})
        or module.lora_B[name].bias is not None
    ):
        return None
    return name


@dataclass(frozen=True, eq=False)
class LoraMember:
    """One LoRA linear layer's constants for LoraLinearFunction: its frozen base (weight, bias,
    bitsandbytes quant state, or None for a plain weight), the adapter's scale and dropout, and
    whether the node runs the base matmul too (base=False: the adapter's branch alone), and whether
    its dropout keeps the mask as bits (core/packed_dropout.py, CUDA) or as torch's bytes."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    quant_state: Any
    scale: float
    p: float
    base: bool = True
    packed: bool = False
    bits16: bool = False  # CPU: the mask from 16 random bits per element (bits16_dropout)


class LoraLinearFunction(torch.autograd.Function):
    """y_i = base_i(x) + s_i * drop_i(x) A_i^T B_i^T for one LoRA linear layer, or for sibling layers
    that take the same input (q/k/v, gate/up), as one autograd node instead of peft's seven per layer
    (dropout, two casts, two matmuls, the 4-bit matmul, the add): less Python and fewer kernels per
    layer and pass, and the backward sums the members' input gradients in place, in the matmuls'
    epilogues. Saves what peft saves: each member's dropped-out input and mask, its rank-r hidden
    state and casted adapter weights. Each member draws its own dropout mask, in member order, as
    peft's layers do when called one after another.

        outputs = LoraLinearFunction.apply(x, members, a_0, b_0, a_1, b_1, ...)  # a tuple if several
    """

    @staticmethod
    def forward(ctx, x, members, *weights):  # noqa: D102
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        outputs, saved = [], []
        for member, weight_a, weight_b in zip(members, weights[0::2], weights[1::2]):
            if member.p > 0 and member.packed:
                dropped, mask = packed_dropout.dropout_forward(x2, member.p)
            elif member.p > 0 and member.bits16:
                dropped, mask = bits16_dropout(x2, member.p)
            elif member.p > 0:
                dropped, mask = torch.native_dropout(x2, member.p, True)
            else:
                dropped, mask = x2, None
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            hidden = torch.mm(dropped, a.t())
            if member.base:
                out = _frozen_matmul(x2, member.weight, member.bias, member.quant_state, dtype)
                out.addmm_(hidden, b.t(), alpha=member.scale)
                out = out.view(*shape[:-1], out.shape[-1])  # the compute dtype, as autocast's matmuls return
            else:  # not a view: FrozenLinearAddFunction adds the frozen matmul into it in place
                out = x2.new_empty(*shape[:-1], b.shape[0])
                torch.mm(hidden, b.t(), out=out.view(-1, b.shape[0])).mul_(member.scale)
            outputs.append(out)
            saved += [dropped, mask, hidden, a, b]
        ctx.save_for_backward(*saved)
        ctx.members, ctx.dtype, ctx.shape = members, dtype, shape
        ctx.param_dtypes = [w.dtype for w in weights]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        saved = ctx.saved_tensors
        grad_x, grad_weights = None, []
        for i, (member, grad) in enumerate(zip(ctx.members, grads)):
            dropped, mask, hidden, a, b = saved[5 * i : 5 * i + 5]
            if grad is None:
                grad_weights += [None, None]
                continue
            g = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
            grad_b = torch.mm(g.t(), hidden).mul_(member.scale)
            grad_hidden = torch.mm(g, b).mul_(member.scale)
            grad_weights += [torch.mm(grad_hidden.t(), dropped), grad_b]
            if not ctx.needs_input_grad[0]:
                continue
            if mask is None:
                grad_x = torch.mm(grad_hidden, a) if grad_x is None else grad_x.addmm_(grad_hidden, a)
            elif member.packed:  # mask applied and added into grad_x in one kernel
                grad_x = packed_dropout.dropout_backward(torch.mm(grad_hidden, a), mask, member.p, out=grad_x)
            elif member.bits16:  # the mask holds keep / (1 - p)
                part = torch.mm(grad_hidden, a)
                grad_x = part.mul_(mask) if grad_x is None else grad_x.addcmul_(part, mask)
            else:
                part = torch.ops.aten.native_dropout_backward(torch.mm(grad_hidden, a), mask, 1.0 / (1.0 - member.p))
                grad_x = part if grad_x is None else grad_x.add_(part)  # addcmul_ with a bool mask is 3x slower
            if member.base:
                grad_x.addmm_(g, _frozen_weight(member.weight, member.quant_state, ctx.dtype))
        if grad_x is not None:
            grad_x = grad_x.view(ctx.shape)
        grad_weights = [g if g is None else g.to(dtype) for g, dtype in zip(grad_weights, ctx.param_dtypes)]
        return grad_x, None, *grad_weights


class FrozenLinearAddFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + update for a frozen base, the add done by the matmul's epilogue.

    Saves no tensor for its backward (the frozen weight stays on ctx), which _lora_tail_forward
    relies on: a recomputed decoder layer stops before it.
    """

    @staticmethod
    def forward(ctx, x, update, weight, bias, quant_state):  # noqa: D102
        dtype = update.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        out = update.view(-1, update.shape[-1])  # in place: the adapter's node does not keep its output
        out.addmm_(x2, _frozen_weight(weight, quant_state, dtype).t())
        if bias is not None:
            out.add_(bias.to(dtype))
        ctx.mark_dirty(update)
        ctx.weight, ctx.quant_state, ctx.dtype, ctx.shape = weight, quant_state, dtype, x.shape
        return update

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
            grad_x = torch.mm(g, _frozen_weight(ctx.weight, ctx.quant_state, ctx.dtype)).view(ctx.shape)
        return grad_x, grad, None, None, None


def bits16_drop_count(p: float) -> int:
    """Of the 65,536 values of 16 random bits, how many drop an element: bits16_dropout realises the
    drop probability count / 65,536, within 7.7e-6 of p."""
    return min(65536, max(0, round(p * 65536)))


def bits16_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout on the CPU with a keep mask drawn from 16 random bits per element.

    torch's CPU bernoulli_ (behind nn.Dropout and native_dropout) draws one 32-bit number per element
    in a serial loop: 4.0 ms for a 1024 x 576 input on the benchmark's CPU, on one thread or two,
    half the time of the 1024 x 576 x 1536 matmul beside it (7.9 ms). Here each 64-bit draw of
    torch's own generator (so seeds and checkpoint recompute behave as usual) gives four elements:
    2.2 ms with the mask made and applied, against 5.1 ms for nn.functional.dropout
    (benchmarks/results/cpu_micro.json). Returns x * mask and the mask: float32, keep / (1 - p')
    with p' the realised drop probability, so the backward is one in-place multiply (a bool mask
    costs a conversion each time).
    """
    n = x.numel()
    drop = bits16_drop_count(p)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    keep = words.view(torch.int16)[:n].view(x.shape) >= drop - 32768
    mask = keep.to(torch.float32).mul_(65536.0 / (65536 - drop) if drop < 65536 else 0.0)
    return (x * mask).to(x.dtype), mask


def _frozen_matmul(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """x W^T (+ bias) for the frozen base; bitsandbytes runs its 4-bit kernel directly without grad."""
    bias = None if bias is None else bias.to(dtype)
    if quant_state is not None:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x2, weight, quant_state=quant_state, bias=bias)
    return torch.nn.functional.linear(x2, weight.to(dtype), bias)


def _frozen_weight(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The base weight (out x in) in the compute dtype, dequantized when 4-bit."""
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight, quant_state).to(dtype)
    return weight.to(dtype)


def _lora_inputs(self: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, *, base: bool = True) -> tuple | None:
    """(LoraMember, weight_a, weight_b) for LoraLinearFunction, or None where peft's own forward must
    run: anything but one plain adapter, a base other than a frozen bitsandbytes 4-bit or plain
    linear, or mixed dtypes outside autocast.
    """
    name = _single_plain_adapter(self, args, kwargs)
    if name is None:
        return None
    base_layer = self.base_layer
    weight = base_layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if weight.requires_grad or (base_layer.bias is not None and base_layer.bias.requires_grad):
        return None  # a trained base weight or bias (LoRA bias="all") needs peft's gradients
    if quant_state is None and type(base_layer) is not nn.Linear:
        return None
    if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
        return None
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    if not torch.is_autocast_enabled(x.device.type) and not (x.dtype == weight_a.dtype == weight_b.dtype):
        return None
    if quant_state is None and not torch.is_autocast_enabled(x.device.type) and weight.dtype != x.dtype:
        return None
    drop = self.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
    packed = p > 0 and getattr(self, "_lora_packed_dropout", False) and packed_dropout.supports(x)
    bits16 = p > 0 and not packed and getattr(self, "_lora_bits16_dropout", False) and x.device.type == "cpu"
    member = LoraMember(weight, base_layer.bias, quant_state, float(self.scaling[name]), p, base, packed, bits16)
    return member, weight_a, weight_b


def _lora_fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA layer's forward as one LoraLinearFunction node (peft's own where it does not apply)."""
    inputs = _lora_inputs(self, x, args, kwargs)
    if inputs is None:
        return type(self).forward(self, x, *args, **kwargs)
    member, weight_a, weight_b = inputs
    return LoraLinearFunction.apply(x, (member,), weight_a, weight_b)


def _lora_tail_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The last LoRA layer of a decoder layer: the adapter's branch first, the frozen matmul last.

    A recomputed decoder layer re-runs its forward only until every tensor its backward needs is
    saved again (torch's non-reentrant checkpoint stops early there). Nothing after this layer's
    frozen matmul saves a tensor (FrozenLinearAddFunction keeps its weight on ctx, the residual add
    saves nothing), so with the adapter's branch first the recompute stops before that matmul: on
    Llama that skips down_proj, a quarter of each recomputed layer's matmul FLOPs.
    """
    inputs = _lora_inputs(self, x, args, kwargs, base=False)
    if inputs is None:
        return type(self).forward(self, x, *args, **kwargs)
    member, weight_a, weight_b = inputs
    update = LoraLinearFunction.apply(x, (member,), weight_a, weight_b)
    return FrozenLinearAddFunction.apply(x, update, member.weight, member.bias, member.quant_state)


# Sibling LoRA layers that take the same input in transformers' decoder layers (Llama, Mistral,
# Qwen, Gemma, ...): one node runs them together.
SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _SiblingGroup:
    """LoRA layers of one module called one after another on the same input. The first one's call
    runs them all as one LoraLinearFunction node and holds the others' outputs for their calls.
    A call that breaks the pattern (another input, another order) turns the group off for good:
    each layer then runs its own node, so a model that does not fit the pattern stays correct."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.enabled = True

    def lead(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        self.pending.clear()
        if not self.enabled:
            return None
        inputs = [_lora_inputs(m, x, args, kwargs) for m in self.modules]
        if any(i is None for i in inputs):
            return None
        members = tuple(i[0] for i in inputs)
        outputs = LoraLinearFunction.apply(x, members, *(w for i in inputs for w in i[1:]))
        self.pending = {index: (x, out) for index, out in enumerate(outputs[1:], 1)}
        return outputs[0]

    def follow(self, index: int, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
        entry = self.pending.pop(index, None)
        if entry is not None and entry[0] is x and not args and not kwargs:
            return entry[1]
        if self.enabled:
            self.enabled = False
            self.pending.clear()
            log.info("LoRA layers %s are not called in turn on one input; each runs on its own", [type(m).__name__ for m in self.modules])
        return None


def _lora_group_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A grouped sibling's forward: the group's node (see _SiblingGroup), else its own."""
    group, index = self._lora_group
    out = group.lead(x, args, kwargs) if index == 0 else group.follow(index, x, args, kwargs)
    return _lora_fused_forward(self, x, *args, **kwargs) if out is None else out


def _lora_linears(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [
        m for m in model.modules()
        if isinstance(m, LoraLayer) and hasattr(m, "lora_A") and type(m).__name__ in ("Linear", "Linear4bit")
    ]


def _sibling_groups(layer: nn.Module, exclude: set[int]) -> list[list[nn.Module]]:
    lora = {id(m) for m in _lora_linears(layer)} - exclude
    groups = []
    for parent in layer.modules():
        for names in SIBLING_GROUPS:
            members = [m for n in names if id(m := getattr(parent, n, None)) in lora]
            if len(members) > 1 and len({m.in_features for m in members}) == 1:
                groups.append(members)
    return groups


def fuse_lora(
    model: nn.Module, *, tail_first: bool = True, group_siblings: bool = True, packed_mask: bool = False, bits16_mask: bool = False
) -> int:
    """Give every peft LoRA linear layer the one-node forward (LoraLinearFunction): the last one of
    each decoder layer the adapter-first forward (tail_first), siblings on one input one node
    together (group_siblings, SIBLING_GROUPS), dropout masks kept as bits on a CUDA GPU
    (packed_mask, core/packed_dropout.py), dropout masks drawn 16 bits per element on the CPU
    (bits16_mask, bits16_dropout). Returns how many layers were changed."""
    tails: set[int] = set()
    if tail_first:
        tails = {id(lins[-1]) for layer in decoder_layers(model) if (lins := _lora_linears(layer))}
    grouped: dict[int, tuple[_SiblingGroup, int]] = {}
    if group_siblings:
        for layer in decoder_layers(model):
            for members in _sibling_groups(layer, tails):
                group = _SiblingGroup(members)
                grouped.update({id(m): (group, index) for index, m in enumerate(members)})
    modules = _lora_linears(model)
    for module in modules:
        if id(module) in grouped:
            module._lora_group = grouped[id(module)]
            forward = _lora_group_forward
        else:
            forward = _lora_tail_forward if id(module) in tails else _lora_fused_forward
        module.forward = MethodType(forward, module)
        if packed_mask:
            module._lora_packed_dropout = True
        if bits16_mask:
            module._lora_bits16_dropout = True
    return len(modules)


def unfuse_lora(model: nn.Module) -> None:
    """Back to peft's own forward."""
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) in _FUSED_FORWARDS:
            del module.forward
        vars(module).pop("_lora_group", None)
        vars(module).pop("_lora_packed_dropout", None)
        vars(module).pop("_lora_bits16_dropout", None)


_FUSED_FORWARDS = (_lora_fused_forward, _lora_tail_forward, _lora_group_forward)


# ---------------------------------------------------------------------------------------------
# Padding-free batches and variable-length attention


def pack_sequences(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of samples grouped into rows of at most max_tokens (first-fit decreasing).

    Samples are never split; a sample longer than max_tokens gets a row of its own.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[index]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(index)
                room[r] -= n
                break
        else:
            rows.append([index])
            room.append(max_tokens - n)
    return rows


def flatten_batch(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A padded (and possibly packed) batch -> one row of real tokens with per-sample position ids.

    Samples are the rows' non-pad prefixes (right padding), split further where position_ids
    restart at 0 (rows packed by the data stage). The first label of each sample is ignored, so no
    sample learns to predict the next one's start. cu_seq_lens_* and max_length_* let
    variable-length attention keep each sample to itself; the attention mask is dropped.
    A batch of full, unpacked rows stays as it is, without its all-ones mask (plain causal attention).
    """
    input_ids = batch["input_ids"]
    labels = batch.get("labels", input_ids)
    mask = batch.get("attention_mask")
    positions = batch.get("position_ids")
    rows, width = input_ids.shape
    unpadded = mask is None or bool(mask.all())
    if unpadded and (positions is None or bool((positions == torch.arange(width)).all())):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    lengths = mask.sum(dim=1).tolist() if mask is not None else [width] * rows
    ids_out, labels_out, pos_out, seq_lens = [], [], [], []
    for r in range(rows):
        n = int(lengths[r])
        if n == 0:
            continue
        if positions is not None:
            starts = (positions[r, :n] == 0).nonzero().flatten().tolist() or [0]
            if starts[0] != 0:
                starts = [0, *starts]
        else:
            starts = [0]
        for s, e in zip(starts, [*starts[1:], n]):
            seq_lens.append(e - s)
        ids_out.append(input_ids[r, :n])
        row_labels = labels[r, :n].clone()
        row_labels[starts] = IGNORE_INDEX
        labels_out.append(row_labels)
        pos_out.append(torch.cat([torch.arange(e - s) for s, e in zip(starts, [*starts[1:], n])]))
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
    longest = max(seq_lens)
    out: dict[str, Any] = {
        k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask", "position_ids")
    }
    out.update(
        input_ids=torch.cat(ids_out)[None],
        labels=torch.cat(labels_out)[None],
        position_ids=torch.cat(pos_out)[None],
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=longest,
        max_length_k=longest,
    )
    return out


class PaddingFreeCollator:
    """Wraps a collator: its padded batches come out as one row of real tokens (see flatten_batch)."""

    def __init__(self, collator: Callable[[list[Any]], dict[str, torch.Tensor]]) -> None:
        self.collator = collator

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        return flatten_batch(self.collator(features))


@functools.cache
def _varlen_call() -> tuple[Callable, dict[str, Any]] | None:
    """torch's variable-length flash attention and the keywords this torch version wants for causal GQA."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        return None
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return varlen_attn, kwargs


def fast_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function. Packed batches (cu_seq_lens from flatten_batch): variable-
    length flash attention. Unmasked batches: SDPA with cuDNN first (1.8x flash's speed on an H200,
    forward+backward, GQA). Anything else: SDPA as usual. query/key/value: (batch, heads, seq, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        # Only the cached verdict: running the check here, inside a checkpointed forward, would add
        # tensors to what the checkpoint saves and fail its recompute.
        if attention_mask is None and query.is_cuda and _CUDNN_VERDICT.get(query.device.index, False):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            # Chosen inside the layer, so a checkpointed layer's recompute picks the same kernel.
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
                return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout and module.training:
        raise ValueError("attention dropout is not supported with padding-free batches; set train.padding_free: false")
    attn, attn_kwargs = _varlen_call()
    batch, heads, seq, head_dim = query.shape
    q = query.transpose(1, 2).reshape(batch * seq, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], head_dim)
    longest = kwargs["max_length_q"]
    out = attn(q, k, v, cu_seq_lens, kwargs.get("cu_seq_lens_k", cu_seq_lens), longest, longest, scale=scaling, **attn_kwargs)
    return out.view(batch, seq, heads, head_dim), None


def _fast_attention_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Masks for fast_attention: none unless the batch has padding (then SDPA's own).

    Packed batches carry cu_seq_lens instead of a mask, so the (tokens x tokens) block mask that
    transformers would build from the position ids is skipped.
    """
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def _random_qkv(lens: list[int], heads: int, kv_heads: int, head_dim: int, device: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(0)
    total = sum(lens)

    def rand(h: int) -> torch.Tensor:
        return torch.randn(total, h, head_dim, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()

    return rand(heads), rand(kv_heads), rand(kv_heads)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Causal attention per sample in float32, on (tokens, heads, dim) tensors."""
    out, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start : start + n].transpose(0, 1)[None].float() for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        start += n
    return torch.cat(out)


def _matches_reference(fn: Callable, lens: list[int], device: str) -> bool:
    q, k, v = _random_qkv(lens, heads=4, kv_heads=2, head_dim=128, device=device)
    out = fn(q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = _reference_attention(q, k, v, lens)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(torch.isfinite(a).all()) and float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2

    return close(out, ref) and all(close(a, b) for a, b in zip(grads, ref_grads))


@functools.cache
def varlen_attention_works(device_index: int = 0) -> bool:
    """Check once per process that varlen attention matches causal attention per sample, with grads."""
    call = _varlen_call() if torch.cuda.is_available() else None
    if call is None:
        return False
    attn, attn_kwargs = call
    lens = [37, 80, 11]
    cu = torch.tensor([0, 37, 117, 128], device=f"cuda:{device_index}", dtype=torch.int32)
    try:
        ok = _matches_reference(lambda q, k, v: attn(q, k, v, cu, cu, max(lens), max(lens), **attn_kwargs), lens, f"cuda:{device_index}")
    except Exception as exc:  # an old torch, a kernel missing for this GPU
        log.warning("variable-length attention unavailable (%s); padding-free batches use SDPA masks", exc)
        return False
    if not ok:
        log.warning("variable-length attention disagrees with the reference; padding-free batches use SDPA masks")
    return ok


_CUDNN_VERDICT: dict[int, bool] = {}


def cudnn_attention_works(device_index: int = 0) -> bool:
    """Check once per process and device that cuDNN SDPA (causal, GQA) matches the reference."""
    if device_index not in _CUDNN_VERDICT:
        _CUDNN_VERDICT[device_index] = _check_cudnn_attention(device_index)
    return _CUDNN_VERDICT[device_index]


def _check_cudnn_attention(device_index: int) -> bool:
    if not torch.cuda.is_available():
        return False
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qb, kb, vb = (t.view(2, 96, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)

    try:
        ok = _matches_reference(cudnn, [96, 96], f"cuda:{device_index}")
    except Exception as exc:
        log.info("cuDNN attention unavailable here (%s); SDPA picks its default kernel", exc)
        return False
    if not ok:
        log.warning("cuDNN attention disagrees with the reference; SDPA picks its default kernel")
    return ok


def enable_fast_attention(model: nn.Module) -> bool:
    """Switch an SDPA model's attention to fast_attention (registered once); False where it cannot run."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = unwrap(model)
    if base.config._attn_implementation not in ("sdpa", FAST_ATTENTION) or not varlen_attention_works():
        return False
    cudnn_attention_works(torch.cuda.current_device())  # decided here, outside any forward
    AttentionInterface.register(FAST_ATTENTION, fast_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, _fast_attention_mask)
    base.set_attn_implementation(FAST_ATTENTION)
    return True


# ---------------------------------------------------------------------------------------------
# The one entry point


@dataclass(frozen=True)
class FastPathReport:
    options: FastOptions
    plan: MemoryPlan
    liger: bool
    fused_lora_modules: int
    varlen_attention: bool
    padding_free: bool
    compiled_layers: int = 0
    packed_mask: bool = False
    bits16_mask: bool = False

    def record(self) -> dict[str, int | float]:
        """What trained, as numbers (0/1 for switches): the values the Trainer got, which can differ
        from params (the memory plan picks micro-batch x accumulation and recomputed layers)."""
        return {
            "micro_batch_size": self.plan.micro_batch_size,
            "gradient_accumulation_steps": self.plan.gradient_accumulation_steps,
            "recomputed_layers": self.plan.checkpoint_layers,
            "num_layers": self.plan.num_layers,
            "estimated_peak_gib": round(self.plan.estimated_peak_gib, 3),
            "liger": int(bool(self.liger)),
            "fused_lora_modules": self.fused_lora_modules,
            "padding_free": int(self.padding_free),
            "varlen_attention": int(self.varlen_attention),
            "compiled_layers": self.compiled_layers,
        }

    def describe(self) -> str:
        liger = ("linear+cross-entropy only" if self.compiled_layers else "on") if self.liger else "off"
        parts = [self.plan.describe(), f"liger {liger}"]
        parts.append(f"fused LoRA on {self.fused_lora_modules} layers" if self.fused_lora_modules else "fused LoRA off")
        if self.packed_mask:
            parts.append("LoRA dropout masks as bits")
        if self.bits16_mask:
            parts.append("LoRA dropout masks from 16-bit draws")
        if self.padding_free:
            parts.append("padding-free batches" + (" with varlen/cuDNN attention" if self.varlen_attention else " (SDPA masks)"))
        parts.append(f"{self.compiled_layers} layers compiled" if self.compiled_layers else "not compiled")
        return "; ".join(parts)


def longest_example(dataset: Any, column: str = "input_ids") -> int:
    """Tokens in the longest training row (a datasets.Dataset, or any sequence of dicts)."""
    try:
        import pyarrow.compute as pc

        return int(pc.max(pc.list_value_length(dataset.data.column(column))).as_py())
    except Exception:
        return max(len(row[column]) for row in dataset)


def apply_fast_path(
    model: nn.Module,
    cfg: TrainConfig,
    collator: Callable | None,
    train_dataset: Any = None,
    *,
    max_seq_len: int | None = None,
    lora_dropout: float | None = None,
) -> tuple[nn.Module, TrainConfig, Callable | None, FastPathReport]:
    """Apply the fast path to a peft model; returns it with the train config and collator to use.

    The config comes back with per_device_batch_size / gradient_accumulation_steps chosen by the
    memory plan (same effective batch); the collator wrapped for padding-free batches when on.
    Call after the LoRA adapters are attached and before the Trainer is built.
    """
    device = next(model.parameters()).device
    options = resolve_options(cfg, device)
    base = unwrap(model)
    dims = ModelDims.from_config(base.config)
    if lora_dropout is None:
        lora_dropout = _lora_dropout(model)
    liger = apply_liger(model, layer_kernels=not options.compile) if options.liger else False
    # sibling groups and bit masks are eager-only: compiled layers fuse the dropout themselves
    packed = options.fused_lora and options.dropout_mask_bits and not options.compile
    bits16 = options.fused_lora and not _cuda(device)
    fused = (
        fuse_lora(model, group_siblings=not options.compile, packed_mask=packed, bits16_mask=bits16)
        if options.fused_lora
        else 0
    )
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
        lora_dropout=lora_dropout,
        compiled=options.compile,
        packed_mask=packed and lora_dropout > 0,
        element_bytes=float(base.get_input_embeddings().weight.element_size()),
        float32_masks=not _cuda(device),
    )
    set_checkpointed_layers(model, plan.checkpoint_layers)
    compiled = compile_layers(model) if options.compile else 0
    if not plan.fits:
        log.warning(
            "the memory plan does not fit train.memory_budget_gib (%s); training may run out of memory: "
            "lower train.per_device_batch_size or data.max_seq_len",
            plan.describe(),
        )
    cfg = cfg.model_copy(
        update={
            "per_device_batch_size": plan.micro_batch_size,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        }
    )
    if options.padding_free and collator is not None:
        collator = PaddingFreeCollator(collator)
    report = FastPathReport(options, plan, liger, fused, varlen, options.padding_free, compiled, packed, bits16 and fused > 0)
    log.info("fast path: %s", report.describe())
    return model, cfg, collator, report


def _lora_dropout(model: nn.Module) -> float:
    for module in model.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict) and len(drop):
            layer = next(iter(drop.values()))
            return float(getattr(layer, "p", 0.0))
    return 0.0
