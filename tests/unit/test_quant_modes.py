"""Every quantization setting params.yaml allows works end to end on a CPU: 4-bit NF4 and FP4 with
and without double quantization, 8-bit (LLM.int8), and none (plain LoRA). Each one trains an
adapter, merges it into the (dequantized) base, saves, reloads the saved files with plain
transformers, and the reloaded model gives the adapter model's logits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM

from qlora_pipeline.config import load_config
from qlora_pipeline.core.data.collate import make_collator
from qlora_pipeline.core.data.tokens import ensure_pad_token
from qlora_pipeline.core.merge import check_saved, dequantized_base, merge_adapter
from qlora_pipeline.core.model import (
    apply_lora,
    load_base_model,
    load_tokenizer,
    quantization_config,
    resolve_compute_dtype,
    resolve_model,
)
from qlora_pipeline.core.train import train_adapter

from ..conftest import DEFAULT_PARAMS, REPO

MODES = {
    "nf4-double": [],
    "nf4": ["quantization.double_quant=false"],
    "fp4-double": ["quantization.quant_type=fp4"],
    "fp4": ["quantization.quant_type=fp4", "quantization.double_quant=false"],
    "8bit": ["quantization.load_in_4bit=false", "quantization.load_in_8bit=true"],
    "none": ["quantization.load_in_4bit=false"],
}
TRAIN = [
    "train.max_steps=3", "train.learning_rate=0.01", "train.logging_steps=1", "train.per_device_batch_size=4",
    "train.gradient_accumulation_steps=1", "train.warmup_steps=0", "train.save_steps=100",
]


def make_cfg(model_name: str, *overrides: str):
    return load_config(DEFAULT_PARAMS, [f"model.name={model_name}", *TRAIN, *overrides])


@dataclass
class Run:
    base: torch.nn.Module
    """A fresh base as load_base_model returns it (quantized per the config)."""
    adapter_model: PeftModel
    """That base with the trained adapter, unmerged: what evaluate scores."""
    merged: torch.nn.Module
    reloaded: torch.nn.Module
    """The saved merged model, loaded back with plain transformers."""
    adapter_dir: Path
    check_relative_diff: float
    losses: list[float]
    ids: torch.Tensor


def train_merge_reload(cfg, cache: Path, out: Path, merge_dtype: torch.dtype = torch.float32) -> Run:
    """train (a few steps) -> merge_adapter -> save -> check_saved -> reload, as the stages do."""
    resolved = resolve_model(cfg.model, cache)
    tokenizer = load_tokenizer(cfg.model, resolved)
    ensure_pad_token(tokenizer)
    model = apply_lora(load_base_model(cfg.model, cfg.quantization, resolved), cfg.lora)
    rows = [tokenizer(f"Sample {i}: the quick brown fox.").input_ids + [tokenizer.eos_token_id] for i in range(12)]
    result = train_adapter(
        model, tokenizer, Dataset.from_dict({"input_ids": rows, "labels": rows}), make_collator(tokenizer, False, 64),
        cfg.train, out / "ckpt", resolve_compute_dtype(cfg.quantization.compute_dtype),
    )
    model.save_pretrained(out / "adapter", safe_serialization=True)

    ids = torch.tensor([rows[0], rows[5]])
    merged, check = merge_adapter(
        load_base_model(cfg.model, cfg.quantization, resolved), str(out / "adapter"), merge_dtype, [ids], 1e-4
    )
    merged.save_pretrained(out / "merged", safe_serialization=True)
    assert check_saved(out / "merged", merged) == len(merged.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=merge_dtype, device_map="cpu").eval()
    base = load_base_model(cfg.model, cfg.quantization, resolved)
    adapter_model = PeftModel.from_pretrained(load_base_model(cfg.model, cfg.quantization, resolved), str(out / "adapter")).eval()
    losses = [r["loss"] for r in result.history]
    return Run(base, adapter_model, merged, reloaded, out / "adapter", check.relative_diff, losses, ids)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A base layer's weight as [out, in] float32, dequantized by bitsandbytes where quantized."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB).float()
    return weight.float()


@pytest.mark.parametrize("mode", MODES)
def test_every_allowed_mode_validates(mode):
    quant = make_cfg("builtin:tiny-llama", *MODES[mode]).quantization
    bnb_cfg = quantization_config(quant)
    if mode == "none":
        assert bnb_cfg is None
    elif mode == "8bit":
        assert bnb_cfg.load_in_8bit and not bnb_cfg.load_in_4bit
    else:
        assert bnb_cfg.load_in_4bit and bnb_cfg.bnb_4bit_quant_type == mode.split("-")[0]
        assert bnb_cfg.bnb_4bit_use_double_quant == mode.endswith("-double")


@pytest.mark.parametrize("mode", MODES)
def test_train_merge_save_reload_in_every_mode(mode, tiny_cache, tmp_path):
    cfg = make_cfg("builtin:tiny-llama", *MODES[mode])
    run = train_merge_reload(cfg, tiny_cache, tmp_path)

    q_proj = run.base.model.layers[0].self_attn.q_proj
    kind = {"8bit": bnb.nn.Linear8bitLt, "none": torch.nn.Linear}.get(mode, bnb.nn.Linear4bit)
    assert type(q_proj) is kind  # the base really is loaded the way the mode says
    if kind is bnb.nn.Linear4bit:
        assert q_proj.weight.quant_state.quant_type == cfg.quantization.quant_type
        assert bool(q_proj.weight.quant_state.nested) == cfg.quantization.double_quant
    assert len(run.losses) == 3 and all(math.isfinite(x) for x in run.losses) and run.losses[-1] < run.losses[0]

    # The merge itself: float32 against float32, only rounding left.
    assert run.check_relative_diff < 1e-5
    # The saved files are the model's own architecture, in its own layout, and reload as merged.
    assert type(run.reloaded) is type(run.base) and not getattr(run.reloaded.config, "quantization_config", None)
    assert {n: t.shape for n, t in run.reloaded.state_dict().items()} == {n: t.shape for n, t in run.merged.state_dict().items()}
    assert torch.equal(logits(run.reloaded, run.ids), logits(run.merged, run.ids))

    # One layer by hand: the reloaded weight is (dequantized) base + scale * B @ A.
    lora_layer = run.adapter_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = lora_layer.scaling["default"] * lora_layer.lora_B["default"].weight.float() @ lora_layer.lora_A["default"].weight.float()
    assert delta.abs().max() > 1e-3  # training moved the adapter
    expected = dequantized_weight(lora_layer.base_layer) + delta
    torch.testing.assert_close(run.reloaded.model.layers[0].self_attn.q_proj.weight, expected, rtol=1e-5, atol=1e-6)

    # The reloaded model gives the adapter model's logits, and not the base's.
    tuned, reloaded = logits(run.adapter_model, run.ids), logits(run.reloaded, run.ids)
    with run.adapter_model.disable_adapter():
        untuned = logits(run.adapter_model, run.ids)
    if mode == "8bit":
        # LLM.int8 also rounds the activations to int8 in every matmul (about 1% of the largest
        # logit); on the same int8 weights dequantized, the adapter model agrees with the merge.
        assert relative(reloaded, tuned) < 0.03
        tuned = logits(PeftModel.from_pretrained(dequantized_base(run.base), str(run.adapter_dir)), run.ids)
    assert relative(reloaded, tuned) < 1e-5
    assert relative(reloaded, untuned) > 0.1  # the adapter changed the model (by about 1x the largest logit)
