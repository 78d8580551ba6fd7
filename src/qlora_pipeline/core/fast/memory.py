"""The memory plan: activation memory and step time estimated from the model's sizes, the fastest
micro-batch and number of recomputed decoder layers that fit the budget, and the recompute set on
the model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qlora_pipeline.core.fast.options import GIB, _cuda

# Cost model for choosing micro-batch and recomputed layers, calibrated on an H200 with the 8B shape
# (benchmarks/results/explore_fused_8b_h200.json, gpu_train_bench_h200.json): a step is GPU-bound or
# host-bound, whichever is longer. GPU: recomputing all 32 layers of 4 x 2048 tokens (down_proj's
# frozen matmul skipped, see layers._lora_tail_forward) took 0.74 s against 0.555 s without ->
# RECOMPUTE_COST = 0.74 / 0.555 - 1 = 0.33.
RECOMPUTE_COST = 0.33
# The GPU's rate of model FLOPs grows with the tokens of a micro-batch (bigger matmuls, fewer launches
# per token): 8B without recompute, 4 x 2048 tokens took 0.542 s and 2 x 2048 0.341 s per micro-batch
# (benchmarks/results/gpu_plan_table_h200_8b.json), i.e. 484 and 401 TFLOP/s once the host's share
# (below) is taken out. rate(t) = peak * t / (t + T0) fits both with T0 = 2,139 tokens and peak =
# 610 TFLOP/s. A rate that did not depend on t (466 TFLOP/s) made the plan take 2 x 2048 without
# recompute over 4 x 2048 with some, which measured slower.
GPU_PEAK_MODEL_FLOPS_PER_S = 610e12
GPU_HALF_RATE_TOKENS = 2139
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
# With the decoder stack replayed from CUDA graphs (train.cuda_graphs) the layers cost the host one
# replay per pass: what remains (embedding, head, optimizer) does not scale with the layers.
HOST_S_PER_LAYER_PASS_GRAPHED = 0.0
# CUDA graphs keep their inputs, output and output gradient as fixed buffers beside the pool (one
# hidden-state tensor each) and the pool is not shared with the head's loss: four hidden states more.
GRAPH_HIDDEN_STATES = 4
# The estimate already runs 1-5% above the measured peaks (8B, 1-4 x 2048 tokens, 0-32 layers).
MEMORY_MARGIN = 1.0


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
    bit_masks: bool = False,
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
        total += (1.75 - (0.875 if bit_masks else 0.0)) * dropped
    return total


def model_flops_per_token(dims: ModelDims, seq_len: int) -> float:
    """Forward + activation-gradient backward of the frozen base: 4 x matmul params + causal attention."""
    d, f, q, kv = dims.hidden, dims.ffn, dims.q_dim, dims.kv_dim
    matmul_params = dims.num_layers * (2 * d * q + 2 * d * kv + 3 * d * f) + d * dims.vocab
    return 4.0 * matmul_params + 6.0 * seq_len * q * dims.num_layers


def kept_output_bytes(dims: ModelDims, element_bytes: float = 2.0) -> float:
    """Bytes per token that a selectively recomputed layer keeps beside its input: the outputs of
    gate_proj and up_proj (core/fast/selective.py), 2 x ffn values. 8B, bf16: 56 KiB."""
    return 2.0 * dims.ffn * element_bytes


# What a recompute runs besides its matmuls and attention (norms, RoPE, SwiGLU, the LoRA dropout's
# kernels, dequantization), as a share of a whole recompute that a selective one runs all the same.
# 8B on an H200, fixed 4 x 2048, CUDA graphs (benchmarks/README.md, "Selective recompute"): 31
# recomputed layers, 9 of them selective, took 6.4-7.8 ms less per step than 27 recomputed wholly
# (three calls); at 5.4-6.5 ms per whole recompute that is 0.40-0.45 of one per selective layer,
# where FLOPs alone give 0.30: 0.30 x (1 - 0.14) + 0.14 = 0.40.
SELECTIVE_FIXED_SHARE = 0.14


def selective_recompute_fraction(dims: ModelDims, seq_len: int) -> float:
    """A selectively recomputed layer's recompute as a fraction of a whole recompute: the FLOPs per
    token of the forward that runs again (2 x matmul parameters, down_proj's skipped in both,
    layers._lora_tail_forward, gate's and up's too when kept, plus causal attention's
    2 x seq_len x q_dim), with SELECTIVE_FIXED_SHARE of the work run whatever is kept. 8B at 2048
    tokens: 0.30 by FLOPs, 0.40 in all."""
    d, f, q, kv = dims.hidden, dims.ffn, dims.q_dim, dims.kv_dim
    attention = 2.0 * seq_len * q
    projections = 2.0 * (2 * d * q + 2 * d * kv)
    flops = (projections + attention) / (projections + 2.0 * 2 * d * f + attention)
    return SELECTIVE_FIXED_SHARE + (1.0 - SELECTIVE_FIXED_SHARE) * flops


def step_seconds(
    dims: ModelDims,
    tokens: int,
    seq_len: int,
    checkpoint_layers: int,
    *,
    compiled: bool = False,
    graphs: bool = False,
    kept_output_layers: int = 0,
) -> float:
    """Estimated time of one micro-batch: the longer of GPU and host time, plus part of the shorter
    (they overlap less the closer they are). kept_output_layers: how many of the recomputed layers
    recompute selectively (selective_recompute_fraction of a whole recompute each on the GPU; the
    host runs a selective recompute's Python all the same)."""
    selective = min(kept_output_layers, checkpoint_layers)
    recomputed = checkpoint_layers - selective * (1.0 - selective_recompute_fraction(dims, seq_len))
    share = recomputed / dims.num_layers
    rate = GPU_PEAK_MODEL_FLOPS_PER_S * tokens / (tokens + GPU_HALF_RATE_TOKENS)
    gpu = tokens * model_flops_per_token(dims, seq_len) * (1 + RECOMPUTE_COST * share) / rate
    per_pass = HOST_S_PER_LAYER_PASS_GRAPHED if graphs else HOST_S_PER_LAYER_PASS_COMPILED if compiled else HOST_S_PER_LAYER_PASS
    host = dims.num_layers * per_pass * 2 * (1 + checkpoint_layers / dims.num_layers)
    longer, shorter = max(gpu, host), min(gpu, host)
    if shorter <= 0:
        return longer
    return longer + 0.2 * shorter * (shorter / longer) ** 2


def estimate_peak_bytes(
    dims: ModelDims,
    tokens: int,
    checkpoint_layers: int,
    static_bytes: float,
    *,
    liger: bool,
    lora_dropout: float,
    bit_masks: bool = False,
    element_bytes: float = 2.0,
    float32_masks: bool = False,
    graphs: bool = False,
    fused_loss: bool | None = None,
    kept_output_layers: int = 0,
) -> float:
    """Peak memory of one training step with `tokens` tokens per micro-batch: GPU memory, or on a CPU
    what the step adds to the process's RSS (static_bytes then counts only what training adds).

    The peak is the larger of two moments: the end of the forward (every kept layer's activations
    plus the recomputed layers' inputs) and the backward of the recomputed layers (their inputs
    plus the one layer being recomputed; the kept layers, the last ones, are freed by then).
    element_bytes, float32_masks: as for layer_activation_bytes. graphs: the decoder stack replayed
    from CUDA graphs (GRAPH_HIDDEN_STATES). fused_loss: liger's linear+cross-entropy, which never
    materialises the logits (None: as liger). kept_output_layers: recomputed layers that also keep
    kept_output_bytes (selective recompute).
    """
    per_layer = layer_activation_bytes(
        dims, liger=liger, lora_dropout=lora_dropout, bit_masks=bit_masks, element_bytes=element_bytes,
        float32_masks=float32_masks,
    )
    checkpoint_layers = min(checkpoint_layers, dims.num_layers)
    kept = dims.num_layers - checkpoint_layers
    inputs = checkpoint_layers * element_bytes * dims.hidden
    inputs += min(kept_output_layers, checkpoint_layers) * kept_output_bytes(dims, element_bytes)
    activations = tokens * (inputs + max(kept, 1 if checkpoint_layers else 0) * per_layer)
    if liger if fused_loss is None else fused_loss:
        loss = 0.0  # logits are never materialised; chunks fit in the misc term below
    else:
        loss = tokens * dims.vocab * (element_bytes + 4.0 + 4.0)  # logits, fp32 upcast (or log-softmax), fp32 grad
    misc = tokens * dims.hidden * element_bytes * (5 + (GRAPH_HIDDEN_STATES if graphs else 0))  # residual-stream grads, embeddings out; 8B: 40 KB measured
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
    kept_output_layers: int = 0  # of the recomputed layers, those recomputing selectively

    def describe(self) -> str:
        budget = f" of a {_gib_text(self.budget_gib)} GiB budget" if self.budget_gib else ""
        selective = f" ({self.kept_output_layers} selectively: gate/up outputs kept)" if self.kept_output_layers else ""
        return (
            f"micro-batch {self.micro_batch_size} x {self.gradient_accumulation_steps} accumulation, "
            f"{self.checkpoint_layers}/{self.num_layers} layers recompute{selective}, "
            f"~{_gib_text(self.estimated_peak_gib)} GiB{budget}"
        )


def _gib_text(gib: float) -> str:
    """One decimal, or two significant digits below 0.1 GiB (a tiny model's plan)."""
    return f"{gib:.1f}" if gib >= 0.1 else f"{gib:.2g}"


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
    bit_masks: bool = False,
    element_bytes: float = 2.0,
    float32_masks: bool = False,
    graphs: bool = False,
    fused_loss: bool | None = None,
    selective: bool = False,
) -> MemoryPlan:
    """The fastest (micro-batch, recomputed layers, selectively recomputed layers among them) whose
    estimated peak fits the budget.

    Keeps the effective batch (batch_size x accumulation) fixed; speed from step_seconds (a GPU cost
    model: on a CPU the micro-batch is not tuned, and fewer recomputed layers are always faster).
    budget_gib None: no limit. selective: recomputed layers may keep their gate/up outputs
    (core/fast/selective.py); each one that fits is taken, the fastest use of memory left over.
    """
    effective = batch_size * accumulation
    sizes = _divisors(effective) if tune_micro_batch else [batch_size]
    layer_choices = _checkpoint_choices(checkpointing, dims.num_layers)
    budget = math.inf if budget_gib is None else budget_gib * GIB

    def peak(b: int, k: int, s: int = 0) -> float:
        return estimate_peak_bytes(
            dims, b * seq_len, k, static_bytes, liger=liger, lora_dropout=lora_dropout, bit_masks=bit_masks,
            element_bytes=element_bytes, float32_masks=float32_masks, graphs=graphs, fused_loss=fused_loss,
            kept_output_layers=s,
        )

    def most_selective(b: int, k: int) -> int:
        """The most recomputed layers that can keep their outputs within the budget (peak grows linearly in it)."""
        if not selective or not k or budget == math.inf:
            return k if selective and k else 0
        room = budget - peak(b, k)
        each = MEMORY_MARGIN * b * seq_len * kept_output_bytes(dims, element_bytes)
        return max(0, min(k, int(room // each)))

    best: tuple[float, int, int, int] | None = None
    for b in sizes:
        fitting = [k for k in layer_choices if peak(b, k) <= budget]
        # without selective recompute the fewest recomputed layers are the fastest; with it, more
        # recomputed layers can leave room for more selective ones
        for k in fitting if selective else fitting[:1]:
            s = most_selective(b, k)
            cost = step_seconds(dims, b * seq_len, seq_len, k, compiled=compiled, graphs=graphs, kept_output_layers=s) / b
            if best is None or cost < best[0] - 1e-9:
                best = (cost, b, k, s)
    if best is None:  # nothing fits: the leanest choice, and say so
        b, k, s = min(sizes), max(layer_choices), 0
        fits = False
    else:
        _, b, k, s = best
        fits = True
    return MemoryPlan(
        micro_batch_size=b,
        gradient_accumulation_steps=effective // b,
        checkpoint_layers=k,
        num_layers=dims.num_layers,
        estimated_peak_gib=peak(b, k, s) / GIB,
        budget_gib=budget_gib,
        fits=fits,
        kept_output_layers=s,
    )


def leanest_plan_bytes(dims: ModelDims, seq_len: int, *, weight_bits: float, tied: bool, lora_r: int, element_bytes: float = 2.0) -> float:
    """Peak memory of the leanest plan for a whole model on one device: one seq_len row per
    micro-batch, every decoder layer recomputed, no fused kernels. Decides whether a model needs
    sharding (train.distributed auto).

    weight_bits: bits per linear-layer weight as stored: 4.127 for NF4 with double quantization (the
    QLoRA paper, Dettmers et al. 2023, section 2: 0.127 bits of constants per weight), 4.5 without
    (a float32 absmax per 64 weights), 8.5 for LLM.int8, 16 for bf16. tied: head shares the embedding.
    The adapter (r x (in + out) per linear layer) counts 16 bytes per parameter: float32 weight,
    gradient and AdamW's two states.
    """
    d, f, q, kv = dims.hidden, dims.ffn, dims.q_dim, dims.kv_dim
    linear = dims.num_layers * (2 * d * q + 2 * d * kv + 3 * d * f)
    weights = linear * weight_bits / 8 + dims.vocab * d * element_bytes * (1 if tied else 2)
    adapter = dims.num_layers * lora_r * ((d + q) * 2 + (d + kv) * 2 + 2 * (d + f) + (f + d))
    return estimate_peak_bytes(dims, seq_len, dims.num_layers, weights + 16.0 * adapter, liger=False, lora_dropout=0.0, element_bytes=element_bytes)


def static_training_bytes(model: nn.Module) -> float:
    """Bytes held through every step: the trainable parameters' grads and AdamW's two states, plus on
    a GPU the model as allocated now (on a CPU it is already in the RSS that the budget leaves out)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    resident = float(torch.cuda.memory_allocated()) if _cuda(next(model.parameters()).device) else 0.0
    return resident + 3.0 * trainable

def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: nn.Module, count: int, kept_outputs: int = 0) -> int:
    """Recompute the first `count` decoder layers in the backward and keep the others' activations;
    the last `kept_outputs` of the recomputed ones recompute selectively (their gate/up outputs
    kept, core/fast/selective.py; needs fuse_lora(keep_outputs=True)).

    The first ones, because their recompute runs at the end of the backward, when the later layers'
    activations have been freed: the peak is one layer lower than with the last ones. The selective
    ones next to the kept layers, so their outputs are freed early in the backward.
    """
    from qlora_pipeline.core.fast.selective import KeepOutputsCheckpoint

    layers = decoder_layers(model)
    count = max(0, min(count, len(layers)))
    if count and not all(getattr(layer, "_gradient_checkpointing_func", None) for layer in layers):
        base = unwrap(model)
        if hasattr(base, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kept_outputs = max(0, min(kept_outputs, count))
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
        selective = count - kept_outputs <= index < count
        layer._keep_mlp_outputs = selective  # read by graphs.StackRunner, which checkpoints itself
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if isinstance(func, KeepOutputsCheckpoint) and not selective:
            layer._gradient_checkpointing_func = func.inner
        elif func is not None and selective and not isinstance(func, KeepOutputsCheckpoint):
            layer._gradient_checkpointing_func = KeepOutputsCheckpoint(func)
    return count
