"""Base model and tokenizer loading (4-bit NF4), and LoRA attachment.

Safetensors only: weights in pickle format are refused. `trust_remote_code` stays off unless
the user sets it in params.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from qlora_pipeline.config import LoraConfig, ModelConfig, QuantizationConfig
from qlora_pipeline.core.gguf import ensure_converted, is_gguf
from qlora_pipeline.core.tiny import ensure_tiny_model
from qlora_pipeline.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    "to work offline use model.name: builtin:tiny-llama or a local directory with config.json, "
    "tokenizer files and *.safetensors weights (HF_HUB_OFFLINE=1 uses models already in the HF cache)"
)


@dataclass(frozen=True)
class ResolvedModel:
    """Where the base model's files are and what to record about them."""

    name: str
    path: str  # a local directory, or the hub id itself
    revision: str
    """Hub commit or branch; `sha256:<hex>` of the file for a GGUF; `local` for a folder."""
    is_local: bool


def resolve_compute_dtype(name: str) -> torch.dtype:
    """auto: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on the CPU.

    Most CPUs have no fast bf16 matmul: the tiny model trains about 1.4x faster in float32 there.
    """
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _looks_local(name: str, root: Path) -> bool:
    return name.startswith(("/", "./", "../", "~")) or (root / os.path.expanduser(name)).exists()


def resolve_model(cfg: ModelConfig, cache_dir: str | Path, root: str | Path = ".") -> ResolvedModel:
    """Turn model.name into a loadable path (relative ones from the project root); builds the
    tiny model, or converts a `.gguf` file to a safetensors folder, on first use."""
    if cfg.trust_remote_code:
        warnings.warn(
            f"model.trust_remote_code is true: Python code shipped with {cfg.name} will run on this machine",
            stacklevel=2,
        )
    if cfg.is_builtin:
        path = ensure_tiny_model(Path(cache_dir) / "builtin")
        return ResolvedModel(cfg.name, str(path), "builtin-v1", True)
    root = Path(root)
    if is_gguf(cfg.name):
        path, sha = ensure_converted(root / Path(cfg.name).expanduser(), cache_dir)
        return ResolvedModel(cfg.name, str(path), f"sha256:{sha}", True)
    if _looks_local(cfg.name, root):
        path = root / Path(cfg.name).expanduser()
        if not path.is_dir():
            raise ModelError(f"model.name: local path {cfg.name} ({path}) does not exist; point it at a model directory")
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name: {path} has no config.json; it must be a saved transformers model")
        if not any(path.glob("*.safetensors")):
            pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            extra = f" (found pickle weights {pickled}: convert them to safetensors)" if pickled else ""
            raise ModelError(f"model.name: {path} has no *.safetensors weights{extra}")
        return ResolvedModel(cfg.name, str(path), "local", True)
    return ResolvedModel(cfg.name, cfg.name, cfg.revision, False)


def _hub_error(resolved: ResolvedModel, exc: Exception) -> ModelError:
    return ModelError(
        f"model.name: cannot load {resolved.name!r} (revision {resolved.revision}): the model hub cannot be "
        f"reached or has no such model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); {OFFLINE_HINT}"
    )


def load_tokenizer(cfg: ModelConfig, resolved: ResolvedModel):
    """The base model's tokenizer, right-padded for training."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved.path,
            revision=None if resolved.is_local else resolved.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        if resolved.is_local:
            raise ModelError(f"model.name: cannot load a tokenizer from {resolved.path}: {exc}") from None
        raise _hub_error(resolved, exc) from None
    tokenizer.padding_side = "right"
    return tokenizer


def quant_storage_dtype(cfg: QuantizationConfig, sharded: bool = False) -> torch.dtype:
    """The dtype holding the packed 4-bit weights: quantization.quant_storage, where auto is the
    compute dtype when FSDP shards the model (sharded), uint8 otherwise. The bits are the same either
    way; FSDP can only shard floating tensors, one dtype per layer (bitsandbytes' FSDP-QLoRA notes)."""
    if cfg.quant_storage != "auto":
        return getattr(torch, cfg.quant_storage)
    return resolve_compute_dtype(cfg.compute_dtype) if sharded else torch.uint8


def quantization_config(cfg: QuantizationConfig, sharded: bool = False) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for 4-bit (QLoRA) or 8-bit loading; None loads the base unquantized (plain LoRA).
    sharded: the model will be sharded with FSDP (train.distributed), which sets the 4-bit storage dtype."""
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype)
    if cfg.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=quant_storage_dtype(cfg, sharded),
        )
    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(
    cfg: ModelConfig, quant: QuantizationConfig, resolved: ResolvedModel, vocab_size: int | None = None, sharded: bool = False
) -> PreTrainedModel:
    """Load the base model per `quant` (4-bit NF4 by default; 8-bit; or unquantized: plain LoRA), in eval mode.

    Non-quantized parts (norms, embeddings, head) stay in the compute dtype: no fp32 upcast,
    which would cost memory and speed for no accuracy gain with a bf16 compute dtype.
    sharded: FSDP will shard it (4-bit storage in the compute dtype, quant_storage_dtype); each rank
    still loads the whole 4-bit model onto its GPU first, and FSDP then keeps 1/N of it there.
    """
    compute_dtype = resolve_compute_dtype(quant.compute_dtype)
    kwargs = dict(
        quantization_config=quantization_config(quant, sharded),
        dtype=compute_dtype,
        device_map={"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu",
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        low_cpu_mem_usage=True,
    )
    if not resolved.is_local:
        kwargs["revision"] = resolved.revision
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except OSError as exc:
        if resolved.is_local:
            raise ModelError(f"model.name: cannot load weights from {resolved.path}: {exc}") from None
        raise _hub_error(resolved, exc) from None
    if compute_dtype == torch.float32:
        keep_float32_cpu_matmuls(model)
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size is not None and vocab_size > rows:
        # The vocabulary never grows (no pad token is ever added), so this is a mismatched tokenizer.
        raise ModelError(
            f"model.name: the tokenizer has {vocab_size} tokens but {resolved.name} has only {rows} embedding rows; "
            "the tokenizer and the weights must come from the same model"
        )
    return model


def keep_float32_cpu_matmuls(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers on their float32 matmul on CPUs with AVX512-BF16.

    On such CPUs bitsandbytes (0.50) repacks a 4-bit weight at the first no-grad forward in eval
    mode and multiplies in bf16 from then on: evaluation and the merge check would then depend on the
    machine (0.2% of the logits on the tiny model, more than register.merge_tolerance allows). With
    compute_dtype float32 the matmuls stay float32 everywhere. Returns the layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def base_config(cfg: ModelConfig, resolved: ResolvedModel):
    """The base model's transformers config (config.json only, no weights)."""
    from transformers import AutoConfig

    kwargs = {} if resolved.is_local else {"revision": resolved.revision}
    try:
        return AutoConfig.from_pretrained(resolved.path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except OSError as exc:
        if resolved.is_local:
            raise ModelError(f"model.name: cannot read config.json from {resolved.path}: {exc}") from None
        raise _hub_error(resolved, exc) from None


def base_model_revision(model: PreTrainedModel, resolved: ResolvedModel) -> str:
    """The exact hub commit when known (lineage), else the configured revision."""
    return getattr(model.config, "_commit_hash", None) or resolved.revision


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the layers LoRA can target, without the output head.

    nn.Linear (bitsandbytes' Linear4bit and Linear8bitLt are subclasses) and transformers' Conv1D
    (GPT-2's c_attn, c_fc, c_proj: a linear layer stored as [in, out]), the same set peft's
    all-linear picks; unquantized they stay Conv1D, quantized bitsandbytes has replaced them.
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head
    }
    names.discard("lm_head")
    return sorted(names)


def apply_lora(model: PreTrainedModel, cfg: LoraConfig):
    """Wrap the quantized model with trainable LoRA adapters; the base stays frozen.

    Which decoder layers recompute in the backward (gradient checkpointing) is decided in one
    place, the fast path's memory plan (core/fast/memory.py, `set_checkpointed_layers`), which
    `train_adapter` applies from `train.gradient_checkpointing`.

    Raises:
        ConfigError: a name in `lora.target_modules` matches no linear layer of the model.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    available = linear_module_names(model)
    if isinstance(cfg.target_modules, list):
        missing = [m for m in cfg.target_modules if m not in available]
        if missing:
            raise ConfigError(
                f"lora.target_modules: {missing} match no linear layer of this model; "
                f"available: {available} (or use all-linear)"
            )
    for param in model.parameters():
        param.requires_grad_(False)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)
