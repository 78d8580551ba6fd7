"""LoRA dropout fused into the adapter's rank-r matmuls (Triton): the mask is drawn again wherever
it is needed, never stored, and the dropped-out input is never written.

    hidden = forward(x, a, seed, p)                                # drop(x) @ a.T
    grad_a, grad_x = backward(grad_hidden, x, a, seed, p, grad_x)  # grad_hidden.T @ drop(x); grad_x += drop'(grad_hidden @ a)

x: (tokens, in), contiguous, `in` a multiple of 8; a: (r, in); grad_hidden: (tokens, r); seed: a
one-element int32 tensor on x's device. peft's layer (and core/bitmask_dropout.py) writes each
adapter's dropped-out copy of its input, keeps it and a mask for the backward, and runs a separate
matmul over it: three passes over the input in the forward, where this reads it once. q, k and v
(gate and up) each keep their own copy there; here they keep nothing beyond the input they share.

The mask: element (i, k) belongs to the group of 8 columns (i * in + k) // 8, whose Philox call
(tl.randint4x with that counter, PHILOX_ROUNDS rounds) gives 128 random bits, 16 per element; an element is dropped when
its 16 bits are below round(p * 65536) (the realised drop probability is within 7.7e-6 of p, as
nodes.bits16_dropout on the CPU). The same (seed, shape) gives the same mask in every kernel,
whatever their tile sizes. The distribution is torch.nn.Dropout's; the random stream is not.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from qlora_pipeline.core.bitmask_dropout import SEED_HIGH  # one seed range for both seeded dropouts (graphs.py draws them)

# Launch settings, the fastest of a sweep on an H200 over the 8B shape's inputs at 7 Philox rounds
# (benchmarks/gpu_lowrank_dropout_tune.py --wide --rounds 7, results/gpu_lowrank_dropout_tune_wide_r7_h200.json:
# an 8B layer's seven adapters in 0.294 ms forward and 0.645 ms backward, against 0.749 and 0.923
# for the bit-mask dropout and torch's matmuls). They change the order of float32 sums, not the mask.
FORWARD_BLOCK_M = 32  # rows per program of the forward (one program per row block, all columns)
FORWARD_BLOCK_K = 128
FORWARD_WARPS = 4
FORWARD_STAGES = 4
BACKWARD_BLOCK_M = 32  # rows per step of the backward (one program per column block and row split)
BACKWARD_BLOCK_K = 128
BACKWARD_WARPS = 2
BACKWARD_STAGES = 2
BACKWARD_SPLIT_M = 16  # row splits of grad_a, summed afterwards (deterministic, no atomics)
# Philox4x32 rounds per draw. 7 rounds pass every test of TestU01's BigCrush (Salmon et al., "Parallel
# random numbers: as easy as 1, 2, 3", SC 2011, table 2); 10, triton's default, adds a safety margin
# a dropout mask does not need. The forward is bound by these draws: 7 rounds took it from 0.343 to
# 0.293 ms per 8B layer (results/gpu_lowrank_dropout_rounds_h200.json).
PHILOX_ROUNDS = 7
MAX_ELEMENTS = 2**31 - 1  # Philox counters are 32-bit


def interpreted() -> bool:
    """TRITON_INTERPRET=1: triton runs the kernels on CPU tensors (slowly), as the tests do."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def available() -> bool:
    """triton imports and there is a CUDA GPU (or triton interprets on the CPU)."""
    if not (torch.cuda.is_available() or interpreted()):
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def supports(x: torch.Tensor, rank: int) -> bool:
    """Whether the kernels take this input: on a CUDA GPU (any device when interpreted), a 16- or
    32-bit float, `in` a multiple of 8, under 2^31 elements, rank at most 128."""
    return (
        (x.is_cuda or interpreted())
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.shape[-1] % 8 == 0
        and x.numel() <= MAX_ELEMENTS
        and rank <= 128
        and available()
    )


def drop_count(p: float) -> int:
    """Of the 65,536 values of an element's 16 random bits, how many drop it."""
    return min(65535, max(0, round(p * 65536)))


def new_seed(device: torch.device | str) -> torch.Tensor:
    """A seed from torch's generator on `device`: a recomputed layer (torch's checkpoint restores the
    generator) draws the same seed, so the same mask, again."""
    return torch.randint(0, SEED_HIGH, (1,), device=device, dtype=torch.int32)


def _rank_pad(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    from qlora_pipeline.core import _lowrank_dropout_kernels as kernels

    return kernels.forward_kernel, kernels.backward_kernel, kernels.mask_kernel


def forward(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float, *, block_m: int | None = None,
            block_k: int | None = None, warps: int | None = None, stages: int | None = None) -> torch.Tensor:
    """drop(x) @ a.T: (tokens, in) x (r, in) -> (tokens, r) in x's dtype, float32 accumulation.

    Raises:
        ValueError: `in` not a multiple of 8, or x and a not of one dtype.
    """
    _check(x, a)
    forward_kernel, _, _ = _kernels()
    m, k = x.shape
    r = a.shape[0]
    bm = block_m or FORWARD_BLOCK_M
    hidden = torch.empty(m, r, device=x.device, dtype=x.dtype)
    drop = drop_count(p)
    forward_kernel[(-(-m // bm),)](
        x, a.contiguous(), hidden, seed, m, k, r, drop, 65536.0 / (65536 - drop),
        R_PAD=_rank_pad(r), BM=bm, BK=block_k or FORWARD_BLOCK_K, STAGES=stages or FORWARD_STAGES, ROUNDS=PHILOX_ROUNDS,
        num_warps=warps or FORWARD_WARPS,
    )
    return hidden


def backward(grad_hidden: torch.Tensor, x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float,
             grad_x: torch.Tensor | None = None, *, need_grad_x: bool = True, block_m: int | None = None,
             block_k: int | None = None, warps: int | None = None, stages: int | None = None,
             split_m: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_hidden.T @ drop(x): (r, in) float32, and the input gradient drop'(grad_hidden @ a) added
    into grad_x in place, or a new tensor where grad_x is None; None without need_grad_x), with the
    forward's mask: grad_hidden (tokens, r) in x's dtype.

    Raises:
        ValueError: `in` not a multiple of 8, or grad_hidden, a or grad_x not of x's shapes and dtype
            (grad_x also contiguous).
    """
    _check(x, a)
    m, k = x.shape
    r = a.shape[0]
    if grad_hidden.shape != (m, r) or grad_hidden.dtype != x.dtype:
        raise ValueError(f"lowrank_dropout: grad_hidden {tuple(grad_hidden.shape)} {grad_hidden.dtype} must be {(m, r)} {x.dtype}")
    if grad_x is not None and (grad_x.shape != x.shape or grad_x.dtype != x.dtype or not grad_x.is_contiguous()):
        raise ValueError(f"lowrank_dropout: grad_x {tuple(grad_x.shape)} {grad_x.dtype} must be a contiguous {tuple(x.shape)} {x.dtype}")
    if m == 0:
        grad_x = (grad_x if grad_x is not None else torch.zeros_like(x)) if need_grad_x else None
        return torch.zeros(r, k, device=x.device, dtype=torch.float32), grad_x
    _, backward_kernel, _ = _kernels()
    bm, bk = block_m or BACKWARD_BLOCK_M, block_k or BACKWARD_BLOCK_K
    blocks = -(-m // bm)
    splits = max(1, min(split_m or BACKWARD_SPLIT_M, blocks))
    rows_per_split = -(-blocks // splits) * bm
    splits = -(-m // rows_per_split)
    partial = torch.empty(splits, r, k, device=x.device, dtype=torch.float32)
    accumulate = grad_x is not None
    if need_grad_x and grad_x is None:
        grad_x = torch.empty_like(x)
    drop = drop_count(p)
    backward_kernel[(-(-k // bk), splits)](
        grad_hidden.contiguous(), x, a.contiguous(), grad_x if need_grad_x else x, partial, seed, m, k, r,
        rows_per_split, drop, 65536.0 / (65536 - drop),
        R_PAD=_rank_pad(r), BM=bm, BK=bk, STAGES=stages or BACKWARD_STAGES, ROUNDS=PHILOX_ROUNDS, GRAD_X=need_grad_x,
        ACCUMULATE=accumulate, num_warps=warps or BACKWARD_WARPS,
    )
    grad_a = partial[0] if splits == 1 else partial.sum(0)
    return grad_a, grad_x if need_grad_x else None


def keep_mask(shape: tuple[int, int], seed: torch.Tensor, p: float, device: torch.device | str) -> torch.Tensor:
    """The mask the kernels draw for an input of this shape and seed, as bools (for checks)."""
    _, _, mask_kernel = _kernels()
    m, k = shape
    out = torch.empty(m, k, device=device, dtype=torch.int8)
    mask_kernel[(-(-m // 16), -(-k // 64))](out, seed, m, k, drop_count(p), BM=16, BK=64, ROUNDS=PHILOX_ROUNDS)
    return out.bool()


def _check(x: torch.Tensor, a: torch.Tensor) -> None:
    if x.dim() != 2 or not x.is_contiguous() or x.shape[1] % 8:
        raise ValueError(f"lowrank_dropout takes a contiguous (tokens, in) input with in a multiple of 8, got {tuple(x.shape)}")
    if a.dtype != x.dtype or a.shape[1] != x.shape[1]:
        raise ValueError(f"lowrank_dropout: adapter {tuple(a.shape)} {a.dtype} does not match input {tuple(x.shape)} {x.dtype}")
