"""Changes to the model's layers: torch.compile of each decoder layer, liger-kernel's fused kernels,
and fused LoRA (each peft LoRA linear layer's forward as one LoraLinearFunction node, siblings on one
input as one node together)."""

from __future__ import annotations

import logging
from types import MethodType
from typing import Any

import torch
from torch import nn

from qlora_pipeline.core import bitmask_dropout, lowrank_dropout
from qlora_pipeline.core.fast.memory import decoder_layers, unwrap
from qlora_pipeline.core.fast.nodes import FrozenLinearAddFunction, LoraLinearFunction, LoraMember
from qlora_pipeline.core.fast.selective import KEPT_OUTPUT_MODULES

log = logging.getLogger(__name__)


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


def apply_liger(model: nn.Module, *, layer_kernels: bool = True, loss_kernel: bool = True) -> bool:
    """Fused RMSNorm, RoPE, SwiGLU and linear+cross-entropy from liger-kernel, on this instance.

    layer_kernels=False: the fused linear+cross-entropy alone (for compiled decoder layers, where
    inductor fuses the norms, RoPE and SwiGLU itself and liger's kernels would only break its graph).
    loss_kernel=False: without the fused linear+cross-entropy (FSDP: it reads the head's weight
    without calling the head, so FSDP never gathers it: "mixed torch.Tensor and DTensor" on a GPU).
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers.integrations.liger import apply_liger_kernel

    model_type = getattr(unwrap(model).config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.info("liger-kernel has no kernels for model type %r; skipped", model_type)
        return False
    kwargs = {} if layer_kernels else {"rope": False, "rms_norm": False, "swiglu": False}
    if not loss_kernel:
        kwargs["fused_linear_cross_entropy"] = False
    apply_liger_kernel(model, kwargs)
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


def _lora_inputs(self: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, *, runs_base_matmul: bool = True) -> tuple | None:
    """(LoraMember, weight_a, weight_b) for LoraLinearFunction, or None where peft's own forward must
    run: anything but one plain adapter, a base other than a frozen bitsandbytes 4-bit or plain
    linear, or mixed dtypes outside autocast.
    """
    name = _single_plain_adapter(self, args, kwargs)
    if name is None:
        return None
    base_layer = self.base_layer
    if getattr(base_layer.weight, "quant_state", None) is None and getattr(base_layer, "quant_state", None) is not None:
        # FSDP2 gathers a sharded 4-bit weight as a plain tensor; bitsandbytes' own forward re-attaches
        # the quantization state the module keeps, and so does this one.
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base_layer)
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
    fused = p > 0 and getattr(self, "_lora_fused_dropout", False) and lowrank_dropout.supports(x, weight_a.shape[0])
    bit_mask = p > 0 and not fused and getattr(self, "_lora_bitmask_dropout", False) and bitmask_dropout.supports(x)
    bits16 = p > 0 and not (fused or bit_mask) and getattr(self, "_lora_bits16_dropout", False) and x.device.type == "cpu"
    seed = getattr(self, "_lora_seed", None) if bit_mask or fused else None
    if p > 0 and getattr(self, "_lora_seed_required", False) and seed is None:
        # a recompute without the seed would draw another mask than the forward (graphs.py)
        why = (
            f"LoRA dropout on a {tuple(x.shape)} {x.device.type} input cannot take the seeded dropout that CUDA graphs need"
            if not (bit_mask or fused)
            else "the model's forward did not run its decoder layers through the CUDA-graph runner"
        )
        raise RuntimeError(f"{why}; set train.cuda_graphs to false")
    keep = getattr(self, "_lora_keep_output", False)
    member = LoraMember(weight, base_layer.bias, quant_state, float(self.scaling[name]), p, runs_base_matmul, bit_mask, bits16, seed, fused, keep)
    return member, weight_a, weight_b


def _peft_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's own forward, where the one-node forward does not apply. Under CUDA graphs its dropout
    would draw new masks in a captured recompute (graphs.py): refused there."""
    if (
        getattr(self, "_lora_seed_required", False)
        and self.training
        and torch.is_grad_enabled()
        and not self.disable_adapters
        and not self.merged
        and any(name in self.lora_dropout and isinstance(self.lora_dropout[name], nn.Dropout) and self.lora_dropout[name].p > 0 for name in self.active_adapters)
    ):
        raise RuntimeError(f"a LoRA layer on {type(self.base_layer).__name__} runs peft's own dropout, which CUDA graphs cannot repeat; set train.cuda_graphs to false")
    return type(self).forward(self, x, *args, **kwargs)


def _lora_fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA layer's forward as one LoraLinearFunction node (peft's own where it does not apply)."""
    inputs = _lora_inputs(self, x, args, kwargs)
    if inputs is None:
        return _peft_forward(self, x, *args, **kwargs)
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
    inputs = _lora_inputs(self, x, args, kwargs, runs_base_matmul=False)
    if inputs is None:
        return _peft_forward(self, x, *args, **kwargs)
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
    model: nn.Module,
    *,
    tail_first: bool = True,
    group_siblings: bool = True,
    bit_masks: bool = False,
    bits16_mask: bool = False,
    fused_dropout: bool = False,
    keep_outputs: bool = False,
) -> int:
    """Give every peft LoRA linear layer the one-node forward (LoraLinearFunction): the last one of
    each decoder layer the adapter-first forward (tail_first), siblings on one input one node
    together (group_siblings, SIBLING_GROUPS), dropout masks kept as bits on a CUDA GPU
    (bit_masks, core/bitmask_dropout.py), dropout inside the adapter's matmuls with its mask drawn
    again in the backward (fused_dropout, core/lowrank_dropout.py; before bit_masks where both
    apply), dropout masks drawn 16 bits per element on the CPU (bits16_mask, bits16_dropout).
    Returns how many layers were changed."""
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
        if bit_masks:
            module._lora_bitmask_dropout = True
        if bits16_mask:
            module._lora_bits16_dropout = True
        if fused_dropout:
            module._lora_fused_dropout = True
    if keep_outputs:
        for module in keepable_modules(model):
            if id(module) not in tails:
                module._lora_keep_output = True
    return len(modules)


def keepable_modules(model: nn.Module) -> list[nn.Module]:
    """The LoRA linear layers whose outputs a selectively recomputed decoder layer can keep
    (selective.KEPT_OUTPUT_MODULES: the MLP's gate_proj and up_proj)."""
    lora = {id(m) for m in _lora_linears(model)}
    return [
        m for layer in decoder_layers(model) for name, m in layer.named_modules()
        if id(m) in lora and name.rsplit(".", 1)[-1] in KEPT_OUTPUT_MODULES
    ]


def selective_recompute_possible(model: nn.Module) -> bool:
    """Every decoder layer has all of the kept-output LoRA layers (gate_proj and up_proj), marked
    by fuse_lora(keep_outputs=True): then a recomputed layer can keep their outputs."""
    layers = decoder_layers(model)
    per_layer = [sum(1 for name, m in layer.named_modules() if getattr(m, "_lora_keep_output", False)) for layer in layers]
    return bool(layers) and all(n == len(KEPT_OUTPUT_MODULES) for n in per_layer)


def unfuse_lora(model: nn.Module) -> None:
    """Back to peft's own forward; recomputed layers recompute wholly again."""
    from qlora_pipeline.core.fast.selective import KeepOutputsCheckpoint

    for layer in decoder_layers(model):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if isinstance(func, KeepOutputsCheckpoint):
            layer._gradient_checkpointing_func = func.inner
        vars(layer).pop("_keep_mlp_outputs", None)
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) in _FUSED_FORWARDS:
            del module.forward
        vars(module).pop("_lora_group", None)
        vars(module).pop("_lora_bitmask_dropout", None)
        vars(module).pop("_lora_bits16_dropout", None)
        vars(module).pop("_lora_fused_dropout", None)
        vars(module).pop("_lora_keep_output", None)
        vars(module).pop("_lora_seed", None)
        vars(module).pop("_lora_seed_required", None)


_FUSED_FORWARDS = (_lora_fused_forward, _lora_tail_forward, _lora_group_forward)
