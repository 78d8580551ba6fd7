"""params.yaml -> one typed, validated config.

Every stage loads the config through `load_config`, so an unknown key, a wrong type or a value
out of range fails before any work starts, naming the key and what is allowed.

    from qlora_pipeline.config import load_config
    cfg = load_config("params.yaml", overrides=["train.learning_rate=1e-4"])
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_serializer, field_validator, model_validator

from qlora_pipeline.columns import columns_per_file, glob_refusal, normalize_columns
from qlora_pipeline.config_train import Section as _Section
from qlora_pipeline.config_train import TrainConfig
from qlora_pipeline.errors import ConfigError
from qlora_pipeline.overrides import apply_overrides

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("builtin:tiny-llama",)


class DataConfig(_Section):
    raw_path: str = "data/raw"
    """A file or a folder (read recursively) under the repo, or an absolute path; dvc.yaml makes
    it the prepare stage's dependency (`${data.raw_path}`), so it cannot be a glob."""
    format: Literal["auto", "text", "instruction", "chat", "sharegpt"] = "auto"
    columns: dict[str, Any] = Field(default_factory=dict)
    """Map our field names to yours: {instruction: question, output: answer} for every file, or per
    file {"extra/*.jsonl": {instruction: question}} (first matching glob wins). Also accepted: the
    same mapping as a YAML string (for `-S`), or a list of {path, columns}."""
    chat_template: str | None = None
    """A Jinja chat template; None uses the tokenizer's own (or a default for the tiny model)."""
    max_seq_len: int = Field(512, ge=8, le=131072)
    truncation: Literal["truncate", "drop"] = "truncate"
    train_on_prompt: bool = False
    """False: loss on completions only where the format has a prompt."""
    packing: bool = False
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    min_eval_rows: int = Field(1, ge=1)
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    dedupe: bool = True
    seed: int = 42
    text_unit: Literal["paragraph", "file"] = "paragraph"
    """How .txt files split into documents: paragraph (blank-line separated) or the whole file."""

    @field_validator("raw_path")
    @classmethod
    def _trackable_path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a file or a folder, e.g. data/raw")
        refusal = glob_refusal(v)
        if refusal:
            raise ValueError(refusal)
        return v

    @field_validator("columns", mode="before")
    @classmethod
    def _column_mapping(cls, v: Any) -> dict[str, Any]:
        return normalize_columns(v)

    @field_serializer("columns")
    def _columns_out(self, v: dict[str, Any]) -> dict[str, str] | list[dict[str, Any]]:
        # Globs hold characters MLflow refuses in param names, so the per-file form is written as a
        # list (logged as one JSON param) rather than nested keys.
        if columns_per_file(v):
            return [{"path": pattern, "columns": dict(mapping)} for pattern, mapping in v.items()]
        return dict(v)


class ModelConfig(_Section):
    name: str = "facebook/opt-125m"
    """A hub id, a local directory, or builtin:tiny-llama (offline, random weights)."""
    revision: str = "main"
    trust_remote_code: bool = False
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"

    @property
    def is_builtin(self) -> bool:
        return self.name.startswith(BUILTIN_PREFIX)

    @field_validator("name")
    @classmethod
    def _known_builtin(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a hub id, a local directory or builtin:tiny-llama")
        if v.startswith(BUILTIN_PREFIX) and v not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {v!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
        return v


class QuantizationConfig(_Section):
    """How the frozen base is held while the adapter trains; each mode runs train -> merge end to end.

    4-bit (QLoRA, the default), 8-bit (bitsandbytes LLM.int8), or neither (plain LoRA on the
    unquantized base in compute_dtype). The merge always goes into a float32 copy of the base as
    the adapter saw it: dequantized where quantized.
    """

    load_in_4bit: bool = True
    load_in_8bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit only."""
    double_quant: bool = True
    """4-bit only: quantize the quantization constants too (about 0.37 bits per weight less)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """auto: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on the CPU."""
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    """4-bit only: the dtype the packed 4-bit weights are stored as (the bits are the same). FSDP
    shards only floating tensors of one dtype per layer, so it needs the compute dtype here.
    auto: the compute dtype when training with train.distributed fsdp, uint8 otherwise."""

    @model_validator(mode="after")
    def _one_mode(self) -> "QuantizationConfig":
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError(
                "load_in_4bit and load_in_8bit are both true; set at most one "
                "(QLoRA uses quantization.load_in_4bit: true; both false trains plain LoRA on the unquantized base)"
            )
        return self


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    """'all-linear' or a list of module-name suffixes, e.g. [q_proj, v_proj]."""
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and (not v or not all(isinstance(m, str) and m for m in v)):
            raise ValueError("must be 'all-linear' or a non-empty list of module names, e.g. [q_proj, v_proj]")
        if isinstance(v, str) and v != "all-linear":
            raise ValueError("a string must be 'all-linear'; list module names as [q_proj, v_proj]")
        return v


class EvaluateConfig(_Section):
    batch_size: int = Field(8, ge=1)
    max_eval_rows: int = Field(0, ge=0)
    """0: all eval rows."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    num_samples: int = Field(8, ge=0)
    """Eval rows with a prompt that also get generations in the samples table."""
    prompts: list[str] = Field(default_factory=list)
    """Extra free-form prompts generated from both base and tuned models."""


def registered_name(model_name: str) -> str:
    """The registry name `register.model_name: auto` stands for: `qlora-` + the base model's file or
    repo name, lower-cased, e.g. facebook/opt-125m -> qlora-opt-125m, builtin:tiny-llama ->
    qlora-tiny-llama, base_models/SmolLM2-135M-Instruct.Q4_1.gguf -> qlora-smollm2-135m-instruct-q4_1.
    A test model therefore never lands under a real model's name."""
    base = model_name.removeprefix(BUILTIN_PREFIX).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    base = base.removesuffix(".gguf")
    return "qlora-" + (re.sub(r"[^a-z0-9_-]+", "-", base.lower()).strip("-") or "model")


class RegisterConfig(_Section):
    model_name: str = Field("auto", min_length=1)
    """The registered model's name; auto: registered_name(model.name)."""
    metric: Literal["eval_loss", "perplexity", "exact_match", "chrf"] = "eval_loss"
    """The promotion metric; loss and perplexity: lower is better; exact_match, chrf: higher."""
    min_improvement: float = Field(0.0, ge=0.0)
    """The challenger must beat base and champion by at least this much."""
    merge_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    merge_tolerance: float = Field(0.001, gt=0, lt=1)
    """Largest allowed |logit difference| between the merged and the adapter model, both run in
    float32 on the same tokens, as a fraction of the adapter model's largest |logit|. A correct
    merge leaves float32 rounding only (under 1e-5 measured on the tiny model and SmolLM2-135M);
    storing the merge in merge_dtype is checked apart, by reloading the saved files exactly."""


    @field_validator("model_name")
    @classmethod
    def _registry_name(cls, v: str) -> str:
        """MLflow's rule for registered model names (mlflow.utils.validation._validate_model_name)."""
        if v.strip() != v or any(c in v for c in "/:") or v in (".", ".."):
            raise ValueError(
                f"{v!r} is not a registered model name: MLflow refuses '/' and ':' (and surrounding spaces); "
                "use letters, digits, '-', '_' and '.', e.g. qlora-mistral-support, or auto"
            )
        return v

    @property
    def greater_is_better(self) -> bool:
        return self.metric in ("exact_match", "chrf")


class TrackingConfig(_Section):
    experiment: str = Field("qlora-pipeline", min_length=1)


with warnings.catch_warnings():
    # `register` is a params section; shadowing ABCMeta.register on the model class is harmless.
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class PipelineConfig(_Section):
        data: DataConfig = Field(default_factory=DataConfig)
        model: ModelConfig = Field(default_factory=ModelConfig)
        quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
        lora: LoraConfig = Field(default_factory=LoraConfig)
        train: TrainConfig = Field(default_factory=TrainConfig)
        evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
        register: RegisterConfig = Field(default_factory=RegisterConfig)
        tracking: TrackingConfig = Field(default_factory=TrackingConfig)

        @model_validator(mode="before")
        @classmethod
        def _resolve_model_name(cls, raw: Any) -> Any:
            register = raw.get("register", {}) if isinstance(raw, dict) else None
            if isinstance(register, dict) and register.get("model_name", "auto") == "auto":
                model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
                name = model.get("name", ModelConfig.model_fields["name"].default)
                if isinstance(name, str):
                    raw = {**raw, "register": {**register, "model_name": registered_name(name)}}
            return raw

        @model_validator(mode="after")
        def _selective_targets(self) -> "PipelineConfig":
            """selective_recompute: true keeps gate_proj's and up_proj's LoRA outputs: both must be LoRA targets."""
            targets = self.lora.target_modules
            if self.train.selective_recompute is True and isinstance(targets, list):
                missing = [name for name in ("gate_proj", "up_proj") if name not in targets]
                if missing:
                    raise ValueError(
                        f"train.selective_recompute: true keeps the outputs of the gate_proj and up_proj LoRA layers, but "
                        f"lora.target_modules lacks {', '.join(missing)}; add them, or set selective_recompute to auto or false"
                    )
            return self

        @model_validator(mode="after")
        def _fsdp_storage(self) -> "PipelineConfig":
            """FSDP shards floating tensors of one dtype per layer: 4-bit weights stored as uint8, or
            8-bit weights, cannot be sharded (the failure would come after loading the model)."""
            if self.train.distributed != "fsdp":
                return self
            quant = self.quantization
            if quant.load_in_8bit:
                raise ValueError(
                    "train.distributed: fsdp cannot shard 8-bit (LLM.int8) weights; set quantization.load_in_4bit: true "
                    "(QLoRA) and load_in_8bit: false, or train.distributed: ddp"
                )
            if not quant.load_in_4bit or quant.quant_storage == "auto":
                return self
            if quant.quant_storage == "uint8" or quant.compute_dtype not in ("auto", quant.quant_storage):
                wanted = "the compute dtype" if quant.compute_dtype == "auto" else quant.compute_dtype
                raise ValueError(
                    f"train.distributed: fsdp needs the 4-bit weights stored in {wanted} (FSDP shards one floating "
                    f"dtype per layer) but quantization.quant_storage is {quant.quant_storage}; set it to auto"
                )
            return self

        def flat(self) -> dict[str, Any]:
            """Resolved params as dotted keys, for MLflow params and lineage tags."""
            out: dict[str, Any] = {}

            def walk(prefix: str, value: Any) -> None:
                if isinstance(value, dict) and value:
                    for k, v in value.items():
                        walk(f"{prefix}.{k}" if prefix else k, v)
                else:
                    out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else value

            walk("", self.model_dump(mode="json"))
            return out


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        section = ".".join(str(p) for p in err["loc"][:-1])
        allowed = _allowed_keys(section)
        return f"{key}: unknown key; allowed keys{' in ' + section if section else ''}: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if not key:  # a rule across sections: the message names its keys
        return msg
    return f"{key}: {msg}" if isinstance(got, dict) else f"{key}: {msg} (got {got!r})"


def _allowed_keys(section: str) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in filter(None, section.split(".")):
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def validate_params(raw: dict[str, Any]) -> PipelineConfig:
    """Validate a params dict; every problem is listed with its key."""
    if not isinstance(raw, dict):
        raise ConfigError("params must be a mapping of sections (data, model, quantization, lora, ...)")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = "\n  ".join(_describe(e) for e in _merge_union_errors(exc.errors()))
        raise ConfigError(f"invalid params:\n  {lines}") from None


_UNION_WORDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string"}


def _union_branch(part: Any) -> str | None:
    """What a union member of a key's type accepts, from pydantic's tag for it in an error's loc."""
    if not isinstance(part, str):
        return None
    if part in _UNION_WORDS:
        return _UNION_WORDS[part]
    if part.startswith("list["):
        return "a list"
    if part.startswith("dict["):
        return "a mapping"
    if part.startswith("literal[") and part.endswith("]"):
        return " or ".join(v.strip().strip("'") for v in part[len("literal[") : -1].split(","))
    return None


def _merge_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One error per key where a value fits no member of a union (`bool | Literal["auto"]`): pydantic
    gives one per member, keyed `train.compile.bool` and `train.compile.literal['auto']`."""
    merged: dict[tuple, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for err in errors:
        loc = tuple(err["loc"])
        branch = _union_branch(loc[-1]) if loc else None
        if branch is None:
            out.append(err)
            continue
        key = loc[:-1]
        if key in merged:
            merged[key]["accepts"].append(branch)
            continue
        merged[key] = {**err, "loc": key, "accepts": [branch]}
        out.append(merged[key])
    for err in merged.values():
        err["msg"] = f"must be {', or '.join(err.pop('accepts'))}"
    return out


def load_config(path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    """Load params.yaml (plus optional dotted overrides) into a validated PipelineConfig."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate_params(raw)
