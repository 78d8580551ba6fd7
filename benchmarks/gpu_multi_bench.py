"""QLoRA on several GPUs: DDP scaling of the 8B fast path, and a 70B shape sharded with FSDP2 or on one GPU.

On the GPU machine (2 x H200, about 7 minutes; results in benchmarks/results/):

    PYTHONPATH=$PWD/src python benchmarks/gpu_multi_bench.py --out $OUT/gpu_multi_bench.json [--parts ddp8b,fsdp70b,one70b]

On a CPU, the same orchestration on the tiny shape with 2 gloo ranks (a smoke test, no numbers worth reading):

    PYTHONPATH=src python benchmarks/gpu_multi_bench.py --device cpu --tiny --out /tmp/multi_tiny.json

This process only orchestrates: each run is its own process group, `python -m torch.distributed.run
--standalone --nproc-per-node=N gpu_multi_bench.py --one SPEC`, with a timeout; rank 0's result is added to
--out after each run, so a timeout keeps the others. Models, data, recipes and FLOPs are gpu_train_bench's
(random-init Llama shapes, NF4 + double quantization, LoRA r=16 / alpha 32 on all linear layers, AdamW,
gradient clipping at 1.0, bf16 autocast).

  ddp8b    8B, recipe `fast` as gpu_train_bench builds it (apply_fast_path, memory_budget_gib 14.2 = 0.6x
           the original recipe's peak), fixed and variable workloads, on 1 and 2 GPUs with one global
           batch: 8 rows of 2048 tokens per optimizer step. Rank r of N takes rows r, r+N, ... of each
           step's 8, as micro-batch x accumulation from the fast path's plan for its 8/N rows. N=2 wraps the
           model in torch's DistributedDataParallel (device_ids=[local_rank], find_unused_parameters=False,
           no_sync on every micro-batch but a step's last), as accelerate does for the Trainer; N=1 does not
           wrap it. Scaling = tokens/s(2) / tokens/s(1). With LoRA dropout on, each rank draws its own masks,
           so the two runs' losses differ by that noise: --lora-dropout 0 compares them exactly.
  fsdp70b  Llama-3.1-70B shape, NF4 with quant_storage bfloat16 (FSDP shards the 4-bit weights as bf16
           tensors; bitsandbytes' Linear4bit.forward re-attaches the quant_state after each unshard), built
           on the meta device and materialised module by module on each rank's GPU (never the bf16 model),
           LoRA by core.model.apply_lora, every decoder layer recomputed (core.fast.set_checkpointed_layers:
           transformers' non-reentrant checkpointing, set before sharding), then sharded with FSDP2 through
           accelerate, as the Trainer does (FullyShardedDataParallelPlugin: fsdp_version 2, transformer-based
           wrap on LlamaDecoderLayer, reshard_after_forward, bf16 mixed precision). Accumulation 1,
           micro-batch 1, 2, 4, 8 each its own run, until the first out-of-memory or the part's time budget.
  one70b   the same 70B model on one GPU without FSDP, micro-batch 1, 2 (until out-of-memory), and the fast
           path on it with memory_budget_gib auto (it plans recompute and micro-batch for --fast-batch rows).
           With 2 GPUs, micro-batch 1 and the fast path run at once, one on each GPU.

The 70B runs train on one global batch at every step, so the loss must fall (by learning, not by the
batch drawn); fsdp_vs_one compares the losses of 2 GPUs sharded with those of one on the same rows.
On a CPU (--device cpu): gloo ranks, float32 compute and quant_storage; accelerate will not shard there
(it picks MULTI_CPU), so fsdp70b applies torch's fully_shard itself to each decoder layer and the root.

MFU = model FLOPs of all ranks / time / (790 TFLOP/s x GPUs), model FLOPs as in gpu_train_bench: per real
token 4 * N (N = matmul parameters, head included) plus 6 * L * q_dim * layers for a sample of L tokens:
31.6 GFLOP per token for 8B and 286 for 70B at L = 2048. Recompute, LoRA and padding are not counted.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from gpu_train_bench import (
    LORA, PEAK_TFLOPS, ROOT, SEED, SEQ_LEN, SHAPES, batches, build_model, collate_padded, environment,
    make_samples, model_flops, packed_rows, sample_lengths, setup_recipe,
)

# Llama-3.1-70B, added to gpu_train_bench's table, which its model_flops and matmul_params read
SHAPES.setdefault("70b", dict(
    vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
    num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
))
SEQ_LEN.setdefault("70b", 2048)
GLOBAL_ROWS = 8  # ddp8b rows per optimizer step on any number of GPUs: 8 x 2048 = 16,384 tokens
FAST_BUDGET_GIB = 14.2  # 0.6 x the original recipe's 8B peak (23.67 GiB): gpu_train_bench's `fast`
# Seconds per part; a part's optional runs (larger micro-batches) start only if they fit. On one H200 a
# 70B run took 35 s (14 s to build, 950 tokens/s at micro-batch 1), an 8B run 38 s.
PART_BUDGET_S = "ddp8b=200,fsdp70b=230,one70b=110"
MIN_RUN_S = 30  # no run starts with less than this left before --total-s


# ---------------------------------------------------------------------------------------------
# Model: the 70B shape without ever holding it in bf16


def build_model_by_layer(shape: str, device, compute_dtype, quant_storage, seed: int = SEED):
    """build_model's model, materialised from the meta device one module at a time: each linear layer
    but the head quantized (NF4 + double quantization) as soon as its weight exists."""
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        **SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, attn_implementation="sdpa",
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(compute_dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        with torch.device(device):  # inv_freq is a non-persistent buffer: computed again, never loaded
            model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    finally:
        torch.set_default_dtype(default_dtype)
    torch.manual_seed(seed)
    std = config.initializer_range  # 0.02; speed and memory do not depend on the values
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=compute_dtype,
                    compress_statistics=True, quant_type="nf4", quant_storage=quant_storage, device="meta",
                )
                weight = torch.empty(child.out_features, child.in_features, dtype=compute_dtype, device=device)
                q.weight = bnb.nn.Params4bit(
                    weight.normal_(0.0, std), requires_grad=False, compress_statistics=True, quant_type="nf4",
                    quant_storage=quant_storage, module=q,
                ).to(device)  # quantizes on the move
                setattr(parent, name, q)
    for module in model.modules():  # what is left on meta: embeddings, norms, head
        if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            module.to_empty(device=device, recurse=False)
            for param in module.parameters(recurse=False):
                if "Norm" in type(module).__name__:
                    param.data.fill_(1.0)
                else:
                    param.data.normal_(0.0, std)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "a tensor left on meta"
    model.is_loaded_in_4bit = True  # what from_pretrained sets; peft picks its 4-bit LoRA layer by it
    model.is_quantized = True
    model.config.use_cache = False
    return model


# ---------------------------------------------------------------------------------------------
# One run, inside torchrun: rank r of N


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def prepare_ranks(spec: dict[str, Any]):
    """(rank, world, device, accelerator or None): the process group, made by accelerate for FSDP on GPUs."""
    import torch
    import torch.distributed as dist

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    on_gpu = spec["device"] == "cuda"
    device = torch.device("cuda", local) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    if spec["mode"] == "fsdp" and on_gpu:
        from accelerate import Accelerator, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            reshard_after_forward=True, state_dict_type="FULL_STATE_DICT", activation_checkpointing=False,
        )
        return rank, world, device, Accelerator(fsdp_plugin=plugin, mixed_precision="bf16")
    dist.init_process_group("nccl" if on_gpu else "gloo", device_id=device if on_gpu else None)
    return rank, world, device, None


def build(spec: dict[str, Any], device) -> tuple:
    """(model, micro, accum, collator, record): LoRA and the recompute plan on this rank's device."""
    import torch

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    t = time.perf_counter()
    if spec["mode"] == "ddp":
        model = build_model(spec["shape"], spec["device"], dtype, seed=spec["seed"])
    else:  # quant_storage = the compute dtype: FSDP shards floating tensors only
        model = build_model_by_layer(spec["shape"], device, dtype, dtype, seed=spec["seed"])
    model, micro, accum, collator, report = setup_recipe(model, spec)  # plain: every layer recomputed
    record: dict[str, Any] = {"micro_batch": micro, "accumulation": accum, "build_s": round(time.perf_counter() - t, 1)}
    if report is not None:
        record.update(fast_path=report.describe(), plan=report.record())
    else:
        record["checkpointing"] = "every decoder layer (core.fast.set_checkpointed_layers, non-reentrant)"
    if on_gpu:
        record.update(memory_after_build_gib=gib(torch.cuda.memory_allocated()), build_peak_gib=gib(torch.cuda.max_memory_allocated()))
    return model, micro, accum, collator, record


def distribute(spec: dict[str, Any], model, accelerator, world: int, device, record: dict[str, Any]) -> tuple:
    """(model, optimizer): sharded with FSDP2 (fsdp), wrapped in DDP (ddp on N > 1), or as it is."""
    import torch

    def adamw(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=spec["lr"], weight_decay=0.0)

    if spec["mode"] == "ddp" and world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    if spec["mode"] != "fsdp":
        return model, adamw(model)
    t = time.perf_counter()
    if accelerator is not None:  # FSDP2 wants the optimizer with the model: accelerate maps it to the shards
        model, optimizer = accelerator.prepare(model, adamw(model))
    else:  # CPU: accelerate will not shard there, so torch's FSDP2 itself, the units accelerate would make
        from torch.distributed.fsdp import fully_shard

        from qlora_pipeline.core.fast import decoder_layers

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        optimizer = adamw(model)
    record["shard_s"] = round(time.perf_counter() - t, 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the unsharded weights are garbage now: the peak below is the sharded one
        record["memory_after_shard_gib"] = gib(torch.cuda.memory_allocated())
    return model, optimizer


def rank_data(spec: dict[str, Any], collator, micro: int, rank: int, world: int) -> tuple:
    """(this rank's micro-batches, loss-counted tokens of each step's global batch). Every rank draws the
    same samples and takes rows r, r+N, ... of each step's global rows."""
    steps, rows_per_step = spec["warmup"] + spec["steps"], spec["batch"] * world
    pool = steps * rows_per_step * (1 if spec["workload"] == "fixed" else 6) + 8
    samples = make_samples(sample_lengths(spec["workload"], pool, spec["seq_len"], spec["seed"]), SHAPES[spec["shape"]]["vocab_size"], spec["seed"])
    packed = spec["workload"] == "variable" and collator is not collate_padded
    rows = packed_rows(samples, spec["seq_len"]) if packed else [{"input_ids": s} for s in samples]
    firsts = [0 if spec["same_batch"] else s * rows_per_step for s in range(steps)]
    per_step = [[rows[(first + j) % len(rows)] for j in range(rows_per_step)] for first in firsts]
    # the loss counts every token but each sample's first (position ids restart at each sample)
    labels = [sum(len(r["input_ids"]) - r.get("position_ids", [0]).count(0) for r in step) for step in per_step]
    return batches([r for step in per_step for r in step[rank::world]], micro, collator), labels


def train(spec: dict[str, Any], model, optimizer, data, step_labels: list[int], accum: int, accelerator, world: int, device) -> dict[str, Any]:
    """Warm-up and timed optimizer steps; a step's loss is the token mean over the global batch."""
    import torch
    import torch.distributed as dist

    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    backward = accelerator.backward if accelerator is not None else torch.Tensor.backward
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    model.train()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    losses, tokens, flops, out = [], 0, 0.0, {}
    t0 = t_train = time.perf_counter()
    for step in range(spec["warmup"] + spec["steps"]):
        if step == spec["warmup"]:
            sync()
            t0 = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for i in range(accum):
            batch, real, lengths = next(data)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            share = sum(n - 1 for n in lengths) / step_labels[step]  # this micro-batch's part of the global mean
            with model.no_sync() if ddp and i < accum - 1 else nullcontext():
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu):
                    loss = model(**batch).loss * share
                backward(loss * world)  # DDP and FSDP average gradients over ranks: x N gives the global mean's
            step_loss += loss.detach()
            if step >= spec["warmup"]:
                tokens, flops = tokens + real, flops + model_flops(spec["shape"], lengths)
        if accelerator is not None:
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(step_loss)  # the global mean; also this step's one sync
        losses.append(float(step_loss))
        out.setdefault("first_step_s", round(time.perf_counter() - t_train, 1))
    sync()
    sums = torch.tensor([float(tokens), flops], dtype=torch.float64, device=device)
    maxima = torch.tensor([time.perf_counter() - t0, torch.cuda.max_memory_allocated() if on_gpu else 0], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)  # the slowest rank's time, the fullest GPU's peak
    tokens, flops, elapsed = float(sums[0]), float(sums[1]), float(maxima[0])
    out.update(
        train_s=round(time.perf_counter() - t_train, 1), timed_s=round(elapsed, 3), real_tokens=int(tokens),
        tokens_per_s=round(tokens / elapsed, 1), tokens_per_s_per_gpu=round(tokens / elapsed / world, 1),
        mfu=round(flops / elapsed / (PEAK_TFLOPS * 1e12 * world), 4), gflop_per_token=float(f"{flops / max(tokens, 1) / 1e9:.4g}"),
        losses=[round(x, 5) for x in losses], loss_finite=all(map(math.isfinite, losses)), loss_decreased=losses[-1] < losses[0],
    )
    if on_gpu:
        out["peak_gib"] = gib(float(maxima[1]))  # torch.cuda.max_memory_allocated, max over ranks
    return out


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    rank, world, device, accelerator = prepare_ranks(spec)
    model, micro, accum, collator, record = build(spec, device)
    model, optimizer = distribute(spec, model, accelerator, world, device, record)
    data, step_labels = rank_data(spec, collator, micro, rank, world)
    record.update(train(spec, model, optimizer, data, step_labels, accum, accelerator, world, device))
    dist.destroy_process_group()
    return record


def run_rank(spec: dict[str, Any], result_path: str) -> int:
    """run_one on this rank: rank 0 writes the result; a failing rank writes its error and exits non-zero,
    so torchrun ends the others (they would wait in a collective)."""
    import torch

    rank = int(os.environ["RANK"])
    try:
        result = run_one(spec)
    except torch.OutOfMemoryError as e:
        Path(f"{result_path}.rank{rank}.err").write_text(json.dumps({"error": f"out of memory: {str(e)[:300]}", "oom": True}))
        print(f"rank {rank}: out of memory", file=sys.stderr)
        return 1
    except Exception as e:
        Path(f"{result_path}.rank{rank}.err").write_text(json.dumps({"error": f"{type(e).__name__}: {str(e)[:500]}"}))
        raise
    if rank == 0:
        Path(result_path).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# Orchestration: one torchrun per run


def launch(spec: dict[str, Any], gpus: str | None = None) -> dict[str, Any]:
    """Start torchrun for one run in a process session of its own (a timeout ends all its ranks)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    os.unlink(path)
    log = tempfile.TemporaryFile(mode="w+")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if spec["device"] == "cpu":  # torchrun sets it for N > 1 only; more threads thrash a small CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec['nproc']}",
        __file__, "--one", json.dumps(spec), "--result-path", path,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return {"spec": spec, "proc": proc, "log": log, "path": Path(path), "t": time.perf_counter()}


def finish(run: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Wait for a launched run: its result, or its error (with the log's tail unless out of memory)."""
    proc, path, out = run["proc"], run["path"], {}
    try:
        proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - run["t"])))
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the run's session: torchrun and its ranks
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        out = {"error": f"timed out after {timeout_s:.0f}s"}
    errors = sorted(path.parent.glob(path.name + ".rank*.err"))
    if path.exists() and not out:
        out = json.loads(path.read_text())
    elif errors:
        out = {**json.loads(errors[0].read_text()), **out}
    elif not out:
        out = {"error": f"exit {proc.returncode}"}
    if "error" in out and not out.get("oom"):
        run["log"].seek(0)
        out["log_tail"] = run["log"].read()[-3000:]
    run["log"].close()
    for p in [path, *errors]:
        p.unlink(missing_ok=True)
    return {**run["spec"], **out, "wall_s": round(time.perf_counter() - run["t"], 1)}


def part_ddp8b(args, base: dict[str, Any], run, fits) -> None:
    shape = "tiny" if args.tiny else "8b"
    spec = dict(
        base, part="ddp8b", mode="ddp", shape=shape, seq_len=SEQ_LEN[shape], recipe="fast", warmup=args.warmup,
        steps=args.steps, same_batch=False, budget_gib=FAST_BUDGET_GIB if args.device == "cuda" else None,
    )
    for workload in args.workloads.split(","):
        for nproc in (int(n) for n in args.ddp_ranks.split(",")):
            run([dict(spec, workload=workload, nproc=nproc, batch=GLOBAL_ROWS // nproc)])


def part_fsdp70b(args, base: dict[str, Any], run, fits) -> None:
    shape = "tiny" if args.tiny else "70b"
    spec = dict(base, part="fsdp70b", mode="fsdp", shape=shape, seq_len=SEQ_LEN[shape], nproc=2, recipe="plain")
    last = None
    for micro in (int(m) for m in args.fsdp_micro.split(",")):
        if last and ("error" in last or not fits(last["wall_s"] + last.get("train_s", 0))):
            break  # out of memory (a larger micro-batch will not fit either), or past the part's budget
        last = run([dict(spec, batch=micro)])[0]


def part_one70b(args, base: dict[str, Any], run, fits) -> None:
    shape = "tiny" if args.tiny else "70b"
    spec = dict(base, part="one70b", mode="single", shape=shape, seq_len=SEQ_LEN[shape], nproc=1, recipe="plain")
    micros = [int(m) for m in args.one_micro.split(",")]
    fast = dict(spec, recipe="fast", batch=args.fast_batch, budget_gib=None)  # None: "auto", 90% of the GPU
    if args.device == "cuda" and args.gpus >= 2:  # two 1-GPU runs at once, one on each GPU
        last = run([dict(spec, batch=micros[0]), fast], gpus=["0", "1"])[0]
    else:
        last = run([dict(spec, batch=micros[0])])[0]
        run([fast])
    for micro in micros[1:]:
        if "error" in last or not fits(last["wall_s"] + last.get("train_s", 0)):
            break
        last = run([dict(spec, batch=micro)])[0]


# ---------------------------------------------------------------------------------------------
# Summary


def max_relative_diff(a: list[float], b: list[float]) -> float:
    return float(f"{max(abs(x - y) / abs(x) for x, y in zip(a, b)):.3g}")


def scaling(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ddp8b per workload: tokens/s on 2 GPUs over 1, and how far apart their losses are."""
    out = []
    for workload in sorted({r["workload"] for r in results if r["part"] == "ddp8b"}):
        by = {r["nproc"]: r for r in results if r["part"] == "ddp8b" and r["workload"] == workload and "error" not in r}
        if 1 in by and 2 in by:
            speedup = by[2]["tokens_per_s"] / by[1]["tokens_per_s"]
            out.append({
                "workload": workload, "scaling": round(speedup, 3), "efficiency": round(speedup / 2, 3),
                "micro_x_accum": {n: f"{by[n]['micro_batch']} x {by[n]['accumulation']}" for n in (1, 2)},
                "max_relative_loss_diff": max_relative_diff(by[1]["losses"], by[2]["losses"]), "lora_dropout": by[1]["lora_dropout"],
            })
    return out


def fsdp_vs_one(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """70B losses on the same global batch: sharded on 2 GPUs against one GPU (a check of the sharded step)."""
    ok = [r for r in results if r["part"] in ("fsdp70b", "one70b") and "error" not in r]
    return [
        {"rows_per_step": o["batch"], "one70b_recipe": o["recipe"], "lora_dropout": f["lora_dropout"],
         "max_relative_loss_diff": max_relative_diff(f["losses"], o["losses"])}
        for f in ok if f["part"] == "fsdp70b"
        for o in ok if o["part"] == "one70b" and o["batch"] == f["batch"] * f["nproc"]
    ]


def fits_70b(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per 70B part: the largest micro-batch that trained, and the first that ran out of memory."""
    out = {}
    for part in ("fsdp70b", "one70b"):
        runs = [r for r in results if r["part"] == part and r["recipe"] == "plain"]
        ok, oom = [r["batch"] for r in runs if "error" not in r], [r["batch"] for r in runs if r.get("oom")]
        if runs:
            out[part] = {"largest_micro_batch": max(ok, default=None), "first_oom_micro_batch": min(oom, default=None)}
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| part | workload | recipe | GPUs | micro x accum | tokens/s | per GPU | peak GiB | MFU | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['part']} | {r['workload']} | {r['recipe']} | {r['nproc']} |"
        if "error" in r:
            lines.append(f"{head} {r['batch']} x 1 | error: {r['error'][:80]} | | | | |")
        else:
            lines.append(
                f"{head} {r['micro_batch']} x {r['accumulation']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                f"{r.get('peak_gib', '-')} | {100 * r['mfu']:.1f}% | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the tiny shape in every part (CPU smoke test)")
    p.add_argument("--parts", default="ddp8b,fsdp70b,one70b")
    p.add_argument("--workloads", default="fixed,variable", help="ddp8b's workloads")
    p.add_argument("--ddp-ranks", default="1,2", help="ddp8b's numbers of GPUs")
    p.add_argument("--warmup", type=int, default=3, help="ddp8b warm-up steps")
    p.add_argument("--steps", type=int, default=8, help="ddp8b timed steps")
    p.add_argument("--warmup-70b", type=int, default=1)
    p.add_argument("--steps-70b", type=int, default=3)
    p.add_argument("--fsdp-micro", default="1,2,4,8", help="fsdp70b micro-batches, in order until out of memory")
    p.add_argument("--one-micro", default="1,2", help="one70b micro-batches, in order until out of memory")
    p.add_argument("--fast-batch", type=int, default=4, help="one70b fast path: rows per step (it picks micro x accum)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-dropout", type=float, default=LORA["dropout"], help="0 to compare the losses of 1 and 2 GPUs")
    p.add_argument("--gpus", type=int, default=2, help="GPUs on the machine (2: one70b's first two runs at once)")
    p.add_argument("--timeout-s", type=float, default=300, help="per run")
    p.add_argument("--total-s", type=float, default=540, help="no run goes on past this, counted from the start")
    p.add_argument("--budget-s", default=PART_BUDGET_S, help="per part: its optional runs start only within it")
    p.add_argument("--out", default="")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--result-path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return run_rank(json.loads(args.one), args.result_path)

    budgets = {k: float(v) for k, v in (kv.split("=") for kv in args.budget_s.split(",") if kv)}
    deadline = time.perf_counter() + args.total_s
    base = dict(
        device=args.device, workload="fixed", warmup=args.warmup_70b, steps=args.steps_70b, same_batch=True,
        lr=args.lr, seed=SEED, lora_dropout=args.lora_dropout,
    )
    results: list[dict[str, Any]] = []
    out = Path(args.out) if args.out else None

    def run(specs: list[dict[str, Any]], gpus: list[str] | None = None) -> list[dict[str, Any]]:
        """Start the runs together, wait for each; print and save the results."""
        left_s = deadline - time.perf_counter()
        if left_s < MIN_RUN_S:
            done = [{**s, "error": "skipped: --total-s reached", "wall_s": 0.0} for s in specs]
        else:
            handles = [launch(s, g) for s, g in zip(specs, gpus or [None] * len(specs))]
            done = [finish(h, min(args.timeout_s, left_s)) for h in handles]
        for r in done:
            what = f"[{r['part']} {r['workload']} {r['recipe']}, {r['nproc']} GPU, batch {r['batch']}]"
            print(f"{what} {r['error']} ({r['wall_s']} s)\n{r.get('log_tail', '')}" if "error" in r else
                  f"{what} {r['micro_batch']} x {r['accumulation']}: {r['tokens_per_s']:,.0f} tok/s, {r.get('peak_gib', '-')} GiB, "
                  f"MFU {100 * r['mfu']:.1f}%, build {r['build_s']} s, wall {r['wall_s']} s, losses {r['losses']} {r.get('fast_path', '')}", flush=True)
        results.extend(done)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"results": results}, indent=1))
        return done

    for name in args.parts.split(","):
        part_end = min(deadline, time.perf_counter() + budgets.get(name, args.total_s))
        part = {"ddp8b": part_ddp8b, "fsdp70b": part_fsdp70b, "one70b": part_one70b}[name]
        part(args, base, run, lambda estimate_s: time.perf_counter() + estimate_s <= part_end)

    summary = {
        "command": "python benchmarks/gpu_multi_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "peak_tflops": PEAK_TFLOPS,
        "mfu_formula": "(4 * N * real_tokens + sum over samples 6 * L^2 * q_dim * layers) of all ranks / time / (790e12 * GPUs); N = matmul params incl. head",
        "gflop_per_token_at_2048": {s: round(model_flops(s, [2048]) / 2048 / 1e9, 1) for s in ("8b", "70b")},
        "results": results,
        "scaling": scaling(results),
        "fits_70b": fits_70b(results),
        "fsdp_vs_one": fsdp_vs_one(results),
        **environment(args.device),
    }
    summary["versions"]["accelerate"] = importlib.metadata.version("accelerate")
    if out:
        out.write_text(json.dumps(summary, indent=1))
    print(table(results))
    print(json.dumps({k: summary[k] for k in ("scaling", "fits_70b", "fsdp_vs_one")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
