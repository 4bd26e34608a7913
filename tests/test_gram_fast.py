"""The custom autograd functions behind the fast paths of ``mmd`` (one-product self-gram backward) and of the
compiled CPU projection (``x Wᵀ`` and ``+ b`` as separate steps, bias gradient as a matrix-vector product)."""

from __future__ import annotations

import pytest
import torch

import distilkit as dk
from distilkit.algebra._proj import Linear, _Affine
from distilkit.losses._gram import _SelfGram

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask(gen: torch.Generator, b: int = 3, length: int = 5) -> torch.Tensor:
    mask = torch.rand(b, length, generator=gen) < 0.6
    mask[0] = True  # one full row
    mask[1] = False  # one fully masked row
    return mask


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    value = fn(*xs)
    grads = torch.autograd.grad(value, xs)
    return value.detach(), grads


# ---------------------------------------------------------------------------------------------- _SelfGram
def test_self_gram_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 4, 3, generator=_gen(), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(_SelfGram.apply, (x,))
    assert torch.autograd.gradgradcheck(_SelfGram.apply, (x,))


@pytest.mark.parametrize("shape", [(2, 4, 3), (4, 3), (2, 2, 4, 3)])
def test_self_gram_equals_the_plain_product(shape):
    gen = _gen(1)
    x = torch.randn(shape, generator=gen, dtype=F64)
    weight = torch.randn(*shape[:-1], shape[-2], generator=gen, dtype=F64)  # not symmetric: a general dG

    def fast(x):
        return (_SelfGram.apply(x) * weight).sum()

    def plain(x):
        return ((x @ x.mT) * weight).sum()

    value, grad = _grads(fast, x)
    expected, expected_grad = _grads(plain, x)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- mmd
@pytest.mark.parametrize("masked", [False, True])
def test_mmd_of_one_tensor_equals_mmd_of_a_pair_of_copies(masked):
    """A single tensor (the self-gram path) and a pair of two equal tensors (the general path) give the same."""
    gen = _gen(2)
    s = torch.randn(3, 5, 4, generator=gen, dtype=F64)
    t = torch.randn(3, 5, 6, generator=gen, dtype=F64)
    mask = _mask(gen) if masked else None
    value, (grad,) = _grads(lambda s: dk.mmd(s, t, mask=mask), s)
    expected, (expected_grad,) = _grads(lambda s: dk.mmd((s, s.clone()), (t, t.clone()), mask=mask), s)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_mmd_gradcheck_with_mask():
    gen = _gen(3)
    s = torch.randn(3, 5, 4, generator=gen, dtype=F64, requires_grad=True)
    t = torch.randn(3, 5, 6, generator=gen, dtype=F64)
    mask = _mask(gen)
    assert torch.autograd.gradcheck(lambda s: dk.mmd(s, t, mask=mask), (s,))


def test_mmd_fully_masked_gives_zero_with_finite_grads():
    gen = _gen(4)
    s = torch.randn(2, 5, 4, generator=gen, dtype=F64)
    t = torch.randn(2, 5, 6, generator=gen, dtype=F64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    value, (grad,) = _grads(lambda s: dk.mmd(s, t, mask=mask), s)
    assert value == 0
    assert torch.isfinite(grad).all() and not grad.any()


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_mmd_nan_at_masked_positions_reaches_nothing(where):
    """The teacher is no longer zeroed before its gram: its masked pairs are selected out of the difference."""
    gen = _gen(5)
    s = torch.randn(3, 5, 4, generator=gen, dtype=F64)
    t = torch.randn(3, 5, 6, generator=gen, dtype=F64)
    mask = _mask(gen)
    rows = mask.unsqueeze(-1)
    spoiled_s = torch.where(rows, s, float("nan")) if where == "student" else s
    spoiled_t = torch.where(rows, t, float("nan")) if where == "teacher" else t
    value, (grad,) = _grads(lambda s: dk.mmd(s, spoiled_t, mask=mask), spoiled_s)
    expected, (expected_grad,) = _grads(lambda s: dk.mmd(s, t, mask=mask), s)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert not grad[~mask].any()


def test_mmd_compiled_fullgraph_equals_eager():
    gen = _gen(6)
    s = torch.randn(3, 5, 4, generator=gen)
    t = torch.randn(3, 5, 6, generator=gen)
    mask = _mask(gen)

    def loss(s, t, mask):
        return dk.mmd(s, t, mask=mask) + dk.hidden_mse(s, s.flip(1).detach() * 0.5, mask=mask)

    compiled = torch.compile(loss, fullgraph=True)
    value, (grad,) = _grads(lambda s: compiled(s, t, mask), s)
    expected, (expected_grad,) = _grads(lambda s: loss(s, t, mask), s)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_hidden_mse_nan_at_masked_positions_reaches_nothing():
    gen = _gen(7)
    s = torch.randn(3, 5, 4, generator=gen, dtype=F64)
    t = torch.randn(3, 5, 4, generator=gen, dtype=F64)
    mask = _mask(gen)
    rows = mask.unsqueeze(-1)
    value, (grad,) = _grads(lambda s: dk.hidden_mse(s, torch.where(rows, t, float("inf")), mask=mask),
                            torch.where(rows, s, float("nan")))
    expected = ((s - t).square() * rows).sum() / (mask.sum() * 4)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(grad).all() and not grad[~mask].any()


# ---------------------------------------------------------------------------------------------- projection
def test_affine_gradcheck():
    gen = _gen(8)
    x = torch.randn(2, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(5, 4, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(_Affine.apply, (x, w, b))
    assert torch.autograd.gradgradcheck(_Affine.apply, (x, w, b))


def test_projection_module_is_an_nn_linear_with_its_state_dict():
    module = dk.proj.linear(3, 8).module()
    assert isinstance(module, torch.nn.Linear) and isinstance(module, Linear)
    assert set(module.state_dict()) == {"weight", "bias"}
    assert set(dk.proj.relu(3, 8).module().state_dict()) == {"0.weight", "0.bias"}


@pytest.mark.parametrize("kind", ["linear", "tanh"])
def test_projection_compiled_equals_eager(kind):
    gen = _gen(9)
    module = getattr(dk.proj, kind)(4, 6).module()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(3, 5, 4, generator=gen)
    target = torch.randn(3, 5, 6, generator=gen)
    mask = _mask(gen)

    def loss(x):
        return dk.hidden_mse(module(x), target, mask=mask)

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        params = list(module.parameters())
        xs = x.clone().requires_grad_()
        value = fn(xs)
        results.append((value.detach(), torch.autograd.grad(value, [xs, *params])))
    (value, grads), (expected, expected_grads) = results[1], results[0]
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-5, atol=1e-6)
