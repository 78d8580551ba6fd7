"""Training on the real 4-bit tiny model: loss logged and finite, LoRA moved, base did not."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch
from datasets import Dataset

from qlora_pipeline.core.data.collate import make_collator
from qlora_pipeline.core.model import apply_lora, resolve_compute_dtype
from qlora_pipeline.core.train import latest_checkpoint, train_adapter
from qlora_pipeline.errors import ConfigError


def tiny_dataset(tokenizer, rows: int = 32) -> Dataset:
    texts = [f"Item {i}: the quick brown fox jumps over the lazy dog {i % 7} times." for i in range(rows)]
    ids = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "source": [f"mem:{i}" for i in range(rows)]})


def test_base_loads_as_real_4bit_nf4(tiny_model):
    _, _, model = tiny_model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of 2 layers
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization


def test_training_moves_lora_not_base(tiny_model, tmp_path):
    cfg, tokenizer, model = tiny_model
    model = apply_lora(model, cfg.lora)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    quant_before = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora_before and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    result = train_adapter(
        model, tokenizer, tiny_dataset(tokenizer), make_collator(tokenizer, False, 64), cfg.train,
        tmp_path / "ckpt", resolve_compute_dtype(cfg.quantization.compute_dtype),
    )

    losses = [row["loss"] for row in result.history]
    assert len(losses) == cfg.train.max_steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert all("tokens_per_second" in row for row in result.history[1:])
    assert all("grad_norm" in row and "learning_rate" in row for row in result.history)
    lora_after = dict(model.named_parameters())
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before)
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(base_before[n], p), n
    for n, m in model.named_modules():
        if n in quant_before:
            assert torch.equal(quant_before[n], m.weight.data), n


def test_resume_continues_from_last_checkpoint(tiny_model, tmp_path, tiny_cfg):
    cfg = tiny_cfg("train.save_steps=4", "train.max_steps=4")
    _, tokenizer, model = tiny_model
    model = apply_lora(model, cfg.lora)
    data, collator = tiny_dataset(tokenizer), make_collator(tokenizer, False, 64)
    dtype = resolve_compute_dtype(cfg.quantization.compute_dtype)
    first = train_adapter(model, tokenizer, data, collator, cfg.train, tmp_path, dtype)
    assert first.global_step == 4 and latest_checkpoint(tmp_path).endswith("checkpoint-4")
    longer = tiny_cfg("train.save_steps=4", "train.max_steps=6").train
    second = train_adapter(model, tokenizer, data, collator, longer, tmp_path, dtype)
    assert second.resumed_from.endswith("checkpoint-4")
    # The restored history up to the checkpoint plus the steps run since: no gap, no duplicate.
    assert [row["step"] for row in second.history] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in second.history[:4]] == [r["loss"] for r in first.history]


def test_target_modules_that_match_nothing_fail_clearly(tiny_model, tiny_cfg):
    cfg = tiny_cfg("lora.target_modules=[c_attn]")
    _, _, model = tiny_model
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['c_attn'\] match no linear layer.*q_proj"):
        apply_lora(model, cfg.lora)


def test_4bit_weights_stored_in_the_compute_dtype_train_the_same(tiny_cache, tiny_cfg, tmp_path):
    """FSDP shards the 4-bit weights only stored as floats (train.distributed fsdp loads them so):
    the bits and so the training are the same as with uint8 storage."""
    from qlora_pipeline.core.data.tokens import ensure_pad_token
    from qlora_pipeline.core.model import load_base_model, load_tokenizer, resolve_model
    from qlora_pipeline.core.train import gather_trainable
    from transformers import set_seed

    cfg = tiny_cfg("train.max_steps=4")
    resolved = resolve_model(cfg.model, tiny_cache)
    tokenizer = load_tokenizer(cfg.model, resolved)
    ensure_pad_token(tokenizer)
    dtype = resolve_compute_dtype(cfg.quantization.compute_dtype)
    runs = {}
    for sharded in (False, True):
        model = load_base_model(cfg.model, cfg.quantization, resolved, vocab_size=len(tokenizer), sharded=sharded)
        storage = {m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert storage == ({dtype} if sharded else {torch.uint8})
        set_seed(cfg.train.seed)
        model = apply_lora(model, cfg.lora)
        result = train_adapter(
            model, tokenizer, tiny_dataset(tokenizer), make_collator(tokenizer, False, 64), cfg.train,
            tmp_path / f"ckpt-{sharded}", dtype,
        )
        runs[sharded] = ([row["loss"] for row in result.history], gather_trainable(model))
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].keys() == runs[False][1].keys() and all(
        torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[False][1]
    )
