"""Correctness of the CUDA-graph decoder stack (core/fast/graphs.py) on a GPU, with LoRA dropout on.

The graphed backward recomputes checkpointed layers inside a captured graph, where torch's
checkpoint cannot restore the generator; the LoRA dropout masks come from seed tensors instead.
This checks that the captured step computes the gradient of the loss it reported: one micro-batch
replayed from the graphs (every layer recomputed, selectively where the plan says: with its 120 GiB
budget, all of them), then the same micro-batch run eagerly with the same seeds, recomputed as in
the graphs, wholly, and not at all. Also a control with other seeds (the gradients must then differ,
or the check could not see a wrong mask).

    PYTHONPATH=src python benchmarks/gpu_graphs_check.py --shape 1b --out results/gpu_graphs_check_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1b")
    p.add_argument("--rows", type=int, default=2, help="2048-token rows per micro-batch")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    import torch

    from gpu_train_bench import SEQ_LEN, SHAPES, build_model, lora_settings, make_samples
    from qlora_pipeline.config import TrainConfig
    from qlora_pipeline.core.data.collate import PackingCollator
    from qlora_pipeline.core.fast import apply_fast_path, set_checkpointed_layers, stack_runner
    from qlora_pipeline.core.model import apply_lora

    torch.manual_seed(0)
    seq = SEQ_LEN[args.shape]
    model = build_model(args.shape, "cuda", torch.bfloat16, seed=0)
    model = apply_lora(model, lora_settings(args.dropout))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which leaves A's gradient zero and dropout without effect on the loss
            torch.nn.init.normal_(param, std=0.02)
    cfg = TrainConfig(
        per_device_batch_size=args.rows, gradient_accumulation_steps=1, gradient_checkpointing=True, use_liger="auto",
        fused_lora=True, padding_free=True, tune_micro_batch=False, memory_budget_gib=120, cuda_graphs=True,
    )
    model, cfg, report = apply_fast_path(model, cfg, max_seq_len=seq)
    runner = stack_runner(model)
    collator = PackingCollator(seq, attention_boundaries=True)
    samples = make_samples([seq] * args.rows, SHAPES[args.shape]["vocab_size"], 1)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collator([{"input_ids": s} for s in samples]).items()}
    params = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    model.train()

    def step() -> tuple[float, dict[str, torch.Tensor]]:
        for _, q in params:
            q.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.cuda.synchronize()
        return float(loss), {n: q.grad.detach().float().clone() for n, q in params if q.grad is not None}

    def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
        rel = [float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)) for n in b]
        total = float(torch.sqrt(sum((a[n] - b[n]).square().sum() for n in b)) / torch.sqrt(sum(b[n].square().sum() for n in b)))
        return {"max_param_relative_diff": round(max(rel), 5), "total_relative_diff": round(total, 6), "params": len(rel)}

    t = time.perf_counter()
    step()  # eager: builds kernels and plans
    step()  # captured, then replayed
    captured_s = time.perf_counter() - t
    loss_graph, grads_graph = step()  # replayed
    seeds = runner.last_seeds.clone()
    replays = runner.replays

    eager_run = runner.run_layers

    def run_with(fixed: torch.Tensor):
        def run_layers(hidden, kwargs, seeds=None):
            return eager_run(hidden, kwargs, seeds=fixed)
        return run_layers

    runner.capture = False
    runner.run_layers = run_with(seeds)
    loss_eager, grads_eager = step()
    _, grads_eager_again = step()  # the noise floor: the same eager step twice
    set_checkpointed_layers(model, report.plan.num_layers, 0)  # whole recompute (the plan's layers keep gate/up outputs)
    loss_whole, grads_whole = step()
    set_checkpointed_layers(model, 0)
    loss_kept, grads_kept = step()
    set_checkpointed_layers(model, report.plan.num_layers)
    runner.run_layers = run_with(torch.randint_like(seeds, 0, 2**31 - 1))
    loss_other, grads_other = step()

    result = {
        "command": "python benchmarks/gpu_graphs_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": args.shape,
        "tokens": args.rows * seq,
        "lora_dropout": args.dropout,
        "fast_path": report.describe(),
        "recomputed_layers": report.plan.checkpoint_layers,
        "selective_layers": report.plan.kept_output_layers,
        "replays": replays,
        "disabled": runner.disabled_reason,
        "first_two_steps_s": round(captured_s, 2),
        "losses": {"graph": loss_graph, "eager_same_seeds": loss_eager, "eager_same_seeds_no_recompute": loss_kept, "eager_same_seeds_whole_recompute": loss_whole, "eager_other_seeds": loss_other},
        "eager_vs_eager_same_seeds": compare(grads_eager_again, grads_eager),
        "graph_vs_eager_same_seeds": compare(grads_graph, grads_eager),
        "graph_vs_eager_no_recompute": compare(grads_graph, grads_kept),
        "graph_vs_eager_whole_recompute": compare(grads_graph, grads_whole),
        "control_other_seeds_vs_eager": compare(grads_other, grads_eager),
    }
    ok = (
        replays >= 2
        and result["graph_vs_eager_same_seeds"]["total_relative_diff"] < 0.02
        and result["graph_vs_eager_no_recompute"]["total_relative_diff"] < 0.02
        and result["graph_vs_eager_whole_recompute"]["total_relative_diff"] < 0.02
        and result["control_other_seeds_vs_eager"]["total_relative_diff"] > 0.05
    )
    result["passed"] = ok
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
