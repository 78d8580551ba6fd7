"""The LoRA autograd nodes (LoraLinearFunction, FrozenLinearAddFunction), the frozen base's matmul
(bitsandbytes 4-bit or plain), and the CPU dropout with masks from 16 random bits per element."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qlora_pipeline.core import bitmask_dropout, lowrank_dropout
from qlora_pipeline.core.fast import selective


@dataclass(frozen=True, eq=False)
class LoraMember:
    """One LoRA linear layer's constants for LoraLinearFunction: its frozen base (weight, bias,
    bitsandbytes quant state, or None for a plain weight), the adapter's scale and dropout, and
    whether the node runs the base matmul too (runs_base_matmul=False: the adapter's branch alone), and how
    its dropout keeps the mask: not at all, drawn again in the backward (fused_dropout,
    core/lowrank_dropout.py, CUDA), as bits (core/bitmask_dropout.py, CUDA) or as torch's bytes."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    quant_state: Any
    scale: float
    p: float
    runs_base_matmul: bool = True
    bit_mask: bool = False
    bits16: bool = False  # CPU: the mask from 16 random bits per element (bits16_dropout)
    seed: torch.Tensor | None = None  # the seeded dropout's seed (core/fast/graphs.py); None: drawn here
    fused_dropout: bool = False  # dropout inside the adapter's matmuls, its mask drawn again (lowrank_dropout)
    keep_output: bool = False  # a selectively recomputed layer keeps this output (core/fast/selective.py)


class LoraLinearFunction(torch.autograd.Function):
    """y_i = base_i(x) + s_i * drop_i(x) A_i^T B_i^T for one LoRA linear layer, or for sibling layers
    that take the same input (q/k/v, gate/up), as one autograd node instead of peft's seven per layer
    (dropout, two casts, two matmuls, the 4-bit matmul, the add): less Python and fewer kernels per
    layer and pass, and the backward sums the members' input gradients in place, in the matmuls'
    epilogues. Saves what peft saves: each member's dropped-out input and mask, its rank-r hidden
    state and casted adapter weights; with fused_dropout, the input the members share and a seed
    instead of the dropped-out inputs and masks. Each member draws its own dropout mask, in member order, as
    peft's layers do when called one after another. Members marked keep_output, inside a selectively
    recomputed layer (core/fast/selective.py), store their outputs in its forward and take them back
    in its recompute instead of running the frozen matmul and the adapter's update again.

        outputs = LoraLinearFunction.apply(x, members, a_0, b_0, a_1, b_1, ...)  # a tuple if several
    """

    @staticmethod
    def forward(ctx, x, members, *weights):  # noqa: D102
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        kept = [i for i, m in enumerate(members) if m.keep_output and m.runs_base_matmul]
        store = selective.current_store() if kept else None
        reused = None
        if store is not None and not store.storing:
            reused = store.take([(*shape[:-1], weights[2 * i + 1].shape[0]) for i in kept])
        outputs, saved = [], []
        for index, (member, weight_a, weight_b) in enumerate(zip(members, weights[0::2], weights[1::2])):
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            if member.p > 0 and member.fused_dropout:  # drop(x) @ a.T in one kernel; the mask is drawn again in the backward
                x2 = x2.contiguous()
                seed = member.seed if member.seed is not None else lowrank_dropout.new_seed(x2.device)
                hidden = lowrank_dropout.forward(x2, a, seed, member.p)
                dropped, mask = x2, seed
            elif member.p > 0 and member.bit_mask:
                dropped, mask = bitmask_dropout.dropout_forward(x2, member.p, member.seed)
            elif member.p > 0 and member.bits16:
                dropped, mask = bits16_dropout(x2, member.p)
            elif member.p > 0:
                dropped, mask = torch.native_dropout(x2, member.p, True)
            else:
                dropped, mask = x2, None
            if not (member.p > 0 and member.fused_dropout):
                hidden = torch.mm(dropped, a.t())
            if member.runs_base_matmul and reused is not None and index in kept:
                out = reused[kept.index(index)]  # the forward's output: frozen matmul and update skipped
            elif member.runs_base_matmul:
                out = _frozen_matmul(x2, member.weight, member.bias, member.quant_state, dtype)
                out.addmm_(hidden, b.t(), alpha=member.scale)
                out = out.view(*shape[:-1], out.shape[-1])  # the compute dtype, as autocast's matmuls return
            else:  # not a view: FrozenLinearAddFunction adds the frozen matmul into it in place
                out = x2.new_empty(*shape[:-1], b.shape[0])
                torch.mm(hidden, b.t(), out=out.view(-1, b.shape[0])).mul_(member.scale)
            outputs.append(out)
            saved += [dropped, mask, hidden, a, b]
        if store is not None and store.storing:
            store.put(tuple(outputs[i] for i in kept))
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
            fused = member.p > 0 and member.fused_dropout
            if fused:  # grad_a and the input gradient in one pass, the mask drawn again
                grad_a, grad_x = lowrank_dropout.backward(grad_hidden, dropped, a, mask, member.p, grad_x, need_grad_x=ctx.needs_input_grad[0])
                grad_weights += [grad_a, grad_b]
            else:
                grad_weights += [torch.mm(grad_hidden.t(), dropped), grad_b]
            if not ctx.needs_input_grad[0]:
                continue
            if fused:
                pass  # lowrank_dropout.backward added this member's input gradient
            elif mask is None:
                grad_x = torch.mm(grad_hidden, a) if grad_x is None else grad_x.addmm_(grad_hidden, a)
            elif member.bit_mask:  # mask applied and added into grad_x in one kernel
                grad_x = bitmask_dropout.dropout_backward(torch.mm(grad_hidden, a), mask, member.p, out=grad_x)
            elif member.bits16:  # the mask holds keep / (1 - p)
                part = torch.mm(grad_hidden, a)
                grad_x = part.mul_(mask) if grad_x is None else grad_x.addcmul_(part, mask)
            else:
                part = torch.ops.aten.native_dropout_backward(torch.mm(grad_hidden, a), mask, 1.0 / (1.0 - member.p))
                grad_x = part if grad_x is None else grad_x.add_(part)  # addcmul_ with a bool mask is 3x slower
            if member.runs_base_matmul:
                grad_x.addmm_(g, _frozen_weight(member.weight, member.quant_state, ctx.dtype))
        if grad_x is not None:
            grad_x = grad_x.view(ctx.shape)
        grad_weights = [g if g is None else g.to(dtype) for g, dtype in zip(grad_weights, ctx.param_dtypes)]
        return grad_x, None, *grad_weights


class FrozenLinearAddFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + update for a frozen base, the add done by the matmul's epilogue.

    Saves no tensor for its backward (the frozen weight stays on ctx), which layers._lora_tail_forward
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
