"""Selective recompute (core/fast/selective.py): recomputed decoder layers that keep their gate/up
outputs, on the real 4-bit tiny model, eagerly (transformers' checkpoint) and through the stack
runner (graphs.py's checkpoint); and the memory plan's choice of how many."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.config import TrainConfig
from qlora_pipeline.core import fast
from qlora_pipeline.core.fast import nodes, selective
from qlora_pipeline.core.model import apply_lora
from qlora_pipeline.errors import ConfigError
from transformers import LlamaConfig

from tests.unit.test_fast_path import LLAMA_8B, plan_8b

GIB = 2**30


def lora_model(cfg, model, dropout: float):
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": dropout}))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # B = 0 would hide the adapter's part of the outputs
    fast.fuse_lora(model, keep_outputs=True)
    model.train()
    return model


class FrozenMatmulCount:
    """Counts the frozen base's matmuls (nodes._frozen_matmul) while a step runs."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = nodes._frozen_matmul

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(nodes, "_frozen_matmul", counted)


def step(model, ids, recomputed: int, selective_layers: int, seed: int = 5):
    fast.set_checkpointed_layers(model, recomputed, selective_layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    return loss.detach(), torch.autograd.grad(loss, trainable)


def same(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b))


@pytest.mark.parametrize("runner", [False, True], ids=["transformers_checkpoint", "stack_runner"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_selective_layers_give_the_gradients_of_a_whole_recompute_and_skip_gate_up(tiny_model, monkeypatch, runner, dropout):
    cfg, _, model = tiny_model
    model = lora_model(cfg, model, dropout)
    assert fast.selective_recompute_possible(model)
    if runner:
        assert fast.enable_cuda_graphs(model, capture=False) is not None
    ids = torch.randint(3, 200, (2, 12))
    kept_loss, kept = step(model, ids, 0, 0)
    count = FrozenMatmulCount(monkeypatch)
    whole_loss, whole = step(model, ids, 2, 0)
    whole_calls, count.calls = count.calls, 0
    sel_loss, sel = step(model, ids, 2, 2)
    # per layer: q/k/v 3 and gate/up 2 in the forward, o 1; down runs its adapter first and adds its
    # frozen matmul itself (FrozenLinearAddFunction), outside _frozen_matmul: 6 forward + 6 recompute
    # with the whole recompute, 6 + 4 with gate/up kept
    assert whole_calls == 2 * (6 + 6) and count.calls == 2 * (6 + 4)
    assert torch.allclose(sel_loss, whole_loss) and torch.allclose(sel_loss, kept_loss)
    assert same(sel, whole) and same(sel, kept)


def test_only_the_layers_chosen_keep_outputs_and_the_choice_can_be_undone(tiny_model, monkeypatch):
    cfg, _, model = tiny_model
    model = lora_model(cfg, model, 0.1)
    layers = fast.decoder_layers(model)
    ids = torch.randint(3, 200, (2, 12))
    count = FrozenMatmulCount(monkeypatch)
    step(model, ids, 2, 1)
    assert count.calls == 2 * 6 + 6 + 4  # the second layer (next to the kept ones) recomputes selectively
    assert [layer._keep_mlp_outputs for layer in layers] == [False, True]
    assert isinstance(layers[1]._gradient_checkpointing_func, selective.KeepOutputsCheckpoint)
    fast.set_checkpointed_layers(model, 2, 0)
    assert not any(isinstance(layer._gradient_checkpointing_func, selective.KeepOutputsCheckpoint) for layer in layers)
    count.calls = 0
    step(model, ids, 2, 0)
    assert count.calls == 2 * (6 + 6)
    assert selective.current_store() is None  # nothing left active on this thread


def test_a_lean_runner_call_keeps_no_outputs(tiny_model, monkeypatch):
    # run_lean (a second forward before the captured one's backward) must add only the layers' inputs
    cfg, _, model = tiny_model
    model = lora_model(cfg, model, 0.0)
    runner = fast.enable_cuda_graphs(model, capture=False)
    ids = torch.randint(3, 200, (2, 12))
    calls = []
    real_run_layers = runner.run_layers

    def recorded(hidden, kwargs, seeds=None):
        calls.append((hidden.detach().requires_grad_(), kwargs))
        return real_run_layers(hidden, kwargs, seeds)

    monkeypatch.setattr(runner, "run_layers", recorded)
    count = FrozenMatmulCount(monkeypatch)
    _, grads = step(model, ids, 2, 2)
    assert count.calls == 2 * (6 + 4)
    hidden, kwargs = calls[-1]
    count.calls = 0
    out = runner.run_lean(hidden, kwargs)
    torch.autograd.grad(out.float().square().sum(), hidden)
    assert count.calls == 2 * (6 + 6) and runner.lean is False


def test_a_model_without_gate_and_up_lora_layers_cannot_recompute_selectively(tiny_model):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"target_modules": ["q_proj", "v_proj", "down_proj"]}))
    fast.fuse_lora(model, keep_outputs=True)
    assert not fast.selective_recompute_possible(model)
    fast.unfuse_lora(model)
    with pytest.raises(ConfigError, match="selective_recompute is true but cannot run without LoRA layers on gate_proj"):
        fast.apply_fast_path(model, TrainConfig(gradient_checkpointing=True, selective_recompute=True), max_seq_len=16)
    fast.unfuse_lora(model)
    model, _, report = fast.apply_fast_path(model, TrainConfig(per_device_batch_size=4, gradient_checkpointing=True), max_seq_len=16)
    assert report.plan.checkpoint_layers == 2 and report.plan.kept_output_layers == 0  # auto: whole recomputes


def test_true_refused_at_load_for_targets_without_gate_and_up_and_for_fsdp(tiny_cfg):
    with pytest.raises(ConfigError, match="lora.target_modules lacks up_proj; add them"):
        tiny_cfg("train.selective_recompute=true", 'lora.target_modules=["q_proj", "gate_proj"]')
    assert tiny_cfg("train.selective_recompute=true").train.selective_recompute is True  # all-linear
    assert tiny_cfg('lora.target_modules=["q_proj"]').train.selective_recompute == "auto"
    with pytest.raises(ValueError, match="selective_recompute: true does not run under distributed: fsdp"):
        TrainConfig(selective_recompute=True, distributed="fsdp")


def test_unfuse_puts_back_whole_recomputes(tiny_model):
    cfg, _, model = tiny_model
    model = lora_model(cfg, model, 0.0)
    fast.set_checkpointed_layers(model, 2, 2)
    fast.unfuse_lora(model)
    layers = fast.decoder_layers(model)
    assert not any(isinstance(layer._gradient_checkpointing_func, selective.KeepOutputsCheckpoint) for layer in layers)
    assert not any(vars(layer).get("_keep_mlp_outputs") for layer in layers)


def test_fast_path_takes_selective_layers_where_the_budget_leaves_room(tiny_model, monkeypatch):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    monkeypatch.setattr(fast.options, "available_ram_bytes", lambda: 256 * GIB)
    model, _, report = fast.apply_fast_path(model, TrainConfig(per_device_batch_size=4, gradient_checkpointing=True), max_seq_len=16)
    # every layer recomputes (the setting); the budget has room, so each keeps its gate/up outputs
    assert (report.plan.checkpoint_layers, report.plan.kept_output_layers) == (2, 2)
    assert report.record()["selective_recompute_layers"] == 2 and "2 selectively" in report.describe()
    assert [layer._keep_mlp_outputs for layer in fast.decoder_layers(model)] == [True, True]


def test_selective_recompute_switch_and_refusals():
    assert fast.resolve_options(TrainConfig(), "cpu").selective_recompute is True
    assert fast.resolve_options(TrainConfig(fused_lora=False), "cpu").selective_recompute is False
    assert fast.resolve_options(TrainConfig(selective_recompute=False), "cpu").selective_recompute is False
    with pytest.raises(ValueError, match="selective_recompute: true needs fused LoRA"):
        TrainConfig(selective_recompute=True, fused_lora=False)
    with pytest.raises(ValueError, match="selective_recompute: true needs fused LoRA"):
        TrainConfig(selective_recompute=True, compile=True)


def test_selective_refused_where_compile_resolves_on(monkeypatch):
    monkeypatch.setattr(fast.options, "compile_available", lambda: True)
    monkeypatch.setattr(fast.options, "_cuda", lambda device=None: True)
    with pytest.raises(ConfigError, match="selective_recompute is true and train.compile resolves to on"):
        fast.resolve_options(TrainConfig(selective_recompute=True, compile="auto", fused_dropout=False, memory_budget_gib=10), "cuda")
    assert fast.resolve_options(TrainConfig(compile="auto", fused_dropout=False, memory_budget_gib=10), "cuda").selective_recompute is False


def test_the_plan_trades_kept_layers_for_selective_ones_within_the_budget():
    whole = plan_8b(14.2, lora_dropout=0.0)
    sel = plan_8b(14.2, lora_dropout=0.0, selective=True)
    assert whole.kept_output_layers == 0 and sel.fits and sel.estimated_peak_gib <= 14.2
    # more layers recompute, but most of them selectively: less recompute work in all
    assert sel.checkpoint_layers > whole.checkpoint_layers and sel.kept_output_layers > 0
    dims = fast.ModelDims.from_config(LlamaConfig(**LLAMA_8B))
    f = fast.selective_recompute_fraction(dims, 2048)
    assert f == pytest.approx(0.40, abs=0.01)
    work = lambda p: p.checkpoint_layers - p.kept_output_layers * (1 - f)  # noqa: E731
    assert work(sel) < work(whole)
    assert fast.kept_output_bytes(dims) == 2 * 14336 * 2
    # each selective layer adds its kept outputs to the estimate
    base = fast.estimate_peak_bytes(dims, 8192, 32, 6 * GIB, liger=True, lora_dropout=0.0)
    more = fast.estimate_peak_bytes(dims, 8192, 32, 6 * GIB, liger=True, lora_dropout=0.0, kept_output_layers=3)
    assert more - base == pytest.approx(3 * 8192 * fast.kept_output_bytes(dims))
    # no room left over: none selective; no recompute: none either
    assert plan_8b(125.0, selective=True).checkpoint_layers == 0
    assert plan_8b(4.0, selective=True).kept_output_layers == 0


def test_store_refuses_outputs_of_another_shape():
    store = selective.OutputStore()
    with store.active():
        store.put((torch.zeros(2, 3), torch.zeros(2, 3)))
    with store.active():
        with pytest.raises(RuntimeError, match="run the backward before calling the layers again"):
            store.take([(2, 4), (2, 3)])
    with store.active():
        assert store.take([(2, 3)]) is None  # nothing left: computed as usual


def test_sharded_training_recomputes_wholly(tiny_model, monkeypatch):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    monkeypatch.setattr(fast.options, "available_ram_bytes", lambda: 256 * GIB)
    train_cfg = TrainConfig(per_device_batch_size=4, gradient_checkpointing=True)
    model, _, report = fast.apply_fast_path(model, train_cfg, max_seq_len=16, sharded=True)
    assert (report.plan.checkpoint_layers, report.plan.kept_output_layers) == (2, 0)
    assert not any(layer._keep_mlp_outputs for layer in fast.decoder_layers(model))
    fast.unfuse_lora(model)
    with pytest.raises(ConfigError, match="selective_recompute is true but cannot run under FSDP"):
        fast.apply_fast_path(model, train_cfg.model_copy(update={"selective_recompute": True}), max_seq_len=16, sharded=True)
