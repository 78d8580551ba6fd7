"""Shared fixtures: the built-in tiny model, offline settings, small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# No test may reach a model hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A cache dir holding the built-in tiny model, built once per session."""
    from qlora_pipeline.core.tiny import ensure_tiny_model

    cache = tmp_path_factory.mktemp("qlora-cache")
    ensure_tiny_model(cache / "builtin")
    return cache


@pytest.fixture
def tiny_cfg():
    """A config for the tiny model with a short, deterministic schedule."""
    from qlora_pipeline.config import load_config

    def make(*overrides: str):
        return load_config(
            REPO / "params.yaml",
            [
                "model.name=builtin:tiny-llama",
                "data.max_seq_len=64",
                "train.max_steps=8",
                "train.per_device_batch_size=4",
                "train.gradient_accumulation_steps=1",
                "train.learning_rate=0.005",
                "train.warmup_steps=0",
                "train.logging_steps=1",
                "train.save_steps=100",
                *overrides,
            ],
        )

    return make


@pytest.fixture
def tiny_model(tiny_cache, tiny_cfg):
    """(config, tokenizer with a pad token, 4-bit base model) for the tiny model."""
    from qlora_pipeline.core.data import ensure_pad_token
    from qlora_pipeline.core.model import load_base_model, load_tokenizer, resolve_model

    cfg = tiny_cfg()
    resolved = resolve_model(cfg.model, tiny_cache)
    tokenizer = load_tokenizer(cfg.model, resolved)
    ensure_pad_token(tokenizer)
    return cfg, tokenizer, load_base_model(cfg.model, cfg.quantization, resolved, vocab_size=len(tokenizer))
