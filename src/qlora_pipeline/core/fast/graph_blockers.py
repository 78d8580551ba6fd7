"""What keeps CUDA graphs of the decoder stack (core/fast/graphs.py) off for a model: its type, its
attention types and dropout (from the config alone, so `train.cuda_graphs: true` is refused before
the weights load), and in the loaded model any dropout but the fused LoRA layers' seeded one, or
LoRA layers that run peft's own forward."""

from __future__ import annotations

from typing import Any

from torch import nn

from qlora_pipeline.errors import ConfigError


def _stack_container(model: nn.Module) -> nn.ModuleList | None:
    """The ModuleList that holds the decoder layers, or None."""
    from qlora_pipeline.core.fast.memory import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        return None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(layers) and all(a is b for a, b in zip(module, layers)):
            return module
    return None


# Model types whose forward hands every decoder layer the same arguments, looping over
# `self.layers[: num_hidden_layers]` (transformers 5.x): the runner can stand in for that loop.
# Others (OPT loops over `self.layers` itself; Gemma 2/3 give each layer its own mask) keep theirs.
SAME_ARGUMENTS_MODELS = ("llama", "mistral", "gemma", "phi3", "qwen2", "qwen3")


def config_blocker(config: Any) -> str | None:
    """What in a model's config keeps CUDA graphs off (graph_blocker's part that needs no weights),
    or None: a model type whose forward does not hand every layer the same arguments, layers of
    several attention types, attention dropout."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SAME_ARGUMENTS_MODELS:
        return f"the decoder layers of model type {model_type!r} are not run by CUDA graphs here (only {', '.join(SAME_ARGUMENTS_MODELS)})"
    if len(set(getattr(config, "layer_types", None) or [None])) > 1:
        return "this model's layers take different attention masks (config.layer_types)"
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout is on (config.attention_dropout)"
    return None


def refuse_before_loading(setting: bool | str, config: Any) -> None:
    """train.cuda_graphs true for a model whose config already rules the graphs out: refused before
    the weights load (graph_blocker checks the loaded model too).

    Raises:
        ConfigError: setting is true and config_blocker names a reason.
    """
    blocker = config_blocker(config) if setting is True else None
    if blocker:
        raise ConfigError(f"train.cuda_graphs is true but cannot run here: {blocker}; set it to auto or false")


def graph_blocker(model: nn.Module) -> str | None:
    """Why CUDA graphs would not run this model correctly, or None.

    Besides the model type: a captured recompute draws new random numbers from torch's generator,
    so no dropout but the fused LoRA layers' seeded one may be on (the model's own dropout,
    attention dropout, LoRA layers that run peft's forward because they train the base's bias or
    weight, or sit on a base other than a 4-bit or plain linear layer).
    """
    from qlora_pipeline.core.fast.layers import _lora_linears
    from qlora_pipeline.core.fast.memory import unwrap

    blocker = config_blocker(unwrap(model).config)
    if blocker:
        return blocker
    container = _stack_container(model)
    if container is None:
        return "the decoder layers are not one ModuleList"
    lora = [m for layer in container for m in _lora_linears(layer)]
    seeded = {id(d) for m in lora for d in m.lora_dropout.values()}
    for layer in container:
        for module in layer.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and id(module) not in seeded:
                return f"the model's own dropout is on ({type(module).__name__}, p={module.p})"
    for module in lora:
        base = module.base_layer
        active = list(module.active_adapters)
        if len(active) != 1 or any(name in getattr(module, "lora_variant", {}) for name in active) or any(
            module.lora_B[name].bias is not None for name in active if name in module.lora_B
        ):
            return "LoRA layers run several adapters, DoRA or a LoRA bias, which peft's own forward runs"
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return "LoRA layers train the base layer's bias or weight (lora.bias), which peft's own forward runs"
        if getattr(base.weight, "quant_state", None) is None and type(base) is not nn.Linear:
            return f"LoRA layers sit on {type(base).__name__} layers (only 4-bit or plain linear layers take the seeded dropout)"
    return None
