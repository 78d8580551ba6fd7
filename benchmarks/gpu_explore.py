"""Exploratory sweep on one model (GPU): what the fast path's choices cost, in one process.

    PYTHONPATH=$PWD/src python benchmarks/gpu_explore.py --shape 8b --out $OUT/explore.json

Builds the shape once, attaches LoRA and the fast path (liger, fused LoRA, varlen attention),
then times a few optimizer steps for each (micro-batch, recomputed layers, fused LoRA, LoRA
dropout) setting, records peak memory next to the memory plan's estimate, times the attention
kernels alone, and profiles one step by kernel family. Feeds the cost model in core/fast/memory.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_train_bench as bench  # noqa: E402


def matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return round(10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12, 1)


def timeit(fn, reps: int = 10, warmup: int = 2) -> float:
    """Milliseconds per call of fn on the GPU (synchronised around the timed calls)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t) / reps * 1e3, 4)


def attention_bench(shape: str) -> dict:
    """Forward+backward time of the attention kernels alone, per layer, at batch x 2048."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from qlora_pipeline.core.fast import _varlen_call

    s = bench.SHAPES[shape]
    b, n, h, kvh, d = bench.BATCH[shape], 2048, s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    out = {}

    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, kvh, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, kvh, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def step(backend=backend):
            with sdpa_kernel([backend]):
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            o.backward(torch.ones_like(o))
        try:
            out[f"sdpa_{name}_ms"] = timeit(step)
        except Exception as exc:
            out[f"sdpa_{name}_ms"] = f"error: {str(exc)[:120]}"
    call = _varlen_call()
    out["varlen_kwargs"] = str(call[1]) if call else None
    if call:
        attn, kw = call
        for seg in (2048, 256):
            qf = torch.randn(b * n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            kf = torch.randn(b * n, kvh, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            vf = torch.randn(b * n, kvh, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            cu = torch.arange(0, b * n + 1, seg, device="cuda", dtype=torch.int32)

            def vstep():
                o = attn(qf, kf, vf, cu, cu, seg, seg, **kw)
                o.backward(torch.ones_like(o))
            try:
                out[f"varlen_seg{seg}_ms"] = timeit(vstep)
            except Exception as exc:
                out[f"varlen_seg{seg}_ms"] = f"error: {str(exc)[:200]}"
    flops = 6.0 * n * n * h * d * b  # causal fwd + bwd model FLOPs, one layer
    out["model_tflop_per_layer"] = round(flops / 1e12, 3)
    return out


def set_dropout(model, p: float) -> None:
    import torch

    for module in model.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, torch.nn.ModuleDict):
            for name in list(drop.keys()):
                drop[name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()


def check_bitmask_dropout() -> dict:
    """The bit-mask dropout kernels against torch on the GPU: values, mask statistics, the same mask
    after restoring the generator (a recompute), the LoRA node's gradients (with and without
    checkpointing), and the kernels' time next to torch's dropout + mask + add."""
    import torch
    import torch.utils.checkpoint

    from qlora_pipeline.core import fast, bitmask_dropout as pd

    out: dict = {}
    p, dev = 0.05, "cuda"
    x = torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16)
    state = torch.cuda.get_rng_state()
    y, bits = pd.dropout_forward(x, p)
    mask = pd.unpack_bits(bits, x.numel()).view_as(x)
    out["keep_fraction"] = round(float(mask.float().mean()), 5)
    out["forward_max_abs_diff"] = float((y.float() - torch.where(mask, x.float() / (1 - p), 0.0)).abs().max())
    torch.cuda.set_rng_state(state)
    out["same_mask_after_restoring_the_generator"] = bool(torch.equal(pd.dropout_forward(x, p)[1], bits))
    out["next_mask_differs"] = not torch.equal(pd.dropout_forward(x, p)[1], bits)
    g, acc = torch.randn_like(x), torch.randn_like(x)
    ref = (g.float() * mask / (1 - p))
    out["backward_max_abs_diff"] = float((pd.dropout_backward(g, bits, p).float() - ref).abs().max())
    out["backward_accumulate_max_abs_diff"] = float((pd.dropout_backward(g, bits, p, out=acc.clone()).float() - (acc.float() + ref)).abs().max())
    small = torch.randn(8 * 1001, device=dev, dtype=torch.bfloat16)  # not a multiple of the block
    ys, bs = pd.dropout_forward(small, 0.3)
    ms = pd.unpack_bits(bs, small.numel())
    out["tail_block_ok"] = bool(torch.equal(ys, torch.where(ms, small.float() / 0.7, 0.0).to(torch.bfloat16)))

    # the LoRA node: gradients against a reference built from the same (unpacked) mask
    torch.manual_seed(0)
    w = torch.randn(1024, 4096, device=dev, dtype=torch.bfloat16) / 64
    a = (torch.randn(16, 4096, device=dev) / 64).requires_grad_()
    b = (torch.randn(1024, 16, device=dev) / 4).requires_grad_()
    member = fast.LoraMember(w, None, None, 2.0, p, True, True)
    xi = torch.randn(4, 512, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
    state = torch.cuda.get_rng_state()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yo = fast.LoraLinearFunction.apply(xi, (member,), a, b)
    grad = torch.randn_like(yo)
    gx, ga, gb = torch.autograd.grad(yo, (xi, a, b), grad)
    torch.cuda.set_rng_state(state)
    _, bits2 = pd.dropout_forward(xi.detach().reshape(-1, 4096), p)
    m2 = pd.unpack_bits(bits2, xi.numel()).view(-1, 4096)
    xr, ar, br = xi.detach().float().reshape(-1, 4096).requires_grad_(), a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    yr = xr @ w.float().t() + (xr * m2 / (1 - p)) @ ar.t() @ br.t() * 2.0
    rgx, rga, rgb = torch.autograd.grad(yr, (xr, ar, br), grad.float().reshape(-1, 1024))

    def rel(u, v):
        return round(float((u.float() - v.float()).norm() / v.float().norm()), 5)

    out["node_rel_err"] = {"y": rel(yo.reshape(-1, 1024), yr), "x": rel(gx.reshape(-1, 4096), rgx), "a": rel(ga, rga), "b": rel(gb, rgb)}

    # checkpointed: the recompute must draw the same masks
    def f(t):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fast.LoraLinearFunction.apply(t, (member,), a, b)

    torch.manual_seed(1)
    g1 = torch.autograd.grad(f(xi), (xi, a, b), grad)
    torch.manual_seed(1)
    g2 = torch.autograd.grad(torch.utils.checkpoint.checkpoint(f, xi, use_reentrant=False), (xi, a, b), grad)
    out["checkpoint_grads_equal"] = all(torch.equal(u, v) for u, v in zip(g1, g2))

    native_mask = torch.rand_like(x, dtype=torch.float32) > p
    out["ms_8192x4096"] = {
        "torch_dropout_forward": timeit(lambda: torch.native_dropout(x, p, True), reps=20),
        "bits_dropout_forward": timeit(lambda: pd.dropout_forward(x, p), reps=20),
        "torch_mask_and_add": timeit(lambda: acc.add_(torch.ops.aten.native_dropout_backward(g, native_mask, 1 / (1 - p))), reps=20),
        "bits_mask_and_add": timeit(lambda: pd.dropout_backward(g, bits, p, out=acc), reps=20),
    }
    return out


def profile_step(step_fn, gpu: bool = True) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    step_fn()
    if gpu:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU] if gpu else [ProfilerActivity.CPU]) as prof:
        step_fn()
        if gpu:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1e3
    families = {  # first match wins (flash kernels carry "cutlass" in their names: attention first)
        "attention": ("flash", "fmha", "attention", "cudnn"),
        "gemm": ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas", "gemv"),
        "dequant_4bit": ("kdequantize", "dequant"),
        "liger": ("rms_norm", "swiglu", "rope", "cross_entropy", "liger", "element_mul"),
        "dropout": ("dropout", "bernoulli", "philox"),
        "elementwise": ("elementwise", "vectorized", "unrolled", "copy", "fill", "cat"),
        "reduce": ("reduce", "norm", "sum"),
        "other triton": ("triton", "_kernel"),
    }
    sums: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        # op-level rows (aten::, bitsandbytes::, autograd Functions, the optimizer) repeat their kernels' time
        op_row = re.fullmatch(r"[\w.]+::[\w.]+", e.key) or e.key.startswith(("autograd", "Optimizer")) or e.key.endswith(("Function", "Backward"))
        if not dev_us or op_row:
            continue
        name = e.key.lower()
        fam = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
        sums[fam] = sums.get(fam, 0.0) + dev_us / 1e3
        kernels.append((dev_us / 1e3, e.count, e.key[:110]))
    kernels.sort(reverse=True)
    # which host ops launch the small kernels (adds, copies, casts): op and its callers
    launchers: dict[str, list[float]] = {}
    for e in prof.events():
        for k in getattr(e, "kernels", []) or []:
            kname = k.name.lower()
            if not any(w in kname for w in ("memcpy", "elementwise", "copy", "functor_add", "masked_scale")):
                continue
            chain, parent = [e.name], e.cpu_parent
            while parent is not None and len(chain) < 4:
                chain.append(parent.name)
                parent = parent.cpu_parent
            key = f"{k.name[:60]} <- {' < '.join(chain)}"
            row = launchers.setdefault(key, [0.0, 0])
            row[0] += k.duration / 1e3
            row[1] += 1
    top_launchers = sorted(launchers.items(), key=lambda kv: -kv[1][0])[:25]
    host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
    return {
        "top_host_ops": [{"ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count, "name": e.key[:110]} for e in host],
        "wall_ms": round(wall_ms, 1),
        "gpu_busy_ms": round(sum(sums.values()), 1),
        "by_family_ms": {k: round(v, 1) for k, v in sorted(sums.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"ms": round(ms, 2), "calls": c, "name": n} for ms, c, n in kernels[:25]],
        "small_kernel_launchers": [{"ms": round(v[0], 2), "calls": v[1], "chain": k} for k, v in top_launchers],
    }


def main() -> int:
    import torch

    from qlora_pipeline.config import TrainConfig
    from qlora_pipeline.core import fast
    from qlora_pipeline.core.data.collate import PackingCollator
    from qlora_pipeline.core.model import apply_lora

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8b")
    p.add_argument("--configs", default="4:32,4:32:n,4:29,4:29:n,4:0,4:16,2:32,2:16,2:16:u,2:16:d,2:0,1:32,1:16,1:0")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--skip-profile-2x0", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--budget-gib", type=float, default=14.2)
    p.add_argument("--out", default="")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run on the tiny shape")
    args = p.parse_args()
    out_path = Path(args.out) if args.out else None
    gpu = args.device == "cuda"
    dev = args.device
    report: dict = {"env": bench.environment(dev), "matmul_tflops": matmul_tflops() if gpu else None}

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def peak_gib():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else 0.0

    def reset_peak():
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()

    def save():
        if out_path:
            out_path.write_text(json.dumps(report, indent=1))
        print(json.dumps(report)[-400:], flush=True)

    report["attention"] = attention_bench(args.shape) if gpu and not args.skip_attention else None
    if gpu:
        from qlora_pipeline.core import bitmask_dropout

        try:
            report["bitmask_dropout"] = check_bitmask_dropout() if bitmask_dropout.available() else "unavailable"
        except Exception as exc:  # recorded, and the sweep goes on to show what else fails
            report["bitmask_dropout"] = f"error: {type(exc).__name__}: {str(exc)[:1500]}"
        print(report["bitmask_dropout"], flush=True)
    save()

    shape, seq = args.shape, bench.SEQ_LEN[args.shape]
    t = time.perf_counter()
    model = bench.build_model(shape, dev, torch.bfloat16 if gpu else torch.float32)
    model = apply_lora(model, bench.lora_settings(bench.LORA["dropout"]))
    cfg = TrainConfig(per_device_batch_size=bench.BATCH[shape], gradient_accumulation_steps=1, memory_budget_gib=args.budget_gib)
    model, cfg2, rep = fast.apply_fast_path(model, cfg, max_seq_len=seq)
    collator = PackingCollator(seq, attention_boundaries=True) if rep.padding_free else bench.collate_padded
    report["build_s"] = round(time.perf_counter() - t, 1)
    report["fast_path"] = rep.describe()
    static = fast.static_training_bytes(model) if gpu else 0.0
    report["static_gib"] = round(static / 2**30, 2)
    dims = fast.ModelDims.from_config(fast.unwrap(model).config)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    samples = bench.make_samples([seq] * 16, bench.SHAPES[shape]["vocab_size"], 0)
    rows = [{"input_ids": s} for s in samples]
    model.train()

    def train_step(batch: dict) -> None:
        batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=gpu):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(b: int, steps: int, short: bool = False) -> tuple[float, float]:
        # short: 128-token rows, so the GPU has little to do and the step time is the host's
        data = bench.batches([{"input_ids": r["input_ids"][:128]} for r in rows] if short else rows, b, collator)
        reset_peak()
        times = []
        for i in range(steps + 1):
            batch, _, _ = next(data)
            sync()
            t0 = time.perf_counter()
            train_step(batch)
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        tok_s = b * (128 if short else seq) / (sum(times) / len(times))
        return round(tok_s, 1), peak_gib()

    sweep = []
    report["sweep"] = sweep
    # micro:recomputed[:flags]; flags: u = peft's LoRA forward (not fused), n = no adapter-first tail
    # layer (recompute runs down_proj's frozen matmul again), g = no sibling groups (q/k/v and gate/up
    # each their own node), b = torch's byte dropout masks (not bits), d = LoRA dropout 0, t = 128-token rows
    # (the host's time per step: tokens/s x 128 is the GPU's share, the rest is Python)
    for config in args.configs.split(","):
        b, k, *rest = config.split(":")
        b, k, flags = int(b), int(k), (rest[0] if rest else "")
        dropout = 0.0 if "d" in flags else bench.LORA["dropout"]
        fast.unfuse_lora(model)
        if "u" not in flags:
            fast.fuse_lora(model, tail_first="n" not in flags, group_siblings="g" not in flags, bit_masks=rep.bit_masks and "b" not in flags)
        set_dropout(model, dropout)
        fast.set_checkpointed_layers(model, k)
        packed = rep.bit_masks and "b" not in flags and "u" not in flags
        est = fast.estimate_peak_bytes(dims, b * seq, k, static, liger=rep.liger, lora_dropout=dropout, bit_masks=packed) / 2**30
        row = dict(micro=b, ckpt_layers=k, flags=flags, dropout=dropout, est_gib=round(est, 2))
        try:
            tok_s, peak = run(b, args.steps, short="t" in flags)
            row.update(tokens_per_s=tok_s, peak_gib=peak)
            if "t" in flags:
                row["step_ms"] = round(1e3 * b * 128 / tok_s, 1)
        except torch.OutOfMemoryError:
            row.update(error="oom")
        opt.zero_grad(set_to_none=True)
        reset_peak()
        sweep.append(row)
        print(row, flush=True)
        save()
    fast.unfuse_lora(model)
    fast.fuse_lora(model, bit_masks=rep.bit_masks)
    set_dropout(model, bench.LORA["dropout"])

    # The plan for the target budget, run as planned, then profiled
    plan = fast.plan_memory(
        dims, seq_len=seq, batch_size=bench.BATCH[shape], accumulation=1, static_bytes=static,
        budget_gib=args.budget_gib, checkpointing="auto", tune_micro_batch=True, liger=rep.liger,
        lora_dropout=bench.LORA["dropout"], bit_masks=rep.bit_masks,
    )
    report["plan_at_budget"] = plan.describe()
    fast.set_checkpointed_layers(model, plan.checkpoint_layers)
    tok_s, peak = run(plan.micro_batch_size, args.steps)
    report["plan_run"] = dict(tokens_per_s=tok_s, peak_gib=peak)
    save()

    data = bench.batches(rows, plan.micro_batch_size, collator)

    def one_step():
        train_step(next(data)[0])

    report["profile_plan"] = profile_step(one_step, gpu)
    save()
    if args.skip_profile_2x0:
        return 0
    fast.set_checkpointed_layers(model, 0)
    data = bench.batches(rows, 2, collator)
    report["profile_2x0"] = profile_step(one_step, gpu)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
