"""The attention that keeps the samples of a padding-free batch apart (the batch itself comes from
core/data/collate.py's PackingCollator, with sample boundaries): variable-length flash attention,
and cuDNN SDPA for unpacked full rows. pack_sequences groups variable-length samples into rows."""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from qlora_pipeline.core.fast.memory import unwrap

log = logging.getLogger(__name__)

FAST_ATTENTION = "sdpa_fast"
IGNORE_INDEX = -100


def pack_sequences(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of samples grouped into rows of at most max_tokens (first-fit decreasing).

    Samples are never split; a sample longer than max_tokens gets a row of its own.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[index]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(index)
                room[r] -= n
                break
        else:
            rows.append([index])
            room.append(max_tokens - n)
    return rows


@functools.cache
def _varlen_call() -> tuple[Callable, dict[str, Any]] | None:
    """torch's variable-length flash attention and the keywords this torch version wants for causal GQA."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        return None
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return varlen_attn, kwargs


def fast_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function. Packed batches (cu_seq_lens from PackingCollator): variable-
    length flash attention. Unmasked batches: SDPA with cuDNN first (1.8x flash's speed on an H200,
    forward+backward, GQA). Anything else: SDPA as usual. query/key/value: (batch, heads, seq, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        # Only the cached verdict: running the check here, inside a checkpointed forward, would add
        # tensors to what the checkpoint saves and fail its recompute.
        if attention_mask is None and query.is_cuda and _CUDNN_VERDICT.get(query.device.index, False):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            # Chosen inside the layer, so a checkpointed layer's recompute picks the same kernel.
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
                return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout and module.training:
        raise ValueError("attention dropout is not supported with padding-free batches; set train.padding_free: false")
    attn, attn_kwargs = _varlen_call()
    batch, heads, seq, head_dim = query.shape
    q = query.transpose(1, 2).reshape(batch * seq, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], head_dim)
    longest = kwargs["max_length_q"]
    out = attn(q, k, v, cu_seq_lens, kwargs.get("cu_seq_lens_k", cu_seq_lens), longest, longest, scale=scaling, **attn_kwargs)
    return out.view(batch, seq, heads, head_dim), None


def _fast_attention_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Masks for fast_attention: none unless the batch has padding (then SDPA's own).

    Packed batches carry cu_seq_lens instead of a mask, so the (tokens x tokens) block mask that
    transformers would build from the position ids is skipped.
    """
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def _random_qkv(lens: list[int], heads: int, kv_heads: int, head_dim: int, device: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(0)
    total = sum(lens)

    def rand(h: int) -> torch.Tensor:
        return torch.randn(total, h, head_dim, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()

    return rand(heads), rand(kv_heads), rand(kv_heads)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Causal attention per sample in float32, on (tokens, heads, dim) tensors."""
    out, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start : start + n].transpose(0, 1)[None].float() for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        start += n
    return torch.cat(out)


def _matches_reference(fn: Callable, lens: list[int], device: str) -> bool:
    q, k, v = _random_qkv(lens, heads=4, kv_heads=2, head_dim=128, device=device)
    out = fn(q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = _reference_attention(q, k, v, lens)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(torch.isfinite(a).all()) and float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2

    return close(out, ref) and all(close(a, b) for a, b in zip(grads, ref_grads))


@functools.cache
def varlen_attention_works(device_index: int = 0) -> bool:
    """Check once per process that varlen attention matches causal attention per sample, with grads."""
    call = _varlen_call() if torch.cuda.is_available() else None
    if call is None:
        return False
    attn, attn_kwargs = call
    lens = [37, 80, 11]
    cu = torch.tensor([0, 37, 117, 128], device=f"cuda:{device_index}", dtype=torch.int32)
    try:
        ok = _matches_reference(lambda q, k, v: attn(q, k, v, cu, cu, max(lens), max(lens), **attn_kwargs), lens, f"cuda:{device_index}")
    except Exception as exc:  # an old torch, a kernel missing for this GPU
        log.warning("variable-length attention unavailable (%s); padding-free batches use SDPA masks", exc)
        return False
    if not ok:
        log.warning("variable-length attention disagrees with the reference; padding-free batches use SDPA masks")
    return ok


_CUDNN_VERDICT: dict[int, bool] = {}


def cudnn_attention_works(device_index: int = 0) -> bool:
    """Check once per process and device that cuDNN SDPA (causal, GQA) matches the reference."""
    if device_index not in _CUDNN_VERDICT:
        _CUDNN_VERDICT[device_index] = _check_cudnn_attention(device_index)
    return _CUDNN_VERDICT[device_index]


def _check_cudnn_attention(device_index: int) -> bool:
    if not torch.cuda.is_available():
        return False
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qb, kb, vb = (t.view(2, 96, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)

    try:
        ok = _matches_reference(cudnn, [96, 96], f"cuda:{device_index}")
    except Exception as exc:
        log.info("cuDNN attention unavailable here (%s); SDPA picks its default kernel", exc)
        return False
    if not ok:
        log.warning("cuDNN attention disagrees with the reference; SDPA picks its default kernel")
    return ok


def enable_fast_attention(model: nn.Module) -> bool:
    """Switch an SDPA model's attention to fast_attention (registered once); False where it cannot run."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = unwrap(model)
    if base.config._attn_implementation not in ("sdpa", FAST_ATTENTION) or not varlen_attention_works():
        return False
    cudnn_attention_works(torch.cuda.current_device())  # decided here, outside any forward
    AttentionInterface.register(FAST_ATTENTION, fast_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, _fast_attention_mask)
    base.set_attn_implementation(FAST_ATTENTION)
    return True
