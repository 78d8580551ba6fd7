"""CUDA graphs of the decoder stack: every decoder layer's forward, and the whole backward with its
recompute, each replayed as one CUDA graph, so the host's Python and kernel launches (about 7,700
per step on the 8B shape) leave the critical path.

    enable_cuda_graphs(model)   # after fuse_lora and set_checkpointed_layers; CUDA only

How it works:
- The decoder stack is one callable: the model's own loop over its layers (`self.layers[:n]` in
  transformers) gets a runner instead of the layers, which runs them all.
- A shape is captured the second time it is seen in training (the first run, eager, leaves cuDNN
  plans and Triton kernels built), with torch.cuda.graph: one warm-up on a side stream, then the
  forward and, through torch.autograd.grad, the backward, in one private memory pool. Replays copy
  the new inputs into the captured ones; the adapter's gradients come back through one autograd
  node, so gradient accumulation, clipping and the optimizer work as usual.
- One shape is captured, at its second call if at most one other came first (StackRunner.decide):
  fixed-length rows give one shape per micro-batch; where shapes vary (padding-free batches of
  varying length) the layers run eagerly. A call of another shape after the capture (an epoch's
  last, shorter batch) runs eagerly with every layer recomputed, so it adds little beside the pool.
- Randomness: a recomputed layer must draw the same LoRA dropout mask in the backward as in the
  forward. torch's checkpoint restores the CUDA generator for that, which cannot run inside a
  capture. Here the runner draws one seed per LoRA layer per forward, outside the layers, and
  checkpoints each layer set to recompute itself with its seeds among the checkpoint's inputs; the
  layer's seeded dropout (core/lowrank_dropout.py, fused into the adapter's matmuls, or the bit
  masks of core/bitmask_dropout.py) reads its seed (`_lora_seed`), set again by the recompute.
  Hence LoRA dropout > 0 needs one of them (CUDA, triton), and no other dropout may be on in the
  layers (graph_blocker).
- Memory: the pool holds the stack's activations for the whole run, so memory that eager training
  frees after the backward (for the head's loss, the optimizer) is not shared with them:
  memory.GRAPH_HIDDEN_STATES in the memory plan.

On an H200 (benchmarks/README.md, "CUDA graphs"), fixed 2048-token rows at 0.6x the original
recipe's memory: 8B 11,567 against 11,339 tokens/s eagerly (the step is GPU-bound there); 1B
70,617 against 63,094 at 0.82x the memory (the plan, free of host cost, recomputes nothing).
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree
from torch.utils.checkpoint import checkpoint

from qlora_pipeline.core.bitmask_dropout import SEED_HIGH
from qlora_pipeline.core.fast.graph_blockers import _stack_container, graph_blocker, refuse_before_loading  # noqa: F401 - re-exported
from qlora_pipeline.core.fast.selective import keep_outputs_checkpoint

log = logging.getLogger(__name__)


def _trainable_slots(layers: list[nn.Module]) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, name, parameter) of every trainable parameter of the layers, in a fixed order."""
    seen: set[int] = set()
    slots = []
    for layer in layers:
        for module in layer.modules():
            for name, param in module._parameters.items():
                if param is not None and param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    slots.append((module, name, param))
    return slots


class _LayerList(nn.ModuleList):
    """The decoder layers' ModuleList: a slice that covers every layer (the model's forward loop)
    gives the stack runner instead; everything else (indexing, iteration, state dict) is unchanged."""

    def __getitem__(self, idx):  # noqa: D105
        runner = self.__dict__.get("_stack_runner")
        if runner is not None and isinstance(idx, slice) and range(len(self))[idx] == range(len(self)):
            return [runner]
        return super().__getitem__(idx)


class _StackReplay(torch.autograd.Function):
    """The captured stack as one autograd node: forward and backward replay their graphs."""

    @staticmethod
    def forward(ctx, graph: "_StackGraph", leaves: tuple, hidden: torch.Tensor, *params: torch.Tensor):  # noqa: D102
        graph.load(hidden, leaves)
        graph.fwd.replay()
        ctx.graph = graph
        # the replay's activations stay in the pool until this node's backward ran or was dropped
        graph.pending = weakref.ref(ctx)
        return graph.out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        graph = ctx.graph
        graph.pending = None
        if grad.data_ptr() != graph.grad_out.data_ptr():
            graph.grad_out.copy_(grad)
        graph.bwd.replay()
        # copies: autograd would otherwise keep a returned buffer as the parameter's .grad, and the
        # next micro-batch's replay would overwrite it (gradient accumulation would lose micro-batches)
        grads = [None if g is None else g.clone() for g in graph.grads]
        return None, None, *grads


class _StackGraph:
    """One captured shape: static inputs, the forward and backward graphs and their outputs."""

    def __init__(self, runner: "StackRunner", hidden: torch.Tensor, leaves: list, spec: Any, warmup: int) -> None:
        self.hidden = hidden.detach().clone().requires_grad_(hidden.requires_grad)
        self.leaves = [leaf.detach().clone() if torch.is_tensor(leaf) else leaf for leaf in leaves]
        self.pending: weakref.ref | None = None
        # The capture uses stand-ins for the adapter's parameters (the same storage, new autograd
        # leaves): a graph of an earlier step that is still referenced (its loss, say) keeps the
        # parameters' gradient accumulators alive on the default stream, and the captured backward
        # would have to wait on that stream, which a capture forbids.
        slots = _trainable_slots(runner.layers)
        for module, name, param in slots:
            module._parameters[name] = nn.Parameter(param.detach(), requires_grad=True)
        try:
            self._capture(runner, [m._parameters[n] for m, n, _ in slots], spec, warmup)
        finally:
            for module, name, param in slots:
                module._parameters[name] = param

    def _capture(self, runner: "StackRunner", params: list[torch.Tensor], spec: Any, warmup: int) -> None:
        hidden = self.hidden
        inputs = ([self.hidden] if self.hidden.requires_grad else []) + params

        def run() -> torch.Tensor:
            return runner.run_layers(self.hidden, _pytree.tree_unflatten(self.leaves, spec))

        device = hidden.device
        autocast = dict(
            device_type="cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False
        )
        torch.cuda.synchronize(device)
        # the warm-up runs on a side stream, which cannot reuse the blocks the eager steps left cached
        torch.cuda.empty_cache()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.autocast(**autocast):
            for _ in range(warmup):
                out = run()
                torch.autograd.grad(out, inputs, torch.zeros_like(out), allow_unused=True)
                del out
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        pool = torch.cuda.graph_pool_handle()
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, pool=pool, capture_error_mode="thread_local"), torch.autocast(**autocast):
            self.out = run()
        self.grad_out = torch.empty_like(self.out)
        with torch.cuda.graph(self.bwd, pool=pool, capture_error_mode="thread_local"):
            grads = torch.autograd.grad(self.out, inputs, self.grad_out, allow_unused=True)
        self.out = self.out.detach()  # drops the captured autograd graph
        grads = list(grads)
        grad_hidden = grads.pop(0) if self.hidden.requires_grad else None
        self.grads = [grad_hidden, *grads]

    def busy(self) -> bool:
        """A replay whose backward has not run yet, and still can: its activations are in the pool."""
        return self.pending is not None and self.pending() is not None

    def load(self, hidden: torch.Tensor, leaves: tuple) -> None:
        """Copy this call's inputs into the captured ones."""
        if hidden.data_ptr() != self.hidden.data_ptr():
            self.hidden.detach().copy_(hidden)
        for static, leaf in zip(self.leaves, leaves):
            if torch.is_tensor(static) and static.data_ptr() != leaf.data_ptr():
                static.copy_(leaf)


class StackRunner:
    """Runs the decoder layers in turn, from CUDA graphs where a shape was captured.

    Called as the model's loop calls one layer: runner(hidden_states, **layer_kwargs) -> hidden_states,
    (batch, tokens, hidden). Counts `replays` and `eager_calls` for reports and tests.
    """

    def __init__(self, layers: list[nn.Module], lora_modules: list[nn.Module], *, capture: bool = True, warmup: int = 1) -> None:
        from qlora_pipeline.core.fast.layers import _lora_linears

        self.layers = layers
        chosen = {id(m) for m in lora_modules}
        per_layer = [[m for m in _lora_linears(layer) if id(m) in chosen] for layer in layers]
        self.lora_modules = [m for modules in per_layer for m in modules]
        counts = [len(modules) for modules in per_layer]
        self.seed_slices = [(sum(counts[:i]), sum(counts[: i + 1])) for i in range(len(layers))]
        # a model loop that reads the layer's attention type (one for all: graph_blocker) finds it here
        self.attention_type = getattr(layers[0], "attention_type", None) if layers else None
        self.params = [p for _, _, p in _trainable_slots(layers)]
        self.capture = capture
        self.warmup = warmup
        self.graphs: dict[Any, _StackGraph] = {}
        self.seen: Counter = Counter()
        self.varied = False
        self.replays = 0
        self.eager_calls = 0
        self.disabled_reason: str | None = None
        self.lean = False

    def counts(self) -> dict[str, int]:
        """Forwards replayed from the graphs, and forwards run eagerly (the first calls of a shape,
        other shapes, evaluation): whether the graphs ran, for run records and benchmarks."""
        return {"replays": self.replays, "eager_calls": self.eager_calls}

    def run_layers(self, hidden: torch.Tensor, kwargs: dict[str, Any], seeds: torch.Tensor | None = None) -> torch.Tensor:
        """The layers in turn, each LoRA layer's dropout seeded from one fresh draw (or `seeds`).

        A layer set to recompute is checkpointed here, with its seeds among the checkpoint's inputs:
        its recompute sets the same seeds again, whatever forward ran in between; selectively where
        memory.set_checkpointed_layers said so (core/fast/selective.py).
        """
        if seeds is None:
            seeds = torch.randint(0, SEED_HIGH, (max(1, len(self.lora_modules)),), device=hidden.device, dtype=torch.int32)
        self.last_seeds = seeds
        for index, layer in enumerate(self.layers):
            start, stop = self.seed_slices[index]
            layer_seeds = seeds[start:stop]
            if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
                # torch's RNG state cannot be saved inside a capture; eagerly it is, for dropout other than the seeded one
                preserve = not (hidden.is_cuda and torch.cuda.is_current_stream_capturing())
                args = (self._run_layer, index, hidden, layer_seeds, kwargs)
                if getattr(layer, "_keep_mlp_outputs", False) and not self.lean:  # selective recompute
                    hidden = keep_outputs_checkpoint(checkpoint, *args, use_reentrant=False, preserve_rng_state=preserve)
                else:
                    hidden = checkpoint(*args, use_reentrant=False, preserve_rng_state=preserve)
            else:
                hidden = self._run_layer(index, hidden, layer_seeds, kwargs)
        return hidden

    def _run_layer(self, index: int, hidden: torch.Tensor, seeds: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        layer = self.layers[index]
        start, stop = self.seed_slices[index]
        for position, module in enumerate(self.lora_modules[start:stop]):
            module._lora_seed = seeds[position : position + 1]
        flag = layer.gradient_checkpointing
        layer.gradient_checkpointing = False  # checkpointed (or not) by run_layers
        try:
            return layer(hidden, **kwargs)
        finally:
            layer.gradient_checkpointing = flag

    def _key(self, hidden: torch.Tensor, leaves: list, spec: Any) -> Any:
        parts = []
        for leaf in leaves:
            if torch.is_tensor(leaf):
                parts.append(("t", tuple(leaf.shape), leaf.dtype, tuple(leaf.stride()), leaf.device))
            else:
                hash(leaf)
                parts.append(("v", leaf))
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return (tuple(hidden.shape), hidden.dtype, hidden.requires_grad, autocast, str(spec), tuple(parts))

    def decide(self, key: Any) -> str:
        """replay, capture, eager or lean for a training call of this shape. A shape is captured at
        its second call if at most one other shape came before: where shapes vary (padding-free batches of
        varying length), graphs stay off, since a captured pool would sit beside every eager call's
        memory. lean: the captured shape again while its last replay still awaits its backward (two
        forwards, then two backwards): eagerly, so that replay's activations stay intact."""
        if key in self.graphs:
            return "lean" if self.graphs[key].busy() else "replay"
        if self.varied:
            return "eager"
        self.seen[key] += 1
        if self.graphs or len(self.seen) > 2:  # two shapes at most: the repeating one and one odd (a short row)
            if not self.graphs and not self.varied:
                self.varied = True
                log.info("micro-batch shapes vary; the decoder layers run without CUDA graphs")
            return "eager"
        return "capture" if self.seen[key] >= 2 else "eager"

    def __call__(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        training = self.layers[0].training and torch.is_grad_enabled()
        if not (self.capture and training and hidden_states.is_cuda and self.disabled_reason is None):
            self.eager_calls += 1
            return self.run_layers(hidden_states, kwargs)
        leaves, spec = _pytree.tree_flatten(kwargs)
        try:
            key = self._key(hidden_states, leaves, spec)
        except TypeError:  # an unhashable argument (a cache object): no graph for it
            key = None
        action = "eager" if key is None else self.decide(key)
        if action in ("eager", "lean"):
            self.eager_calls += 1
            return self.run_lean(hidden_states, kwargs) if self.graphs else self.run_layers(hidden_states, kwargs)
        if action == "capture":
            try:
                self.graphs[key] = _StackGraph(self, hidden_states, leaves, spec, self.warmup)
            except Exception as exc:  # a failed capture leaves CUDA's generator unusable: no going on eagerly
                self.disabled_reason = f"{type(exc).__name__}: {exc}"
                raise RuntimeError(
                    f"capturing the decoder layers as CUDA graphs failed ({self.disabled_reason}); set train.cuda_graphs to false"
                ) from exc
            log.info("decoder stack captured as CUDA graphs for %s tokens", "x".join(map(str, hidden_states.shape[:2])))
        self.replays += 1
        return _StackReplay.apply(self.graphs[key], tuple(leaves), hidden_states, *self.params)

    def run_lean(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The layers eagerly with every one recomputed: a shape other than the captured one (the last,
        shorter batch of an epoch, say) then adds only the layers' inputs beside the graphs' pool."""
        flags = [layer.gradient_checkpointing for layer in self.layers]
        for layer in self.layers:
            layer.gradient_checkpointing = True
        self.lean = True  # and no selective recompute: only the inputs are kept
        try:
            return self.run_layers(hidden, kwargs)
        finally:
            self.lean = False
            for layer, flag in zip(self.layers, flags):
                layer.gradient_checkpointing = flag


def enable_cuda_graphs(model: nn.Module, *, capture: bool = True) -> StackRunner | None:
    """Run the model's decoder stack through a StackRunner; returns it, or None where graph_blocker
    finds a reason not to (then nothing changes).

    Call after fuse_lora and set_checkpointed_layers. The runner checkpoints the layers set to
    recompute itself, without saving the RNG state (a capture cannot; nothing in the layers draws from
    torch's generator: graph_blocker, and the LoRA dropout seeds are the checkpoint's inputs).
    capture=False keeps the runner eager (the CPU, tests).
    """
    from qlora_pipeline.core.fast.layers import _lora_linears

    blocker = graph_blocker(model)
    if blocker is not None:
        log.info("CUDA graphs off: %s", blocker)
        return None
    container = _stack_container(model)
    layers = list(container)
    lora = [m for layer in layers for m in _lora_linears(layer)]
    runner = StackRunner(layers, lora, capture=capture)
    if capture:
        for module in lora:
            module._lora_seed_required = True
    container.__class__ = _LayerList
    container.__dict__["_stack_runner"] = runner
    return runner


def stack_runner(model: nn.Module) -> StackRunner | None:
    """The model's StackRunner (enable_cuda_graphs), or None."""
    for module in model.modules():
        if isinstance(module, _LayerList):
            return module.__dict__.get("_stack_runner")
    return None


def disable_cuda_graphs(model: nn.Module) -> None:
    """Back to the model's own loop over its layers (the graphs' memory is freed with the runner)."""
    for module in model.modules():
        if isinstance(module, _LayerList):
            module.__dict__.pop("_stack_runner", None)
            module.__class__ = nn.ModuleList
        vars(module).pop("_lora_seed", None)
        vars(module).pop("_lora_seed_required", None)
