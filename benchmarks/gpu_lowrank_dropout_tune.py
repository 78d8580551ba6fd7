"""The LoRA dropout fused into the adapter's matmuls (core/lowrank_dropout.py) against the bit-mask
dropout and torch's, on the GPU, for the 8B shape's LoRA inputs (8192 tokens x 4096 and x 14336,
rank 16, bf16), with a sweep of the fused kernels' launch settings.

Per input: the forward (dropout and the rank-r matmul drop(x) @ A^T) and the backward (grad_A and
the input gradient added into an existing one). Each is timed as CUDA-graph replays (the host left
out, as in the graphed training step). Every fused setting is checked against torch with the mask
the kernels draw (`keep_mask`). The layer mix is an 8B decoder layer's seven adapters: six on 4096
inputs (q, k, v, o, gate, up) and one on 14336 (down).

    PYTHONPATH=$PWD/src python benchmarks/gpu_lowrank_dropout_tune.py --out $OUT/lowrank_tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

P = 0.05
RANK = 16
SHAPES = {"8192x4096": (8192, 4096), "8192x14336": (8192, 14336)}
LAYER_MIX = {"8192x4096": 6, "8192x14336": 1}


def graph_ms(fn, reps: int = 20, rounds: int = 5) -> float:
    """GPU time of one call, from CUDA-graph replays of `reps` calls."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(stop) / (rounds * reps), 4)


def baselines(x, a, gh, gx, seed) -> dict:
    import torch

    from qlora_pipeline.core import bitmask_dropout as bd

    dropped, bits = bd.dropout_forward(x, P, seed)
    tdropped, tmask = torch.native_dropout(x, P, True)
    return {
        "bits_forward": graph_ms(lambda: torch.mm(bd.dropout_forward(x, P, seed)[0], a.t())),
        "bits_backward": graph_ms(lambda: (torch.mm(gh.t(), dropped), bd.dropout_backward(torch.mm(gh, a), bits, P, out=gx))),
        "torch_forward": graph_ms(lambda: torch.mm(torch.native_dropout(x, P, True)[0], a.t())),
        "torch_backward": graph_ms(
            lambda: (torch.mm(gh.t(), tdropped), gx.add_(torch.ops.aten.native_dropout_backward(torch.mm(gh, a), tmask, 1.0 / (1 - P))))
        ),
    }


def check(x, a, gh, seed, forward_kw: dict, backward_kw: dict) -> dict:
    """The fused kernels against torch with their own mask: relative errors."""
    import torch

    from qlora_pipeline.core import lowrank_dropout as ld

    keep = ld.keep_mask(tuple(x.shape), seed, P, x.device)
    scale = 65536 / (65536 - ld.drop_count(P))
    dropped = torch.where(keep, x.float() * scale, 0.0)
    base = torch.randn_like(x)
    hidden = ld.forward(x, a, seed, P, **forward_kw)
    grad_a, grad_x = ld.backward(gh, x, a, seed, P, base.clone(), **backward_kw)

    def rel(got, want):
        return float((got.float() - want).norm() / want.norm())

    return {
        "keep_fraction": round(float(keep.float().mean()), 5),
        "forward": rel(hidden, dropped @ a.float().t()),
        "grad_a": rel(grad_a, gh.float().t() @ dropped),
        "grad_x": rel(grad_x, base.float() + torch.where(keep, (gh.float() @ a.float()) * scale, 0.0)),
    }


def main() -> None:
    import torch

    from qlora_pipeline.core import lowrank_dropout as ld

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a few settings only")
    parser.add_argument("--rounds-only", action="store_true", help="only time the default settings at 10 and 7 Philox rounds")
    parser.add_argument("--rounds", type=int, default=10, help="Philox rounds for the sweep")
    parser.add_argument("--wide", action="store_true", help="a wider sweep (smaller row blocks, more warps, stages and row splits)")
    args = parser.parse_args()
    torch.manual_seed(0)
    seed = torch.tensor([12345], device="cuda", dtype=torch.int32)
    inputs = {}
    for name, (m, k) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a = (torch.randn(RANK, k, device="cuda") / k**0.5).to(torch.bfloat16)
        gh = (torch.randn(m, RANK, device="cuda") * 0.1).to(torch.bfloat16)
        gx = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        inputs[name] = (x, a, gh, gx)
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "p": P, "rank": RANK}
    import triton

    result["triton"] = triton.__version__
    result["baselines"] = {name: baselines(x, a, gh, gx, seed) for name, (x, a, gh, gx) in inputs.items()}
    result["default_check"] = {name: check(x, a, gh, seed, {}, {}) for name, (x, a, gh, _) in inputs.items()}
    rounds_rows = []
    for rounds in (10, 7):
        ld.PHILOX_ROUNDS = rounds
        row: dict = {"rounds": rounds}
        for name, (x, a, gh, gx) in inputs.items():
            row[name] = {"forward": graph_ms(lambda: ld.forward(x, a, seed, P)), "backward": graph_ms(lambda: ld.backward(gh, x, a, seed, P, gx))}
        row["check"] = {name: check(x, a, gh, seed, {}, {}) for name, (x, a, gh, _) in inputs.items()}
        row["layer_ms"] = {d: round(sum(LAYER_MIX[n] * row[n][d] for n in SHAPES), 4) for d in ("forward", "backward")}
        rounds_rows.append(row)
    ld.PHILOX_ROUNDS = 10
    result["philox_rounds"] = rounds_rows
    if args.rounds_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return

    ld.PHILOX_ROUNDS = args.rounds
    result["sweep_rounds"] = args.rounds
    forward_grid = [dict(block_m=bm, block_k=bk, warps=w, stages=s) for bm, bk, w, s in itertools.product(
        (16, 32, 64), (64, 128, 256), (4, 8), (2, 3, 4))]
    backward_grid = [dict(block_m=bm, block_k=bk, warps=w, stages=s, split_m=sp) for bm, bk, w, s, sp in itertools.product(
        (32, 64, 128), (64, 128), (4, 8), (1, 2, 3), (4, 8, 16))]
    if args.wide:
        forward_grid = [dict(block_m=bm, block_k=bk, warps=w, stages=s) for bm, bk, w, s in itertools.product(
            (16, 32, 64), (64, 128, 256), (2, 4, 8), (3, 4, 5))]
        backward_grid = [dict(block_m=bm, block_k=bk, warps=w, stages=s, split_m=sp) for bm, bk, w, s, sp in itertools.product(
            (16, 32, 64), (64, 128, 256), (2, 4), (2, 3, 4), (8, 16))]
    if args.quick:
        forward_grid, backward_grid = forward_grid[:4], backward_grid[:4]
    t0 = time.time()
    forward_rows, backward_rows = [], []
    for kw in forward_grid:
        row = dict(kw)
        try:
            for name, (x, a, _, _) in inputs.items():
                row[name] = graph_ms(lambda: ld.forward(x, a, seed, P, **kw))
            row["layer_ms"] = round(sum(LAYER_MIX[n] * row[n] for n in SHAPES), 4)
        except Exception as error:  # a setting triton cannot build (registers, shared memory)
            row["error"] = f"{type(error).__name__}: {str(error)[:120]}"
        forward_rows.append(row)
    for kw in backward_grid:
        row = dict(kw)
        try:
            for name, (x, a, gh, gx) in inputs.items():
                row[name] = graph_ms(lambda: ld.backward(gh, x, a, seed, P, gx, **kw))
            row["layer_ms"] = round(sum(LAYER_MIX[n] * row[n] for n in SHAPES), 4)
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error)[:120]}"
        backward_rows.append(row)
    result["sweep_s"] = round(time.time() - t0, 1)
    ok_f = sorted((r for r in forward_rows if "layer_ms" in r), key=lambda r: r["layer_ms"])
    ok_b = sorted((r for r in backward_rows if "layer_ms" in r), key=lambda r: r["layer_ms"])
    result["forward_best"], result["backward_best"] = ok_f[:5], ok_b[:5]
    best_f = {k: ok_f[0][k] for k in ("block_m", "block_k", "warps", "stages")}
    best_b = {k: ok_b[0][k] for k in ("block_m", "block_k", "warps", "stages", "split_m")}
    result["best_check"] = {name: check(x, a, gh, seed, best_f, best_b) for name, (x, a, gh, _) in inputs.items()}
    layer = {
        kind: round(sum(LAYER_MIX[n] * result["baselines"][n][kind] for n in SHAPES), 4)
        for kind in ("bits_forward", "bits_backward", "torch_forward", "torch_backward")
    }
    layer["fused_forward"], layer["fused_backward"] = ok_f[0]["layer_ms"], ok_b[0]["layer_ms"]
    result["layer_ms"] = layer
    # 8B graphed step at 28/32 recomputed: 60 forward layer passes, 32 backward
    result["step_saving_ms_vs_bits"] = round(60 * (layer["bits_forward"] - layer["fused_forward"]) + 32 * (layer["bits_backward"] - layer["fused_backward"]), 1)
    result["forward_sweep"], result["backward_sweep"] = forward_rows, backward_rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_sweep")}, indent=1))


if __name__ == "__main__":
    main()
