"""The Triton kernels of core/lowrank_dropout.py (a module of their own: triton resolves the
helpers a kernel calls among the module's globals, and imports only where the kernels run)."""

import triton
import triton.language as tl


@triton.jit
def keep_tile(seed, rows, k0, n_groups, drop, BM: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):
    # columns k0 .. k0 + BK of `rows`: 8 columns per Philox counter, 16 bits per column
    counters = rows[:, None] * n_groups + (k0 // 8 + tl.arange(0, BK // 8))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters, ROUNDS)
    w01 = tl.join(tl.join((r0 & 0xFFFF).to(tl.int32), (r0 >> 16).to(tl.int32)), tl.join((r1 & 0xFFFF).to(tl.int32), (r1 >> 16).to(tl.int32)))
    w23 = tl.join(tl.join((r2 & 0xFFFF).to(tl.int32), (r2 >> 16).to(tl.int32)), tl.join((r3 & 0xFFFF).to(tl.int32), (r3 >> 16).to(tl.int32)))
    return tl.reshape(tl.join(w01, w23), (BM, BK)) >= drop

@triton.jit
def forward_kernel(x_ptr, a_ptr, h_ptr, seed_ptr, M, K, R, drop, scale,
                   R_PAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, ROUNDS: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, R_PAD)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        x = tl.where(keep_tile(seed, rows, k0, K // 8, drop, BM, BK, ROUNDS), x, 0.0)
        a = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)
        acc += tl.dot(x, a)
    tl.store(h_ptr + rows[:, None] * R + ranks[None, :], (acc * scale).to(h_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (ranks[None, :] < R))

@triton.jit
def backward_kernel(g_ptr, x_ptr, a_ptr, gx_ptr, part_ptr, seed_ptr, M, K, R, rows_per_split, drop, scale,
                    R_PAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, ROUNDS: tl.constexpr,
                    GRAD_X: tl.constexpr, ACCUMULATE: tl.constexpr):
    k0 = tl.program_id(0) * BK
    split = tl.program_id(1)
    cols = k0 + tl.arange(0, BK)
    ranks = tl.arange(0, R_PAD)
    seed = tl.load(seed_ptr)
    if GRAD_X:
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0)
    acc = tl.zeros((R_PAD, BK), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in tl.range(start, start + rows_per_split, BM, num_stages=STAGES):
        rows = m0 + tl.arange(0, BM)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0)
        keep = keep_tile(seed, rows, k0, K // 8, drop, BM, BK, ROUNDS)
        acc += tl.dot(tl.trans(g), tl.where(keep, x, 0.0))
        if GRAD_X:
            update = tl.where(keep, tl.dot(g, a) * scale, 0.0)
            gx_ptrs = gx_ptr + rows[:, None] * K + cols[None, :]
            if ACCUMULATE:
                update += tl.load(gx_ptrs, mask=inside, other=0.0).to(tl.float32)
            tl.store(gx_ptrs, update.to(gx_ptr.dtype.element_ty), mask=inside)
    tl.store(part_ptr + split * R * K + ranks[:, None] * K + cols[None, :], acc * scale, mask=(ranks[:, None] < R) & (cols[None, :] < K))

@triton.jit
def mask_kernel(out_ptr, seed_ptr, M, K, drop, BM: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    cols = k0 + tl.arange(0, BK)
    keep = keep_tile(tl.load(seed_ptr), rows, k0, K // 8, drop, BM, BK, ROUNDS)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=(rows[:, None] < M) & (cols[None, :] < K))
