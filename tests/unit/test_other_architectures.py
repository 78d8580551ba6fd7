"""The default hub model is OPT (biases, tied embeddings, fc1/fc2): the same 4-bit LoRA train,
merge and merge check work on a small random OPT saved as a local directory."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import OPTConfig, OPTForCausalLM

from qlora_pipeline.config import load_config
from qlora_pipeline.core.data import ensure_pad_token, make_collator
from qlora_pipeline.core.merge import check_saved, merge_adapter
from qlora_pipeline.core.model import apply_lora, linear_module_names, load_base_model, load_tokenizer, resolve_model
from qlora_pipeline.core.tiny import build_tiny_tokenizer
from qlora_pipeline.core.train import train_adapter

from ..conftest import REPO


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("opt-small")
    OPTForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_opt_trains_and_merges_within_tolerance(opt_dir, tmp_path):
    cfg = load_config(
        REPO / "params.yaml",
        [f"model.name={opt_dir}", "train.max_steps=6", "train.learning_rate=0.01", "train.logging_steps=1",
         "train.per_device_batch_size=4", "train.gradient_accumulation_steps=1", "train.warmup_steps=0"],
    )
    resolved = resolve_model(cfg.model, tmp_path / "cache")
    assert resolved.is_local
    tokenizer = load_tokenizer(cfg.model, resolved)
    ensure_pad_token(tokenizer)
    model = load_base_model(cfg.model, cfg.quantization, resolved)
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"} <= set(linear_module_names(model))
    model = apply_lora(model, cfg.lora, gradient_checkpointing=False)
    ids = [tokenizer(f"Sample {i}: the quick brown fox.").input_ids + [tokenizer.eos_token_id] for i in range(16)]
    result = train_adapter(
        model, tokenizer, Dataset.from_dict({"input_ids": ids, "labels": ids}), make_collator(tokenizer, False, 64),
        cfg.train, tmp_path / "ckpt", torch.float32,
    )
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    model.save_pretrained(tmp_path / "adapter", safe_serialization=True)

    adapter_model = PeftModel.from_pretrained(load_base_model(cfg.model, cfg.quantization, resolved), str(tmp_path / "adapter"))
    batch = torch.tensor([ids[0]])
    merged, check = merge_adapter(
        load_base_model(cfg.model, cfg.quantization, resolved), str(tmp_path / "adapter"), torch.bfloat16, [batch], tolerance=1e-4
    )
    assert check.relative_diff < 1e-4
    merged.save_pretrained(tmp_path / "merged", safe_serialization=True)
    assert check_saved(tmp_path / "merged", merged) > 0
    with torch.no_grad():  # the bf16 merge against the 4-bit model it came from: close, not equal
        drift = (adapter_model(input_ids=batch).logits - merged.float()(input_ids=batch).logits).abs().max()
    assert drift < 0.05 * adapter_model(input_ids=batch).logits.abs().max()
