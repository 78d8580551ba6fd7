"""CPU training speed and memory: SmolLM2-135M-Instruct in 4-bit NF4 with LoRA, as `qlora train` runs it.

    .venv/bin/python benchmarks/cpu_bench.py --model base_models/SmolLM2-135M-Instruct.Q4_1.gguf --rounds 4 \
        --out benchmarks/results/cpu_bench.json

Every variant is built as the train stage builds it: `load_base_model` with the default
`quantization:` section, `apply_lora` with the default `lora:` section (r 16, alpha 32, dropout
0.05, all linear layers), then what `train_adapter` does (the fast path's plan, the transformers
Trainer) on batches of 8 x 128 tokens; a variant changes only the params it names.

Two phases, so that other work on the machine cannot tilt the comparison:
1. memory: each variant in a process of its own runs `train_adapter` itself for `--memory-steps`
   optimizer steps; its peak RSS during training (VmHWM, reset when training starts) and the
   estimate of the fast path's memory plan are recorded, with the Trainer's own step times.
2. speed: one process holds every variant's model and Trainer (optimizer and schedule from
   `Trainer.create_optimizer_and_scheduler`) and runs the Trainer's step (`training_step`, gradient
   clipping, optimizer and scheduler step, zero_grad) for each variant in turn, in a rotating
   order, `--warmup` untimed rounds then `--rounds` timed ones. Each timed step waits until other
   processes use less than `--quiet-cores` cores (from /proc/stat) and is run again if they used
   more while it ran: on 2 cores, one busy neighbour slows torch's two threads several-fold.
   Tokens/s = 8 x 128 / the median step time (and / the fastest step).
`--profile` adds one profiled step (torch.profiler, CPU ops by self time) per named variant.

A `.gguf` model is converted once by `resolve_model` into `--cache-dir`, as the pipeline does.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 128
BATCH = 8
GIB = 1024**3

# name -> (params overrides as dotted keys, what it is). "today" is the CPU behaviour before the
# CPU plan: every decoder layer recomputed (auto meant true on a CPU) and peft's LoRA forward.
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "today": (
        {"train.gradient_checkpointing": True, "train.fused_lora": False},
        "every layer recomputed, peft's LoRA layers (the CPU defaults before)",
    ),
    "default": ({}, "the defaults: memory plan against RAM, fused LoRA with 16-bit-draw dropout masks"),
    "no_recompute": (
        {"train.gradient_checkpointing": False, "train.fused_lora": False},
        "no layer recomputed, peft's LoRA layers",
    ),
    "fused_torch_dropout": (
        {"train.gradient_checkpointing": False, "train.fused_lora": True, "_bits16": False},
        "no recompute, fused LoRA with torch's native_dropout masks",
    ),
    "default_recompute": ({"train.gradient_checkpointing": True}, "the defaults with every layer recomputed"),
    "eager_attention": ({"model.attn_implementation": "eager"}, "the defaults with eager attention instead of SDPA"),
    "one_thread": ({"train.num_threads": 1}, "the defaults on one torch thread"),
    "bf16": ({"quantization.compute_dtype": "bfloat16"}, "the defaults with a bfloat16 compute dtype"),
    "lora_dropout_0": ({"lora.dropout": 0.0}, "the defaults with LoRA dropout 0 (a model setting: context only)"),
    "compiled": ({"train.compile": True}, "the defaults with each decoder layer compiled (torch.compile, inductor)"),
}
DEFAULT_VARIANTS = ",".join(VARIANTS)


# ---------------------------------------------------------------------------------------------
# The model


def bench_config(model: str, overrides: dict[str, Any], steps: int):
    """The pipeline's defaults with this benchmark's batch and schedule, plus the variant's params."""
    from qlora_pipeline.config import validate_params

    raw: dict[str, Any] = {
        "model": {"name": model},
        "data": {"max_seq_len": SEQ_LEN},
        "train": {
            "per_device_batch_size": BATCH,
            "gradient_accumulation_steps": 1,
            "max_steps": steps,
            "warmup_steps": 0,
            "logging_steps": 1,
            "save_steps": 10_000,
        },
    }
    for key, value in overrides.items():
        if not key.startswith("_"):
            section, name = key.split(".")
            raw.setdefault(section, {})[name] = value
    return validate_params(raw)


def token_rows(vocab: int, rows: int, seed: int = 0):
    """Rows of SEQ_LEN random tokens (ids 3 and up: no special tokens), every token a label."""
    import torch
    from datasets import Dataset

    ids = torch.randint(3, vocab, (rows, SEQ_LEN), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def load_variant(name: str, model: str, cache_dir: str, steps: int):
    """(config, tokenizer, peft model) for a variant, as the train stage loads them (a `.gguf` is
    converted once into cache_dir by resolve_model)."""
    from transformers import set_seed

    from qlora_pipeline.core.data.tokens import ensure_pad_token
    from qlora_pipeline.core.model import apply_lora, load_base_model, load_tokenizer, resolve_model

    cfg = bench_config(model, VARIANTS[name][0], steps)
    resolved = resolve_model(cfg.model, cache_dir, REPO)
    tokenizer = load_tokenizer(cfg.model, resolved)
    ensure_pad_token(tokenizer)
    model = load_base_model(cfg.model, cfg.quantization, resolved, vocab_size=len(tokenizer))
    set_seed(cfg.train.seed)
    model = apply_lora(model, cfg.lora)
    return cfg, tokenizer, model


def fix_dropout_masks(name: str, model) -> bool:
    """For a variant that asks for it (`_bits16: False`), the fused LoRA layers with torch's own
    dropout masks instead of bits16_dropout: fused again as apply_fast_path fuses them on a CPU."""
    from qlora_pipeline.core import fast

    if VARIANTS[name][0].get("_bits16") is False:
        fast.unfuse_lora(model)
        fast.fuse_lora(model)
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# Phase 1: each variant's own process runs train_adapter (memory, and the Trainer's own timing)


def _memory_worker(name: str, model: str, cache_dir: str, steps: int, conn) -> None:
    import torch
    from transformers import TrainerCallback

    from qlora_pipeline.core import train as train_module
    from qlora_pipeline.core.data.collate import make_collator
    from qlora_pipeline.core.model import resolve_compute_dtype

    started = time.perf_counter()
    cfg, tokenizer, peft_model = load_variant(name, model, cache_dir, steps)
    load_s = time.perf_counter() - started
    reports = []
    apply_fast_path = train_module.apply_fast_path

    def recording_fast_path(*args, **kwargs):
        out = apply_fast_path(*args, **kwargs)
        fix_dropout_masks(name, out[0])
        reports.append(out[2])
        return out

    train_module.apply_fast_path = recording_fast_path

    class Watch(TrainerCallback):
        def __init__(self) -> None:
            self.rss_begin, self.hwm_reset, self.start, self.step_s = 0, False, 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            gc.collect()
            self.rss_begin = rss_bytes()
            self.hwm_reset = reset_peak_rss()

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.start)

    watch = Watch()
    with tempfile.TemporaryDirectory() as ckpt:
        result = train_module.train_adapter(
            peft_model,
            tokenizer,
            token_rows(len(tokenizer), BATCH * steps),
            make_collator(tokenizer, False, SEQ_LEN),
            cfg.train,
            Path(ckpt),
            resolve_compute_dtype(cfg.quantization.compute_dtype),
            callbacks=[watch],
        )
    peak = peak_rss_bytes() if watch.hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = reports[0]
    conn.send(
        {
            "load_s": round(load_s, 1),
            "fast_path": report.describe(),
            "recomputed_layers": report.plan.checkpoint_layers,
            "num_layers": report.plan.num_layers,
            "memory_budget_gib": report.plan.budget_gib,
            "estimated_step_gib": report.plan.estimated_peak_gib,
            "rss_train_begin_gib": watch.rss_begin / GIB,
            "train_peak_rss_gib": peak / GIB,
            "train_rss_growth_gib": (peak - watch.rss_begin) / GIB,
            "trainer_step_s": [round(t, 2) for t in watch.step_s],
            "trainer_losses": [round(r["loss"], 4) for r in result.history],
            "torch_threads": torch.get_num_threads(),
        }
    )
    conn.close()


def measure_memory(names: list[str], model: str, cache_dir: str, steps: int) -> dict[str, dict[str, Any]]:
    """Phase 1, one variant at a time."""
    ctx = mp.get_context("spawn")
    out = {}
    for name in names:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_memory_worker, args=(name, model, cache_dir, steps, child))
        proc.start()
        child.close()
        try:
            out[name] = parent.recv()
        except EOFError:
            out[name] = {"error": f"the process exited with {proc.exitcode}"}
        proc.join()
        r = out[name]
        print(f"memory {name}: {r.get('train_rss_growth_gib', float('nan')):.2f} GiB added in training "
              f"(plan estimate {r.get('estimated_step_gib', float('nan')):.2f}), Trainer steps {r.get('trainer_step_s')} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# Other processes' CPU use: timed steps run only while the machine is otherwise idle


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) since boot / start."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy, own.user + own.system


class Quiet:
    """Measures how many cores other processes kept busy, and waits for them to go idle."""

    def __init__(self, threshold_cores: float, max_wait_s: float) -> None:
        self.threshold, self.max_wait_s = threshold_cores, max_wait_s
        self.waited_s = 0.0

    @staticmethod
    def others_cores(fn) -> tuple[Any, float, float]:
        """fn's result, its wall time, and the cores other processes used meanwhile (on average)."""
        busy0, own0 = cpu_seconds()
        start = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - start
        busy1, own1 = cpu_seconds()
        return result, wall, max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall, 1e-3)

    def wait(self) -> float:
        """Sleep (1 s at a time) until other processes use under the threshold; returns their last load."""
        start = time.perf_counter()
        while True:
            _, _, others = self.others_cores(lambda: time.sleep(1.0))
            if others < self.threshold or time.perf_counter() - start > self.max_wait_s:
                self.waited_s += time.perf_counter() - start
                return others


# ---------------------------------------------------------------------------------------------
# Phase 2: every variant in this process, one Trainer step each in turn


class Runner:
    """One variant: its model after the fast path, a Trainer built as train_adapter builds it, and
    the Trainer's optimizer step."""

    def __init__(self, name: str, model: str, cache_dir: str, steps: int, batches: int) -> None:
        import torch
        from transformers import Trainer

        from qlora_pipeline.core.data.collate import make_collator
        from qlora_pipeline.core.fast import apply_fast_path
        from qlora_pipeline.core.train import training_arguments

        self.name = name
        self.cfg, tokenizer, model = load_variant(name, model, cache_dir, steps)
        self.threads = self.cfg.train.num_threads or torch.get_num_threads()
        rows = token_rows(len(tokenizer), BATCH * batches)
        model, train_cfg, self.report = apply_fast_path(model, self.cfg.train, rows)
        collator = make_collator(tokenizer, False, SEQ_LEN, padding_free=self.report.padding_free)
        self.fast_path = self.report.describe()
        if fix_dropout_masks(name, model):
            self.fast_path = self.fast_path.replace("LoRA dropout masks from 16-bit draws", "torch's LoRA dropout masks")
        self.ckpt = tempfile.TemporaryDirectory()
        # as train_adapter on a CPU: no mixed precision
        args = training_arguments(train_cfg, Path(self.ckpt.name), use_bf16=False, use_fp16=False)
        self.trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=tokenizer)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=train_cfg.max_steps)
        self.model = model
        self.batches = [collator([rows[i] for i in range(b * BATCH, (b + 1) * BATCH)]) for b in range(batches)]
        self.next_batch = 0
        self.step_s: list[float] = []
        self.losses: list[float] = []
        model.train()

    def step(self) -> float:
        """One optimizer step as the Trainer's loop runs it (accumulation 1); returns its wall time."""
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        batch = self.batches[self.next_batch % len(self.batches)]
        self.next_batch += 1
        trainer, model = self.trainer, self.model
        start = time.perf_counter()
        num_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
        loss = trainer.training_step(model, batch, num_items)
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        self.losses.append(round(float(loss), 4))
        elapsed = time.perf_counter() - start
        torch.set_num_threads(previous)
        return elapsed


def measure_speed(
    names: list[str], model: str, cache_dir: str, warmup: int, rounds: int, profile: list[str], quiet: Quiet, retries: int,
    after_round: Callable[[dict], None] = lambda speed: None,
) -> tuple[dict, dict]:
    """Phase 2: every variant loaded here, then rounds of one step each, in rotating order. A timed
    step during which other processes kept more than quiet.threshold cores busy is run again (up to
    `retries` times; the last one is kept, and its load recorded)."""
    total = warmup + (rounds + len(profile)) * (1 + retries)
    runners = {}
    for name in names:
        runners[name] = Runner(name, model, cache_dir, total, total)
        runners[name].others = []
        runners[name].rerun = 0
        print(f"speed {name}: {runners[name].report.describe()}", flush=True)
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            runner = runners[name]
            for attempt in range(1 + retries):
                quiet.wait()
                _, elapsed, others = quiet.others_cores(runner.step)
                if index < warmup or others < quiet.threshold:
                    break
                runner.rerun += attempt < retries
                print(f"round {index} {name}: {elapsed:.2f} s while other processes used {others:.2f} cores: again", flush=True)
            if index >= warmup:
                runner.step_s.append(elapsed)
                runner.others.append(round(others, 3))
            print(f"round {index} {name}: {elapsed:.2f} s{' (warm-up)' if index < warmup else ''}", flush=True)
        if index >= warmup:
            after_round(speed_summary(runners))
    profiles = {}
    for name in profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        for _ in range(1 + retries):
            quiet.wait()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                _, elapsed, others = quiet.others_cores(runners[name].step)
            if others < quiet.threshold:
                break
        profiles[name] = {**profile_summary(prof, elapsed), "other_processes_cores": round(others, 3)}
    return speed_summary(runners), profiles


def speed_summary(runners: dict[str, Runner]) -> dict[str, dict[str, Any]]:
    """Per variant: the timed steps, tokens/s from their median and from the fastest."""
    return {
        name: {
            "step_s": [round(t, 3) for t in r.step_s],
            "tokens_per_s_median": round(BATCH * SEQ_LEN / statistics.median(r.step_s), 1) if r.step_s else None,
            "tokens_per_s_best": round(BATCH * SEQ_LEN / min(r.step_s), 1) if r.step_s else None,
            "torch_threads": r.threads,
            "other_processes_cores": r.others,
            "steps_run_again": r.rerun,
            "losses": r.losses,
            "fast_path": r.fast_path,
        }
        for name, r in runners.items()
    }


# ---------------------------------------------------------------------------------------------
# Single operations, at the shapes of one SmolLM2 layer with 8 x 128 tokens


def micro_benchmarks(quiet: Quiet, repeats: int = 30) -> dict[str, Any]:
    """Milliseconds (fastest of `repeats`, each after a wait for idle) for the operations the profile
    points at, on torch's default threads and on one: dropout masks, the 4-bit dequantize against
    the matmul it feeds, float32 against bfloat16 matmuls."""
    import bitsandbytes.functional as bnbf
    import torch

    from qlora_pipeline.core.fast import bits16_dropout

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * SEQ_LEN, 576, generator=gen)
    weight = torch.randn(1536, 576, generator=gen)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True, blocksize=64)
    ops = {
        "dropout nn.functional (peft's LoRA dropout), 1024 x 576": lambda: torch.nn.functional.dropout(x, 0.05, True),
        "dropout torch.native_dropout, 1024 x 576": lambda: torch.native_dropout(x, 0.05, True),
        "dropout bits16_dropout, 1024 x 576": lambda: bits16_dropout(x, 0.05),
        "bernoulli_ alone, 1024 x 576": lambda: torch.empty_like(x).bernoulli_(0.95),
        "dequantize_4bit NF4 + double quant, 1536 x 576": lambda: bnbf.dequantize_4bit(packed, state),
        "matmul float32, 1024 x 576 x 1536": lambda: x @ weight.t(),
        "matmul bfloat16, 1024 x 576 x 1536": lambda: x.bfloat16() @ weight.bfloat16().t(),
    }
    default_threads = torch.get_num_threads()
    out: dict[str, Any] = {}
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        timings = {}
        for name, fn in ops.items():
            fn()
            best = math.inf
            for _ in range(repeats):
                quiet.wait()
                _, elapsed, _ = quiet.others_cores(fn)
                best = min(best, elapsed)
            timings[name] = round(best * 1e3, 3)
        out[f"{threads}_threads"] = timings
    torch.set_num_threads(default_threads)
    return out


# Operator groups for the profile, by name: where a CPU training step spends its time.
OP_GROUPS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkl", "aten::linear")),
    ("4-bit dequantize", ("bitsandbytes::dequantize",)),
    ("dropout masks", ("aten::bernoulli", "aten::native_dropout", "aten::uniform_", "aten::random_", "aten::ge")),
    ("attention", ("aten::_scaled_dot_product", "aten::_softmax", "aten::_softmax_backward")),
    ("log-softmax / cross-entropy", ("aten::_log_softmax", "aten::nll_loss")),
    ("optimizer", ("Optimizer.step", "aten::_foreach", "aten::lerp", "aten::addcdiv", "aten::sqrt")),
    ("autograd and Python", ("autograd::", "LoraLinearFunction", "MatMul4Bit", "MmBackward", "MulBackward", "AddBackward", "torch::autograd")),
    ("copies and casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat")),
    ("fill / zero", ("aten::fill_", "aten::zero_", "aten::zeros")),
    ("elementwise", ("aten::mul", "aten::add", "aten::div", "aten::sub", "aten::neg", "aten::pow", "aten::rsqrt", "aten::mean", "aten::silu", "aten::sum", "aten::where", "aten::masked", "aten::embedding")),
)


def profile_summary(prof, step_s: float, top: int = 25) -> dict[str, Any]:
    """Top ops by self CPU time and a breakdown by OP_GROUPS, as % of the profiled step's wall time."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: -e.self_cpu_time_total)
    total_us = step_s * 1e6
    rows = [
        {
            "op": e.key,
            "self_ms": round(e.self_cpu_time_total / 1e3, 1),
            "pct_of_step": round(100 * e.self_cpu_time_total / total_us, 1),
            "calls": e.count,
        }
        for e in events[:top]
    ]
    groups: dict[str, float] = {}
    for e in events:
        group = next((g for g, prefixes in OP_GROUPS if e.key.startswith(prefixes)), "other")
        groups[group] = groups.get(group, 0.0) + e.self_cpu_time_total
    by_group = {g: {"ms": round(us / 1e3, 1), "pct_of_step": round(100 * us / total_us, 1)} for g, us in sorted(groups.items(), key=lambda kv: -kv[1])}
    profiled_us = sum(groups.values())
    return {"step_s": round(step_s, 3), "ops_self_ms": round(profiled_us / 1e3, 1), "top_ops": rows, "groups": by_group}


def environment() -> dict[str, Any]:
    import bitsandbytes
    import peft
    import torch
    import transformers

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in info if line.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    from qlora_pipeline.core.fast import available_ram_bytes

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_instructions": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_available_gib_at_start": round(available_ram_bytes() / GIB, 1),
        "load_average_1min_at_start": os.getloadavg()[0],
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | recomputed | tokens/s (median) | tokens/s (best step) | vs today (median) | RSS added in training, GiB (plan's estimate) | what |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r.get('recomputed_layers', '?')}/{r.get('num_layers', '?')} | {r.get('tokens_per_s_median', '-')} | "
            f"{r.get('tokens_per_s_best', '-')} | {r.get('speed_vs_today_median', '-')}x | "
            f"{r.get('train_rss_growth_gib', float('nan')):.2f} ({r.get('estimated_step_gib', float('nan')):.2f}) | {r['what']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model.name: a .gguf file or a safetensors model directory")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "qlora-cpu-bench"), help="where a .gguf is converted")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--memory-steps", type=int, default=2, help="train_adapter steps per variant in phase 1 (0: skip phase 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds in phase 2")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds in phase 2 (one step of every variant each)")
    p.add_argument("--profile", default="today,default", help="variants to profile for one step after the rounds")
    p.add_argument("--quiet-cores", type=float, default=0.15, help="timed steps wait for, and are re-run unless, other processes use fewer cores")
    p.add_argument("--max-wait-s", type=float, default=900.0, help="longest wait for other processes to go idle before a step")
    p.add_argument("--retries", type=int, default=3, help="re-runs of a timed step that other processes disturbed")
    p.add_argument("--micro-only", action="store_true", help="only the single-operation timings (micro_benchmarks)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_bench.json"))
    args = p.parse_args(argv)
    if not args.model and not args.micro_only:
        p.error("--model is required")
    sys.path.insert(0, str(REPO / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = [n for n in args.variants.split(",") if n]
    profile = [n for n in args.profile.split(",") if n]
    unknown = [n for n in names + profile if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if set(profile) - set(names):
        p.error("--profile must name variants from --variants")
    if args.micro_only:
        quiet = Quiet(args.quiet_cores, args.max_wait_s)
        micro = micro_benchmarks(quiet)
        report = {"command": "python benchmarks/cpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "environment": environment(), "quiet_cores": args.quiet_cores, "micro_ms": micro}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        for threads, timings in micro.items():
            print(threads)
            for name, ms in timings.items():
                print(f"  {name:60s} {ms:9.3f} ms")
        return 0
    model = str(Path(args.model).expanduser().resolve())
    from qlora_pipeline.core.model import resolve_model

    resolve_model(bench_config(model, {}, 1).model, args.cache_dir, REPO)  # a .gguf converted once, before any timing
    env = environment()
    t0 = time.perf_counter()
    memory = measure_memory(names, model, args.cache_dir, args.memory_steps) if args.memory_steps else {}
    quiet = Quiet(args.quiet_cores, args.max_wait_s)

    def write(speed: dict, profiles: dict, complete: bool) -> list[dict[str, Any]]:
        results = [{"variant": n, "what": VARIANTS[n][1], "overrides": VARIANTS[n][0], **memory.get(n, {}), **speed[n]} for n in names]
        base = next((r for r in results if r["variant"] == "today"), None)
        if base and base["tokens_per_s_median"]:
            for r in results:
                r["speed_vs_today_median"] = round(r["tokens_per_s_median"] / base["tokens_per_s_median"], 2)
                r["speed_vs_today_best"] = round(r["tokens_per_s_best"] / base["tokens_per_s_best"], 2)
        report = {
            "command": "python benchmarks/cpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "complete": complete,
            "batch": f"{BATCH} x {SEQ_LEN} tokens",
            "warmup_rounds": args.warmup,
            "timed_rounds": args.rounds,
            "memory_steps": args.memory_steps,
            "environment": env,
            "load_average_1min_at_end": os.getloadavg()[0],
            "quiet_cores": args.quiet_cores,
            "waited_for_quiet_s": round(quiet.waited_s, 1),
            "wall_s": round(time.perf_counter() - t0, 1),
            "results": results,
            "profiles": profiles,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return results

    speed, profiles = measure_speed(
        names, model, args.cache_dir, args.warmup, args.rounds, profile, quiet, args.retries,
        after_round=lambda partial: write(partial, {}, False),
    )
    results = write(speed, profiles, True)
    print(table(results))
    for name, prof in profiles.items():
        print(f"\nprofile of one {name} step ({prof['step_s']} s):")
        for group, v in prof["groups"].items():
            print(f"  {group:30s} {v['ms']:9.1f} ms  {v['pct_of_step']:5.1f}%")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
