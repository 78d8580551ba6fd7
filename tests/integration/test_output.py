"""What a user reads: the stages' output off a terminal (DVC under CI, Prefect's relay) and on one.

Off a terminal: no raw Trainer log dicts, no progress-bar frames, one plain line per training log
step, none of the third-party notices cli.py silences; with --verbose they are back. On a
terminal: one live bar for training, with the loss, tokens/s and ETA.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import BIN, project_env, run, set_params, small_project

pytestmark = pytest.mark.integration

STAGES = ("prepare", "train", "evaluate", "register")
MAX_STEPS = 4
# Logged at step 1 (logging_first_step) and every step after: one progress line each.
LOG_STEPS = list(range(1, MAX_STEPS + 1))
FAST = {
    "train.max_steps": MAX_STEPS,
    "train.logging_steps": 1,
    "train.save_steps": 100,
    "evaluate.num_samples": 2,
    "evaluate.max_eval_rows": 8,
}
# Lines a stage may print besides the progress lines: its own log lines and MLflow's registry notes.
MAX_LINES_PER_STAGE = 4

# Every one of these was in the output before it was silenced (make demo, or the tiny pipeline).
NOISE = (
    "{'loss'",  # transformers' ProgressCallback / PrinterCallback printing each log dict
    "{'train_runtime'",
    "it/s]",  # any tqdm frame
    "Loading weights",
    "Writing model shards",
    "Converting and de-quantizing GGUF tensors",
    "The specified dataset source can be interpreted in multiple ways",
    "The model card could not be retrieved",
    "Unable to find license information",
    "Failed to load CPU gemm_4bit_forward",  # bitsandbytes' `kernels` notice (AVX512-BF16 CPUs)
    "system metrics",
    "The modules are dequantized",
    "[transformers]",
    "UserWarning",
    "FutureWarning",
)
PROGRESS_LINE = re.compile(
    r"training step (\d+)/(\d+): loss \d+\.\d{4}, [\d,]+ tokens/s, ETA \d+:\d\d:\d\d$"
)


def stage_env(project: Path) -> dict:
    """The user's environment without anything that would change what the stages print."""
    env = project_env(project)
    for name in ("QLORA_VERBOSE", "QLORA_LOG_LEVEL", "TTY_INTERACTIVE", "TRANSFORMERS_VERBOSITY", "TQDM_DISABLE",
                 "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "MLFLOW_TRACKING_URI",
                 "FORCE_COLOR", "PYTHONWARNINGS"):
        env.pop(name, None)
    return env


# The four stages as `qlora <stage>` runs them, in one process: a stage's imports cost ~10 s of CPU
# here, and the libraries are loaded after the first stage set up its logging, as in each of them.
DRIVER = """
import sys
from qlora_pipeline.cli import app
for stage in sys.argv[1:]:
    for stream in (sys.stdout, sys.stderr):
        print("@@ " + stage, file=stream, flush=True)
    code = app([stage], prog_name="qlora", standalone_mode=False)
    if code:
        sys.exit(code)
"""


def split_by_stage(text: str) -> dict[str, str]:
    parts = re.split(r"^@@ (\w+)\n", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    """The four stages, stdout and stderr captured (not a terminal): {stage: (stdout, stderr)}."""
    project = small_project(tmp_path_factory.mktemp("output"))
    set_params(project, FAST)
    env = stage_env(project)
    result = run([str(BIN / "python"), "-c", DRIVER, *STAGES], project, {**env, "PYTHONUNBUFFERED": "1"})
    assert result.stdout.startswith("@@ ") and result.stderr.startswith("@@ "), result.stdout + result.stderr
    out, err = split_by_stage(result.stdout), split_by_stage(result.stderr)
    assert list(out) == list(err) == list(STAGES), result.stdout + result.stderr
    return project, env, {stage: SimpleNamespace(stdout=out[stage], stderr=err[stage]) for stage in STAGES}


def lines_of(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def test_no_frames_no_dicts_no_noise(quiet_run):
    _, _, outputs = quiet_run
    for stage, result in outputs.items():
        assert "\r" not in result.stderr + result.stdout, f"{stage}: a progress bar drew frames"
        text = result.stdout + result.stderr
        found = [noise for noise in NOISE if noise in text]
        assert not found, f"{stage} printed {found}:\n{text}"


def test_one_plain_line_per_training_log_step(quiet_run):
    _, _, outputs = quiet_run
    progress = [line for line in lines_of(outputs["train"]) if "training step" in line]
    steps = [PROGRESS_LINE.search(line) for line in progress]
    assert all(steps), progress
    assert [(int(m[1]), int(m[2])) for m in steps] == [(s, MAX_STEPS) for s in LOG_STEPS]
    for stage in ("prepare", "evaluate", "register"):
        assert not any("training step" in line for line in lines_of(outputs[stage])), stage


def test_total_output_is_bounded(quiet_run):
    _, _, outputs = quiet_run
    total = sum(len(lines_of(result)) for result in outputs.values())
    # 4 stages x at most 4 lines of their own, plus one line per training log step.
    assert total <= MAX_LINES_PER_STAGE * len(STAGES) + len(LOG_STEPS), "\n".join(
        line for result in outputs.values() for line in lines_of(result)
    )


def test_verbose_brings_third_party_output_back(quiet_run):
    project, env, _ = quiet_run
    result = run([str(BIN / "qlora"), "train", "--verbose", "-S", "train.max_steps=1"], project, env)
    text = result.stdout + result.stderr
    # A Python warning (mlflow's dataset source), a library log line and a tqdm bar, all back.
    assert "The specified dataset source can be interpreted in multiple ways" in text, text
    assert "system metrics" in text, text
    assert "Loading weights" in text, text
    # Still ours, not transformers': the progress line and no printed dicts.
    assert "training step 1/1: loss" in text and "{'loss'" not in text, text


def test_training_bar_on_a_terminal(monkeypatch):
    """On a terminal the training callback draws one live bar with loss and tokens/s, and logs no lines."""
    from rich.console import Console

    from qlora_pipeline import progress
    from qlora_pipeline.core.callbacks import TrainingProgress

    screen = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=screen, force_terminal=True, width=160))
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    logged = []
    monkeypatch.setattr(progress.log, "info", lambda *args: logged.append(args))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=3, global_step=0)
    callback = TrainingProgress()
    callback.on_train_begin(None, state, None)
    for step in (1, 2, 3):
        state.global_step = step
        callback.on_step_end(None, state, None)
        callback.on_log(None, state, None, logs={"loss": 2.5 - step / 10, "tokens_per_second": 1234.0})
    callback.on_train_end(None, state, None)
    out = screen.getvalue()
    assert not logged
    assert "training" in out and "3/3" in out and "loss 2.2000, 1,234 tokens/s" in out and "ETA" in out, out
    assert progress._display is None  # stopped: the terminal gets its cursor back
