"""The fast training path (core/fast/) on the CPU: knobs, memory plan, batches, fused LoRA, training.

The GPU-only pieces (liger-kernel, varlen and cuDNN attention) are measured by
benchmarks/gpu_train_bench.py on the GPU machine; here everything else runs on the real 4-bit
tiny model.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig

from qlora_pipeline.config import TrainConfig, validate_params
from qlora_pipeline.core import fast
from qlora_pipeline.core.data.collate import PackingCollator, make_collator
from qlora_pipeline.core.model import apply_lora, resolve_compute_dtype
from qlora_pipeline.errors import ConfigError
from qlora_pipeline.core.train import train_adapter
from qlora_pipeline.errors import ConfigError

LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
)
GIB = 2**30


# --- knobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False, "auto", 0, 12])
def test_checkpointing_knob_accepts_bool_auto_or_layer_count(value):
    assert TrainConfig(gradient_checkpointing=value).gradient_checkpointing == value


@pytest.mark.parametrize(
    "train, message",
    [
        ({"gradient_checkpointing": -1}, "train.gradient_checkpointing: must be true, false, auto or a number"),
        ({"memory_budget_gib": 0}, "train.memory_budget_gib: must be auto or a positive number"),
        ({"use_liger": "sometimes"}, "train.use_liger"),
        ({"padding_free": "maybe"}, "train.padding_free"),
        ({"fused_lora": 3}, "train.fused_lora"),
        ({"dropout_mask_bits": "bits"}, "train.dropout_mask_bits"),
        ({"compile": "sometimes"}, "train.compile"),
        ({"fast_path": True}, "train.fast_path: unknown key"),
    ],
)
def test_bad_knobs_fail_with_their_key(train, message):
    with pytest.raises(ConfigError, match=message):
        validate_params({"train": train})


def test_auto_knobs_on_a_cpu_plan_memory_against_ram_and_fuse_lora_only():
    opts = fast.resolve_options(TrainConfig(), "cpu")
    assert (opts.liger, opts.fused_lora, opts.padding_free, opts.tune_micro_batch) == (False, True, False, False)
    assert opts.dropout_mask_bits is False
    # auto checkpointing is planned against half the RAM available now, not forced on every layer
    assert opts.checkpointing == "auto"
    assert opts.memory_budget_gib == pytest.approx(fast.default_cpu_memory_budget_gib(), rel=0.2)


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_compile_knob_accepts_bool_or_auto_and_defaults_off(value):
    assert TrainConfig().compile is False
    assert validate_params({"train": {"compile": value}}).train.compile == value
    # auto means "with CUDA": off on a CPU; true is honoured on a CPU too (torch.compile runs there)
    assert fast.resolve_options(TrainConfig(compile=value), "cpu").compile is (value is True)


def test_compile_forced_on_where_torch_compile_is_disabled_fails_clearly(monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert fast.resolve_options(TrainConfig(compile="auto"), "cpu").compile is False
    with pytest.raises(ConfigError, match="train.compile is true but it is not available"):
        fast.resolve_options(TrainConfig(compile=True), "cpu")


def test_compiled_plan_keeps_the_measured_fastest_choice():
    # H200, 8B, 14.2 GiB (benchmarks/README.md): compiled, 4 x 2048 with 30/32 recomputed ran 10,139
    # tokens/s and 1 x 2048 x 4 with 15/32 only 6,937, so the compiled cost model must keep 4 x 2048
    eager, compiled = plan_8b(14.2), plan_8b(14.2, compiled=True)
    assert (eager.micro_batch_size, eager.checkpoint_layers) == (4, 29)
    assert (compiled.micro_batch_size, compiled.checkpoint_layers, compiled.fits) == (4, 29, True)
    dims = fast.ModelDims.from_config(LlamaConfig(**LLAMA_8B))
    one = 4 * fast.step_seconds(dims, 2048, 2048, 15, compiled=True)
    # the measured 1 x 2048 x 4 step time, within the cost model's accuracy (+11% here: the GPU's
    # rate at 2048-token micro-batches comes from two eager measurements, core/fast/memory.py)
    assert 0.9 < one / (8192 / 6937) < 1.15


def test_bit_masks_forced_on_without_a_cuda_gpu_fail_clearly():
    with pytest.raises(ConfigError, match="train.dropout_mask_bits is true but it is not available here"):
        fast.resolve_options(TrainConfig(dropout_mask_bits=True), "cpu")


def test_fused_dropout_is_off_on_a_cpu_and_refused_when_forced():
    assert fast.resolve_options(TrainConfig(), "cpu").fused_dropout is False
    with pytest.raises(ConfigError, match="train.fused_dropout is true but it is not available here"):
        fast.resolve_options(TrainConfig(fused_dropout=True), "cpu")


def test_liger_forced_on_without_liger_fails_clearly(monkeypatch):
    monkeypatch.setattr(fast.options, "liger_available", lambda: False)
    with pytest.raises(ConfigError, match="train.use_liger is true but it is not available"):
        fast.resolve_options(TrainConfig(use_liger=True), "cpu")


# --- memory plan ---------------------------------------------------------------------------------


def plan_8b(budget_gib, **kw):
    dims = fast.ModelDims.from_config(LlamaConfig(**LLAMA_8B))
    args = dict(seq_len=2048, batch_size=4, accumulation=1, static_bytes=5.97 * GIB, budget_gib=budget_gib,
                checkpointing="auto", tune_micro_batch=True, liger=True, lora_dropout=0.05)
    return fast.plan_memory(dims, **{**args, **kw})


def test_plan_reproduces_the_measured_h200_choices():
    # 14.2 GiB (0.6x the original recipe) -> 4 x 2048 with 29 of 32 layers recomputed (30 measured
    # 11.5 GiB, so a third kept layer fits); the whole GPU -> no recompute (58 GiB measured).
    tight = plan_8b(14.2)
    assert (tight.micro_batch_size, tight.checkpoint_layers, tight.fits) == (4, 29, True)
    assert tight.estimated_peak_gib <= 14.2
    roomy = plan_8b(125.0)
    assert (roomy.micro_batch_size, roomy.checkpoint_layers) == (4, 0)


def test_plan_keeps_the_effective_batch_and_says_when_nothing_fits():
    plan = plan_8b(14.2, batch_size=2, accumulation=4)
    assert plan.micro_batch_size * plan.gradient_accumulation_steps == 8
    hopeless = plan_8b(4.0)
    assert not hopeless.fits and hopeless.checkpoint_layers == 32 and hopeless.micro_batch_size == 1


def test_plan_honours_a_fixed_checkpointing_choice():
    assert plan_8b(125.0, checkpointing=True).checkpoint_layers == 32
    assert plan_8b(125.0, checkpointing=False).checkpoint_layers == 0
    assert plan_8b(125.0, checkpointing=7).checkpoint_layers == 7


def test_estimate_tracks_the_measured_peaks():
    # peaks measured on the H200 (benchmarks/results/explore_8b_h200.json): (micro, recomputed, dropout) -> GiB
    dims = fast.ModelDims.from_config(LlamaConfig(**LLAMA_8B))
    measured_peaks = {
        (4, 32, 0.05): 9.8, (4, 30, 0.05): 11.51, (4, 16, 0.05): 33.23, (4, 0, 0.05): 58.04,
        (2, 8, 0.05): 25.77, (1, 32, 0.05): 6.89, (1, 0, 0.0): 14.62, (2, 16, 0.0): 15.16,
    }
    for (micro, layers, dropout), measured in measured_peaks.items():
        est = fast.estimate_peak_bytes(dims, micro * 2048, layers, 5.97 * GIB, liger=True, lora_dropout=dropout) / GIB
        assert measured <= est <= 1.06 * measured, (micro, layers, dropout, est)
    # with the masks as bits (benchmarks/results/explore_bits4x_8b_h200.json), static 6.0 GiB
    for layers, measured in {29: 12.44, 28: 13.73, 32: 9.86}.items():
        est = fast.estimate_peak_bytes(dims, 4 * 2048, layers, 6.0 * GIB, liger=True, lora_dropout=0.05, bit_masks=True) / GIB
        assert measured <= est <= 1.06 * measured, (layers, est)


# --- batches -------------------------------------------------------------------------------------


def padding_free(features: list[dict]) -> dict:
    """What the Trainer gets with train.padding_free on: the data collator's padding-free batch."""
    return PackingCollator(64, attention_boundaries=True)(features)


def test_padding_free_batches_have_no_padding_and_keep_samples_apart():
    out = padding_free([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10, 11, 12]}])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9, 10, 11, 12]]
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 8] and out["max_length_q"] == 5
    assert "attention_mask" not in out


def test_padding_free_splits_rows_packed_before():
    out = padding_free([{"input_ids": [1, 2, 3, 4, 5, 6], "position_ids": [0, 1, 0, 1, 2, 0]}])
    assert out["cu_seq_lens_q"].tolist() == [0, 2, 5, 6]
    assert out["labels"].tolist() == [[-100, 2, -100, 4, 5, -100]]


def test_full_unpacked_rows_stay_as_they_are():
    ids = torch.arange(12).view(2, 6)
    out = padding_free([{"input_ids": row.tolist()} for row in ids])
    assert torch.equal(out["input_ids"], ids) and "attention_mask" not in out and "cu_seq_lens_q" not in out


def test_pack_sequences_fills_rows_without_splitting_samples():
    lengths = [5, 3, 8, 2, 2, 7]
    rows = fast.pack_sequences(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows) and len(rows) == 3


# --- the model -----------------------------------------------------------------------------------


def tiny_dataset(tokenizer, rows: int = 24) -> Dataset:
    texts = [f"Row {i}: low-rank adapters train {'small ' * (i % 5)}matrices." for i in range(rows)]
    ids = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]  # lengths vary: padding
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def lora_with_visible_update(model, cfg):
    """LoRA without dropout and with B != 0, and a function giving (loss, LoRA grads) on fixed ids."""
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.0}))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the update visible
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 200, (2, 12))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        loss = model(input_ids=ids, labels=ids).loss
        return loss.detach(), torch.autograd.grad(loss, trainable)

    return model, loss_and_grads


def test_fused_lora_matches_peft_forward_and_grads(tiny_model):
    cfg, _, model = tiny_model
    model, loss_and_grads = lora_with_visible_update(model, cfg)
    ref_loss, ref_grads = loss_and_grads()
    assert fast.fuse_lora(model) == 14
    loss, grads = loss_and_grads()
    fast.unfuse_lora(model)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, ref_grads))


def test_recompute_stops_before_the_last_frozen_matmul_of_each_layer(tiny_model, monkeypatch):
    # every layer checkpointed: the backward re-runs each layer's forward, but only until its last
    # saved tensor; the tail layer (down_proj) runs its adapter first, so its 4-bit matmul is skipped
    cfg, _, model = tiny_model
    model, loss_and_grads = lora_with_visible_update(model, cfg)
    ref_loss, ref_grads = loss_and_grads()
    fast.set_checkpointed_layers(model, 2)
    model.train()  # checkpointing only applies in training mode; LoRA dropout is 0 here
    kinds = {}
    for layer in fast.decoder_layers(model):
        for kind in ("down", "up"):
            kinds[id(getattr(layer.mlp, f"{kind}_proj").base_layer.weight)] = kind
    calls = {"down": 0, "up": 0}
    frozen_matmul, frozen_weight = fast._frozen_matmul, fast._frozen_weight

    def count(weight):
        if id(weight) in kinds:
            calls[kinds[id(weight)]] += 1

    def counting_matmul(x, weight, *args):
        count(weight)
        return frozen_matmul(x, weight, *args)

    def counting_weight(weight, *args):
        count(weight)
        return frozen_weight(weight, *args)

    monkeypatch.setattr(fast.nodes, "_frozen_matmul", counting_matmul)
    monkeypatch.setattr(fast.nodes, "_frozen_weight", counting_weight)
    assert fast.fuse_lora(model) == 14
    loss, grads = loss_and_grads()
    # per layer, down: forward and backward; up: forward, recompute and backward
    assert calls == {"down": 4, "up": 6}
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, ref_grads))
    calls.update(down=0, up=0)
    fast.unfuse_lora(model)
    fast.fuse_lora(model, tail_first=False)
    loss_and_grads()
    assert calls == {"down": 6, "up": 6}
    fast.unfuse_lora(model)


def count_nodes(monkeypatch) -> list[int]:
    """Patches LoraLinearFunction.forward to record each node's number of members."""
    sizes: list[int] = []
    forward = fast.LoraLinearFunction.forward

    def counting(ctx, x, members, *weights):
        sizes.append(len(members))
        return forward(ctx, x, members, *weights)

    monkeypatch.setattr(fast.LoraLinearFunction, "forward", staticmethod(counting))
    return sizes


def test_sibling_layers_run_as_one_node_with_peft_results(tiny_model, monkeypatch):
    cfg, _, model = tiny_model
    model, loss_and_grads = lora_with_visible_update(model, cfg)
    model.train()  # in eval mode bitsandbytes repacks CPU weights for inference (and peft runs them)
    ref_loss, ref_grads = loss_and_grads()
    sizes = count_nodes(monkeypatch)
    fast.fuse_lora(model)
    loss, grads = loss_and_grads()
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2, 3, 3]  # per layer: q/k/v, o, gate/up, down
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, ref_grads))
    fast.unfuse_lora(model)
    sizes.clear()
    fast.fuse_lora(model, group_siblings=False)
    loss_and_grads()
    assert sizes == [1] * 14
    fast.unfuse_lora(model)
    assert not any(hasattr(m, "_lora_group") for m in model.modules())


def test_sibling_group_called_out_of_turn_falls_back_to_each_layer(tiny_model):
    cfg, _, model = tiny_model
    model, _ = lora_with_visible_update(model, cfg)
    model.train()
    attn = fast.decoder_layers(model)[0].self_attn
    x, other = torch.randn(2, 5, attn.q_proj.in_features), torch.randn(2, 5, attn.q_proj.in_features)
    expected = [attn.q_proj(x), attn.k_proj(other), attn.v_proj(x)]  # peft's forward
    fast.fuse_lora(model)
    got = [attn.q_proj(x), attn.k_proj(other), attn.v_proj(x)]  # k breaks the pattern
    assert not attn.q_proj._lora_group[0].enabled
    got += [attn.k_proj(x), attn.q_proj(x)]  # out of order, each on its own from now on
    fast.unfuse_lora(model)
    for a, b in zip(got, [*expected, attn.k_proj(x), attn.q_proj(x)]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_dropout_draws_each_layers_mask_as_single_nodes_do(tiny_model):
    # a group draws its members' masks in member order: with one seed, grouped and single nodes
    # see the same masks, so outputs and gradients agree exactly
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.3}))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    attn = fast.decoder_layers(model)[0].self_attn
    trainable = [p for m in (attn.q_proj, attn.k_proj, attn.v_proj) for p in m.parameters() if p.requires_grad]
    x = torch.randn(2, 5, attn.q_proj.in_features)

    def run(group: bool):
        fast.fuse_lora(model, group_siblings=group)
        xr = x.clone().requires_grad_()
        torch.manual_seed(3)
        out = sum(p(xr).square().sum() for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        grads = torch.autograd.grad(out, [xr, *trainable])
        fast.unfuse_lora(model)
        return out.detach(), grads

    (out_g, grads_g), (out_s, grads_s) = run(True), run(False)
    torch.testing.assert_close(out_g, out_s)
    for a, b in zip(grads_g, grads_s):
        torch.testing.assert_close(a, b)


def test_fused_lora_returns_the_autocast_dtype_for_float32_inputs(tiny_model):
    # OPT's LayerNorm runs in float32 under autocast, so its q/k/v inputs are float32; the LoRA
    # layers must still return bf16, as autocast's own matmuls do (flash attention takes no float32)
    cfg, _, model = tiny_model
    model, _ = lora_with_visible_update(model, cfg)
    model.train()  # as in training (in eval mode bitsandbytes repacks CPU weights for inference)
    attn, mlp = fast.decoder_layers(model)[0].self_attn, fast.decoder_layers(model)[0].mlp
    x = torch.randn(2, 5, attn.q_proj.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attn.q_proj(x)  # peft's forward
        fast.fuse_lora(model)
        fused, tail = attn.q_proj(x), mlp.down_proj(torch.randn(2, 5, mlp.down_proj.in_features))
    fast.unfuse_lora(model)
    assert fused.dtype == tail.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_fused_lora_leaves_trained_base_parameters_to_peft(tiny_model):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    layer = fast.decoder_layers(model)[0].self_attn.q_proj
    x = torch.zeros(1, 1, layer.in_features)
    assert fast._lora_inputs(layer, x, (), {}) is not None
    layer.base_layer.bias = torch.nn.Parameter(torch.zeros(layer.out_features))  # LoRA bias="all"
    assert fast._lora_inputs(layer, x, (), {}) is None
    layer.base_layer.bias.requires_grad_(False)
    assert fast._lora_inputs(layer, x, (), {}) is not None


def test_fused_lora_with_dropout_matches_peft_in_distribution(tiny_model):
    # with dropout the masks differ from peft's, so compare what must hold exactly: the same mask
    # seen by forward and backward (gradients equal a reference computed from the saved mask)
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.5}))
    layer = fast.decoder_layers(model)[0].self_attn.q_proj
    layer.train()
    for p in layer.lora_B.parameters():
        torch.nn.init.normal_(p, std=0.05)
    member, weight_a, weight_b = fast._lora_inputs(layer, torch.zeros(1, 1, layer.in_features), (), {})
    base_weight, bias, quant_state, scale, p = member.weight, member.bias, member.quant_state, member.scale, member.p
    assert p == 0.5
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    torch.manual_seed(7)
    out = fast.LoraLinearFunction.apply(x, (member,), weight_a, weight_b)
    torch.manual_seed(7)
    dropped, mask = torch.native_dropout(x.detach().reshape(-1, x.shape[-1]), p, True)
    xr = x.detach().clone().requires_grad_()
    a, b = weight_a.detach().clone().requires_grad_(), weight_b.detach().clone().requires_grad_()
    base = fast._frozen_matmul(xr.reshape(-1, x.shape[-1]), base_weight, bias, quant_state, x.dtype)
    ref = base + (xr.reshape(-1, x.shape[-1]) * mask / (1 - p)) @ a.t() @ b.t() * scale
    assert torch.allclose(out.reshape(-1, out.shape[-1]), ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(ref)
    out.backward(grad.view_as(out))
    ref.backward(grad)
    assert torch.allclose(weight_a.grad, a.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(weight_b.grad, b.grad, rtol=1e-4, atol=1e-6)
    # the frozen base's input gradient: bitsandbytes' dequantized weight, same as MatMul4Bit's
    base_grad = grad @ fast._frozen_weight(base_weight, quant_state, x.dtype)
    lora_grad = (grad @ b.detach() * scale @ a.detach()) * mask / (1 - p)
    assert torch.allclose(x.grad.reshape(-1, x.shape[-1]), base_grad + lora_grad, rtol=1e-4, atol=1e-5)


def test_checkpointing_the_first_layers_only(tiny_model):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    assert fast.set_checkpointed_layers(model, 1) == 1
    assert [layer.gradient_checkpointing for layer in fast.decoder_layers(model)] == [True, False]


def test_fast_path_trains_through_the_pipeline(tiny_model, tmp_path, tiny_cfg, monkeypatch):
    """Every CPU-capable piece forced on (fused LoRA, padding-free, 1 of 2 layers recomputed),
    through train_adapter's own hook: loss logged and finite, falls, LoRA moves, base does not."""
    cfg, tokenizer, model = tiny_model
    flattened = []
    collator = make_collator(tokenizer, False, 64, padding_free=True)
    monkeypatch.setattr(collator, "_flatten", lambda rows, f=collator._flatten, **kw: flattened.append(1) or f(rows, **kw))
    train_cfg = tiny_cfg("train.fused_lora=true", "train.padding_free=true", "train.gradient_checkpointing=1").train
    model = apply_lora(model, cfg.lora)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    result = train_adapter(
        model, tokenizer, tiny_dataset(tokenizer), collator, train_cfg,
        tmp_path / "ckpt", resolve_compute_dtype(cfg.quantization.compute_dtype),
    )

    assert result.plan["padding_free"] == 1
    losses = [row["loss"] for row in result.history]
    assert len(losses) == train_cfg.max_steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert [layer.gradient_checkpointing for layer in fast.decoder_layers(model)] == [True, False]
    assert len(flattened) >= train_cfg.max_steps  # the batches went through the padding-free collator
    params = dict(model.named_parameters())
    assert any(not torch.equal(lora_before[n], params[n]) for n in lora_before)
    assert all(torch.equal(base_before[n], params[n]) for n in base_before)


def test_compile_auto_leaves_a_cpu_model_eager(tiny_model):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    model, _, report = fast.apply_fast_path(model, TrainConfig(compile="auto"), max_seq_len=16)
    assert report.compiled_layers == 0 and "not compiled" in report.describe()
    assert all(layer._compiled_call_impl is None for layer in fast.decoder_layers(model))


def test_compiled_layers_train_like_eager_ones(tiny_model, monkeypatch):
    """train.compile: true on the CPU: every decoder layer compiled (aot_eager here: the same tracing
    through bitsandbytes' 4-bit ops, peft's LoRA and checkpointing, without building kernels), one
    of two layers recomputed; loss and LoRA gradients match the eager model's."""
    cfg, _, model = tiny_model
    monkeypatch.setattr(fast.layers, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    model, loss_and_grads = lora_with_visible_update(model, cfg)
    ref_loss, ref_grads = loss_and_grads()
    train_cfg = TrainConfig(compile=True, fused_lora=True, gradient_checkpointing=1)
    model, _, report = fast.apply_fast_path(model, train_cfg, max_seq_len=12)
    layers = fast.decoder_layers(model)
    assert report.compiled_layers == len(layers) == 2 and "2 layers compiled" in report.describe()
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    try:
        for _ in range(2):  # the second call runs the cached graph
            loss, grads = loss_and_grads()
            assert torch.allclose(loss, ref_loss, rtol=1e-5)
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, ref_grads))
    finally:
        torch._dynamo.reset()


def test_compiled_layers_with_lora_dropout_trace_whole(tiny_model, monkeypatch):
    """The CPU's 16-bit-draw dropout (Tensor.random_) broke each compiled layer's graph at every LoRA
    layer, and dynamo then recompiled the LoRA forward per module until its limit (SmolLM2: 30
    layers, a recompile storm and eager fallback). Compiled layers take torch's dropout: no break."""
    from torch._dynamo.utils import counters

    cfg, _, model = tiny_model
    monkeypatch.setattr(fast.layers, "COMPILE_BACKEND", "aot_eager")
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.05}))
    torch._dynamo.reset()
    counters.clear()
    try:
        model, _, report = fast.apply_fast_path(model, TrainConfig(compile=True, fused_lora=True, gradient_checkpointing=1), max_seq_len=16)
        assert report.compiled_layers == 2 and not report.bits16_mask
        ids = torch.randint(3, 200, (2, 16))
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


# --- the benchmark's own code path (benchmarks/gpu_train_bench.py --device cpu --tiny) ----------


@pytest.mark.parametrize("recipe", ["original", "fast"])
def test_benchmark_runs_on_the_tiny_shape(recipe):
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("gpu_train_bench", REPO / "benchmarks" / "gpu_train_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run_one(dict(
        device="cpu", shape="tiny", seq_len=bench.SEQ_LEN["tiny"], batch=bench.BATCH["tiny"], workload="variable",
        recipe=recipe, warmup=1, steps=2, lr=1e-3, seed=bench.SEED, lora_dropout=0.05,
    ))
    assert result["real_tokens"] > 0 and result["tokens_per_s"] > 0 and result["gflop_per_token"] > 0
    assert len(result["losses"]) == 3 and all(math.isfinite(x) for x in result["losses"])
    assert ("fast_path" in result) == (recipe == "fast")


def test_fused_dropout_forced_on_where_compile_resolves_on_fails_clearly(monkeypatch):
    # on a GPU, compile: auto resolves on, and compiled layers take torch's dropout: true would be ignored
    from qlora_pipeline.core import lowrank_dropout
    from qlora_pipeline.core.fast import options

    monkeypatch.setattr(options, "_cuda", lambda device=None: True)
    monkeypatch.setattr(lowrank_dropout, "available", lambda: True)
    monkeypatch.setattr(options, "compile_available", lambda: True)
    with pytest.raises(ConfigError, match="train.fused_dropout is true and train.compile resolves to on"):
        fast.resolve_options(TrainConfig(fused_dropout=True, compile="auto", memory_budget_gib=10), "cuda")
    assert fast.resolve_options(TrainConfig(fused_dropout=True, compile=False, memory_budget_gib=10), "cuda").fused_dropout
