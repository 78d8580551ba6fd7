"""The fast path's knobs (`train:` in params.yaml) resolved for this machine, and the memory budget's
defaults: a share of the GPU's memory, or of the RAM available on a CPU."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from qlora_pipeline.core import bitmask_dropout, lowrank_dropout
from qlora_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from qlora_pipeline.config import TrainConfig

GIB = 1024**3


def _cuda(device: torch.device | str | None = None) -> bool:
    if device is not None:
        return torch.device(device).type == "cuda"
    return torch.cuda.is_available()


@functools.cache
def liger_available() -> bool:
    """True when liger-kernel (the `gpu` extra) and its triton import cleanly."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # ImportError, or triton failing to find a GPU driver
        return False
    return True


def resolve_switch(value: bool | str, name: str, *, on_gpu: bool, available: bool = True, needs: str = "") -> bool:
    """auto -> on with a CUDA GPU (and the feature available).

    Raises:
        ConfigError: the switch is true where the feature is not available on this machine.
    """
    if value == "auto":
        return on_gpu and available
    if value and not available:
        raise ConfigError(f"train.{name} is true but it is not available here{f' (it needs {needs})' if needs else ''}; set it to auto or false")
    return bool(value)


@dataclass(frozen=True)
class FastOptions:
    """The resolved knobs: what the fast path will do on this machine."""

    liger: bool
    fused_lora: bool
    padding_free: bool
    checkpointing: bool | int | str  # "auto", True (every layer), False (none) or a layer count
    tune_micro_batch: bool
    memory_budget_gib: float | None  # GiB of GPU memory, or of RAM on a CPU; None: no limit
    compile: bool = False
    dropout_mask_bits: bool = False
    cuda_graphs: bool = False
    fused_dropout: bool = False
    selective_recompute: bool = False


def resolve_options(cfg: TrainConfig, device: torch.device | str | None = None) -> FastOptions:
    """What the fast path does on this device. The memory plan (checkpointing, budget) and fused
    LoRA apply on a CPU too: there the budget is RAM (default_cpu_memory_budget_gib)."""
    on_gpu = _cuda(device)
    if cfg.memory_budget_gib != "auto":
        budget = float(cfg.memory_budget_gib)
    else:
        budget = default_memory_budget_gib() if on_gpu else default_cpu_memory_budget_gib()
    fused_lora = resolve_switch(cfg.fused_lora, "fused_lora", on_gpu=True)
    compiled = resolve_switch(cfg.compile, "compile", on_gpu=on_gpu, available=compile_available())
    options = FastOptions(
        liger=resolve_switch(cfg.use_liger, "use_liger", on_gpu=on_gpu, available=liger_available()),
        fused_lora=fused_lora,
        padding_free=resolve_switch(cfg.padding_free, "padding_free", on_gpu=on_gpu),
        checkpointing=cfg.gradient_checkpointing,
        tune_micro_batch=bool(cfg.tune_micro_batch) and on_gpu,
        memory_budget_gib=budget,
        compile=compiled,
        dropout_mask_bits=resolve_switch(cfg.dropout_mask_bits, "dropout_mask_bits", on_gpu=on_gpu, available=bitmask_dropout.available()),
        cuda_graphs=_cuda_graphs_switch(cfg.cuda_graphs, on_gpu),
        fused_dropout=resolve_switch(
            cfg.fused_dropout, "fused_dropout", on_gpu=on_gpu, available=on_gpu and lowrank_dropout.available(), needs="a CUDA GPU and triton"
        ),
        selective_recompute=(fused_lora and not compiled) if cfg.selective_recompute == "auto" else bool(cfg.selective_recompute),
    )
    for name in ("cuda_graphs", "fused_dropout", "selective_recompute"):  # eager-only switches forced on
        if getattr(cfg, name) is True and compiled:
            raise ConfigError(f"train.{name} is true and train.compile resolves to on (auto with a GPU); set compile to false")
    return options


def _cuda_graphs_switch(value: bool | str, on_gpu: bool) -> bool:
    """train.cuda_graphs resolved: auto -> with one CUDA GPU (not one of several ranks).

    Raises:
        ConfigError: true without a CUDA GPU, or in one of several ranks.
    """
    if value is True and not on_gpu:
        raise ConfigError("train.cuda_graphs is true but no CUDA GPU is visible here; set it to auto (off without a GPU) or false")
    if value is True and not _single_process():
        raise ConfigError(
            "train.cuda_graphs is true but this is one of several ranks (torchrun); CUDA graphs run on one GPU: "
            "set train.cuda_graphs to auto (off with several GPUs) or train.num_gpus to 1"
        )
    return resolve_switch(value, "cuda_graphs", on_gpu=on_gpu, available=on_gpu and _single_process())


def _single_process() -> bool:
    """Not one of several ranks (torchrun sets WORLD_SIZE): CUDA graphs are measured on one GPU only."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1


def compile_available() -> bool:
    """torch.compile exists and is not switched off (TORCHDYNAMO_DISABLE=1)."""
    import os

    return hasattr(torch, "compile") and hasattr(nn.Module, "compile") and os.environ.get("TORCHDYNAMO_DISABLE", "") not in ("1", "true", "True")


def default_memory_budget_gib(fraction: float = 0.9) -> float:
    """90% of what this process can have of the current GPU."""
    free, total = torch.cuda.mem_get_info()
    usable = min(total, free + torch.cuda.memory_reserved())
    return fraction * usable / GIB


def available_ram_bytes() -> int:
    """RAM this process can still take: psutil's `available` (free plus reclaimable page cache),
    lowered to the cgroup v2 limit's headroom inside a container that sets one."""
    import psutil

    available = int(psutil.virtual_memory().available)
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
    except (OSError, ValueError):
        return available
    return available if limit == "max" else min(available, max(0, int(limit) - used))


def default_cpu_memory_budget_gib(fraction: float = 0.5) -> float:
    """Half the RAM available now: what a CPU training step may add to the loaded model's RSS.

    The plan's estimate came within 3% of the RSS that training added with fused LoRA (SmolLM2-135M,
    8 x 128 tokens: 3.25 GiB estimated, 3.17 measured with no layer recomputed; 0.79 and 0.80 with
    all), but peft's own LoRA layers added 2.54 GiB where 0.79 was estimated: freed memory the
    allocator keeps (benchmarks/README.md, "CPU"). The other half covers that and other processes.
    """
    return fraction * available_ram_bytes() / GIB
