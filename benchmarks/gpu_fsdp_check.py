"""Several GPUs, checked with the pipeline's own core: DDP and FSDP2 against one GPU, a killed rank
resumed, and the merge of an adapter trained sharded. Without MLflow/DVC/Prefect (the GPU machine
has none of them): the functions the train stage calls, each run under torchrun as the stage
relaunches itself (distributed.launch). On a machine with one GPU, --ranks 1 runs the sharded runs
as FSDP2 at world size 1: the same Trainer/accelerate path, 4-bit storage, checkpoints and resume,
without the traffic between GPUs.

    PYTHONPATH=$PWD/src python benchmarks/gpu_fsdp_check.py --out $OUT/gpu_fsdp_check.json
    PYTHONPATH=src python benchmarks/gpu_fsdp_check.py --cpu --out /tmp/fsdp_check.json  # CPU: DDP only

Runs, each its own torchrun process group, same data, seed and global batch (micro-batch 4 x
accumulation 2 on one rank, 4 x 1 on each of two), LoRA dropout 0 so ranks draw no masks:
  one          1 rank, the reference
  ddp          2 ranks, DDP
  fsdp         2 ranks, FSDP2 (4-bit weights stored in bf16, sharded), fast path as configured (auto)
  fsdp_plain   2 ranks, FSDP2 with plain peft layers (no liger, no fused LoRA)
  fsdp_killed  2 ranks, FSDP2, the last rank SIGKILLs itself right after the checkpoint at step 8
  fsdp_resumed the same command again: resumes from checkpoint-8 and finishes
Checks: per-step losses of each 2-rank run against `one`; the killed run's rerun resumed from
checkpoint-8 (not from step 0); the checkpoint-8 adapter written by the
killed run holds every LoRA tensor at full shape; the resumed run's steps 9..12 and final adapter
against the uninterrupted fsdp run; the merged model's logits (core.merge.merge_adapter) within
register.merge_tolerance for the sharded run's adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, KILL_AT = 12, 8
LOSS_TOLERANCE = 0.02  # per-step losses against `one`, and the resumed run's against the uninterrupted one (gpu_train_bench's loss check)


def params(model_dir: Path, **train) -> dict:
    return {
        "data": {"raw_path": str(ROOT / "data/demo/instructions.jsonl"), "max_seq_len": 256},
        "model": {"name": str(model_dir)},
        "lora": {"dropout": 0.0},
        "train": {"max_steps": STEPS, "per_device_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
                  "warmup_steps": 0, "logging_steps": 1, "save_steps": 4, "save_total_limit": 5, **train},
    }


def build_model(work: Path) -> Path:
    """A random-init Llama (hidden 512, 8 layers) with the built-in tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    from qlora_pipeline.core.tiny import build_tiny_tokenizer

    target = work / "llama-small"
    if (target / "config.json").is_file():
        return target
    set_seed(0)
    tok = build_tiny_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False))
    model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)
    return target


class KillAfterSave:
    """Rank 1 SIGKILLs itself once the checkpoint of `step` is on disk (no handler runs)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Kill(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == step:
                    time.sleep(2.0)  # rank 0 finishes writing the checkpoint's shared files
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Kill()


def rank_main(spec: dict) -> None:
    """One rank: what stages/train.run does in a rank, without the tracking."""
    import torch
    from transformers import set_seed

    from qlora_pipeline import distributed
    from qlora_pipeline.config import validate_params
    from qlora_pipeline.core.data.collate import make_collator
    from qlora_pipeline.core.data.prepare import prepare_data
    from qlora_pipeline.core.data.tokens import ensure_pad_token
    from qlora_pipeline.core.model import apply_lora, load_base_model, load_tokenizer, resolve_compute_dtype, resolve_model
    from qlora_pipeline.core.train import train_adapter

    distributed.setup_rank()
    work = Path(spec["work"])
    cfg = validate_params(params(Path(spec["model_dir"]), **spec.get("train", {})))
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    how = spec.get("how") or distributed.strategy(cfg.train, ranks)  # fsdp also at world size 1 (one GPU)
    sharded = how == "fsdp"
    resolved = resolve_model(cfg.model, work / "cache")
    tokenizer = load_tokenizer(cfg.model, resolved)
    ensure_pad_token(tokenizer)
    prepared = prepare_data(cfg.data, tokenizer, ROOT)
    collator = make_collator(tokenizer, cfg.data.packing, cfg.data.max_seq_len, padding_free=False)
    model = load_base_model(cfg.model, cfg.quantization, resolved, sharded=sharded)
    set_seed(cfg.train.seed)
    model = apply_lora(model, cfg.lora)
    callbacks = [KillAfterSave(KILL_AT)] if spec.get("kill") and int(os.environ.get("RANK", "0")) == ranks - 1 else []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_adapter(
        model, tokenizer, prepared.train, collator, distributed.per_rank(cfg.train, ranks),
        work / spec["checkpoints"], resolve_compute_dtype(cfg.quantization.compute_dtype), callbacks=callbacks, sharded=sharded,
    )
    if distributed.is_main():
        adapter = work / f"{spec['name']}-adapter"
        model.save_pretrained(adapter, safe_serialization=True, state_dict=result.adapter_state)
        Path(spec["result"]).write_text(json.dumps({
            "strategy": how, "ranks": ranks, "global_step": result.global_step, "resumed_from": result.resumed_from,
            "losses": {int(r["step"]): r["loss"] for r in result.history}, "plan": result.plan,
            "train_s": round(time.perf_counter() - start, 2), "adapter": str(adapter),
        }))


def launch(name: str, ranks: int, work: Path, model_dir: Path, checkpoints: str, timeout_s: float, **extra) -> dict:
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    spec = {"name": name, "work": str(work), "model_dir": str(model_dir), "checkpoints": checkpoints, "result": str(result), **extra}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if "how" in extra:
        env["QLORA_STRATEGY"] = extra["how"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__, "--rank", json.dumps(spec)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    out = {"name": name, "ranks": ranks, "exit": proc.returncode, "wall_s": round(time.perf_counter() - start, 1)}
    if result.is_file():
        out.update(json.loads(result.read_text()))
    elif not extra.get("kill"):
        out["error"] = (proc.stdout + proc.stderr)[-4000:]
    return out


def adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def loss_diff(run: dict, ref: dict) -> float | None:
    steps = [s for s in ref.get("losses", {}) if s in run.get("losses", {})]
    if not steps:
        return None
    return max(abs(run["losses"][s] - ref["losses"][s]) / max(abs(ref["losses"][s]), 1e-9) for s in steps)


def merge_check(work: Path, model_dir: Path, adapter: Path) -> dict:
    import torch

    from qlora_pipeline.config import validate_params
    from qlora_pipeline.core.data.prepare import prepare_data
    from qlora_pipeline.core.data.tokens import ensure_pad_token
    from qlora_pipeline.core.merge import merge_adapter
    from qlora_pipeline.core.model import load_base_model, load_tokenizer, resolve_model

    cfg = validate_params(params(model_dir))
    resolved = resolve_model(cfg.model, work / "cache")
    tokenizer = load_tokenizer(cfg.model, resolved)
    ensure_pad_token(tokenizer)
    prepared = prepare_data(cfg.data, tokenizer, ROOT)
    _, worst = merge_adapter(
        load_base_model(cfg.model, cfg.quantization, resolved), str(adapter), getattr(torch, cfg.register.merge_dtype),
        [torch.tensor([row["input_ids"]]) for row in prepared.eval.select(range(4))], cfg.register.merge_tolerance,
    )
    return {"merge_relative_diff": worst.relative_diff, "merge_tolerance": cfg.register.merge_tolerance,
            "merge_within_tolerance": worst.relative_diff <= cfg.register.merge_tolerance}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the summary JSON (required)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-fsdp-check"))
    parser.add_argument("--cpu", action="store_true", help="CPU ranks (gloo): one and ddp only")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the sharded runs; 1 on a one-GPU machine (FSDP2 at world size 1)")
    parser.add_argument("--timeout-s", type=float, default=240)
    parser.add_argument("--rank", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(json.loads(args.rank))
        return 0
    if args.out is None:
        parser.error("--out is required")
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.work)
    runs: dict[str, dict] = {}
    summary: dict = {"command": "python benchmarks/gpu_fsdp_check.py " + " ".join(sys.argv[1:]), "steps": STEPS, "runs": runs}

    def record(run: dict) -> dict:
        runs[run["name"]] = run
        print(json.dumps({k: v for k, v in run.items() if k not in ("losses", "plan")}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
        return run

    go = dict(work=args.work, model_dir=model_dir, timeout_s=args.timeout_s)
    one = record(launch("one", 1, checkpoints="ckpt-one", **go))
    n = args.ranks
    if n > 1:
        record(launch("ddp", n, checkpoints="ckpt-ddp", how="ddp", **go))
    if not args.cpu:
        record(launch("fsdp", n, checkpoints="ckpt-fsdp", how="fsdp", **go))
        record(launch("fsdp_plain", n, checkpoints="ckpt-fsdp-plain", how="fsdp", train={"use_liger": False, "fused_lora": False}, **go))
        killed = record(launch("fsdp_killed", n, checkpoints="ckpt-fsdp-kill", how="fsdp", kill=True, **go))
        resumed = record(launch("fsdp_resumed", n, checkpoints="ckpt-fsdp-kill", how="fsdp", **go))
        checkpoint = args.work / "ckpt-fsdp-kill" / f"checkpoint-{KILL_AT}"
        checks = summary["checks"] = {"killed_exit": killed["exit"], "resumed_from": resumed.get("resumed_from")}
        if (checkpoint / "adapter_model.safetensors").is_file() and "adapter" in one:
            saved, full = adapter_tensors(checkpoint), adapter_tensors(Path(one["adapter"]))
            checks["checkpoint_adapter_full"] = set(saved) == set(full) and all(saved[k].shape == full[k].shape for k in full)
            checks["checkpoint_adapter_tensors"] = f"{len(saved)}/{len(full)}"
        if "adapter" in resumed and "adapter" in runs["fsdp"]:
            checks["resumed_vs_uninterrupted_adapter_max_abs"] = max_diff(adapter_tensors(Path(resumed["adapter"])), adapter_tensors(Path(runs["fsdp"]["adapter"])))
            checks["resumed_steps"] = sorted(resumed.get("losses", {}))
            checks["resumed_vs_uninterrupted_loss_rel"] = loss_diff(resumed, runs["fsdp"])
        if "adapter" in runs["fsdp"]:
            checks.update(merge_check(args.work, model_dir, Path(runs["fsdp"]["adapter"])))
        checks["resumed_from_the_kill"] = str(resumed.get("resumed_from") or "").endswith(f"checkpoint-{KILL_AT}")
        rel = checks.get("resumed_vs_uninterrupted_loss_rel")
        checks["passed"] = bool(
            killed["exit"] != 0 and checks["resumed_from_the_kill"] and checks.get("checkpoint_adapter_full")
            and rel is not None and rel <= LOSS_TOLERANCE and checks.get("merge_within_tolerance")
        )
    summary["loss_rel_diff_vs_one"] = {name: loss_diff(run, one) for name, run in runs.items() if name not in ("one", "fsdp_killed")}
    failed = [name for name, run in runs.items() if name != "fsdp_killed" and (run["exit"] != 0 or "error" in run)]
    drifted = [name for name, rel in summary["loss_rel_diff_vs_one"].items() if rel is None or rel > LOSS_TOLERANCE]
    summary["passed"] = not failed and not drifted and summary.get("checks", {}).get("passed", True)
    summary["failed_runs"], summary["losses_off_one"] = failed, drifted
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
