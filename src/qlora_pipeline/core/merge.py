"""Merge a LoRA adapter into a full-precision copy of the base and check the merge alone.

The adapter was trained against the quantized base, so it is merged into the dequantized base (the
exact NF4/FP4 or int8 values the adapter saw), never into the quantized weights themselves:
re-quantizing W + BA would throw the update away in rounding. An unquantized base (plain LoRA,
`quantization.load_in_4bit: false`) is merged into as it is, in float32.

Dequantizing restores each layer's own class and layout: bitsandbytes stores a Conv1D layer
(GPT-2's c_attn, c_fc, c_proj, weight [in, out]) transposed as a linear one, and transformers'
`dequantize()` gives it back as nn.Linear [out, in], a model its own architecture cannot load.

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


def _as_conv1d(linear: torch.nn.Linear):
    """The Conv1D layer bitsandbytes loaded as a linear one: the same function, weight [in, out]."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        conv = Conv1D(linear.out_features, linear.in_features)
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else weight.new_zeros(linear.out_features)
    conv.weight = torch.nn.Parameter(weight.t().contiguous(), requires_grad=False)
    conv.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    hook = getattr(linear, "_hf_hook", None)
    if hook is not None:  # an accelerate dispatch hook moves inputs to the layer's device
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(conv, hook)
    return conv


def dequantized_base(model):
    """A float32 copy of the base in its architecture's own layout: dequantized if quantized.

    Quantized layers become the class they were before bitsandbytes replaced them (its
    `source_cls`): nn.Linear, or Conv1D with the weight transposed back.
    """
    if not getattr(model, "is_quantized", False):
        return _plain(model).float()
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    was_conv1d = [
        name for name, module in model.named_modules()
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
        and issubclass(getattr(module, "source_cls", torch.nn.Linear), Conv1D)
    ]
    model = model.dequantize(dtype=torch.float32)
    for name in was_conv1d:
        model.set_submodule(name, _as_conv1d(model.get_submodule(name)))
    return _plain(model).float()


@torch.no_grad()
def merge_adapter(
    base, adapter_dir: str, dtype: torch.dtype, check_inputs: list[torch.Tensor], tolerance: float
):
    """Fold the adapter into the (dequantized) base; returns (merged model in `dtype`, MergeCheck).

    base: as load_base_model returns it, 4-bit, 8-bit or unquantized; it is changed in place.
    check_inputs: token-id tensors of shape [1, seq] (or [batch, seq]) the two models are compared
    on. Memory: a float32 copy of the base (4 bytes per parameter) on the base's device.
    Raises MergeError when the merged model's logits differ from the adapter model's by more than
    `tolerance` of the largest logit (a correct merge is near 1e-6).
    """
    model = PeftModel.from_pretrained(dequantized_base(base), adapter_dir).eval()
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
    """Reload the saved merged model with plain transformers; it must be `merged`, tensor for tensor.

    The architecture named in the saved config.json must have the merged model's layer classes and
    tensor shapes (a layer in another layout, such as a GPT-2 Conv1D saved as nn.Linear, fails
    here), and every reloaded tensor must equal the merged one. Returns the number of tensors
    compared. Raises MergeError naming the first layer or tensor that differs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    expected = merged.state_dict()
    dtype = next(merged.parameters()).dtype
    try:
        config = AutoConfig.from_pretrained(saved_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as exc:
        raise MergeError(f"the merged model in {saved_dir} has no loadable config: {exc}; nothing was registered") from None
    arch = type(skeleton).__name__
    _check_layout(merged, skeleton, arch)
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=dtype, device_map="cpu").state_dict()
    except (OSError, ValueError, RuntimeError) as exc:
        raise MergeError(f"the merged model in {saved_dir} does not load with transformers as {arch}: {exc}") from None
    extra = sorted(set(reloaded) - set(expected))
    if extra:
        raise MergeError(f"the saved merged model reloads with tensors the merged model lacks: {extra[:5]}; nothing was registered")
    for name, tensor in expected.items():
        got = reloaded.get(name)
        if got is None or got.shape != tensor.shape or not torch.equal(got, tensor.cpu()):
            what = "missing" if got is None else (f"shape {list(got.shape)} vs {list(tensor.shape)}" if got.shape != tensor.shape else "other values")
            raise MergeError(f"the saved merged model does not reload as merged: {name} is {what}; nothing was registered")
    return len(expected)


def _check_layout(merged, skeleton, arch: str) -> None:
    """Every tensor of the merged model has the shape, and every linear layer the class, `arch` gives it."""
    from transformers.pytorch_utils import Conv1D

    shapes = {n: t.shape for n, t in skeleton.state_dict().items()}
    for name, tensor in merged.state_dict().items():
        if name in shapes and shapes[name] != tensor.shape:
            raise MergeError(
                f"the merged model is not in {arch}'s layout: {name} is {list(tensor.shape)}, {arch} expects "
                f"{list(shapes[name])}; nothing was registered"
            )
    linear = (torch.nn.Linear, Conv1D)
    own = dict(skeleton.named_modules())
    for name, module in merged.named_modules():  # a square layer stored transposed keeps its shape
        theirs = own.get(name)
        if theirs is not None and type(theirs) is not type(module) and (isinstance(module, linear) or isinstance(theirs, linear)):
            raise MergeError(
                f"the merged model is not in {arch}'s layout: {name} is {type(module).__name__}, {arch} has "
                f"{type(theirs).__name__}; nothing was registered"
            )
