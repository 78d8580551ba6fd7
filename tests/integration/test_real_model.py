"""A real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF file (base_models/,
`make models`), a few QLoRA steps through `dvc repro` against a real MLflow server, then what a
user relies on: no vocabulary growth, an adapter that holds only LoRA weights, EOS learned, eval
loss down, a merge that matches the adapter model, and a registered version that loads and
generates with plain transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, make_project, project_env, run

pytestmark = pytest.mark.integration

GGUF = REPO / "base_models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
VOCAB = 49_152  # SmolLM2's vocabulary (GGUF metadata); pad = EOS = <|im_end|> in the file
MODEL_NAME = "qlora-smollm2-test"
# Converted once per checkout (keyed by the file's sha256) and shared with `make demo`.
SHARED_CACHE = REPO / ".cache" / "qlora"
# A few steps of the demo's recipe: enough to move eval loss, short enough for CI on 2 cores.
PARAMS = {
    "model.name": "base_models/SmolLM2-135M-Instruct.Q4_1.gguf",
    "register.model_name": MODEL_NAME,
    "data.max_seq_len": 128,
    "train.max_steps": 6,
    "train.per_device_batch_size": 8,
    "train.learning_rate": 0.001,
    "train.logging_steps": 1,
    "train.save_steps": 100,
    "evaluate.max_eval_rows": 16,
    "evaluate.num_samples": 2,
    "evaluate.max_new_tokens": 16,
    "evaluate.prompts": [],
}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, mlflow_server):
    if not GGUF.is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_models.py")], check=True)
    project = make_project(tmp_path_factory.mktemp("real-model"), PARAMS)
    target = project / "base_models" / GGUF.name
    try:
        os.link(GGUF, target)
    except OSError:
        import shutil

        shutil.copy2(GGUF, target)
    env = project_env(project, MLFLOW_TRACKING_URI=mlflow_server, QLORA_CACHE_DIR=str(SHARED_CACHE))
    run(["dvc", "repro"], project, env, timeout=1500)
    return project, env, mlflow_server


def _lora_param_count(config: dict, r: int) -> int:
    """r * (in + out) per adapted linear layer: q, k, v, o, gate, up, down in every decoder layer."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    per_layer = sum(r * (i + o) for i, o in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                                             (hidden, inter), (hidden, inter), (inter, hidden)])
    return per_layer * config["num_hidden_layers"]


def _base_config() -> dict:
    folder = SHARED_CACHE / "gguf" / GGUF_SHA256[:16]
    return json.loads((folder / "config.json").read_text())


def test_adapter_holds_only_lora_weights(real_run):
    from safetensors import safe_open

    project, _, _ = real_run
    path = project / "models" / "adapter" / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        numel = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in keys)
    assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k][:5]
    assert numel == _lora_param_count(_base_config(), r=16) == 4_884_480
    assert path.stat().st_size < numel * 4 + 200_000  # float32 LoRA weights and a header, nothing else


def test_merged_model_keeps_the_base_vocabulary_and_config(real_run):
    from safetensors import safe_open

    project, _, _ = real_run
    merged = project / "models" / "merged"
    config = json.loads((merged / "config.json").read_text())
    ignore = {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "quantization_config", "use_cache"}
    base = _base_config()
    assert {k: v for k, v in config.items() if k not in ignore} == {k: v for k, v in base.items() if k not in ignore}
    assert config["vocab_size"] == VOCAB
    shapes = {}
    for shard in merged.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    assert shapes["model.embed_tokens.weight"] == [VOCAB, config["hidden_size"]]
    tokenizer = json.loads((merged / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) + len([t for t in tokenizer["added_tokens"] if t["content"] not in tokenizer["model"]["vocab"]]) == VOCAB


def test_eos_is_learned_and_never_padding(real_run):
    import pandas as pd
    from transformers import AutoTokenizer

    project, _, _ = real_run
    tok = AutoTokenizer.from_pretrained(project / "models" / "adapter")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id not in (None, tok.eos_token_id) and len(tok) == VOCAB
    train = pd.read_parquet(project / "data" / "prepared" / "train.parquet")
    replies = train[train["prompt"] != ""]  # instruction rows; plain-text chunks may end mid-document
    assert len(replies) > 200
    last_labels = [[t for t in labels if t != -100][-1] for labels in replies["labels"]]
    assert set(last_labels) == {tok.eos_token_id}


def test_eval_loss_goes_down_and_merge_matches(real_run):
    project, _, _ = real_run
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    reg = json.loads((project / "reports" / "register.json").read_text())
    assert reg["version"] == 1 and reg["promoted"] is True
    assert 0 <= reg["merge_relative_diff"] <= 0.02


def test_registered_version_loads_with_plain_transformers(real_run, tmp_path):
    import mlflow
    import torch
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, server = real_run
    mlflow.set_tracking_uri(server)
    version = MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.tags["base_model_revision"] == f"sha256:{GGUF_SHA256}"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path)))
    weights = next(p.parent for p in local.rglob("config.json") if any(p.parent.glob("*.safetensors")))
    tokenizer_dir = next(p.parent for p in local.rglob("tokenizer_config.json"))
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert model.get_input_embeddings().num_embeddings == VOCAB and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()
