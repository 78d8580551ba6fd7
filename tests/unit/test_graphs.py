"""CUDA graphs of the decoder stack (core/fast/graphs.py): what runs without a GPU.

The capture and replay themselves need CUDA (benchmarks/gpu_graphs_check.py checks them on the GPU
machine, gpu_train_bench.py's fast_graphs recipe measures them); here, on the real 4-bit tiny model:
the runner takes the model's layer loop and gives the same loss and gradients, the switch and its
refusals, and the memory plan's extra term.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_pipeline.config import TrainConfig
from qlora_pipeline.core import fast
from qlora_pipeline.core.fast import graphs
from qlora_pipeline.core.model import apply_lora
from qlora_pipeline.core.train import graph_counts as train_graph_counts
from qlora_pipeline.errors import ConfigError
from tests.unit.test_fast_path import LLAMA_8B, lora_with_visible_update


def test_runner_takes_the_layer_loop_with_the_same_loss_and_grads(tiny_model):
    cfg, _, model = tiny_model
    model, loss_and_grads = lora_with_visible_update(model, cfg)
    fast.fuse_lora(model)
    fast.set_checkpointed_layers(model, 1)
    ref_loss, ref_grads = loss_and_grads()
    keys = list(model.state_dict())
    runner = fast.enable_cuda_graphs(model, capture=False)
    assert runner is not None and len(runner.layers) == 2 and fast.stack_runner(model) is runner
    for _ in range(2):
        loss, grads = loss_and_grads()
        assert torch.allclose(loss, ref_loss, rtol=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, ref_grads))
    assert runner.eager_calls == 2 and runner.replays == 0
    # every LoRA layer got a seed of its own from one draw per forward
    seeds = [m._lora_seed for m in runner.lora_modules]
    assert len(seeds) == 14 and all(s.shape == (1,) and s.dtype == torch.int32 for s in seeds)
    assert list(model.state_dict()) == keys  # names (and so saved adapters) unchanged
    container = graphs._stack_container(model)
    assert list(container) == runner.layers and container[0] is runner.layers[0]
    fast.disable_cuda_graphs(model)
    assert type(container) is nn.ModuleList and not hasattr(runner.lora_modules[0], "_lora_seed")
    loss, _ = loss_and_grads()
    assert torch.allclose(loss, ref_loss, rtol=1e-6) and runner.eager_calls == 2


def test_eval_and_no_grad_calls_run_the_layers_eagerly(tiny_model):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    runner = fast.enable_cuda_graphs(model, capture=True)
    ids = torch.randint(3, 200, (1, 8))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # a CPU tensor: never captured
    assert runner.eager_calls == 2 and runner.replays == 0 and not runner.graphs
    # the run record says whether the graphs ran, not only that they were installed
    assert train_graph_counts(model) == {"cuda_graph_replays": 0, "cuda_graph_eager_calls": 2}
    fast.disable_cuda_graphs(model)
    assert train_graph_counts(model) == {}


def test_capture_requires_a_seeded_dropout_for_lora_dropout(tiny_model):
    # a captured recompute cannot restore torch's generator: with capture on, a LoRA dropout that
    # cannot take a seeded dropout (here: a CPU input) is refused instead of drawing new masks
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.1}))
    fast.fuse_lora(model)
    fast.enable_cuda_graphs(model, capture=True)
    ids = torch.randint(3, 200, (1, 8))
    model.train()
    with pytest.raises(RuntimeError, match="seeded dropout that CUDA graphs need; set train.cuda_graphs to false"):
        model(input_ids=ids, labels=ids)


def test_cuda_graphs_switch_and_its_refusals():
    assert TrainConfig().cuda_graphs == "auto"
    assert fast.resolve_options(TrainConfig(cuda_graphs="auto"), "cpu").cuda_graphs is False
    with pytest.raises(ConfigError, match="train.cuda_graphs is true but no CUDA GPU is visible here"):
        fast.resolve_options(TrainConfig(cuda_graphs=True), "cpu")
    with pytest.raises(ValueError, match="distributed to ddp or auto"):
        TrainConfig(cuda_graphs=True, distributed="fsdp")
    for bad in ({"compile": True}, {"fused_lora": False}):
        with pytest.raises(ValueError, match="cuda_graphs: true needs fused LoRA layers"):
            TrainConfig(cuda_graphs=True, **bad)


def test_graphs_refused_where_several_ranks_run(monkeypatch):
    with pytest.raises(ValueError, match="cuda_graphs: true runs on one GPU but num_gpus is 2"):
        TrainConfig(cuda_graphs=True, num_gpus=2, gradient_accumulation_steps=4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fast.options._cuda_graphs_switch("auto", on_gpu=True) is False
    with pytest.raises(ConfigError, match="one of several ranks"):
        fast.options._cuda_graphs_switch(True, on_gpu=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fast.options._cuda_graphs_switch("auto", on_gpu=True) is True
    assert fast.options._cuda_graphs_switch("auto", on_gpu=False) is False


def test_plan_counts_the_graphs_buffers_and_no_host_time():
    from transformers import LlamaConfig

    dims = fast.ModelDims.from_config(LlamaConfig(**LLAMA_8B))
    tokens = 8192
    kw = dict(liger=True, lora_dropout=0.05, bit_masks=True)
    eager = fast.estimate_peak_bytes(dims, tokens, 29, 6e9, **kw)
    graphed = fast.estimate_peak_bytes(dims, tokens, 29, 6e9, graphs=True, **kw)
    assert graphed - eager == pytest.approx(fast.memory.GRAPH_HIDDEN_STATES * tokens * dims.hidden * 2)
    # host time gone: the step is the GPU's estimate alone, below the eager one
    eager_s = fast.step_seconds(dims, tokens, 2048, 29)
    graphed_s = fast.step_seconds(dims, tokens, 2048, 29, graphs=True)
    assert graphed_s < eager_s


class _Captured:
    """Stands for a captured shape in StackRunner.decide: busy while a replay awaits its backward."""

    def __init__(self):
        self.pending = None

    busy = graphs._StackGraph.busy


def test_a_shape_is_captured_at_its_second_call_unless_shapes_vary():
    runner = graphs.StackRunner([nn.Linear(2, 2)], [], capture=True)
    assert [runner.decide("a"), runner.decide("a")] == ["eager", "capture"]
    runner.graphs["a"] = _Captured()
    assert [runner.decide("a"), runner.decide("b"), runner.decide("b")] == ["replay", "eager", "eager"]
    odd_first = graphs.StackRunner([nn.Linear(2, 2)], [], capture=True)  # the one short row came first
    assert [odd_first.decide(k) for k in ("short", "a", "a")] == ["eager", "eager", "capture"]
    varied = graphs.StackRunner([nn.Linear(2, 2)], [], capture=True)
    assert [varied.decide(k) for k in ("a", "b", "c", "a", "b")] == ["eager"] * 5 and varied.varied
    assert len(varied.seen) == 3  # no more counting once shapes vary


def test_a_second_forward_before_the_backward_runs_eagerly():
    # two forwards, then two backwards: the second must not overwrite the first replay's activations
    class Node:
        pass

    runner = graphs.StackRunner([nn.Linear(2, 2)], [], capture=True)
    captured = runner.graphs["a"] = _Captured()
    node = Node()
    captured.pending = __import__("weakref").ref(node)
    assert runner.decide("a") == "lean"
    del node  # the first replay's graph was dropped (or its backward ran): replays resume
    assert runner.decide("a") == "replay"


def test_lean_run_recomputes_every_layer_for_that_call_only(tiny_model, monkeypatch):
    cfg, _, model = tiny_model
    model, loss_and_grads = lora_with_visible_update(model, cfg)
    fast.fuse_lora(model)
    fast.set_checkpointed_layers(model, 2)
    fast.set_checkpointed_layers(model, 0)
    ref_loss, ref_grads = loss_and_grads()
    runner = fast.enable_cuda_graphs(model, capture=False)
    seen = []
    run_layers = runner.run_layers
    runner.run_layers = lambda h, kw, seeds=None: seen.append([layer.gradient_checkpointing for layer in runner.layers]) or run_layers(h, kw)
    monkeypatch.setattr(graphs.StackRunner, "__call__", lambda self, hidden, **kw: self.run_lean(hidden, kw))
    loss, grads = loss_and_grads()
    assert seen == [[True, True]]
    assert [layer.gradient_checkpointing for layer in runner.layers] == [False, False]
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize(
    ("lengths", "one"),
    [([8, 8, 8, 8], True), ([8, 8, 8, 5], True), ([5, 8, 8, 8], True), ([8, 8, 5, 5], False), ([3, 9, 4], False), ([7], True)],
)
def test_rows_of_one_length_allow_one_short_last_row(lengths, one):
    from datasets import Dataset

    rows = Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    assert fast.rows_of_one_length(rows) is one


def test_auto_takes_graphs_only_for_one_shape_and_true_insists():
    options = fast.FastOptions(liger=False, fused_lora=True, padding_free=True, checkpointing="auto", tune_micro_batch=True,
                               memory_budget_gib=10.0, cuda_graphs=True)
    possible = fast._graphs_possible
    assert possible(TrainConfig(), options, 0.0, fixed_shapes=True) is True
    assert possible(TrainConfig(), options, 0.0, fixed_shapes=False) is False  # varying shapes: auto stays eager
    assert possible(TrainConfig(cuda_graphs=True), options, 0.0, fixed_shapes=False) is True
    unfused = fast.FastOptions(**{**vars(options), "fused_lora": False})
    assert possible(TrainConfig(), unfused, 0.0, fixed_shapes=True) is False
    with pytest.raises(ConfigError, match="train.cuda_graphs is true but needs fused LoRA layers"):
        possible(TrainConfig(cuda_graphs=True), unfused, 0.0, fixed_shapes=True)


def test_fsdp_keeps_liger_loss_kernel_off_and_plans_the_logits(tiny_model, monkeypatch):
    # liger's fused linear+cross-entropy reads the head's weight without calling the head, so FSDP
    # never gathers it (on the GPU: "mixed torch.Tensor and DTensor"); sharded runs keep it off
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    calls = []
    monkeypatch.setattr(fast.options, "liger_available", lambda: True)
    monkeypatch.setattr(fast, "apply_liger", lambda m, **kw: calls.append(kw) or True)
    for sharded in (False, True):
        fast.apply_fast_path(model, TrainConfig(use_liger=True), max_seq_len=16, sharded=sharded)
    assert [c["loss_kernel"] for c in calls] == [True, False]
    from transformers import LlamaConfig

    dims = fast.ModelDims.from_config(LlamaConfig(**LLAMA_8B))
    fused = fast.estimate_peak_bytes(dims, 8192, 29, 6e9, liger=True, lora_dropout=0.05)
    unfused = fast.estimate_peak_bytes(dims, 8192, 29, 6e9, liger=True, lora_dropout=0.05, fused_loss=False)
    assert unfused - fused == pytest.approx(8192 * dims.vocab * (2 + 4 + 4))


def test_models_the_runner_cannot_serve_keep_their_own_loop(tiny_model):
    """graph_blocker: a forward that does not hand every layer the same arguments, or dropout that a
    captured recompute would draw anew, and the graphs stay off (auto) or are refused (true)."""
    from qlora_pipeline.core.fast.memory import unwrap

    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    config = unwrap(model).config
    assert graphs.graph_blocker(model) is None
    for attr, value, reason in (
        ("model_type", "opt", "model type 'opt'"),
        ("layer_types", ["sliding_attention", "full_attention"], "different attention masks"),
        ("attention_dropout", 0.1, "attention dropout"),
    ):
        before = getattr(config, attr, None)
        setattr(config, attr, value)
        try:
            assert reason in graphs.graph_blocker(model)
            assert fast.enable_cuda_graphs(model) is None and graphs._stack_container(model).__class__ is nn.ModuleList
            options = fast.FastOptions(liger=False, fused_lora=True, padding_free=True, checkpointing="auto",
                                       tune_micro_batch=True, memory_budget_gib=10.0, cuda_graphs=True)
            assert fast._graphs_possible(TrainConfig(), options, 0.0, True, graphs.graph_blocker(model)) is False
            with pytest.raises(ConfigError, match=f"train.cuda_graphs is true but cannot run here: .*{reason}"):
                fast._graphs_possible(TrainConfig(cuda_graphs=True), options, 0.0, True, graphs.graph_blocker(model))
        finally:
            setattr(config, attr, before)
    layer = fast.decoder_layers(model)[0]
    layer.extra_dropout = nn.Dropout(0.1)
    assert "the model's own dropout is on" in graphs.graph_blocker(model)
    del layer.extra_dropout


def test_trained_base_biases_run_peft_forward_and_block_graphs(tiny_model):
    # lora.bias: all on a model whose linear layers have biases: peft's own forward (and dropout) runs
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.1}))
    for module in fast.layers._lora_linears(model):
        module.base_layer.bias = nn.Parameter(torch.zeros(module.base_layer.out_features))
    assert "LoRA layers train the base layer's bias" in graphs.graph_blocker(model)
    # and should a runner be forced on, peft's own dropout is refused rather than drawn anew
    fast.fuse_lora(model)
    container = graphs._stack_container(model)
    runner = graphs.StackRunner(list(container), [m for layer in container for m in fast.layers._lora_linears(layer)])
    for module in runner.lora_modules:
        module._lora_seed_required = True
    ids = torch.randint(3, 200, (1, 8))
    model.train()
    with pytest.raises(RuntimeError, match="runs peft's own dropout, which CUDA graphs cannot repeat"):
        model(input_ids=ids, labels=ids)


def test_disable_leaves_checkpointing_as_it_was_and_drops_the_seeds(tiny_model):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.0}))
    fast.fuse_lora(model)
    fast.set_checkpointed_layers(model, 1)
    before = [layer._gradient_checkpointing_func for layer in fast.decoder_layers(model)]
    runner = fast.enable_cuda_graphs(model, capture=True)
    assert [layer._gradient_checkpointing_func for layer in runner.layers] == before
    ids = torch.randint(3, 200, (1, 8))
    model(input_ids=ids, labels=ids)
    fast.disable_cuda_graphs(model)
    assert [layer._gradient_checkpointing_func for layer in fast.decoder_layers(model)] == before
    assert not any(hasattr(m, "_lora_seed_required") or hasattr(m, "_lora_seed") for m in runner.lora_modules)


@pytest.fixture
def seeded_cpu_dropout(monkeypatch):
    """The bit-mask dropout's contract on the CPU: the mask depends on the seed tensor alone."""
    from qlora_pipeline.core import bitmask_dropout

    def forward(x, p, seed=None):
        gen = torch.Generator().manual_seed(int(seed.item()) if seed is not None else 0)
        keep = torch.rand(x.shape, generator=gen) >= p
        return x * keep / (1 - p), keep

    def backward(grad, keep, p, out=None):
        part = grad * keep / (1 - p)
        return part if out is None else out.add_(part)

    monkeypatch.setattr(bitmask_dropout, "supports", lambda x: True)
    monkeypatch.setattr(bitmask_dropout, "dropout_forward", forward)
    monkeypatch.setattr(bitmask_dropout, "dropout_backward", backward)


def test_a_recompute_draws_its_own_forwards_masks_after_another_forward(tiny_model, seeded_cpu_dropout):
    """Two forwards, then the first one's backward: each recomputed layer must draw the masks of the
    forward it belongs to (its seeds are the checkpoint's inputs), not the latest forward's."""
    cfg, _, model = tiny_model
    model, _ = lora_with_visible_update(model, cfg)
    model = fast.unwrap(model)
    for module in fast.layers._lora_linears(model):
        module.lora_dropout["default"] = nn.Dropout(0.3)
    fast.fuse_lora(model, bit_masks=True)
    fast.set_checkpointed_layers(model, 2)
    runner = fast.enable_cuda_graphs(model, capture=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    ids_a, ids_b = torch.randint(3, 200, (2, 12)), torch.randint(3, 200, (2, 12))

    loss = model(input_ids=ids_a, labels=ids_a).loss
    seeds = runner.last_seeds.clone()
    reference = torch.autograd.grad(loss, trainable)

    run_layers = runner.run_layers
    runner.run_layers = lambda hidden, kwargs, seeds_=None: run_layers(hidden, kwargs, seeds=seeds)
    loss_a = model(input_ids=ids_a, labels=ids_a).loss  # the same seeds again
    runner.run_layers = run_layers
    model(input_ids=ids_b, labels=ids_b)  # another forward before loss_a's backward
    grads = torch.autograd.grad(loss_a, trainable)
    assert torch.allclose(loss_a, loss)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, reference))
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_peft_forward_refusal_only_where_its_dropout_would_run(tiny_model):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.1}))
    for module in fast.layers._lora_linears(model):
        module.base_layer.bias = nn.Parameter(torch.zeros(module.base_layer.out_features))
        module._lora_seed_required = True
    fast.fuse_lora(model)
    ids = torch.randint(3, 200, (1, 8))
    model.train()
    with model.disable_adapter(), torch.no_grad():  # a reference forward: no adapter, no dropout
        model(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)
    with pytest.raises(RuntimeError, match="runs peft's own dropout"):
        model(input_ids=ids, labels=ids)


def test_blocker_sees_every_dropout_class_and_dora(tiny_model):
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora)
    layer = fast.decoder_layers(model)[0]
    for extra in (nn.Dropout1d(0.1), nn.AlphaDropout(0.1)):
        layer.extra_dropout = extra
        assert "the model's own dropout is on" in graphs.graph_blocker(model)
    del layer.extra_dropout
    module = fast.layers._lora_linears(model)[0]
    module.lora_variant = {"default": object()}
    assert "DoRA" in graphs.graph_blocker(model)


def test_eager_runner_keeps_torchs_dropout_masks_under_recompute(tiny_model):
    # outside a capture the runner's checkpoint saves torch's RNG state, so a dropout drawn from
    # torch's generator (here the CPU's LoRA dropout) gets the forward's masks again in the recompute
    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.3}))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    fast.fuse_lora(model)
    fast.enable_cuda_graphs(model, capture=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, 200, (2, 12))
    model.train()

    def grads(recomputed: int):
        fast.set_checkpointed_layers(model, recomputed)
        torch.manual_seed(5)
        return torch.autograd.grad(model(input_ids=ids, labels=ids).loss, trainable)

    kept, recomputed = grads(0), grads(2)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(recomputed, kept))


def test_graphs_true_refused_before_loading_where_compile_resolves_on(monkeypatch):
    monkeypatch.setattr(fast.options, "compile_available", lambda: True)
    monkeypatch.setattr(fast.options, "_cuda", lambda device=None: True)
    with pytest.raises(ConfigError, match="train.compile resolves to on"):
        fast.resolve_options(TrainConfig(cuda_graphs=True, compile="auto", memory_budget_gib=10), "cuda")


def test_graphs_true_refused_before_loading_for_a_model_type_they_cannot_run():
    """The default model (OPT) loops over its layers itself: cuda_graphs true is refused from its
    config, before any weight loads; auto leaves it to the loaded model's check (graphs off)."""
    from transformers import LlamaConfig, OPTConfig

    with pytest.raises(ConfigError, match="model type 'opt' are not run by CUDA graphs.*set it to auto or false"):
        graphs.refuse_before_loading(True, OPTConfig())
    with pytest.raises(ConfigError, match="attention dropout"):
        graphs.refuse_before_loading(True, LlamaConfig(attention_dropout=0.1))
    graphs.refuse_before_loading("auto", OPTConfig())
    graphs.refuse_before_loading(True, LlamaConfig())
