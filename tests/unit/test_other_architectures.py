"""Beyond the built-in Llama: GPT-2 (Conv1D layers, tied head), OPT (the default hub model: biases,
tied embeddings, fc1/fc2), Llama and Qwen2 (q/k/v biases). Small random models saved as local
directories train, merge, and save in their own architecture's layout, 4-bit and unquantized."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.pytorch_utils import Conv1D

from qlora_pipeline.core.model import apply_lora, linear_module_names, load_base_model, resolve_model
from qlora_pipeline.core.tiny import build_tiny_model, build_tiny_tokenizer

from .test_quant_modes import MODES, logits, make_cfg, relative, train_merge_reload


def _gpt2(tokenizer):
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def _opt(tokenizer):
    return OPTForCausalLM(OPTConfig(
        vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))


def _qwen2(tokenizer):
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


ARCHITECTURES = {"gpt2": _gpt2, "opt": _opt, "llama": build_tiny_model, "qwen2": _qwen2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """model_dir(arch): a random tiny model of that architecture saved with safetensors, built once."""
    built = {}

    def make(arch: str):
        if arch not in built:
            tokenizer = build_tiny_tokenizer()
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(arch)
            ARCHITECTURES[arch](tokenizer).save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
            built[arch] = path
        return built[arch]

    return make


@pytest.mark.parametrize("mode", ["nf4-double", "none"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_train_merge_and_reload_in_the_architectures_own_layout(arch, mode, model_dir, tmp_path):
    path = model_dir(arch)
    run = train_merge_reload(make_cfg(str(path), *MODES[mode]), tmp_path / "cache", tmp_path)
    assert run.losses[-1] < run.losses[0]
    assert run.check_relative_diff < 1e-5

    # The saved files have the architecture's own classes and shapes: the base as it was saved.
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    assert type(run.reloaded) is type(original)
    assert {n: t.shape for n, t in run.reloaded.state_dict().items()} == {n: t.shape for n, t in original.state_dict().items()}
    own = dict(original.named_modules())
    assert {n: type(m) for n, m in run.reloaded.named_modules()} == {n: type(own[n]) for n, _ in run.reloaded.named_modules()}
    if arch == "gpt2":  # Conv1D stores [in, out]: c_attn 64 -> 3 * 64, c_fc 64 -> 4 * 64, mlp.c_proj back
        block = run.reloaded.transformer.h[0]
        assert type(block.attn.c_attn) is Conv1D and block.attn.c_attn.weight.shape == (64, 192)
        assert block.mlp.c_fc.weight.shape == (64, 256) and block.mlp.c_proj.weight.shape == (256, 64)

    # Reloaded from disk it is the merged model, and gives the adapter model's logits.
    tuned, reloaded = logits(run.adapter_model, run.ids), logits(run.reloaded, run.ids)
    assert torch.equal(reloaded, logits(run.merged, run.ids))
    assert relative(reloaded, tuned) < 1e-5
    with run.adapter_model.disable_adapter():
        assert relative(reloaded, logits(run.adapter_model, run.ids)) > 0.01  # the adapter did change it


@pytest.mark.parametrize("mode", ["nf4-double", "8bit", "none"])
def test_gpt2_conv1d_layers_are_lora_targets(mode, model_dir, tmp_path):
    cfg = make_cfg(str(model_dir("gpt2")), *MODES[mode], "lora.target_modules=[c_attn]")
    model = load_base_model(cfg.model, cfg.quantization, resolve_model(cfg.model, tmp_path))
    assert linear_module_names(model) == ["c_attn", "c_fc", "c_proj"]  # the tied head is not one
    peft_model = apply_lora(model, cfg.lora)
    adapted = sorted(n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert adapted == [f"base_model.model.transformer.h.{i}.attn.c_attn" for i in range(2)]
