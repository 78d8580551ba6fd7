"""Merging into the dequantized base reproduces the 4-bit adapter model within tolerance."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from qlora_pipeline.core.merge import MergeCheck, check_merge, compare_logits, merge_into_dequantized
from qlora_pipeline.core.model import apply_lora, load_base_model, resolve_model
from qlora_pipeline.errors import MergeError

# Relative to the largest logit: float32 merges are exact up to the 4-bit matmul's own rounding.
MERGE_TOLERANCE = {"float32": 0.01, "bfloat16": 0.02}


@pytest.fixture(scope="module")
def adapter_dir(tiny_cache, tmp_path_factory):
    from qlora_pipeline.config import load_config

    from ..conftest import REPO

    cfg = load_config(REPO / "params.yaml", ["model.name=builtin:tiny-llama"])
    resolved = resolve_model(cfg.model, tiny_cache)
    model = apply_lora(load_base_model(cfg.model, cfg.quantization, resolved), cfg.lora, False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give the adapter a real effect
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out, safe_serialization=True)
    assert (out / "adapter_model.safetensors").is_file()
    return cfg, resolved, out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_model_matches_adapter_model(adapter_dir, dtype):
    cfg, resolved, path = adapter_dir
    adapter_model = PeftModel.from_pretrained(load_base_model(cfg.model, cfg.quantization, resolved), str(path))
    merged = merge_into_dequantized(load_base_model(cfg.model, cfg.quantization, resolved), str(path), getattr(torch, dtype))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.dtype == getattr(torch, dtype) for p in merged.parameters())
    ids = torch.randint(8, 500, (2, 48), generator=torch.Generator().manual_seed(1))
    check = compare_logits(adapter_model, merged, ids, MERGE_TOLERANCE[dtype])
    check_merge(check)
    assert check.relative_diff < MERGE_TOLERANCE[dtype]
    # The adapter changes the model: the check would catch a merge that dropped it.
    with adapter_model.disable_adapter():
        base_logits = adapter_model(input_ids=ids).logits
    assert (base_logits - merged(input_ids=ids).logits.float()).abs().max() > 10 * check.max_abs_logit_diff


def test_drift_over_tolerance_fails():
    with pytest.raises(MergeError, match=r"differs from the adapter model by 0.5 in logits \(25.00% of the largest"):
        check_merge(MergeCheck(0.5, 0.1, 2.0, 0.1, 10))
