"""QLoRA training speed and memory: the original recipe vs plain transformers+peft vs our fast path.

On the GPU machine (results in benchmarks/results/, table in benchmarks/README.md):

    PYTHONPATH=$PWD/src python benchmarks/gpu_train_bench.py --shapes 8b,1b --out $OUT/gpu_train_bench.json

On a CPU, the same code path on a tiny Llama (a smoke test, no numbers worth reading):

    PYTHONPATH=src python benchmarks/gpu_train_bench.py --device cpu --tiny

Random-init Llama shapes built from LlamaConfig (no hub), every linear layer but the head in
4-bit NF4 with double quantization, LoRA r=16 on all linear layers, AdamW, bf16 autocast.
Recipes (each in its own process, so patches and allocator state never leak between them):

  original      peft.prepare_model_for_kbit_training (fp32 upcast of norms, embeddings and head),
                gradient checkpointing, padding to the batch's longest sample, bf16 autocast (as the
                Trainer runs it with bf16=True)
  original_noamp  the same without autocast: activations stay fp32 after the upcast norms (the
                  Trainer without bf16/fp16; what ../shared/gpu/README.md's reference figures match)
  plain         the pipeline without the fast path: bf16 kept, SDPA, non-reentrant checkpointing
                on every layer (core.model.apply_lora), padding to the batch's longest sample
  plain_nockpt  plain without checkpointing (the speed plain gets when memory is no object)
  fast          core.fast.apply_fast_path with train.memory_budget_gib set to 0.6x the lowest
                original* peak of this run (or --fast-budget-gib): liger, fused LoRA, padding-free
                packed batches with varlen (or cuDNN) attention, planned checkpointing and micro-batch
  fast_masks    fast with train.fused_dropout: false (the LoRA dropout keeps masks: bits with CUDA graphs)
  fast_eager_masks  fast_eager with train.fused_dropout: false (torch's byte masks)
  fast_bits     fast with train.fused_dropout: false and train.dropout_mask_bits: true (bit masks)
  fast_whole, fast_eager_whole  fast, fast_eager with train.selective_recompute: false (recomputed
                layers recompute whole)
  fast_graphs   fast with train.cuda_graphs: true (the decoder stack replayed from CUDA graphs; bit masks)
  fast_eager    fast with train.cuda_graphs: false (the fast path before CUDA graphs)
  fast_max      the fast path with the whole GPU as its budget (memory_budget_gib: auto)
  fast_expseg   fast with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the allocator grows
                segments instead of splitting cached blocks; the pipeline sets it for training)
  fast_compiled the fast path with train.compile: true (torch.compile of each decoder layer; liger
                keeps only its fused linear+cross-entropy), same budget as fast
  fast_compiled_m4  fast_compiled with the micro-batch forced to 4 rows (the 8B batch: kept as configured)
  <fast recipe>_mN  that recipe with the micro-batch forced to N rows (accumulation batch / N); the
                plan still picks the recomputed layers that fit the budget (e.g. fast_m1, fast_eager_m2)

MFU = model FLOPs / time / 790 TFLOP/s (the H200's measured dense bf16 rate, ../shared/gpu/README.md).
Model FLOPs count the frozen base's forward and activation-gradient backward, per real token
4 * N (N = parameters of every matmul, head included, embedding excluded) plus causal attention
6 * L * q_dim * layers for a sample of length L (forward QK^T and AV, twice that for the backward).
Recompute, LoRA and padding are not counted: they are overheads, not useful work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

PEAK_TFLOPS = 790.0  # measured dense bf16 on this H200 (../shared/gpu/README.md)
SEED = 1234
ROOT = Path(__file__).resolve().parents[1]

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B
    "1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
    ),
    # Llama-3.1-8B
    "8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
    ),
    # CPU smoke test
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
    ),
}
# sequences per optimizer step, as in the reference measurements (../shared/gpu/README.md)
BATCH = {"1b": 8, "8b": 4, "tiny": 4}
SEQ_LEN = {"1b": 2048, "8b": 2048, "tiny": 128}
LORA = dict(r=16, alpha=32, dropout=0.05)  # the pipeline's params.yaml lora section
VARIABLE_MEDIAN, VARIABLE_SIGMA = 256, 1.0
BUDGETED = ("fast", "fast_eager", "fast_masks", "fast_eager_masks", "fast_bits", "fast_whole", "fast_eager_whole", "fast_graphs", "fast_expseg", "fast_compiled")  # recipes run under the 0.6x-original budget, also with a _mN suffix


def forced_micro(recipe: str) -> tuple[str, int | None]:
    """'fast_eager_m2' -> ('fast_eager', 2): a fast recipe with its micro-batch forced to N rows."""
    match = re.fullmatch(r"(.+)_m(\d+)", recipe)
    return (match.group(1), int(match.group(2))) if match else (recipe, None)


# ---------------------------------------------------------------------------------------------
# Model


def build_model(shape: str, device: str, compute_dtype, seed: int = SEED):
    """A random-init Llama with every linear layer but the head in 4-bit NF4 + double quantization,
    the same modules transformers' BitsAndBytesConfig loading produces."""
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, attn_implementation="sdpa",
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                    quant_storage=torch.uint8, device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4",
                    quant_storage=torch.uint8, module=q,
                ).to(device)
                setattr(parent, name, q)
                del child
    model.is_loaded_in_4bit = True  # what from_pretrained sets; peft picks its 4-bit LoRA layer by it
    model.is_quantized = True
    model.config.use_cache = False
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def matmul_params(shape: str) -> int:
    """N: parameters of every matmul of the base (all linear layers and the head, not the embedding)."""
    s = SHAPES[shape]
    d, f, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    q = s["num_attention_heads"] * s["head_dim"]
    kv = s["num_key_value_heads"] * s["head_dim"]
    return layers * (d * q + 2 * d * kv + q * d + 3 * d * f) + d * s["vocab_size"]


def model_flops(shape: str, sample_lengths: list[int]) -> float:
    s = SHAPES[shape]
    q = s["num_attention_heads"] * s["head_dim"]
    n = matmul_params(shape)
    return sum(4.0 * n * L + 6.0 * L * L * q * s["num_hidden_layers"] for L in sample_lengths)


def lora_settings(dropout: float):
    from qlora_pipeline.config import LoraConfig

    return LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=dropout, target_modules="all-linear")


def setup_recipe(model, spec: dict[str, Any]):
    """Returns (peft model, micro-batch size, accumulation steps, collator, fast-path report or None)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    from qlora_pipeline.config import TrainConfig
    from qlora_pipeline.core.data.collate import PackingCollator
    from qlora_pipeline.core.fast import apply_fast_path, decoder_layers, set_checkpointed_layers
    from qlora_pipeline.core.model import apply_lora

    recipe, batch, dropout = spec["recipe"], spec["batch"], spec["lora_dropout"]
    torch.manual_seed(spec["seed"] + 1)  # the same LoRA init for every recipe
    if recipe in ("original", "original_noamp"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        peft_cfg = PeftLoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=dropout, target_modules="all-linear",
            bias="none", task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_cfg), batch, 1, collate_padded, None
    if recipe in ("plain", "plain_nockpt"):
        model = apply_lora(model, lora_settings(dropout))
        if recipe == "plain":  # every decoder layer recomputed, as transformers' gradient checkpointing
            set_checkpointed_layers(model, len(decoder_layers(model)))
        micro = spec.get("micro") or batch  # a smaller micro-batch with accumulation: the same step, less memory
        return model, micro, batch // micro, collate_padded, None
    # fast, fast_max, fast_compiled*: the pipeline's own call (core/train.py makes the same one)
    on_gpu = spec["device"] == "cuda"
    recipe, micro = forced_micro(recipe)
    if micro is not None and batch % micro:
        raise ValueError(f"{spec['recipe']}: micro-batch {micro} does not divide the batch of {batch}")
    cfg = TrainConfig(
        per_device_batch_size=micro or batch,
        gradient_accumulation_steps=batch // (micro or batch),
        gradient_checkpointing="auto",
        use_liger="auto" if on_gpu else False,
        fused_lora=True,
        padding_free=True,
        tune_micro_batch=micro is None,
        memory_budget_gib=spec.get("budget_gib") or "auto",
        compile=recipe.startswith("fast_compiled"),
        dropout_mask_bits=recipe == "fast_bits",
        fused_dropout=False if recipe in ("fast_masks", "fast_eager_masks", "fast_bits") else "auto",
        cuda_graphs=True if recipe == "fast_graphs" else False if recipe in ("fast_eager", "fast_eager_masks", "fast_eager_whole") else "auto",
        selective_recompute=False if recipe.endswith("_whole") else "auto",
    )
    model = apply_lora(model, lora_settings(dropout))
    fixed = spec["workload"] == "fixed"  # what rows_of_one_length finds for the pipeline's rows
    model, cfg, report = apply_fast_path(model, cfg, max_seq_len=spec["seq_len"], fixed_shapes=fixed)
    collator = PackingCollator(spec["seq_len"], attention_boundaries=True) if report.padding_free else collate_padded
    return model, cfg.per_device_batch_size, cfg.gradient_accumulation_steps, collator, report


# ---------------------------------------------------------------------------------------------
# Data


def sample_lengths(workload: str, count: int, seq_len: int, seed: int) -> list[int]:
    import numpy as np

    if workload == "fixed":
        return [seq_len] * count
    rng = np.random.default_rng(seed)
    raw = np.exp(rng.normal(math.log(VARIABLE_MEDIAN * seq_len / 2048), VARIABLE_SIGMA, size=count))
    return [int(x) for x in np.clip(np.round(raw), 8, seq_len)]


def make_samples(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def collate_padded(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Right-pad to the batch's longest row, as a normal causal-LM collator does (pad id 0)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long) if "position_ids" in rows[0] else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r["input_ids"])
        if positions is not None:
            positions[i, :n] = torch.tensor(r["position_ids"])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if positions is not None:
        batch["position_ids"] = positions
    return batch


def packed_rows(samples: list[list[int]], seq_len: int) -> list[dict[str, list[int]]]:
    """Samples packed into rows of at most seq_len tokens, position ids restarting per sample
    (what data.packing produces)."""
    from qlora_pipeline.core.fast import pack_sequences

    rows = []
    for group in pack_sequences([len(s) for s in samples], seq_len):
        ids, pos = [], []
        for i in sorted(group):
            ids += samples[i]
            pos += list(range(len(samples[i])))
        rows.append({"input_ids": ids, "position_ids": pos})
    return rows


def batches(rows: list[dict[str, list[int]]], micro: int, collator) -> Iterator[tuple[dict, int, list[int]]]:
    """(collated batch, real tokens, sample lengths), cycling through rows."""
    i = 0
    while True:
        group = [rows[(i + j) % len(rows)] for j in range(micro)]
        i += micro
        lengths = []
        for r in group:
            if "position_ids" in r:
                starts = [k for k, p in enumerate(r["position_ids"]) if p == 0] + [len(r["position_ids"])]
                lengths += [b - a for a, b in zip(starts, starts[1:])]
            else:
                lengths.append(len(r["input_ids"]))
        yield collator(group), sum(lengths), lengths


# ---------------------------------------------------------------------------------------------
# One run


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    device = spec["device"]
    on_gpu = device == "cuda"
    compute_dtype = torch.bfloat16 if on_gpu else torch.float32
    if spec.get("philox_rounds"):  # rounds of the fused LoRA dropout's Philox draws (core/lowrank_dropout.py)
        from qlora_pipeline.core import lowrank_dropout

        lowrank_dropout.PHILOX_ROUNDS = spec["philox_rounds"]
    if spec.get("lowrank_launch"):  # its launch settings (gpu_lowrank_dropout_tune.py)
        from qlora_pipeline.core import lowrank_dropout as ld

        (ld.FORWARD_BLOCK_M, ld.FORWARD_BLOCK_K, ld.FORWARD_WARPS, ld.FORWARD_STAGES, ld.BACKWARD_BLOCK_M, ld.BACKWARD_BLOCK_K,
         ld.BACKWARD_WARPS, ld.BACKWARD_STAGES, ld.BACKWARD_SPLIT_M) = spec["lowrank_launch"]
    if spec.get("bitmask_launch"):  # the bit-mask dropout kernels' BLOCK and warps (gpu_dropout_tune.py)
        from qlora_pipeline.core import bitmask_dropout

        bitmask_dropout.BLOCK, bitmask_dropout.FORWARD_WARPS, bitmask_dropout.BACKWARD_WARPS = spec["bitmask_launch"]
    shape, seq_len = spec["shape"], spec["seq_len"]
    t_build = time.perf_counter()
    model = build_model(shape, device, compute_dtype, seed=spec["seed"])
    model, micro, accum, collator, report = setup_recipe(model, spec)
    build_s = time.perf_counter() - t_build

    # Data: the same samples for every recipe. Padded recipes take `batch` samples per optimizer
    # step; the fast path packs samples into rows and takes `batch` rows per step.
    steps_total = spec["warmup"] + spec["steps"]
    rows_needed = steps_total * micro * accum
    pool = rows_needed * (1 if spec["workload"] == "fixed" else 6) + 8
    samples = make_samples(sample_lengths(spec["workload"], pool, seq_len, spec["seed"]), SHAPES[shape]["vocab_size"], spec["seed"])
    if spec.get("fixed_groups"):  # correctness check: both recipes see the same samples per step
        samples = samples[: spec["fixed_groups"] * spec["batch"]]
        rows = [{"input_ids": s} for s in samples]
    elif spec["recipe"].startswith("fast") and spec["workload"] == "variable":
        rows = packed_rows(samples, seq_len)
    else:
        rows = [{"input_ids": s} for s in samples]
    data = batches(rows, micro, collator)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    model.train()

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    losses, step_times, tokens_timed, flops_timed = [], [], 0, 0.0
    autocast = on_gpu and spec["recipe"] != "original_noamp"
    t0 = time.perf_counter()
    for step in range(steps_total):
        if step == spec["warmup"]:
            sync()
            t0 = time.perf_counter()
        micro_batches = [next(data) for _ in range(accum)]
        label_counts = [int((b["labels"][:, 1:] != -100).sum()) for b, _, _ in micro_batches]
        step_loss = torch.zeros((), device=device)
        for (batch, real, lengths), n_labels in zip(micro_batches, label_counts):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss * (n_labels / sum(label_counts))
            loss.backward()
            step_loss += loss.detach()
            if step >= spec["warmup"]:
                tokens_timed += real
                flops_timed += model_flops(shape, lengths)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # one sync per optimizer step, as a training loop that logs every step's loss; lazy_loss:
        # read at the end, so the host prepares the next batches while the GPU runs
        losses.append(step_loss if spec.get("lazy_loss") else float(step_loss))
        step_times.append(time.perf_counter())
        if step == 0:
            sync()  # with lazy_loss nothing has waited for the GPU yet
            first_step_s = time.perf_counter() - t0  # includes compiling, when the recipe compiles
    sync()
    elapsed = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    peaks = {}
    if on_gpu:  # read before the profiled steps below
        peaks = {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
    from qlora_pipeline.core.fast import stack_runner

    runner = stack_runner(model)
    graph_counts = {**runner.counts(), "disabled": runner.disabled_reason} if runner else None
    profile = None
    if spec.get("profile"):  # one more step under torch.profiler: GPU busy time by kernel family
        from gpu_explore import profile_step

        def one_step() -> None:
            for batch, _, _ in (next(data) for _ in range(accum)):
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                    model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        profile = profile_step(one_step, on_gpu)
    result = {
        **spec,
        "micro_batch": micro,
        "accumulation": accum,
        "build_s": round(build_s, 1),
        "first_step_s": round(first_step_s, 1),
        "timed_s": round(elapsed, 3),
        "real_tokens": tokens_timed,
        "tokens_per_s": round(tokens_timed / elapsed, 1),
        "mfu": round(flops_timed / elapsed / (PEAK_TFLOPS * 1e12), 4),
        "gflop_per_token": float(f"{flops_timed / max(tokens_timed, 1) / 1e9:.4g}"),
        "losses": [round(x, 5) for x in losses],
    }
    if profile is not None:
        result["profile"] = profile
    result.update(peaks)
    if report is not None and report.compiled_layers:
        from torch._dynamo.utils import counters

        result["dynamo"] = {
            "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": {k[:200]: v for k, v in counters["graph_break"].items()},
            "recompiles": counters["recompiles"].get("total", 0) if "recompiles" in counters else None,
        }
    if graph_counts is not None:
        result["graphs"] = graph_counts
    if report is not None:
        result["fast_path"] = report.describe()
        result["plan"] = {
            "micro_batch": report.plan.micro_batch_size,
            "accumulation": report.plan.gradient_accumulation_steps,
            "checkpoint_layers": report.plan.checkpoint_layers,
            "selective_layers": report.plan.kept_output_layers,
            "estimated_peak_gib": round(report.plan.estimated_peak_gib, 2),
            "budget_gib": report.plan.budget_gib,
            "varlen_attention": report.varlen_attention,
            "liger": report.liger,
            "fused_lora_modules": report.fused_lora_modules,
            "compiled_layers": report.compiled_layers,
        }
    return result


# ---------------------------------------------------------------------------------------------
# Orchestration: each run in its own process


def spawn(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if forced_micro(spec["recipe"])[0] == "fast_expseg":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    cmd = [sys.executable, __file__, "--one", json.dumps(spec), "--result-path", path]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout_s:.0f}s"}
    wall = round(time.perf_counter() - t, 1)
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {**spec, "error": f"exit {proc.returncode}", "log_tail": tail, "wall_s": wall}
    finally:
        Path(path).unlink(missing_ok=True)
    result["wall_s"] = wall
    return result


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for shape in {r["shape"] for r in results}:
        for workload in ("fixed", "variable"):
            by = {r["recipe"]: r for r in results if r["shape"] == shape and r["workload"] == workload and "error" not in r and not r.get("check")}
            row = {"shape": shape, "workload": workload}
            for name, fast in by.items():
                if forced_micro(name)[0] not in BUDGETED:
                    continue
                for base in ("original", "original_noamp", "plain", "plain_nockpt", "fast_eager", "fast"):
                    if base in by and base != name:
                        row[f"{name}_over_{base}_speed"] = round(fast["tokens_per_s"] / by[base]["tokens_per_s"], 2)
                        if "peak_gib" in fast and "peak_gib" in by[base]:
                            row[f"{name}_over_{base}_memory"] = round(fast["peak_gib"] / by[base]["peak_gib"], 3)
            if len(row) > 2:
                out.append(row)
    return out


def loss_check(results: list[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """Per workload: the plain and fast recipes' loss after each step, on the same samples and seed."""
    out = []
    for workload in ("fixed", "variable"):
        checks = {r["recipe"]: r for r in results if r.get("check") and r["workload"] == workload and "error" not in r}
        if "plain" not in checks:
            continue
        for name in [n for n in checks if n.startswith("fast")]:
            a, b = checks["plain"]["losses"], checks[name]["losses"]
            rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
            out.append({
                "shape": checks["plain"]["shape"],
                "workload": workload,
                "recipe": name,
                "what": "same samples per step, same seed, LoRA dropout 0, lr 1e-3: plain (padded batches, SDPA, "
                f"peft) vs {name} (padding-free/packed, varlen or cuDNN attention, liger, fused LoRA, planned checkpointing)",
                "plain_losses": a,
                f"{name}_losses" if name != "fast" else "fast_losses": b,
                "max_relative_diff": round(max(rel), 5),
                "tolerance": tolerance,
                "passed": max(rel) <= tolerance,
            })
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| shape | workload | recipe | micro x accum | real tokens/s | peak GiB | MFU |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("check"):
            continue
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['workload']} | {r['recipe']} | error: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['workload']} | {r['recipe']} | {r['micro_batch']} x {r['accumulation']} | "
            f"{r['tokens_per_s']:,.0f} | {r.get('peak_gib', '-')} | {100 * r['mfu']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the tiny shape (CPU smoke test)")
    p.add_argument("--shapes", default="8b,1b")
    p.add_argument("--workloads", default="fixed,variable")
    p.add_argument("--recipes", default="original_noamp,original,plain,fast", help="fast's budget: 0.6x the lowest original* peak")
    p.add_argument("--extra", default="plain_nockpt,fast_max", help="extra recipes, fixed workload, largest shape only")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-dropout", type=float, default=LORA["dropout"])
    p.add_argument("--fast-budget-gib", type=float, default=0.0, help="0: 0.6x the original recipe's peak")
    p.add_argument("--check-shape", default="1b", help="shape of the loss check ('' to skip)")
    p.add_argument("--check-steps", type=int, default=8)
    p.add_argument("--check-recipes", default="fast", help="recipes checked against plain")
    p.add_argument("--check-tolerance", type=float, default=0.02)
    p.add_argument("--lazy-loss", action="store_true", help="read the step losses at the end, not after each step (no per-step sync)")
    p.add_argument("--philox-rounds", type=int, default=0, help="Philox rounds of the fused LoRA dropout (default: the module's)")
    p.add_argument("--lowrank-launch", default="", help="forward BM,BK,warps,stages and backward BM,BK,warps,stages,split of the fused LoRA dropout")
    p.add_argument("--bitmask-launch", default="", help="BLOCK,FORWARD_WARPS,BACKWARD_WARPS of the bit-mask dropout kernels (default: the module's)")
    p.add_argument("--profile", default="", help="recipes profiled for one more step after the timed ones (torch.profiler)")
    p.add_argument("--timeout-s", type=float, default=300)
    p.add_argument("--out", default="")
    p.add_argument("--merge", nargs="+", default=[], help="combine result files (later runs replace earlier ones) into --out")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--result-path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        result = run_one(json.loads(args.one))
        Path(args.result_path).write_text(json.dumps(result))
        return 0

    if args.merge:
        return merge(args.merge, Path(args.out), args.check_tolerance)

    shapes = ["tiny"] if args.tiny else [s for s in args.shapes.split(",") if s]
    check_shape = "tiny" if args.tiny else args.check_shape
    common = dict(device=args.device, warmup=args.warmup, steps=args.steps, lr=args.lr, seed=SEED, lora_dropout=args.lora_dropout, lazy_loss=args.lazy_loss,
                  bitmask_launch=[int(v) for v in args.bitmask_launch.split(",")] if args.bitmask_launch else None,
                  philox_rounds=args.philox_rounds or None,
                  lowrank_launch=[int(v) for v in args.lowrank_launch.split(",")] if args.lowrank_launch else None)
    results: list[dict[str, Any]] = []
    out = Path(args.out) if args.out else None

    def record(r: dict[str, Any]) -> None:
        results.append(r)
        status = r.get("error") or f"{r['tokens_per_s']:,.0f} tok/s, {r.get('peak_gib', '-')} GiB, MFU {100 * r['mfu']:.1f}%"
        print(f"[{r['shape']} {r['workload']} {r['recipe']}{' check' if r.get('check') else ''}] {status} {r.get('fast_path', '')}", flush=True)
        if "log_tail" in r:
            print(r["log_tail"], flush=True)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"results": results}, indent=1))

    for shape in shapes:
        base = dict(common, shape=shape, seq_len=SEQ_LEN[shape], batch=BATCH[shape])
        for workload in args.workloads.split(","):
            original_peaks = []
            for recipe in args.recipes.split(","):
                spec = dict(base, workload=workload, recipe=recipe, profile=recipe in args.profile.split(","))
                if forced_micro(recipe)[0] in BUDGETED and args.device == "cuda":
                    spec["budget_gib"] = args.fast_budget_gib or (0.6 * min(original_peaks) if original_peaks else None)
                r = spawn(spec, args.timeout_s)
                if recipe.startswith("original") and "peak_gib" in r:
                    original_peaks.append(r["peak_gib"])
                record(r)
        if shape == shapes[0] and args.extra:
            for recipe in args.extra.split(","):
                record(spawn(dict(base, workload="fixed", recipe=recipe), args.timeout_s))
    if check_shape:
        base = dict(common, shape=check_shape, seq_len=SEQ_LEN[check_shape], batch=BATCH[check_shape])
        for workload in args.workloads.split(","):
            plain_peak = None
            for recipe in ("plain", *args.check_recipes.split(",")):
                spec = dict(
                    base, workload=workload, recipe=recipe, check=True, fixed_groups=2, lora_dropout=0.0,
                    warmup=0, steps=args.check_steps, lr=1e-3,
                )
                if recipe.startswith("fast") and plain_peak:  # a tight budget, so the check covers recompute too
                    spec["budget_gib"] = 0.6 * plain_peak
                r = spawn(spec, args.timeout_s)
                plain_peak = plain_peak or r.get("peak_gib")
                record(r)

    summary = {
        "command": "python benchmarks/gpu_train_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "peak_tflops": PEAK_TFLOPS,
        "mfu_formula": "(4 * N * real_tokens + sum over samples 6 * L^2 * q_dim * layers) / time / 790e12; N = matmul params incl. head",
        "results": results,
        "ratios": ratios(results),
        "loss_check": loss_check(results, args.check_tolerance),
    }
    summary.update(environment(args.device))
    if out:
        out.write_text(json.dumps(summary, indent=1))
    print(table(results))
    print(json.dumps({"ratios": summary["ratios"], "loss_check": summary["loss_check"]}, indent=1))
    return 0


def merge(paths: list[str], out: Path, tolerance: float) -> int:
    """One summary from several runs: a later result for the same (shape, workload, recipe, check) wins."""
    by_key: dict[tuple, dict[str, Any]] = {}
    commands, env = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        commands.append(data.get("command", ""))
        env = {k: data[k] for k in ("versions", "gpu") if k in data} or env
        for r in data["results"]:
            if "error" in r and (r["shape"], r["workload"], r["recipe"], bool(r.get("check"))) in by_key:
                continue
            by_key[(r["shape"], r["workload"], r["recipe"], bool(r.get("check")))] = r
    results = list(by_key.values())
    summary = {
        "commands": commands,
        "peak_tflops": PEAK_TFLOPS,
        "mfu_formula": "(4 * N * real_tokens + sum over samples 6 * L^2 * q_dim * layers) / time / 790e12; N = matmul params incl. head",
        "results": results,
        "ratios": ratios(results),
        "loss_check": loss_check(results, tolerance),
        **env,
    }
    out.write_text(json.dumps(summary, indent=1))
    print(table(results))
    print(json.dumps({"ratios": summary["ratios"]}, indent=1))
    return 0


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    env = {"versions": {}}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel"):
        try:
            env["versions"][name] = md.version(name)
        except md.PackageNotFoundError:
            env["versions"][name] = None
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


if __name__ == "__main__":
    sys.exit(main())
