"""params.yaml validation: every mistake names its key and what is allowed."""

from __future__ import annotations

import pytest

from qlora_pipeline.config import load_config, validate_params
from qlora_pipeline.overrides import apply_overrides
from qlora_pipeline.errors import ConfigError

from ..conftest import DEFAULT_PARAMS


def test_default_params_validate():
    cfg = load_config(DEFAULT_PARAMS)
    assert cfg.model.name == "facebook/opt-125m"
    assert cfg.quantization.load_in_4bit and cfg.quantization.quant_type == "nf4" and cfg.quantization.double_quant
    assert cfg.model.trust_remote_code is False
    assert cfg.lora.target_modules == "all-linear"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.rank=8", "lora.rank: unknown key; allowed keys in lora: alpha, bias, dropout, r,"),
        ("bogus.key=1", "bogus: unknown key; allowed keys: data, evaluate, lora, model"),
        ("lora.r=0", "lora.r: Input should be greater than or equal to 1"),
        ("lora.alpha=-1", "lora.alpha: Input should be greater than 0"),
        ("lora.dropout=1.5", "lora.dropout: Input should be less than 1"),
        ("train.learning_rate=abc", "train.learning_rate: Input should be a valid number"),
        ("train.learning_rate=0", "train.learning_rate: Input should be greater than 0"),
        ("quantization.load_in_8bit=true", "load_in_4bit and load_in_8bit are both true"),
        ("lora.target_modules=[]", "lora.target_modules: must be 'all-linear' or a non-empty list"),
        ("quantization.quant_type=int3", "quantization.quant_type: Input should be 'nf4' or 'fp4'"),
        ("model.name=builtin:huge", "unknown built-in model 'builtin:huge'"),
        ("register.metric=accuracy", "register.metric: Input should be 'eval_loss', 'perplexity', 'exact_match' or 'chrf'"),
        ("data.eval_fraction=1.0", "data.eval_fraction: Input should be less than 1"),
        ("register.model_name=team/support-bot", "register.model_name: 'team/support-bot' is not a registered model name"),
        ("register.model_name=bot:v2", "MLflow refuses '/' and ':'"),
        ("register.model_name=' bot'", "is not a registered model name"),
        ("train.dropout_mask_bits=true;train.fused_lora=false", "dropout_mask_bits: true needs fused LoRA layers"),
        ("train.dropout_mask_bits=true;train.compile=true", "dropout_mask_bits: true and compile: true cannot both apply"),
        ("train.fused_dropout=true;train.compile=true", "fused_dropout: true needs fused LoRA layers without compile"),
        ("train.fused_dropout=true;train.fused_lora=false", "fused_dropout: true needs fused LoRA layers without compile"),
        ("train.num_gpus=2;train.gradient_accumulation_steps=3", "gradient_accumulation_steps (3) must be a multiple of num_gpus (2)"),
        ("train.num_gpus=0", "train.num_gpus: must be auto or a number of GPUs >= 1"),
        ("train.distributed=fsdp;quantization.quant_storage=uint8", "fsdp needs the 4-bit weights stored in the compute dtype"),
        ("train.distributed=fsdp;quantization.compute_dtype=bfloat16;quantization.quant_storage=float16",
         "stored in bfloat16 (FSDP shards one floating dtype per layer) but quantization.quant_storage is float16"),
        ("train.distributed=fsdp;quantization.load_in_4bit=false;quantization.load_in_8bit=true", "fsdp cannot shard 8-bit"),
        ("train.distributed=fsdp;train.compile=true", "distributed: fsdp and compile: true cannot both apply"),
        ("train.distributed=fsdp;train.num_gpus=1", "fsdp shards the model across several GPUs but num_gpus is 1"),
        ("train.distributed=zero3", "train.distributed: Input should be 'ddp', 'fsdp' or 'auto'"),
    ],
)
def test_bad_params_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_PARAMS, override.split(";"))
    assert expected in str(info.value)


def test_eval_steps_past_the_last_step_is_refused():
    with pytest.raises(ConfigError, match=r"eval_steps \(20\) is past the last step \(max_steps 10\).*at most 10, or 0"):
        load_config(DEFAULT_PARAMS, ["train.max_steps=10", "train.save_steps=20", "train.eval_steps=20"])


def test_overrides_beat_the_file_and_parse_yaml():
    cfg = load_config(DEFAULT_PARAMS, ["train.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_override_needs_key_and_value():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(DEFAULT_PARAMS, ["train.learning_rate"])


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_flat_params_are_dotted_and_complete():
    flat = validate_params({}).flat()
    assert flat["lora.r"] == 16 and flat["train.learning_rate"] == 2e-4
    assert flat["lora.target_modules"] == "all-linear"


def test_apply_overrides_does_not_mutate_input():
    raw = {"train": {"learning_rate": 1.0}}
    out = apply_overrides(raw, {"train.learning_rate": 2.0})
    assert raw["train"]["learning_rate"] == 1.0 and out["train"]["learning_rate"] == 2.0


def test_params_yaml_holds_every_key_with_the_code_defaults():
    """One default per key: what params.yaml says is what config.py falls back to."""
    import yaml

    from qlora_pipeline.config import PipelineConfig

    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    code = PipelineConfig().model_dump(mode="json")
    file = validate_params(raw).model_dump(mode="json")
    for section, keys in code.items():
        assert set(keys) == set(raw[section]), section
        differ = {k: (v, file[section][k]) for k, v in keys.items() if v != file[section][k]}
        assert differ == {}, f"{section}: (config.py, params.yaml) {differ}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.cuda_graphs=2", "train.cuda_graphs: must be true or false, or auto (got 2)"),
        ("train.compile=maybe", "train.compile: must be true or false, or auto (got 'maybe')"),
        ("train.memory_budget_gib=lots", "train.memory_budget_gib: must be a number, or auto (got 'lots')"),
    ],
)
def test_a_value_outside_every_member_of_a_union_gets_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_PARAMS, [override])
    assert str(info.value).splitlines()[1:] == [f"  {message}"]


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", ".inf", "true", "0", "-1"])
def test_memory_budget_must_be_a_finite_positive_number(value):
    """NaN passed a `<= 0` check and planned against a NaN budget; true was read as 1.0 GiB."""
    with pytest.raises(ConfigError, match="train.memory_budget_gib: must be auto or a positive number of GiB"):
        load_config(DEFAULT_PARAMS, [f"train.memory_budget_gib={value}"])
