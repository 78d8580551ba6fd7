"""Launch settings of the bit-mask LoRA dropout kernels (core/bitmask_dropout.py) on the GPU.

The forward kernel reads the input and writes the dropped-out copy and the bits; in the profile of
the graphed 8B step it takes 39.7 ms in 420 calls, about half the memory bandwidth's rate
(benchmarks/README.md). This times the forward and backward kernels for each BLOCK x warps on the
8B shape's LoRA inputs (8192 x 4096 and 8192 x 14336, bf16), checks each setting's output (keep
fraction, values, the backward against the unpacked mask; warps alone must give the very same
mask), then runs the 8B fast recipe with the default and the fastest setting, alternated twice.

    PYTHONPATH=$PWD/src python benchmarks/gpu_dropout_tune.py --out $OUT/dropout_tune.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def time_ms(fn, reps: int = 50) -> float:
    import torch

    for _ in range(3):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(stop) / reps, 4)


def sweep(blocks: list[int], warps: list[int]) -> list[dict]:
    import torch

    from qlora_pipeline.core import bitmask_dropout as pd

    p = 0.05
    rows = []
    inputs = {name: torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for name, shape in (("8192x4096", (8192, 4096)), ("8192x14336", (8192, 14336)))}
    seed = torch.tensor([12345], device="cuda", dtype=torch.int32)
    reference: dict = {}
    for block in blocks:
        for w in warps:
            pd.BLOCK, pd.FORWARD_WARPS, pd.BACKWARD_WARPS = block, w, w
            row: dict = {"block": block, "warps": w}
            for name, x in inputs.items():
                y, bits = pd.dropout_forward(x, p, seed)
                mask = pd.unpack_bits(bits, x.numel()).view_as(x)
                g, acc = torch.randn_like(x), torch.randn_like(x)
                back = pd.dropout_backward(g, bits, p, out=acc.clone())
                expected = torch.where(mask, x.float() * (1.0 / (1 - p)), 0.0)
                ok = bool(torch.equal(y != 0, mask & (x != 0))) and bool(torch.allclose(y.float(), expected, rtol=1e-2, atol=1e-3)) and bool(
                    torch.allclose(back.float(), acc.float() + g.float() * mask / (1 - p), atol=0.02, rtol=0.01)
                )
                if (block, name) in reference:  # warps alone: the very same mask
                    ok = ok and bool(torch.equal(bits, reference[(block, name)]))
                reference.setdefault((block, name), bits)
                row[name] = {
                    "forward_ms": time_ms(lambda x=x: pd.dropout_forward(x, p, seed)),
                    "backward_add_ms": time_ms(lambda g=g, bits=bits, acc=acc: pd.dropout_backward(g, bits, p, out=acc)),
                    "keep_fraction": round(float(mask.float().mean()), 5),
                    "correct": ok,
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--blocks", default="2048,4096,8192")
    parser.add_argument("--warps", default="2,4,8,16")
    parser.add_argument("--bench-rounds", type=int, default=2, help="8B fast recipe runs per setting (0: none)")
    parser.add_argument("--budget-gib", type=float, default=14.2)
    args = parser.parse_args()
    rows = sweep([int(b) for b in args.blocks.split(",")], [int(w) for w in args.warps.split(",")])
    summary: dict = {"command": "python benchmarks/gpu_dropout_tune.py " + " ".join(sys.argv[1:]), "sweep": rows}

    def cost(r: dict) -> float:  # the 8B step's mix: per layer 6 calls on hidden-size inputs, 1 on ffn-size
        return sum(6 * r["8192x4096"][k] + r["8192x14336"][k] for k in ("forward_ms", "backward_add_ms"))

    valid = [r for r in rows if r["8192x4096"]["correct"] and r["8192x14336"]["correct"]]
    default = next(r for r in rows if r["block"] == 2048 and r["warps"] == 4)
    best = min(valid, key=cost)
    summary["default"], summary["best"] = default, best
    summary["per_layer_pass_ms"] = {"default": round(cost(default), 3), "best": round(cost(best), 3)}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    runs = []
    for round_ in range(args.bench_rounds):
        settings = [("default", "2048,4,4"), ("best", f"{best['block']},{best['warps']},{best['warps']}")]
        for label, launch in settings[: 1 if best is default else 2]:  # the default is the best: nothing to compare
            out = args.out.with_name(f"{args.out.stem}_bench_{label}_{round_}.json")
            subprocess.run([
                sys.executable, str(HERE / "gpu_train_bench.py"), "--shapes", "8b", "--workloads", "fixed", "--recipes", "fast",
                "--extra", "", "--check-shape", "", "--fast-budget-gib", str(args.budget_gib), "--timeout-s", "100",
                "--bitmask-launch", launch, "--out", str(out),
            ], check=False)
            if out.is_file():
                r = json.loads(out.read_text())["results"][0]
                runs.append({"setting": label, "launch": launch, "round": round_, **{k: r.get(k) for k in ("tokens_per_s", "peak_gib", "error")}})
                print(json.dumps(runs[-1]), flush=True)
    summary["bench_8b"] = runs
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
