"""Merge a LoRA adapter into a full-precision copy of the base and check it reproduces the adapter.

The adapter was trained against the 4-bit base, so it is merged into the dequantized base
(the exact weights the adapter saw, in bf16 by default), never into the 4-bit weights
themselves: re-quantizing W + BA would throw the update away in rounding. The merged model
is then compared logit by logit with the adapter model, every time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel

from qlora_pipeline.errors import MergeError


@dataclass(frozen=True)
class MergeCheck:
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    max_abs_logit: float
    tolerance: float
    """Allowed max |logit difference| as a fraction of the largest |logit| of the adapter model."""
    tokens_compared: int

    @property
    def relative_diff(self) -> float:
        return self.max_abs_logit_diff / max(self.max_abs_logit, 1e-6)


def merge_into_dequantized(quantized_base, adapter_dir: str, dtype: torch.dtype):
    """Dequantize the 4-bit base to `dtype`, load the adapter on it and fold it in."""
    base = quantized_base.dequantize(dtype=dtype)
    base = base.to(dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(safe_merge=True)
    merged.config.quantization_config = None
    if hasattr(merged, "hf_quantizer"):
        merged.hf_quantizer = None
    merged.is_quantized = False
    return merged.eval()


@torch.no_grad()
def compare_logits(adapter_model, merged_model, input_ids: torch.Tensor, tolerance: float) -> MergeCheck:
    """|logit difference| between the adapter model and the merged model on the same tokens.

    Relative to the largest logit, because rounding the merged weights to bf16 moves each logit
    in proportion to its size: one tolerance then fits a random tiny model and a real 8B alike.
    """
    adapter_model.eval()
    merged_model.eval()
    device_a = next(adapter_model.parameters()).device
    device_m = next(merged_model.parameters()).device
    a = adapter_model(input_ids=input_ids.to(device_a)).logits.float().cpu()
    m = merged_model(input_ids=input_ids.to(device_m)).logits.float().cpu()
    diff = (a - m).abs()
    return MergeCheck(float(diff.max()), float(diff.mean()), float(a.abs().max()), tolerance, int(input_ids.numel()))


def worst_of(checks: list[MergeCheck]) -> MergeCheck:
    return max(checks, key=lambda c: c.relative_diff)


def check_merge(check: MergeCheck) -> None:
    """Fail if the merged model drifts from the adapter model beyond the tolerance."""
    if check.relative_diff > check.tolerance:
        raise MergeError(
            f"merged model differs from the adapter model by {check.max_abs_logit_diff:.4g} in logits "
            f"({check.relative_diff:.2%} of the largest logit {check.max_abs_logit:.4g}; register.merge_tolerance "
            f"is {check.tolerance:.2%}); use register.merge_dtype: float32 for an exact merge, or raise the "
            f"tolerance if this drift is acceptable"
        )
