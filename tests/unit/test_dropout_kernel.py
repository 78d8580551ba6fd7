"""The LoRA dropout kernel (core/dropout_kernel.py), run by triton's CPU interpreter.

The same Triton code runs on the GPU; benchmarks/README.md has its speed and the loss check there.
Here: the kernels against a reference built from the materialised mask, and LoraLinearFunction with
the kernel (forward, all three gradients, a checkpointed recompute drawing the same mask).
"""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.core import dropout_kernel as dk
from qlora_pipeline.core import fast

pytest.importorskip("triton", reason="triton is in the dev extra (Linux x86_64)")


@pytest.fixture
def interpreted():
    """Kernels run by triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET)."""
    assert dk.interpreted() and dk.available()


def reference_mask(shape, seed, p):
    return dk.keep_mask(shape, seed, p, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [16, 8])
def test_kernels_match_dropout_with_the_same_mask(interpreted, dtype, rank):
    torch.manual_seed(0)
    m, k, p, seed = 70, 150, 0.3, 1234  # neither a multiple of the blocks
    x = torch.randn(m, k, dtype=dtype)
    a = (0.1 * torch.randn(rank, k)).to(dtype)
    mask = reference_mask((m, k), seed, p)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.02
    dropped = x.float() * mask / (1 - p)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-2)

    hidden = dk.dropout_lowrank(x, a, seed, p)
    torch.testing.assert_close(hidden.float(), dropped @ a.float().t(), **tol)

    grad_hidden = torch.randn(m, rank, dtype=dtype)
    grad_a = dk.dropout_lowrank_grad_a(grad_hidden, x, seed, p)
    torch.testing.assert_close(grad_a, grad_hidden.float().t() @ dropped, **tol)

    base = torch.randn(m, k, dtype=dtype)
    grad_x = dk.dropout_lowrank_grad_x_(base.clone(), grad_hidden, a, seed, p)
    torch.testing.assert_close(grad_x.float(), base.float() + (grad_hidden.float() @ a.float()) * mask / (1 - p), **tol)
    fresh = dk.dropout_lowrank_grad_x_(torch.full_like(base, 7.0), grad_hidden, a, seed, p, accumulate=False)
    torch.testing.assert_close(fresh.float(), (grad_hidden.float() @ a.float()) * mask / (1 - p), **tol)

    other = reference_mask((m, k), seed + 1, p)
    assert not torch.equal(mask, other)


def lora_inputs(k=48, out=40, rank=16):
    torch.manual_seed(1)
    weight_a = (0.1 * torch.randn(rank, k)).requires_grad_()
    weight_b = (0.1 * torch.randn(out, rank)).requires_grad_()
    base_weight = torch.randn(out, k)
    return weight_a, weight_b, base_weight


@pytest.mark.parametrize("base", [True, False])
def test_lora_node_with_the_kernel_matches_the_reference(interpreted, monkeypatch, base):
    p, seed, scale = 0.25, 99, 2.0
    monkeypatch.setattr(dk, "new_seed", lambda: seed)
    weight_a, weight_b, base_weight = lora_inputs()
    x = torch.randn(2, 9, 48, requires_grad=True)
    out = fast.LoraLinearFunction.apply(x, weight_a, weight_b, base_weight, None, None, scale, p, True, base)
    grad = torch.randn_like(out)
    out.backward(grad)

    mask = reference_mask((18, 48), seed, p)
    xr = x.detach().clone().requires_grad_()
    a, b = weight_a.detach().clone().requires_grad_(), weight_b.detach().clone().requires_grad_()
    flat = xr.reshape(-1, 48)
    ref = (flat * mask / (1 - p)) @ a.t() @ b.t() * scale
    if base:
        ref = ref + flat @ base_weight.t()
    ref.backward(grad.reshape(-1, 40))
    torch.testing.assert_close(out.reshape(-1, 40), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_a.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_b.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_checkpoint_recompute_draws_the_same_mask(interpreted):
    # the seed comes from the CPU generator, which the checkpoint restores before recomputing
    from torch.utils.checkpoint import checkpoint

    weight_a, weight_b, base_weight = lora_inputs()

    def layer(x):
        h = fast.LoraLinearFunction.apply(x, weight_a, weight_b, base_weight, None, None, 2.0, 0.5, True, True)
        return torch.tanh(h).sum()

    x = torch.randn(4, 48, requires_grad=True)
    grads = []
    for wrapped in (False, True):
        torch.manual_seed(5)
        loss = checkpoint(layer, x, use_reentrant=False) if wrapped else layer(x)
        grads.append(torch.autograd.grad(loss, (x, weight_a, weight_b)))
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, rtol=0, atol=0)
