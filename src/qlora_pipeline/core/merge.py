"""Merge a LoRA adapter into a full-precision copy of the base and check the merge alone.

The adapter was trained against the 4-bit base, so it is merged into the dequantized base (the
exact NF4 values the adapter saw), never into the 4-bit weights themselves: re-quantizing W + BA
would throw the update away in rounding.

The check compares like with like, every time: the adapter model (dequantized base + unmerged
adapter) and the merged model, both in float32 on the same device and the same tokens. What is
left is the merge's own error (float32 rounding of W + s*B@A: about 1e-6 of the largest logit),
not the difference between a bf16 and a float32 forward pass, which on a 30-layer model is several
percent and says nothing about the merge. Rounding the merged weights to `merge_dtype` for storage
is checked separately, where they are saved (`check_saved`): the files must reload bit for bit.
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


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def _summary(reference: list[torch.Tensor], other: list[torch.Tensor], tolerance: float) -> MergeCheck:
    diffs = [(a - b).abs() for a, b in zip(reference, other)]
    return MergeCheck(
        max_abs_logit_diff=max(float(d.max()) for d in diffs),
        mean_abs_logit_diff=float(torch.cat([d.flatten() for d in diffs]).mean()),
        max_abs_logit=max(float(a.abs().max()) for a in reference),
        tolerance=tolerance,
        tokens_compared=sum(int(a.shape[0] * a.shape[1]) for a in reference),
    )


def _plain(model):
    """Drop the quantization marks a dequantized model still carries, so it saves as a plain one."""
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    return model


@torch.no_grad()
def merge_adapter(
    quantized_base, adapter_dir: str, dtype: torch.dtype, check_inputs: list[torch.Tensor], tolerance: float
):
    """Fold the adapter into the dequantized base; returns (merged model in `dtype`, MergeCheck).

    check_inputs: token-id tensors of shape [1, seq] (or [batch, seq]) the two models are compared
    on. Memory: a float32 copy of the base (4 bytes per parameter) on the base's device.
    Raises MergeError when the merged model's logits differ from the adapter model's by more than
    `tolerance` of the largest logit (a correct merge is near 1e-6).
    """
    base = _plain(quantized_base.dequantize(dtype=torch.float32)).float()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    reference = [_logits(model, ids) for ids in check_inputs]
    merged = model.merge_and_unload(safe_merge=True).eval()
    check = _summary(reference, [_logits(merged, ids) for ids in check_inputs], tolerance)
    check_merge(check)
    return _plain(merged.to(dtype)), check


def check_merge(check: MergeCheck) -> None:
    """Fail if the merged model drifts from the adapter model beyond the tolerance."""
    if check.relative_diff > check.tolerance:
        raise MergeError(
            f"merged model differs from the adapter model by {check.max_abs_logit_diff:.4g} in logits "
            f"({check.relative_diff:.2%} of the largest logit {check.max_abs_logit:.4g}; register.merge_tolerance "
            f"is {check.tolerance:.2%}), both in float32 on the same tokens: the merge itself is wrong "
            f"(an adapter saved for another base, or a layer type the merge does not handle); check "
            f"model.name and lora.target_modules"
        )


@torch.no_grad()
def check_saved(saved_dir, merged) -> int:
    """Reload the saved merged model with plain transformers; every tensor must equal `merged`'s.

    Returns the number of tensors compared. Raises MergeError naming the first tensor that is
    missing, of another shape (a layer saved in another layout) or of other values.
    """
    from transformers import AutoModelForCausalLM

    expected = merged.state_dict()
    dtype = next(merged.parameters()).dtype
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=dtype, device_map="cpu").state_dict()
    except (OSError, ValueError, RuntimeError) as exc:
        raise MergeError(f"the merged model in {saved_dir} does not load with transformers: {exc}") from None
    for name, tensor in expected.items():
        got = reloaded.get(name)
        if got is None or got.shape != tensor.shape or not torch.equal(got, tensor.cpu()):
            what = "missing" if got is None else (f"shape {list(got.shape)} vs {list(tensor.shape)}" if got.shape != tensor.shape else "other values")
            raise MergeError(f"the saved merged model does not reload as merged: {name} is {what}; nothing was registered")
    return len(expected)
