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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from qlora_pipeline.columns import columns_per_file, glob_refusal, normalize_columns
from qlora_pipeline.errors import ConfigError
from qlora_pipeline.overrides import apply_overrides

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("builtin:tiny-llama",)
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class TrainConfig(_Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    """-1: run `epochs` epochs; otherwise stop after this many optimizer steps."""
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit"] = "adamw_torch"
    gradient_checkpointing: bool | int | Literal["auto"] = "auto"
    """Recompute activations in the backward: true (every decoder layer), false, a number of layers,
    or auto (as few layers as memory_budget_gib needs: GPU memory, or RAM on a CPU)."""
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    eval_steps: int = Field(0, ge=0)
    """0: off. Else the loss on the eval split every eval_steps optimizer steps and at the last step
    (logged as eval_loss: MLflow, plots/train_loss.png), and the adapter saved is the checkpoint with
    the lowest eval loss, not the last one (metrics/train.json: best_step, best_eval_loss).
    save_steps must then be a multiple of eval_steps (the Trainer's rule for keeping the best
    checkpoint); a new best is saved whenever it is evaluated, so none is lost between saves."""
    seed: int = 42
    num_threads: int = Field(0, ge=0)
    """CPU threads for torch; 0 keeps torch's default."""
    num_gpus: int | Literal["auto"] = "auto"
    """Ranks to train on (torchrun, data-parallel): auto, every visible GPU; or N. The global batch
    stays per_device_batch_size x gradient_accumulation_steps (each rank accumulates 1/N of the
    steps). On a machine without a GPU, N > 1 runs N CPU ranks (gloo)."""
    distributed: Literal["ddp", "fsdp", "auto"] = "auto"
    """How several ranks share the work: ddp (each rank holds the whole 4-bit model and trains on
    its share of every batch), or fsdp (FSDP2 through accelerate: the 4-bit weights, the adapter and
    its optimizer state sharded across the GPUs, each layer gathered while it runs; needs CUDA GPUs
    and 4-bit storage in the compute dtype, see quantization.quant_storage). auto: ddp when the
    model and the smallest training plan fit one GPU, fsdp otherwise (distributed.strategy)."""
    # The fast GPU path (core/fast/). auto: on with a CUDA GPU, off on a CPU.
    use_liger: bool | Literal["auto"] = "auto"
    """Fused RMSNorm, RoPE, SwiGLU and linear+cross-entropy from liger-kernel (the `gpu` extra)."""
    fused_lora: bool | Literal["auto"] = "auto"
    """Each LoRA linear layer as one autograd node (frozen matmul, dropout, adapter, fused add);
    each decoder layer's last one runs its adapter first, so recompute skips its frozen matmul."""
    dropout_mask_bits: bool | Literal["auto"] = False
    """With fused_lora on a CUDA GPU: LoRA dropout keeps its mask as bits (a Triton kernel), not bytes:
    ~6% less peak memory at the same recompute, but no faster (Triton's launch cost); auto: on with CUDA."""
    padding_free: bool | Literal["auto"] = "auto"
    """Drop pad tokens: each micro-batch becomes one row of samples, attention kept per sample."""
    tune_micro_batch: bool = True
    """On a GPU, trade per_device_batch_size against gradient_accumulation_steps (same product)."""
    memory_budget_gib: float | Literal["auto"] = "auto"
    """Peak GPU memory the plan aims under; auto: 90% of the GPU's memory."""
    compile: bool | Literal["auto"] = False
    """torch.compile each decoder layer (removes the per-layer Python overhead; the first step pays
    the compile). auto: on with a CUDA GPU. Off by default: no speed-up measured on an H200
    (benchmarks/README.md)."""

    cuda_graphs: bool | Literal["auto"] = "auto"
    """Replay the decoder layers' forward and backward from CUDA graphs (core/fast/graphs.py): the
    host's kernel launches leave the step. Needs fused_lora; LoRA dropout then keeps its masks as bits
    (triton). One shape is captured, so it pays where every training row has one length (a corpus
    cut into max_seq_len chunks); SFT samples of varying length stay eager. auto: on with one
    CUDA GPU when the training rows have one length."""

    @field_validator("gradient_checkpointing")
    @classmethod
    def _layer_count(cls, v: bool | int | str) -> bool | int | str:
        if not isinstance(v, bool) and isinstance(v, int) and v < 0:
            raise ValueError("must be true, false, auto or a number of layers >= 0")
        return v

    @field_validator("num_gpus", mode="before")
    @classmethod
    def _rank_count(cls, v: int | str) -> int | str:
        if isinstance(v, bool) or (isinstance(v, int) and v < 1):
            raise ValueError("must be auto or a number of GPUs >= 1")
        return v

    @field_validator("memory_budget_gib")
    @classmethod
    def _positive_budget(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 0:
            raise ValueError("must be auto or a positive number of GiB, e.g. 14")
        return v

    @model_validator(mode="after")
    def _fast_path_combinations(self) -> "TrainConfig":
        """Switches that cannot work together, refused at load time (qlora check), not at train start."""
        if isinstance(self.num_gpus, int) and self.num_gpus > 1 and self.gradient_accumulation_steps % self.num_gpus:
            fits, accum = (self.gradient_accumulation_steps // self.num_gpus + 1) * self.num_gpus, self.gradient_accumulation_steps
            raise ValueError(f"gradient_accumulation_steps ({accum}) must be a multiple of num_gpus ({self.num_gpus}): the global batch "
                             f"is divided among the ranks; set it to {fits}, or num_gpus to a divisor of it")
        if self.dropout_mask_bits is True and self.fused_lora is False:
            raise ValueError(
                "dropout_mask_bits: true needs fused LoRA layers (the bit masks live in their autograd node); "
                "set fused_lora to auto or true, or dropout_mask_bits to false"
            )
        if self.distributed == "fsdp" and self.compile is True:
            raise ValueError(
                "distributed: fsdp and compile: true cannot both apply: compiled decoder layers are not "
                "supported under FSDP here; set compile to false (or auto), or distributed to ddp"
            )
        if self.distributed == "fsdp" and self.num_gpus == 1:
            raise ValueError(
                "distributed: fsdp shards the model across several GPUs but num_gpus is 1; "
                "set num_gpus to auto or a number > 1, or distributed to auto"
            )
        if self.cuda_graphs is True and isinstance(self.num_gpus, int) and self.num_gpus > 1:
            raise ValueError(
                f"cuda_graphs: true runs on one GPU but num_gpus is {self.num_gpus}; set cuda_graphs to auto "
                "(off with several GPUs) or num_gpus to 1"
            )
        if self.cuda_graphs is True and (self.compile is True or self.fused_lora is False or self.distributed == "fsdp"):
            raise ValueError(
                "cuda_graphs: true needs fused LoRA layers, without compile and without fsdp (the graphs hold "
                "the whole layers); set cuda_graphs to false, or fused_lora to auto/true and compile to false"
            )
        if self.dropout_mask_bits is True and self.compile is True:
            raise ValueError(
                "dropout_mask_bits: true and compile: true cannot both apply: compiled layers fuse their own "
                "dropout and keep no mask; set one of them to false (or auto)"
            )
        return self

    @model_validator(mode="after")
    def _eval_fits_schedule(self) -> "TrainConfig":
        if not self.eval_steps:
            return self
        if self.save_steps % self.eval_steps:
            lower = self.save_steps // self.eval_steps * self.eval_steps
            options = f"{lower} or {lower + self.eval_steps}" if lower else f"{self.eval_steps}"
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}) so that the best "
                f"checkpoint can be kept; set save_steps to {options}, or eval_steps to a divisor of {self.save_steps}"
            )
        if self.max_steps > 0 and self.eval_steps > self.max_steps:
            raise ValueError(
                f"eval_steps ({self.eval_steps}) is past the last step (max_steps {self.max_steps}): the eval curve "
                f"would have one point; set eval_steps to at most {self.max_steps}, or 0 to turn it off"
            )
        return self


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
        lines = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid params:\n  {lines}") from None


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
