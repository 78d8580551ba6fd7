"""Shared fixtures: the built-in tiny model, offline settings, small configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _committed_params() -> Path:
    """params.yaml as committed (HEAD): `dvc exp run -S` (make demo) leaves the working copy's
    params changed, and tests start from the defaults. Outside a git checkout, the file itself."""
    out = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        return DEFAULT_PARAMS
    path = Path(tempfile.mkdtemp(prefix="qlora-tests-")) / "params.yaml"
    path.write_text(out.stdout)
    return path


DEFAULT_PARAMS = _committed_params()
# The short schedule `make demo` runs; tests start from it and name what they change.
SHORT_SCHEDULE: dict = yaml.safe_load((REPO / "schedules" / "short.yaml").read_text())

# `make test` spreads the suite over workers (pytest-xdist, --dist loadfile): each module runs
# whole on one worker (its module fixtures are built once), the longest first, so the waits of the
# Prefect tests overlap the CPU work of the others. Modules not listed follow in file order.
LONGEST_FIRST = (
    "integration/test_prefect_flow.py",
    "integration/test_prefect_faults.py",
    "integration/test_team_stack.py",
    "integration/test_registry.py",
    "integration/test_real_model.py",
    "integration/test_ranks.py",
    # these share the session's `pipeline` project and change it: they keep their file order
    "integration/test_dvc_views.py",
    "integration/test_pipeline_dvc.py",
    "integration/test_reliability.py",
    "integration/test_serving.py",
    "integration/test_data_deps.py",
    "integration/test_store_modes.py",
    "integration/test_bad_inputs.py",
    "integration/test_output.py",
)

# No test may reach a model hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels (core/lowrank_dropout.py) run in triton's CPU interpreter; it is chosen when triton
# is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
SESSION_ENV = {name: os.environ.get(name) for name in MLFLOW_URI_VARS}


def restore_mlflow_uris() -> None:
    """MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI as the session began (mlflow.set_*_uri export them)."""
    for name in MLFLOW_URI_VARS:
        if SESSION_ENV.get(name) is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = SESSION_ENV[name]


@pytest.fixture(autouse=True)
def no_environment_leaks():
    """What a test sets in this process's environment ends with it. mlflow.set_tracking_uri and
    set_registry_uri also set MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI for child processes: left
    behind, a later test's `qlora register` would talk to another test's server (or a dead port)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    restore_mlflow_uris()  # also what a module or session fixture set before `saved`
    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        tracking_utils._tracking_uri = None
        registry_utils._registry_uri = None


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
            DEFAULT_PARAMS,
            [
                *(f"{key}={json.dumps(value)}" for key, value in SHORT_SCHEDULE.items()),
                # the tiny model: shorter rows, fewer and smaller steps, a higher rate, every step logged
                "model.name=builtin:tiny-llama",
                "data.max_seq_len=64",
                "train.max_steps=8",
                "train.per_device_batch_size=4",
                "train.learning_rate=0.005",
                "train.warmup_steps=0",
                "train.logging_steps=1",
                *overrides,
            ],
        )

    return make


@pytest.fixture
def tiny_model(tiny_cache, tiny_cfg):
    """(config, tokenizer with a pad token, 4-bit base model) for the tiny model."""
    from qlora_pipeline.core.data.tokens import ensure_pad_token
    from qlora_pipeline.core.model import load_base_model, load_tokenizer, resolve_model

    cfg = tiny_cfg()
    resolved = resolve_model(cfg.model, tiny_cache)
    tokenizer = load_tokenizer(cfg.model, resolved)
    ensure_pad_token(tokenizer)
    return cfg, tokenizer, load_base_model(cfg.model, cfg.quantization, resolved, vocab_size=len(tokenizer))


def pytest_collection_modifyitems(config, items):
    """Modules in LONGEST_FIRST order (see there); xdist hands them out in this order."""
    def module(item) -> str:
        return Path(item.fspath).relative_to(REPO / "tests").as_posix()

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(module(item), len(rank)))
