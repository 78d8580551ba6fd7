"""LoRA dropout on the GPU with its mask kept as bits (Triton), for the one-node LoRA layers.

torch's dropout keeps a byte per element for the backward; this keeps a bit, so a decoder layer
that is not recomputed holds ~0.26 GiB less at 4 x 2048 tokens on an 8B model, and the kernels
move fewer bytes: the forward writes the dropped-out input and the bits, the backward applies the
mask and adds into the input gradient in one pass (torch needs a mask kernel and an add). On an
H200 the kernels are lighter (benchmarks/README.md) but the step is no faster: each Triton launch
costs the host more than torch's, and the step is close to host-bound. Hence opt-in
(`train.dropout_mask_bits`).

    dropped, bits = dropout_forward(x2, p)            # x2: contiguous, numel a multiple of 8
    grad_x = dropout_backward(grad, bits, p, out=grad_x)  # out=None: a new tensor; else added into out

The random numbers come from a seed drawn from torch's CUDA generator, so a recomputed layer
(torch's checkpoint restores the generator) draws the same mask again; or from a seed tensor the
caller passes (core/fast/graphs.py, where the generator cannot be restored inside a CUDA graph).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

BLOCK = 2048  # elements per program (the random numbers' layout depends on it: a new BLOCK, new masks)
FORWARD_WARPS = 4  # warps per program, forward and backward kernels (launch settings only: same results)
BACKWARD_WARPS = 4
SEED_HIGH = 2**31 - 1  # seeds are drawn in [0, SEED_HIGH): int32


@functools.cache
def available() -> bool:
    """A CUDA GPU and triton that imports."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def supports(x: torch.Tensor) -> bool:
    """Whether this input can take the bit-mask dropout (else torch's)."""
    return x.is_cuda and x.numel() % 8 == 0 and x.numel() < 2**31 and available()


@functools.cache
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def drop_part(x_ptr, y_ptr, bits_ptr, start, r, n, p, scale, PART: tl.constexpr):
        offs = start + tl.arange(0, PART)
        valid = offs < n
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        keep = r >= p
        tl.store(y_ptr + offs, tl.where(keep, x * scale, 0.0).to(y_ptr.dtype.element_ty), mask=valid)
        flags = tl.reshape(keep.to(tl.int32), (PART // 8, 8))
        byte = tl.sum(flags << tl.arange(0, 8)[None, :], axis=1)
        boffs = start // 8 + tl.arange(0, PART // 8)
        tl.store(bits_ptr + boffs, byte.to(tl.uint8), mask=boffs < n // 8)

    @triton.jit
    def forward_kernel(x_ptr, y_ptr, bits_ptr, seed_ptr, n, p, scale, BLOCK: tl.constexpr):
        # one Philox call gives four numbers: each quarter of the block takes one of them
        PART: tl.constexpr = BLOCK // 4
        pid = tl.program_id(0)
        r0, r1, r2, r3 = tl.rand4x(tl.load(seed_ptr), pid * PART + tl.arange(0, PART))
        start = pid * BLOCK
        drop_part(x_ptr, y_ptr, bits_ptr, start, r0, n, p, scale, PART)
        drop_part(x_ptr, y_ptr, bits_ptr, start + PART, r1, n, p, scale, PART)
        drop_part(x_ptr, y_ptr, bits_ptr, start + 2 * PART, r2, n, p, scale, PART)
        drop_part(x_ptr, y_ptr, bits_ptr, start + 3 * PART, r3, n, p, scale, PART)

    @triton.jit
    def backward_kernel(g_ptr, bits_ptr, out_ptr, n, scale, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        byte = tl.load(bits_ptr + boffs, mask=boffs < n // 8, other=0).to(tl.int32)
        keep = tl.reshape((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1, (BLOCK,)) != 0
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        value = tl.where(keep, tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32) * scale, 0.0)
        if ACCUMULATE:
            value += tl.load(out_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=valid)

    return forward_kernel, backward_kernel


def dropout_forward(x: torch.Tensor, p: float, seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * mask / (1 - p), the mask as bits: element i is bit i % 8 of byte i // 8).

    seed: a one-element int32 CUDA tensor the mask is drawn from (the same seed, the same mask);
    None: a fresh one from torch's CUDA generator.
    """
    forward_kernel, _ = _kernels()
    x = x.contiguous()
    n = x.numel()
    y = torch.empty_like(x)
    bits = torch.empty(n // 8, dtype=torch.uint8, device=x.device)
    if seed is None:
        seed = torch.randint(0, SEED_HIGH, (1,), device=x.device, dtype=torch.int32)
    forward_kernel[(-(-n // BLOCK),)](x, y, bits, seed, n, float(p), 1.0 / (1.0 - p), BLOCK=BLOCK, num_warps=FORWARD_WARPS)
    return y, bits


def dropout_backward(grad: torch.Tensor, bits: torch.Tensor, p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """grad * mask / (1 - p), added into `out` when given (same shape, contiguous)."""
    _, backward_kernel = _kernels()
    grad = grad.contiguous()
    n = grad.numel()
    accumulate = out is not None
    if out is None:
        out = torch.empty_like(grad)
    backward_kernel[(-(-n // BLOCK),)](grad, bits, out, n, 1.0 / (1.0 - p), ACCUMULATE=accumulate, BLOCK=BLOCK, num_warps=BACKWARD_WARPS)
    return out


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The mask as bools (n elements), for checks."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    return ((bits.to(torch.int32)[:, None] >> shifts) & 1).bool().flatten()[:n]
