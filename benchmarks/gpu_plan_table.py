"""The plan for every card: our fast path with train.memory_budget_gib set to a card's memory,
against plain transformers+peft's fastest configuration that fits the same memory.

    PYTHONPATH=$PWD/src python benchmarks/gpu_plan_table.py --out $OUT/gpu_plan_table.json
    PYTHONPATH=src python benchmarks/gpu_plan_table.py --device cpu --tiny --out /tmp/plan.json   # CPU smoke

8B shape, fixed workload (4 x 2048-token rows per optimizer step), each run its own process
(gpu_train_bench.run_one). Budgets: 16, 24, 40, 80 GiB and auto (90% of the GPU). For each, the fast
path plans micro-batch and recompute itself. Plain is measured once per configuration: micro-batch 1,
2 and 4 (accumulation 4, 2, 1), with every layer recomputed (`plain`) and without (`plain_nockpt`);
at each budget its row is the fastest of those whose measured peak fits ("does not fit" when none).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train_bench import BATCH, LORA, SEED, SEQ_LEN, environment, spawn  # noqa: E402

BUDGETS = ("16", "24", "40", "80", "auto")


def fastest_fitting(runs: list[dict], budget_gib: float) -> dict | None:
    fits = [r for r in runs if "error" not in r and r.get("peak_gib", float("inf")) <= budget_gib]
    return max(fits, key=lambda r: r["tokens_per_s"], default=None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--budgets", default=",".join(BUDGETS))
    p.add_argument("--plain-micro", default="1,2,4")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--timeout-s", type=float, default=240)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--earlier", type=Path, nargs="*", default=[], help="summaries of earlier calls whose runs count too")
    args = p.parse_args()
    shape = "tiny" if args.tiny else "8b"
    base = dict(device=args.device, shape=shape, seq_len=SEQ_LEN[shape], batch=BATCH[shape], workload="fixed",
                warmup=args.warmup, steps=args.steps, lr=2e-4, seed=SEED, lora_dropout=LORA["dropout"])
    summary: dict = {"command": "python benchmarks/gpu_plan_table.py " + " ".join(sys.argv[1:]), "fast": [], "plain": []}

    commands, measured_on = [], {}
    for earlier in args.earlier:  # runs split over several calls (a call's time limit)
        prior = json.loads(earlier.read_text())
        summary["fast"] += prior.get("fast", [])
        summary["plain"] += prior.get("plain", [])
        commands.append(prior["command"])
        measured_on = measured_on or {k: v for k, v in prior.items() if k not in ("command", "fast", "plain", "table")}
    summary["command"] = " ; ".join([*commands, summary["command"]])

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")

    for budget in filter(None, args.budgets.split(",")):
        r = spawn(dict(base, recipe="fast", budget_gib=None if budget == "auto" else float(budget)), args.timeout_s)
        r["budget"] = budget
        summary["fast"].append(r)
        print(f"[fast {budget}] {r.get('error') or (r['tokens_per_s'], r.get('peak_gib'), r.get('fast_path'))}", flush=True)
        save()
    for recipe in ("plain", "plain_nockpt"):
        for micro in (int(m) for m in filter(None, args.plain_micro.split(","))):
            r = spawn(dict(base, recipe=recipe, micro=micro), args.timeout_s)
            summary["plain"].append(r)
            print(f"[{recipe} {micro}] {r.get('error') or (r['tokens_per_s'], r.get('peak_gib'))}", flush=True)
            save()
    latest = {r["budget"]: r for r in summary["fast"]}  # a later call's run at a budget replaces an earlier one
    rows = []
    for fast in latest.values():
        budget_gib = fast.get("plan", {}).get("budget_gib") or (None if fast["budget"] == "auto" else float(fast["budget"]))
        plain = fastest_fitting(summary["plain"], budget_gib) if budget_gib else None
        rows.append({
            "budget": fast["budget"], "budget_gib": budget_gib,
            "fast_tokens_per_s": fast.get("tokens_per_s"), "fast_peak_gib": fast.get("peak_gib"), "fast_plan": fast.get("fast_path"),
            "plain": f"{plain['recipe']} {plain['micro_batch']} x {plain['accumulation']}" if plain else "does not fit",
            "plain_tokens_per_s": plain["tokens_per_s"] if plain else None, "plain_peak_gib": plain.get("peak_gib") if plain else None,
            "fast_over_plain": round(fast["tokens_per_s"] / plain["tokens_per_s"], 2) if plain and "tokens_per_s" in fast else None,
        })
    summary["table"] = rows
    summary.update(measured_on or environment(args.device))  # the GPU machine's versions, not the combining one's
    save()
    print("| budget | fast tokens/s | fast peak GiB | fast plan | plain's best that fits | plain tokens/s | plain peak GiB | fast / plain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['fast_tokens_per_s']} | {r['fast_peak_gib']} | {r['fast_plan']} | {r['plain']} | {r['plain_tokens_per_s']} | {r['plain_peak_gib']} | {r['fast_over_plain']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
