"""Selective recompute: a recomputed decoder layer that keeps its MLP's gate and up outputs.

A recomputed (checkpointed) layer keeps only its input and runs its forward again in the backward.
Most of that second forward is the MLP's gate and up projections (8B shape: 2 x 4096 x 14336 of the
2 x 4096 x 5120 + 2 x 4096 x 14336 matmul parameters a recompute runs; down_proj is skipped, see
layers._lora_tail_forward). Keeping their two outputs (2 x ffn values per token: 56 KiB on 8B in
bf16, against about 140 KiB for the whole layer) lets the recompute skip those matmuls: per byte
of memory, about twice the recompute saved by keeping whole layers (by FLOPs; measured, a selective
recompute costs 0.4 of a whole one: memory.SELECTIVE_FIXED_SHARE). The memory plan
(memory.plan_memory) decides how many recomputed layers keep them. On an H200, 8B shape, 14.2 GiB:
31 layers recomputed, 9 selectively, ran 1.01x the plan of 27 whole recomputes
(benchmarks/README.md, "Selective recompute").

Megatron-LM's selective activation recompute (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models") keeps the layer's cheap-to-store, costly-to-recompute
tensors in the same way; torch's own selective checkpointing
(torch.utils.checkpoint.create_selective_checkpoint_contexts) keeps the outputs of chosen aten ops,
which cannot name these two: the LoRA node adds the adapter's update into the frozen matmul's
output in place, and an op's cached output would be added to twice in the recompute.

How: the layer runs under keep_outputs_checkpoint. Its first forward stores what the LoRA nodes
marked `_lora_keep_output` (gate_proj, up_proj) return; the recompute hands those back instead of
running their frozen matmuls (the adapter's rank-r part still runs: its backward needs it, and the
same LoRA dropout mask is drawn again). The store belongs to the one checkpointed call, so it goes
with that call's autograd graph.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

# The LoRA layers whose outputs a selectively recomputed layer keeps: the MLP's input projections.
KEPT_OUTPUT_MODULES = ("gate_proj", "up_proj")

_ACTIVE = threading.local()


class OutputStore:
    """The kept outputs of one checkpointed layer call, in the order the nodes produced them.

    The first run of the layer (the forward) stores; every later run (the recompute) takes them
    back in the same order. A later run that finds nothing to take (a second backward through the
    same graph) computes them as usual.
    """

    def __init__(self) -> None:
        self.outputs: deque[tuple[torch.Tensor, ...]] = deque()
        self.runs = 0

    @property
    def storing(self) -> bool:
        return self.runs == 1

    def put(self, outputs: tuple[torch.Tensor, ...]) -> None:
        self.outputs.append(tuple(o.detach() for o in outputs))

    def take(self, shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, ...] | None:
        """The next stored outputs, or None when none are left.

        Raises:
            RuntimeError: the stored outputs have other shapes than this call's (the layer ran
                differently in the recompute than in the forward; a whole recompute fails there too,
                with torch's CheckpointError).
        """
        if not self.outputs:
            return None
        outputs = self.outputs.popleft()
        if [tuple(o.shape) for o in outputs] != [tuple(s) for s in shapes]:
            raise RuntimeError(
                f"selective recompute: a decoder layer's recompute wants outputs of shapes {shapes}, its forward kept "
                f"{[tuple(o.shape) for o in outputs]}: the layer ran differently in its recompute (a LoRA layer of it "
                "called on its own between the forward and the backward?); run the backward before calling the layers again"
            )
        return outputs

    @contextmanager
    def active(self) -> Iterator["OutputStore"]:
        self.runs += 1
        stack = _stack()
        stack.append(self)
        try:
            yield self
        finally:
            stack.pop()


def _stack() -> list[OutputStore]:
    stack = getattr(_ACTIVE, "stack", None)
    if stack is None:
        stack = _ACTIVE.stack = []
    return stack


def current_store() -> OutputStore | None:
    """The store of the selectively recomputed layer running on this thread, or None."""
    stack = _stack()
    return stack[-1] if stack else None


def keep_outputs_checkpoint(checkpoint_fn: Callable[..., Any], function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """checkpoint_fn(function, *args, **kwargs) with the kept outputs of `function`'s LoRA nodes
    stored in its forward and handed back in its recompute. checkpoint_fn: torch's non-reentrant
    checkpoint (or transformers' partial of it)."""
    store = OutputStore()

    def run(*a: Any, **k: Any) -> Any:
        with store.active():
            return function(*a, **k)

    return checkpoint_fn(run, *args, **kwargs)


class KeepOutputsCheckpoint:
    """A decoder layer's `_gradient_checkpointing_func` (transformers' GradientCheckpointingLayer
    calls it as func(forward, *args)) that checkpoints selectively; `inner` is the function it
    replaced, put back by memory.set_checkpointed_layers."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return keep_outputs_checkpoint(self.inner, function, *args, **kwargs)
