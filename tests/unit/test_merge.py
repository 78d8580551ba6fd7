"""Merging into the dequantized base reproduces the adapter model; the saved files reload exactly."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from qlora_pipeline.core.merge import MergeCheck, check_merge, check_saved, dequantized_base, merge_adapter
from qlora_pipeline.core.model import apply_lora, load_base_model, resolve_model
from qlora_pipeline.errors import MergeError


@pytest.fixture(scope="module")
def adapter_dir(tiny_cache, tmp_path_factory):
    from qlora_pipeline.config import load_config

    from ..conftest import DEFAULT_PARAMS

    cfg = load_config(DEFAULT_PARAMS, ["model.name=builtin:tiny-llama"])
    resolved = resolve_model(cfg.model, tiny_cache)
    model = apply_lora(load_base_model(cfg.model, cfg.quantization, resolved), cfg.lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give the adapter a real effect
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out, safe_serialization=True)
    assert (out / "adapter_model.safetensors").is_file()
    return cfg, resolved, out


def _ids(n: int = 2, seq: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(8, 500, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_check_measures_the_merge_alone(adapter_dir, dtype, tmp_path):
    cfg, resolved, path = adapter_dir
    ids = _ids()
    merged, check = merge_adapter(load_base_model(cfg.model, cfg.quantization, resolved), str(path), getattr(torch, dtype), [ids], 1e-4)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.dtype == getattr(torch, dtype) for p in merged.parameters())
    # float32 against float32: only the merge's own rounding is left, whatever dtype is stored.
    assert check.relative_diff < 1e-5 and check.tokens_compared == ids.numel()
    merged.save_pretrained(tmp_path, safe_serialization=True)
    assert check_saved(tmp_path, merged) == len(merged.state_dict())
    # The adapter changes the model: a merge that dropped it would be far outside the tolerance.
    adapter_model = PeftModel.from_pretrained(load_base_model(cfg.model, cfg.quantization, resolved), str(path))
    with torch.no_grad(), adapter_model.disable_adapter():
        base_logits = adapter_model(input_ids=ids).logits
    assert (base_logits - merged.float()(input_ids=ids).logits).abs().max() > 1000 * check.max_abs_logit_diff


def test_saved_files_that_do_not_reload_as_merged_fail(adapter_dir, tmp_path):
    cfg, resolved, path = adapter_dir
    merged, _ = merge_adapter(load_base_model(cfg.model, cfg.quantization, resolved), str(path), torch.float32, [_ids()], 1e-4)
    merged.save_pretrained(tmp_path, safe_serialization=True)
    with torch.no_grad():
        next(p for n, p in merged.named_parameters() if n.endswith("q_proj.weight")).add_(0.01)
    with pytest.raises(MergeError, match="does not reload as merged: .*q_proj.weight is other values"):
        check_saved(tmp_path, merged)


def test_drift_over_tolerance_fails():
    with pytest.raises(MergeError, match=r"differs from the adapter model by 0.5 in logits \(25.00% of the largest.*float32"):
        check_merge(MergeCheck(0.5, 0.1, 2.0, 0.1, 10))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from qlora_pipeline.core.tiny import build_tiny_tokenizer

    from .test_other_architectures import ARCHITECTURES

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    ARCHITECTURES["gpt2"](tokenizer).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _gpt2_base(gpt2_dir, mode: str):
    from .test_quant_modes import MODES, make_cfg

    cfg = make_cfg(str(gpt2_dir), *MODES[mode])
    return load_base_model(cfg.model, cfg.quantization, resolve_model(cfg.model, gpt2_dir))


@pytest.mark.parametrize("mode", ["nf4-double", "fp4", "8bit"])
def test_dequantized_gpt2_gets_its_conv1d_layers_back(gpt2_dir, mode):
    from transformers.pytorch_utils import Conv1D

    from .test_quant_modes import dequantized_weight

    quantized = _gpt2_base(gpt2_dir, mode)
    names = [n for n, m in quantized.named_modules() if n.rsplit(".", 1)[-1] in ("c_attn", "c_fc", "c_proj")]
    assert len(names) == 2 * 4
    # bitsandbytes holds each Conv1D as a linear layer, weight [out, in]; dequantized it is Conv1D [in, out].
    expected = {n: dequantized_weight(quantized.get_submodule(n)).t() for n in names}
    biases = {n: quantized.get_submodule(n).bias.detach().float().clone() for n in names}
    ids = _ids(1, 16)
    quantized_logits = quantized(input_ids=ids).logits.detach() if mode != "8bit" else None
    base = dequantized_base(quantized)
    for n in names:
        layer = base.get_submodule(n)
        assert type(layer) is Conv1D and layer.weight.dtype == torch.float32
        assert torch.equal(layer.weight, expected[n]) and torch.equal(layer.bias, biases[n]), n
    if quantized_logits is not None:  # a float32 4-bit forward runs on exactly these weights
        with torch.no_grad():
            torch.testing.assert_close(base(input_ids=ids).logits, quantized_logits, rtol=1e-5, atol=1e-5)


def test_saved_in_another_layout_fails(gpt2_dir, tmp_path):
    """transformers' own dequantize() gives GPT-2's Conv1D layers back as nn.Linear [out, in]."""
    from qlora_pipeline.core.merge import _plain

    wrong = _plain(_gpt2_base(gpt2_dir, "nf4-double").dequantize(dtype=torch.float32))
    wrong.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(MergeError, match=r"not in GPT2LMHeadModel's layout: transformer.h.0.attn.c_attn.weight is \[192, 64\], GPT2LMHeadModel expects \[64, 192\]"):
        check_saved(tmp_path, wrong)


def test_square_layer_in_another_layout_fails(gpt2_dir, tmp_path):
    """attn.c_proj is 64 x 64: stored as nn.Linear its shape matches, only its class tells."""
    base = dequantized_base(_gpt2_base(gpt2_dir, "none"))
    conv = base.transformer.h[1].attn.c_proj
    linear = torch.nn.Linear(64, 64)
    linear.weight.data, linear.bias.data = conv.weight.data.t().contiguous(), conv.bias.data.clone()
    base.transformer.h[1].attn.c_proj = linear
    base.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(MergeError, match="not in GPT2LMHeadModel's layout: transformer.h.1.attn.c_proj is Linear, GPT2LMHeadModel has Conv1D"):
        check_saved(tmp_path, base)


def test_float32_4bit_matmuls_stay_float32_on_any_cpu(adapter_dir):
    """On CPUs with AVX512-BF16, bitsandbytes would repack 4-bit weights at the first eval forward
    and multiply in bf16, so evaluation and the merge check would differ by machine."""
    cfg, resolved, _ = adapter_dir
    model = load_base_model(cfg.model, cfg.quantization, resolved).eval()
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    with torch.no_grad():
        model(input_ids=_ids())
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
