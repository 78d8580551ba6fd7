"""GPU correctness of the pipeline's core, end to end, without MLflow/DVC/Prefect.

The same functions the stages call: prepare_data on the demo data, a 4-bit NF4 base loaded by
load_base_model, apply_lora, train_adapter (the transformers Trainer with the fast path on a GPU),
eval_loss of base vs tuned, greedy generations, merge_adapter (the merge checked in float32) with the
default register.merge_tolerance. Random-init models of the OPT-125m (the default hub model) and
Llama-3.2-1B shapes, the built-in tokenizer, so nothing is downloaded.

    PYTHONPATH=src python benchmarks/gpu_pipeline_check.py --out results/gpu_pipeline_check.json
    PYTHONPATH=src python benchmarks/gpu_pipeline_check.py --tiny --out /tmp/check.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, set_seed

from qlora_pipeline.config import validate_params
from qlora_pipeline.core.data.collate import make_collator
from qlora_pipeline.core.data.tokens import ensure_pad_token
from qlora_pipeline.core.data.prepare import prepare_data
from qlora_pipeline.core.evaluate import eval_loss, generate
from qlora_pipeline.core.merge import merge_adapter
from qlora_pipeline.core.model import apply_lora, load_base_model, load_tokenizer, resolve_compute_dtype, resolve_model
from qlora_pipeline.core.tiny import build_tiny_tokenizer
from qlora_pipeline.core.train import train_adapter

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # OPT-125m's shape (facebook/opt-125m, the default model.name), with the built-in vocabulary.
    "opt-125m": lambda tok: OPTForCausalLM(OPTConfig(
        vocab_size=len(tok), hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
        word_embed_proj_dim=768, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)),
    # Llama-3.2-1B's shape.
    "llama-1b": lambda tok: LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)),
    "tiny-opt": lambda tok: OPTForCausalLM(OPTConfig(
        vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)),
}


def check_shape(name: str, work: Path, steps: int) -> dict:
    set_seed(0)
    tokenizer = build_tiny_tokenizer()
    model_dir = work / name
    SHAPES[name](tokenizer).to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    cfg = validate_params({
        "data": {"raw_path": str(ROOT / "data/demo/instructions.jsonl"), "max_seq_len": 256},
        "model": {"name": str(model_dir)},
        "train": {"max_steps": steps, "per_device_batch_size": 8, "gradient_accumulation_steps": 1,
                  "learning_rate": 1e-3, "warmup_steps": 2, "logging_steps": 5, "save_steps": 10_000},
        "evaluate": {"batch_size": 8, "max_new_tokens": 16},
    })
    resolved = resolve_model(cfg.model, work / "cache")
    tokenizer = load_tokenizer(cfg.model, resolved)
    ensure_pad_token(tokenizer)
    prepared = prepare_data(cfg.data, tokenizer, ROOT)
    collator = make_collator(tokenizer, cfg.data.packing, cfg.data.max_seq_len)
    dtype = resolve_compute_dtype(cfg.quantization.compute_dtype)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = load_base_model(cfg.model, cfg.quantization, resolved)
    set_seed(cfg.train.seed)
    model = apply_lora(model, cfg.lora)
    start = time.perf_counter()
    result = train_adapter(model, tokenizer, prepared.train, collator, cfg.train, work / f"{name}-ckpt", dtype)
    train_s = time.perf_counter() - start
    eval_collator = make_collator(tokenizer, False, cfg.data.max_seq_len)
    tuned = eval_loss(model, prepared.eval, eval_collator, cfg.evaluate.batch_size)
    with model.disable_adapter():
        base = eval_loss(model, prepared.eval, eval_collator, cfg.evaluate.batch_size)
    prompts = [r["prompt"] for r in prepared.eval.select(range(4))]
    samples = generate(model, tokenizer, prompts, cfg.evaluate.max_new_tokens, cfg.evaluate.batch_size)
    adapter_dir = work / f"{name}-adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    del model

    _, worst = merge_adapter(
        load_base_model(cfg.model, cfg.quantization, resolved), str(adapter_dir), getattr(torch, cfg.register.merge_dtype),
        [torch.tensor([row["input_ids"]]) for row in prepared.eval.select(range(4))], cfg.register.merge_tolerance,
    )
    losses = [r["loss"] for r in result.history]
    return {
        "shape": name,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "compute_dtype": str(dtype),
        "steps": result.global_step,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "finite": all(math.isfinite(x) for x in losses),
        "train_s": round(train_s, 2),
        "tokens_per_s": round(result.tokens_seen / train_s, 1),
        "peak_gib": round(peak_gib, 2),
        "base_eval_loss": base["eval_loss"],
        "tuned_eval_loss": tuned["eval_loss"],
        "tuned_beats_base": tuned["eval_loss"] < base["eval_loss"],
        "merge_dtype": cfg.register.merge_dtype,
        "merge_max_abs_logit_diff": worst.max_abs_logit_diff,
        "max_abs_logit": worst.max_abs_logit,
        "merge_relative_diff": worst.relative_diff,
        "merge_tolerance": cfg.register.merge_tolerance,
        "merge_within_tolerance": worst.relative_diff <= cfg.register.merge_tolerance,
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="opt-125m,llama-1b")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a 2-layer OPT")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-gpu-check"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shapes = ["tiny-opt"] if args.tiny else args.shapes.split(",")
    results = []
    for name in shapes:
        try:
            results.append(check_shape(name, args.work, 4 if args.tiny else args.steps))
        except Exception as exc:  # one shape failing must not hide the others' results
            results.append({"shape": name, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(results[-1], indent=1), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
