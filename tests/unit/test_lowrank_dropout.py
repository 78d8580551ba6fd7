"""The LoRA dropout fused into the adapter's matmuls (core/lowrank_dropout.py), run by triton's CPU
interpreter: values and gradients against torch with the kernels' own mask, the mask the same
whatever the tile sizes, and the LoRA node and a recomputed layer drawing the forward's mask."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qlora_pipeline.core import lowrank_dropout as ld  # noqa: E402
from qlora_pipeline.core.fast.nodes import LoraLinearFunction, LoraMember  # noqa: E402

pytestmark = pytest.mark.skipif(not ld.available(), reason="triton's interpreter is not on (TRITON_INTERPRET=1)")


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int32)


def _reference(x, a, keep, p):
    scale = 65536 / (65536 - ld.drop_count(p))
    return torch.where(keep, x.float() * scale, 0.0), scale


@pytest.mark.parametrize(("m", "k", "r", "dtype"), [(40, 64, 16, torch.float32), (70, 136, 8, torch.float32), (33, 200, 4, torch.float16)])
def test_forward_and_backward_match_torch_with_the_kernels_mask(m, k, r, dtype):
    torch.manual_seed(0)
    p = 0.3
    x, a = torch.randn(m, k).to(dtype), torch.randn(r, k).to(dtype)
    grad_hidden, base = torch.randn(m, r).to(dtype), torch.randn(m, k).to(dtype)
    seed = _seed(1234)
    keep = ld.keep_mask((m, k), seed, p, "cpu")
    dropped, scale = _reference(x, a, keep, p)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # float16: the interpreter has no bfloat16 arithmetic

    hidden = ld.forward(x, a, seed, p)
    torch.testing.assert_close(hidden.float(), dropped @ a.float().t(), rtol=tol, atol=tol * 10)
    grad_a, grad_x = ld.backward(grad_hidden, x, a, seed, p, base.clone())
    torch.testing.assert_close(grad_a, grad_hidden.float().t() @ dropped, rtol=tol, atol=tol * 10)
    expected_x = base.float() + torch.where(keep, (grad_hidden.float() @ a.float()) * scale, 0.0)
    torch.testing.assert_close(grad_x.float(), expected_x, rtol=tol, atol=tol * 10)
    fresh_a, fresh_x = ld.backward(grad_hidden, x, a, seed, p)  # no input gradient yet: a new one
    torch.testing.assert_close(fresh_x.float(), expected_x - base.float(), rtol=tol, atol=tol * 10)
    only_a, none = ld.backward(grad_hidden, x, a, seed, p, need_grad_x=False)
    assert none is None and torch.equal(only_a, fresh_a)


def test_the_mask_does_not_depend_on_the_tiles():
    torch.manual_seed(0)
    x, a = torch.randn(50, 96), torch.randn(16, 96)
    seed = _seed(7)
    first = ld.forward(x, a, seed, 0.2)
    torch.testing.assert_close(ld.forward(x, a, seed, 0.2, block_m=16, block_k=32), first, rtol=1e-5, atol=1e-5)
    grad_hidden = torch.randn(50, 16)
    grad_a, grad_x = ld.backward(grad_hidden, x, a, seed, 0.2)
    other_a, other_x = ld.backward(grad_hidden, x, a, seed, 0.2, block_m=32, block_k=32, split_m=3)
    torch.testing.assert_close(other_a, grad_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_x, grad_x, rtol=1e-5, atol=1e-5)


def test_keep_fraction_and_seeds():
    p = 0.1
    keep = ld.keep_mask((256, 512), _seed(3), p, "cpu")
    assert abs(keep.float().mean().item() - (1 - p)) < 0.005
    assert torch.equal(keep, ld.keep_mask((256, 512), _seed(3), p, "cpu"))
    other = ld.keep_mask((256, 512), _seed(4), p, "cpu")
    assert 0.1 < (keep != other).float().mean().item() < 0.3  # independent draws: about 2 p (1 - p) differ
    # rows do not repeat one another's mask
    assert not torch.equal(keep[0], keep[1])
    assert ld.drop_count(0.05) == 3277 and ld.keep_mask((8, 64), _seed(1), 0.0, "cpu").all()


def test_refuses_inputs_it_cannot_take():
    with pytest.raises(ValueError, match="multiple of 8"):
        ld.forward(torch.randn(4, 12), torch.randn(16, 12), _seed(1), 0.1)
    with pytest.raises(ValueError, match="does not match"):
        ld.forward(torch.randn(4, 16), torch.randn(16, 16, dtype=torch.bfloat16), _seed(1), 0.1)
    assert not ld.supports(torch.randn(4, 12), 16) and not ld.supports(torch.randn(4, 16), 256)


def test_lora_node_with_fused_dropout_matches_peft_math():
    """Two siblings on one input (q/k/v-like), each with its own seed: outputs and all gradients
    against x W^T + s drop(x) A^T B^T built from each member's mask."""
    torch.manual_seed(0)
    k, r, n, p, s = 64, 8, 32, 0.25, 2.0
    x = torch.randn(2, 12, k, requires_grad=True)
    weight = torch.randn(n, k)
    members = [LoraMember(weight, None, None, s, p, True, False, False, _seed(100 + i), True) for i in range(2)]
    weights = [w.requires_grad_() for _ in range(2) for w in (torch.randn(r, k), torch.randn(n, r))]
    outs = LoraLinearFunction.apply(x, members, *weights)
    sum(o.pow(2).sum() for o in outs).backward()

    x_ref = x.detach().clone().requires_grad_()
    refs = [w.detach().clone().requires_grad_() for w in weights]
    total = 0
    for i, member in enumerate(members):
        keep = ld.keep_mask((24, k), member.seed, p, "cpu").view(2, 12, k)
        dropped = torch.where(keep, x_ref * (65536 / (65536 - ld.drop_count(p))), 0.0)
        total = total + (x_ref @ weight.t() + s * (dropped @ refs[2 * i].t()) @ refs[2 * i + 1].t()).pow(2).sum()
    total.backward()
    def close(got, want):  # float32 sums of values in the thousands, in another order
        assert float((got - want).norm() / want.norm()) < 1e-5

    close(x.grad, x_ref.grad)
    for got, want in zip(weights, refs):
        close(got.grad, want.grad)


def test_a_recomputed_layer_draws_the_forwards_mask(tiny_model):
    """fuse_lora(fused_dropout=True) on the tiny 4-bit model: the seed comes from torch's generator,
    which checkpoint restores, so with every layer recomputed the gradients equal those with none."""
    from qlora_pipeline.core import fast
    from qlora_pipeline.core.model import apply_lora

    cfg, _, model = tiny_model
    model = apply_lora(model, cfg.lora.model_copy(update={"dropout": 0.2}))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A's gradient (and the mask's effect) zero
            torch.nn.init.normal_(param, std=0.05)
    fast.fuse_lora(model, fused_dropout=True)
    model.train()
    ids = torch.randint(3, 200, (2, 16))
    trainable = [q for q in model.parameters() if q.requires_grad]

    def grads(recompute: int, seed: int = 11) -> list[torch.Tensor]:
        fast.set_checkpointed_layers(model, recompute)
        torch.manual_seed(seed)
        return list(torch.autograd.grad(model(input_ids=ids, labels=ids).loss, trainable))

    kept = grads(0)
    recomputed = grads(len(fast.decoder_layers(model)))
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    other = grads(0, seed=12)  # another seed: other masks, other gradients
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(kept, other))
    fast.unfuse_lora(model)


def test_backward_refuses_gradients_of_another_shape_and_takes_zero_rows():
    x, a, seed = torch.randn(20, 64), torch.randn(4, 64), _seed(5)
    with pytest.raises(ValueError, match="grad_x"):
        ld.backward(torch.randn(20, 4), x, a, seed, 0.3, torch.zeros(10, 64))
    with pytest.raises(ValueError, match="grad_x"):
        ld.backward(torch.randn(20, 4), x, a, seed, 0.3, torch.zeros(64, 20).t())
    with pytest.raises(ValueError, match="grad_hidden"):
        ld.backward(torch.randn(20, 4, dtype=torch.float64), x, a, seed, 0.3)
    grad_a, grad_x = ld.backward(torch.randn(0, 4), torch.randn(0, 64), a, seed, 0.1)
    assert grad_a.shape == (4, 64) and not grad_a.any() and grad_x.shape == (0, 64)
