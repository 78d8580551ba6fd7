"""The fast path on a CPU (core/fast/): recompute planned against RAM, fused LoRA with 16-bit-draw
dropout masks. The speed behind these defaults: benchmarks/cpu_bench.py (benchmarks/README.md, "CPU")."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig

from qlora_pipeline.config import TrainConfig
from qlora_pipeline.core import fast
from qlora_pipeline.core.data.collate import make_collator
from qlora_pipeline.core.model import apply_lora, resolve_compute_dtype
from qlora_pipeline.core.train import train_adapter

from .test_train_4bit import tiny_dataset

GIB = 2**30
SEQ_LEN = 16


def with_available_ram(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(fast.options, "available_ram_bytes", lambda: int(gib * GIB))


def tiny_peak_gib(model, cfg, checkpoint_layers: int) -> float:
    """The plan's estimate for the tiny model at batch 4 x SEQ_LEN, as apply_fast_path computes it."""
    dims = fast.ModelDims.from_config(fast.unwrap(model).config)
    static = fast.static_training_bytes(model)
    peak = fast.estimate_peak_bytes(
        dims, 4 * SEQ_LEN, checkpoint_layers, static, liger=False, lora_dropout=cfg.lora.dropout, element_bytes=4.0,
        float32_masks=True,
    )
    return peak / GIB


def recomputed(model) -> list[bool]:
    return [layer.gradient_checkpointing for layer in fast.decoder_layers(model)]


def test_cpu_options_plan_against_ram_and_fuse_lora(monkeypatch):
    with_available_ram(monkeypatch, 10.0)
    opts = fast.resolve_options(TrainConfig(), "cpu")
    assert opts.checkpointing == "auto" and opts.memory_budget_gib == pytest.approx(5.0)  # half the RAM available
    assert opts.fused_lora is True
    assert (opts.liger, opts.padding_free, opts.tune_micro_batch, opts.compile) == (False, False, False, False)
    assert fast.resolve_options(TrainConfig(memory_budget_gib=3), "cpu").memory_budget_gib == 3.0
    assert fast.resolve_options(TrainConfig(fused_lora=False), "cpu").fused_lora is False


def test_apply_lora_leaves_auto_checkpointing_to_the_plan(tiny_model):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    assert recomputed(model) == [False, False]


def test_auto_recomputes_nothing_on_a_cpu_with_ram_to_spare(tiny_model, monkeypatch):
    cfg, _, model = tiny_model
    with_available_ram(monkeypatch, 64.0)
    model = apply_lora(model, cfg.lora)
    model, _, report = fast.apply_fast_path(model, TrainConfig(per_device_batch_size=4), max_seq_len=SEQ_LEN)
    assert report.plan.checkpoint_layers == 0 and report.plan.fits
    assert recomputed(model) == [False, False]
    assert report.fused_lora_modules == 14 and report.bits16_mask
    assert "0/2 layers recompute" in report.describe() and "16-bit draws" in report.describe()


def test_auto_recomputes_as_few_layers_as_the_ram_needs(tiny_model, monkeypatch):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    none, one = tiny_peak_gib(model, cfg, 0), tiny_peak_gib(model, cfg, 1)
    assert none > one
    # half the available RAM is the budget: between the estimates with none and one layer recomputed
    with_available_ram(monkeypatch, none + one)
    cfg = TrainConfig(per_device_batch_size=4, selective_recompute=False)  # the whole-layer choice alone
    model, _, report = fast.apply_fast_path(model, cfg, max_seq_len=SEQ_LEN)
    assert report.plan.checkpoint_layers == 1 and report.plan.fits
    assert report.plan.estimated_peak_gib == pytest.approx(one)
    assert recomputed(model) == [True, False]  # the first layers: their recompute runs last


def test_auto_recomputes_every_layer_and_warns_when_nothing_fits(tiny_model, monkeypatch, caplog):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    with_available_ram(monkeypatch, 1e-6)
    model, _, report = fast.apply_fast_path(model, TrainConfig(per_device_batch_size=4), max_seq_len=SEQ_LEN)
    assert report.plan.checkpoint_layers == 2 and not report.plan.fits
    assert recomputed(model) == [True, True]
    assert "does not fit train.memory_budget_gib" in caplog.text


@pytest.mark.parametrize("setting, expected", [(True, [True, True]), (False, [False, False]), (1, [True, False])])
def test_an_explicit_setting_is_kept_on_a_cpu(tiny_model, monkeypatch, setting, expected):
    cfg, _, model = tiny_model
    with_available_ram(monkeypatch, 64.0)
    model = apply_lora(model, cfg.lora)
    assert recomputed(model) == [False, False]  # one place decides recompute: the fast path's plan
    model, _, report = fast.apply_fast_path(
        model, TrainConfig(gradient_checkpointing=setting, per_device_batch_size=4), max_seq_len=SEQ_LEN
    )
    assert recomputed(model) == expected


def test_cpu_estimate_tracks_the_measured_rss():
    # benchmarks/results/cpu_bench.json ("default" and "default_recompute"): SmolLM2-135M, float32,
    # 8 x 128 tokens, LoRA r 16 on every linear layer with dropout 0.05, fused LoRA: RSS added while
    # training (GiB) by the number of recomputed layers
    dims = fast.ModelDims.from_config(
        LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    )
    trainable_bytes = 30 * 16 * (2 * 1152 + 2 * 768 + 3 * 2112) * 4  # r x (in + out) per layer, float32
    measured = {0: 3.17, 30: 0.80}
    for layers, gib in measured.items():
        est = fast.estimate_peak_bytes(dims, 8 * 128, layers, 3 * trainable_bytes, liger=False, lora_dropout=0.05, element_bytes=4.0, float32_masks=True)
        assert 0.9 * gib <= est / GIB <= 1.1 * gib, (layers, est / GIB)


def test_bits16_dropout_drops_p_of_the_elements_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    out, mask = fast.bits16_dropout(x, 0.05)
    realised = fast.bits16_drop_count(0.05) / 65536
    assert abs(realised - 0.05) < 7.7e-6
    assert mask.dtype == torch.float32 and out.dtype == x.dtype
    assert abs(float((mask == 0).float().mean()) - realised) < 2e-3  # 400k draws: 5 standard errors
    assert torch.equal(out, x * mask)
    values = mask.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - realised))
    assert abs(float(out.mean()) - 1.0) < 3e-3
    torch.manual_seed(0)
    assert torch.equal(fast.bits16_dropout(x, 0.05)[1], mask)  # torch's generator: same seed, same mask


def test_bits16_dropout_edge_probabilities():
    x = torch.randn(3, 7)
    assert torch.equal(fast.bits16_dropout(x, 0.0)[0], x)
    out, mask = fast.bits16_dropout(x, 1.0)
    assert not out.any() and not mask.any()
    out, _ = fast.bits16_dropout(x.bfloat16(), 0.5)
    assert out.dtype == torch.bfloat16


def test_fused_lora_with_bits16_masks_has_the_reference_gradients(tiny_model):
    # forward and backward see the same mask: outputs and gradients equal a reference computed
    # with the mask bits16_dropout draws from the same seed
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.3}))
    layer = fast.decoder_layers(model)[0].mlp.up_proj
    layer.train()
    for p in layer.lora_B.parameters():
        torch.nn.init.normal_(p, std=0.05)
    layer._lora_bits16_dropout = True
    member, weight_a, weight_b = fast._lora_inputs(layer, torch.zeros(1, 1, layer.in_features), (), {})
    assert member.bits16 and member.p == pytest.approx(0.3)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    torch.manual_seed(11)
    out = fast.LoraLinearFunction.apply(x, (member,), weight_a, weight_b)
    torch.manual_seed(11)
    _, mask = fast.bits16_dropout(x.detach().reshape(-1, x.shape[-1]), member.p)
    xr = x.detach().clone().requires_grad_()
    a, b = weight_a.detach().clone().requires_grad_(), weight_b.detach().clone().requires_grad_()
    x2 = xr.reshape(-1, x.shape[-1])
    ref = fast._frozen_matmul(x2, member.weight, member.bias, member.quant_state, x.dtype) + (x2 * mask) @ a.t() @ b.t() * member.scale
    torch.testing.assert_close(out.reshape(-1, out.shape[-1]), ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(ref)
    out.backward(grad.view_as(out))
    ref.backward(grad)
    torch.testing.assert_close(weight_a.grad, a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight_b.grad, b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_cpu_defaults_train_through_the_pipeline(tiny_model, tmp_path, tiny_cfg, monkeypatch):
    """train_adapter with the defaults on a CPU and RAM for only part of the activations: the first
    layer recomputes (switched on by the plan alone), LoRA layers are fused with 16-bit-draw masks;
    the loss is logged and falls, LoRA moves in both layers, the base does not."""
    cfg, tokenizer, model = tiny_model
    train_cfg = tiny_cfg().train
    assert train_cfg.gradient_checkpointing == "auto" and train_cfg.fused_lora == "auto"
    model = apply_lora(model, cfg.lora)
    dims = fast.ModelDims.from_config(fast.unwrap(model).config)
    longest = max(len(r) for r in tiny_dataset(tokenizer)["input_ids"])

    def peak(k: int) -> float:
        est = fast.estimate_peak_bytes(dims, train_cfg.per_device_batch_size * longest, k, fast.static_training_bytes(model),
                                       liger=False, lora_dropout=cfg.lora.dropout, element_bytes=4.0, float32_masks=True)
        return est / GIB

    with_available_ram(monkeypatch, peak(0) + peak(1))
    drawn = []
    monkeypatch.setattr(fast.nodes, "bits16_dropout", lambda x, p, f=fast.bits16_dropout: drawn.append(1) or f(x, p))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    result = train_adapter(
        model, tokenizer, tiny_dataset(tokenizer), make_collator(tokenizer, False, 64), train_cfg,
        tmp_path / "ckpt", resolve_compute_dtype(cfg.quantization.compute_dtype),
    )

    losses = [row["loss"] for row in result.history]
    assert len(losses) == train_cfg.max_steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert recomputed(model) == [True, False]
    # the record says what trained: the plan's recompute, not params' "auto"
    assert result.plan["recomputed_layers"] == 1 and result.plan["num_layers"] == 2
    assert result.plan["micro_batch_size"] * result.plan["gradient_accumulation_steps"] == train_cfg.per_device_batch_size * train_cfg.gradient_accumulation_steps
    assert result.plan["fused_lora_modules"] > 0 and result.plan["measured_peak_of"] == "process rss"
    assert result.plan["measured_peak_gib"] > 0 and result.plan["attention"]
    assert drawn  # the fused layers drew their masks 16 bits at a time
    params = dict(model.named_parameters())
    for layer in ("layers.0.", "layers.1."):
        assert any(not torch.equal(lora_before[n], params[n]) for n in lora_before if layer in n), layer
    assert all(torch.equal(base_before[n], params[n]) for n in base_before)


def test_recomputed_layers_draw_the_same_bits16_masks(tiny_model):
    # checkpointing restores torch's CPU generator before a recompute, so a recomputed layer sees the
    # masks its forward drew: loss and LoRA gradients equal those without recompute
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.3}))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    fast.fuse_lora(model, bits16_mask=True)
    model.train()
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(layers: int):
        fast.set_checkpointed_layers(model, layers)
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        return loss.detach(), torch.autograd.grad(loss, trainable)

    (loss_plain, grads_plain), (loss_recomputed, grads_recomputed) = loss_and_grads(0), loss_and_grads(2)
    torch.testing.assert_close(loss_recomputed, loss_plain, rtol=0, atol=0)
    for a, b in zip(grads_recomputed, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
