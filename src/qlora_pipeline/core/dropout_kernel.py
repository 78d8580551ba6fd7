"""LoRA dropout fused into the adapter's rank-r matmuls (Triton), its mask never stored.

    hidden = dropout_lowrank(x, a, seed, p)              # drop(x) @ a.T, x: (tokens, in), a: (r, in)
    grad_a = dropout_lowrank_grad_a(grad_hidden, x, seed, p)
    dropout_lowrank_grad_x_(grad_x, grad_hidden, a, seed, p)   # grad_x += drop'(grad_hidden @ a)

The keep mask of element (i, k) is Philox(seed, i * in + k) >= p, computed again wherever it is
needed. peft's LoRA instead keeps each adapter's dropped-out copy of its input and a byte mask for
the backward (3 bytes per input element per adapter; q, k and v each keep their own) and runs a
separate dropout kernel; here each adapter keeps a reference to its input, which q/k/v (and
gate/up) share, and the dropout costs no extra pass over memory. Same distribution as
torch.nn.Dropout (keep with probability 1 - p, kept values scaled by 1 / (1 - p)); not the same
random stream.

Needs triton and a CUDA tensor; `available()` says whether it can run here.
"""

from __future__ import annotations

import functools
import os

import torch

BLOCK_M = 64
BLOCK_K = 128
SPLIT_M = 8  # row blocks of the grad_a reduction, summed afterwards (deterministic, no atomics)
MAX_ELEMENTS = 2**31 - 1  # Philox offsets are 32-bit element indices


def interpreted() -> bool:
    """TRITON_INTERPRET=1: triton runs the kernels on CPU tensors (slowly), for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def available() -> bool:
    """triton imports, and a CUDA device is present (or triton interprets on the CPU)."""
    if not (torch.cuda.is_available() or interpreted()):
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def supported(x: torch.Tensor, rank: int) -> bool:
    """Whether the kernels take this input: CUDA (any device when interpreted), 16-bit, at most 2^31
    elements, rank <= 128."""
    return (
        (x.is_cuda or interpreted())
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.numel() <= MAX_ELEMENTS
        and rank <= 128
        and available()
    )


def new_seed() -> int:
    """A seed from torch's CPU generator: checkpoint recompute restores that generator, so the
    recomputed forward draws the same seed (and mask) as the first; no GPU sync."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _rank_pad(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(X, A, H, seed, p, scale, M, K, R, sxm, sxk, sar, sak, shm, shr,
                       R_PAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R_PAD)
        acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
        for k0 in tl.range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            inside = (rm[:, None] < M) & (rk[None, :] < K)
            x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=inside, other=0.0)
            keep = tl.rand(seed, rm[:, None] * K + rk[None, :]) >= p
            x = tl.where(keep, x * scale, 0.0).to(X.dtype.element_ty)
            a = tl.load(A + rr[None, :] * sar + rk[:, None] * sak, mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)
            acc += tl.dot(x, a)
        tl.store(H + rm[:, None] * shm + rr[None, :] * shr, acc.to(H.dtype.element_ty), mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def grad_a_kernel(G, X, OUT, seed, p, scale, M, K, R, rows_per_split, sgm, sgr, sxm, sxk, so_s, so_r, so_k,
                      R_PAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        rk = tl.program_id(0) * BK + tl.arange(0, BK)
        split = tl.program_id(1)
        rr = tl.arange(0, R_PAD)
        acc = tl.zeros((R_PAD, BK), dtype=tl.float32)
        start = split * rows_per_split
        for m0 in tl.range(start, start + rows_per_split, BM):
            rm = m0 + tl.arange(0, BM)
            rows = rm < M
            g = tl.load(G + rm[:, None] * sgm + rr[None, :] * sgr, mask=rows[:, None] & (rr[None, :] < R), other=0.0)
            x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=rows[:, None] & (rk[None, :] < K), other=0.0)
            keep = tl.rand(seed, rm[:, None] * K + rk[None, :]) >= p
            x = tl.where(keep, x * scale, 0.0).to(X.dtype.element_ty)
            acc += tl.dot(tl.trans(g), x)
        tl.store(OUT + split * so_s + rr[:, None] * so_r + rk[None, :] * so_k, acc, mask=(rr[:, None] < R) & (rk[None, :] < K))

    @triton.jit
    def grad_x_kernel(GX, G, A, seed, p, scale, M, K, R, sxm, sxk, sgm, sgr, sar, sak,
                      R_PAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, ACCUMULATE: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        rr = tl.arange(0, R_PAD)
        g = tl.load(G + rm[:, None] * sgm + rr[None, :] * sgr, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        a = tl.load(A + rr[:, None] * sar + rk[None, :] * sak, mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
        update = tl.dot(g, a)
        keep = tl.rand(seed, rm[:, None] * K + rk[None, :]) >= p
        update = tl.where(keep, update * scale, 0.0)
        inside = (rm[:, None] < M) & (rk[None, :] < K)
        ptrs = GX + rm[:, None] * sxm + rk[None, :] * sxk
        if ACCUMULATE:
            update += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
        tl.store(ptrs, update.to(GX.dtype.element_ty), mask=inside)

    return forward_kernel, grad_a_kernel, grad_x_kernel


def dropout_lowrank(x: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """drop(x) @ a.T with the mask from (seed, element index); x: (M, K), a: (R, K) -> (M, R)."""
    forward_kernel, _, _ = _kernels()
    m, k = x.shape
    r = a.shape[0]
    hidden = torch.empty(m, r, device=x.device, dtype=x.dtype)
    grid = ((m + BLOCK_M - 1) // BLOCK_M,)
    forward_kernel[grid](
        x, a, hidden, seed, p, 1.0 / (1.0 - p), m, k, r, x.stride(0), x.stride(1), a.stride(0), a.stride(1),
        hidden.stride(0), hidden.stride(1), R_PAD=_rank_pad(r), BM=BLOCK_M, BK=BLOCK_K,
    )
    return hidden


def dropout_lowrank_grad_a(grad_hidden: torch.Tensor, x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """grad_hidden.T @ drop(x), the same mask as the forward: (R, K), float32."""
    _, grad_a_kernel, _ = _kernels()
    m, k = x.shape
    r = grad_hidden.shape[1]
    blocks = (m + BLOCK_M - 1) // BLOCK_M
    splits = max(1, min(SPLIT_M, blocks))
    rows_per_split = ((blocks + splits - 1) // splits) * BLOCK_M
    partial = torch.empty(splits, r, k, device=x.device, dtype=torch.float32)
    grid = ((k + BLOCK_K - 1) // BLOCK_K, splits)
    grad_a_kernel[grid](
        grad_hidden, x, partial, seed, p, 1.0 / (1.0 - p), m, k, r, rows_per_split,
        grad_hidden.stride(0), grad_hidden.stride(1), x.stride(0), x.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2), R_PAD=_rank_pad(r), BM=BLOCK_M, BK=BLOCK_K,
    )
    return partial.sum(0)


def dropout_lowrank_grad_x_(grad_x: torch.Tensor, grad_hidden: torch.Tensor, a: torch.Tensor, seed: int, p: float, *, accumulate: bool = True) -> torch.Tensor:
    """grad_x += drop'(grad_hidden @ a) in place (the dropout's backward: the forward's mask and
    scale); accumulate=False: grad_x = drop'(grad_hidden @ a)."""
    _, _, grad_x_kernel = _kernels()
    m, k = grad_x.shape
    r = a.shape[0]
    grid = ((m + BLOCK_M - 1) // BLOCK_M, (k + BLOCK_K - 1) // BLOCK_K)
    grad_x_kernel[grid](
        grad_x, grad_hidden, a, seed, p, 1.0 / (1.0 - p), m, k, r, grad_x.stride(0), grad_x.stride(1),
        grad_hidden.stride(0), grad_hidden.stride(1), a.stride(0), a.stride(1), R_PAD=_rank_pad(r), BM=BLOCK_M, BK=BLOCK_K,
        ACCUMULATE=accumulate,
    )
    return grad_x


def keep_mask(shape: tuple[int, int], seed: int, p: float, device: torch.device | str) -> torch.Tensor:
    """The keep mask the kernels use, materialised (for tests): dropout_lowrank(eye, ...) row by row
    would do, but one forward against an identity adapter is simpler."""
    m, k = shape
    ones = torch.ones(m, k, device=device, dtype=torch.bfloat16)
    mask = torch.empty(m, k, device=device, dtype=torch.bool)
    eye = torch.eye(16, device=device, dtype=torch.bfloat16)
    for k0 in range(0, k, 16):
        block = torch.zeros(16, k, device=device, dtype=torch.bfloat16)
        width = min(16, k - k0)
        block[:width, k0 : k0 + width] = eye[:width, :width]
        mask[:, k0 : k0 + width] = dropout_lowrank(ones, block, seed, p)[:, :width] != 0
    return mask
