"""Static plot images, and evaluation during training (train.eval_steps) on the real 4-bit tiny model."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from datasets import Dataset
from matplotlib.container import BarContainer
from safetensors.torch import load_file

from qlora_pipeline.config import TrainConfig
from qlora_pipeline.core.data.collate import make_collator
from qlora_pipeline.core.model import apply_lora, resolve_compute_dtype
from qlora_pipeline.core.train import train_adapter
from qlora_pipeline.errors import ConfigError
from qlora_pipeline.plots import loss_figure, read_histogram, save_png, token_length_figure
from qlora_pipeline.stages.prepare import numbers_only
from qlora_pipeline.tracking import metrics_callback

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_token_length_histogram_is_bars_written_as_png(tmp_path):
    csv = tmp_path / "lengths.csv"
    csv.write_text("bucket,count\n0,3\n16,7\n32,0\n48,2\n")
    histogram = read_histogram(csv)
    fig = token_length_figure(histogram)
    (ax,) = fig.axes
    (bars,) = ax.containers
    assert isinstance(bars, BarContainer) and not ax.lines
    assert [(p.get_x(), p.get_width(), p.get_height()) for p in bars] == [(0, 16, 3), (16, 16, 7), (32, 16, 0), (48, 16, 2)]
    save_png(fig, tmp_path / "plots" / "token_lengths.png")
    assert (tmp_path / "plots" / "token_lengths.png").read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["token_lengths.png"]  # no temporary left


def test_loss_figure_draws_eval_loss_only_when_evaluated():
    history = [{"step": s, "loss": 3.0 - s / 10} for s in (1, 2, 4)]
    (ax,) = loss_figure(history).axes
    assert [line.get_label() for line in ax.lines] == ["training loss"]
    (ax,) = loss_figure(history, [{"step": 2, "eval_loss": 2.5}, {"step": 4, "eval_loss": 2.7}], best_step=2).axes
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines) == ["training loss", "eval loss", "kept: step 2"]
    assert list(lines["eval loss"].get_xdata()) == [2, 4] and list(lines["eval loss"].get_ydata()) == [2.5, 2.7]


def test_data_metrics_keep_numbers_only():
    stats = {
        "rows_train": 3, "format": "mixed", "files": ["raw/a.jsonl"], "end_of_turn": "</s> (appended)",
        "formats": {"chat": 2, "text": 1}, "rows_dropped": {}, "max_bad_fraction": 0.05, "flag": True,
    }
    assert numbers_only(stats) == {"rows_train": 3, "formats": {"chat": 2, "text": 1}, "rows_dropped": {}, "max_bad_fraction": 0.05}


@pytest.mark.parametrize(("save", "every"), [(5, 2), (2, 4), (3, 2)])
def test_save_steps_must_be_a_multiple_of_eval_steps(save, every):
    with pytest.raises(ValueError, match=rf"save_steps \({save}\) must be a multiple of eval_steps \({every}\)"):
        TrainConfig(save_steps=save, eval_steps=every)
    assert TrainConfig(save_steps=save * every, eval_steps=every).eval_steps == every
    assert TrainConfig(save_steps=save, eval_steps=0).eval_steps == 0


def test_bad_eval_steps_fail_at_load_time(tiny_cfg):
    with pytest.raises(ConfigError, match=r"train: save_steps \(50\) must be a multiple of eval_steps \(20\) .*set save_steps to 40 or 60"):
        tiny_cfg("train.save_steps=50", "train.eval_steps=20")


def _rows(ids: list[list[int]]) -> Dataset:
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "source": [f"mem:{i}" for i in range(len(ids))]})


def test_eval_during_training_keeps_the_best_checkpoint(tiny_model, tiny_cfg, tmp_path, monkeypatch):
    # Train on "A B A B ...", evaluate on "A A A ...": the model first learns that A is frequent (the
    # eval loss falls), then that B follows A (it rises: 5.43, 5.66, 5.81), so the best evaluation
    # is the first, between two saves (every 4 steps).
    # Padding-free training batches (the fast path swaps the collator) while eval batches stay padded.
    cfg = tiny_cfg("train.max_steps=6", "train.eval_steps=2", "train.save_steps=4", "train.padding_free=true",
                   "train.learning_rate=0.01")
    _, tokenizer, model = tiny_model
    torch.manual_seed(cfg.train.seed)  # the LoRA init, whatever ran before (as the train stage seeds it)
    model = apply_lora(model, cfg.lora)
    a, b = 100, 101
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a real local store
    with mlflow.start_run() as run:
        result = train_adapter(
            model, tokenizer, _rows([[a, b] * (8 + i % 4) for i in range(24)]), make_collator(tokenizer, False, 64), cfg.train,
            tmp_path / "ckpt", resolve_compute_dtype(cfg.quantization.compute_dtype),
            callbacks=[metrics_callback()],
            eval_dataset=_rows([[a] * 24] * 8), eval_collator=make_collator(tokenizer, False, 64),
        )
    sent_to_mlflow = [(m.step, {"eval_loss": m.value}) for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval_loss")]

    losses = {row["step"]: row["eval_loss"] for row in result.eval_history}
    assert list(losses) == [2, 4, 6] and all(math.isfinite(v) for v in losses.values())
    assert result.best_step == min(losses, key=losses.get) == 2
    assert result.best_eval_loss == losses[2] < losses[6]
    # Through the stage's MLflow callback, at the step it was measured: the MLflow UI's eval curve.
    assert {step: m["eval_loss"] for step, m in sent_to_mlflow if "eval_loss" in m} == losses
    # The best evaluation fell between saves (every 4 steps) and still has its checkpoint; the adapter
    # the stage saves from the model is that checkpoint's, not the last step's.
    best = load_file(tmp_path / "ckpt" / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(tmp_path / "ckpt" / "checkpoint-6" / "adapter_model.safetensors")
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(best) and len(best) == 2 * 14  # lora_A and lora_B of 7 linears x 2 layers
    assert all(torch.equal(saved[n], best[n]) for n in best)
    assert not all(torch.equal(saved[n], last[n]) for n in best)
