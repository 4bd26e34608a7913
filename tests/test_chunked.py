"""Chunked logit divergences: equal to the independent float64 references and to the dense losses, one chunk of
full-vocabulary temporaries at a time, compile-friendly, masks and reductions as every other loss."""

from __future__ import annotations

import pytest
import torch
from references import REFERENCES
from torch.utils._python_dispatch import TorchDispatchMode

import distilkit as dk
from distilkit.losses._chunked import CHUNKED, chunked_jsd, chunked_kd_ce, chunked_kd_kl, chunked_skew_kl

F64 = torch.float64
B, L, V = 3, 5, 11
KINDS = sorted(CHUNKED)
EXTRA = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}}


def _inputs(seed: int, dtype=F64, shape=(B, L, V)):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=F64).to(dtype).requires_grad_()
    t = (2 * torch.randn(*shape, generator=g, dtype=F64)).to(dtype)
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    return s, t, mask


def _grad(value, x):
    (g,) = torch.autograd.grad(value, x)
    return g


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", ["float", "per_row"])
@pytest.mark.parametrize("t2_scale", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64_reference(kind, temperature, t2_scale, masked):
    s, t, mask = _inputs(0)
    mask = mask if masked else None
    gen = torch.Generator().manual_seed(1)
    temp = 2.5 if temperature == "float" else torch.rand(B, L, dtype=F64, generator=gen) + 0.5
    opts = {"temperature": temp, "mask": mask, "t2_scale": t2_scale, **EXTRA.get(kind, {})}
    ref_sum, ref_count = REFERENCES[kind](s, t, **opts)
    ref_mean = ref_sum / max(ref_count, 1.0)
    fn = CHUNKED[kind]
    for chunk in (1, 4, 15, None):  # 15 rows: 4 does not divide them; 1 and all rows are the edge cases
        mean = fn(s, t, chunk_size=chunk, **opts)
        assert mean.dtype == F64
        torch.testing.assert_close(mean, ref_mean.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_grad(mean, s), _grad(ref_mean, s), rtol=1e-9, atol=1e-12)
        ref_mean = REFERENCES[kind](s, t, **opts)[0] / max(ref_count, 1.0)  # fresh graph for the next chunk size
    total, count = fn.sum_count(s, t, chunk_size=4, **opts)
    torch.testing.assert_close(total, ref_sum.detach(), rtol=1e-10, atol=1e-12)
    assert count.item() == ref_count
    torch.testing.assert_close(fn(s, t, chunk_size=4, reduction="sum", **opts), ref_sum.detach(), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_reduction_none_has_the_dense_rows_and_gradients_for_any_weights(kind):
    s, t, mask = _inputs(2)
    opts = {"temperature": 1.7, "mask": mask, **EXTRA.get(kind, {})}
    rows = CHUNKED[kind](s, t, chunk_size=4, reduction="none", **opts)
    dense = getattr(dk.losses, kind)(s, t, reduction="none", **opts)
    assert rows.shape == (B, L)
    torch.testing.assert_close(rows, dense, rtol=1e-10, atol=1e-12)
    w = torch.randn(B, L, dtype=F64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_grad((rows * w).sum(), s), _grad((dense * w).sum(), s), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_and_bfloat16_equal_the_dense_loss(kind):
    s64, t64, mask = _inputs(4, shape=(4, 33, 257))
    opts = {"temperature": 2.0, "mask": mask, **EXTRA.get(kind, {})}
    for dtype, tol in ((torch.float32, {"rtol": 1e-5, "atol": 1e-5}), (torch.bfloat16, {"rtol": 1e-5, "atol": 1e-5})):
        s = s64.detach().to(dtype).requires_grad_()
        t = t64.to(dtype)
        value = CHUNKED[kind](s, t, chunk_size=16, **opts)
        dense = getattr(dk.losses, kind)(s, t, **opts)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, dense, **tol)
        g, gd = _grad(value, s), _grad(dense, s)
        assert g.dtype == dtype
        # tvd: where p_S ≈ p_T, rounding may pick the other sign of |p_T − p_S| (another valid subgradient)
        atol = 1e-4 if kind == "tvd" else 1e-6
        torch.testing.assert_close(g.float(), gd.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=atol)


def test_upstream_gradient_scales_and_the_teacher_gets_none():
    s, t, mask = _inputs(5)
    t = t.detach().requires_grad_()
    value = chunked_kd_kl(s, t, temperature=3.0, mask=mask, chunk_size=2)
    (2.5 * value).backward()
    dense_s = s.detach().requires_grad_()
    (2.5 * dk.kd_kl(dense_s, t.detach(), temperature=3.0, mask=mask)).backward()
    torch.testing.assert_close(s.grad, dense_s.grad, rtol=1e-10, atol=1e-12)
    assert t.grad is None


def test_fully_masked_gives_zero_and_garbage_in_masked_rows_never_leaks():
    s, t, _ = _inputs(6)
    nothing = torch.zeros(B, L, dtype=torch.bool)
    for kind in KINDS:
        value = CHUNKED[kind](s, t, mask=nothing, **EXTRA.get(kind, {}))
        assert value.item() == 0.0
        assert torch.equal(_grad(value, s), torch.zeros_like(s))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 2] = False
    bad = s.detach().clone()
    bad[1, 2] = float("nan")
    bad[1, 2, 0] = float("inf")
    bad.requires_grad_()
    for kind in KINDS:
        value = CHUNKED[kind](bad, t, mask=mask, chunk_size=4, **EXTRA.get(kind, {}))
        clean = getattr(dk.losses, kind)(s, t, mask=mask, **EXTRA.get(kind, {}))
        torch.testing.assert_close(value, clean)
        g = _grad(value, bad)
        assert torch.isfinite(g).all() and (g[1, 2] == 0).all()


def test_jsd_and_skew_kl_limits():
    s, t, mask = _inputs(7)
    for beta in (0.0, 1.0, torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64), torch.tensor(0.4, dtype=F64)):
        ref = REFERENCES["jsd"](s, t, mask=mask, beta=float(beta))[0]
        value = chunked_jsd(s, t, mask=mask, beta=beta, chunk_size=4, reduction="sum")
        torch.testing.assert_close(value, ref.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_grad(value, s), _grad(ref, s), rtol=1e-9, atol=1e-12)
    for alpha in (0.0, 1.0):
        ref = REFERENCES["skew_kl"](s, t, mask=mask, alpha=alpha)[0]
        value = chunked_skew_kl(s, t, mask=mask, alpha=alpha, chunk_size=4, reduction="sum")
        torch.testing.assert_close(value, ref.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_grad(value, s), _grad(ref, s), rtol=1e-9, atol=1e-12)


class _LargestOutputs(TorchDispatchMode):
    """Records the element count of every new tensor an operator produces (views and in-place results skipped)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in (*args, *(kwargs or {}).values())
                  if isinstance(x, torch.Tensor)}
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:  # new memory only
                self.sizes.append((str(func), x.numel()))
        return out


@pytest.mark.parametrize("kind", KINDS)
def test_only_one_chunk_of_full_vocabulary_temporaries(kind):
    """Apart from the gradient buffer (the student's shape, allocated once), no operation of the forward or the
    backward produces a tensor larger than one chunk of rows."""
    rows, vocab, chunk = 64, 97, 8
    s, t, mask = _inputs(8, torch.float32, shape=(rows, vocab))
    with _LargestOutputs() as seen:
        value = CHUNKED[kind](s, t, mask=mask, chunk_size=chunk, **EXTRA.get(kind, {}))
        value.backward()
    big = [(name, n) for name, n in seen.sizes if n > chunk * vocab]
    assert [n for _, n in big] == [rows * vocab], big  # the gradient buffer, once
    assert "empty" in big[0][0]


def test_compiled_fullgraph_equals_eager():
    s, t, mask = _inputs(9, torch.float32, shape=(4, 9, 31))
    temp = torch.rand(4, 9, generator=torch.Generator().manual_seed(10)) + 0.5

    def f(s, t, mask, temp):
        return (chunked_kd_ce(s, t, mask=mask, temperature=temp, chunk_size=8)
                + chunked_jsd(s, t, mask=mask, temperature=2.0, beta=0.3, chunk_size=16))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    value = compiled(s, t, mask, temp)
    expected = f(s, t, mask, temp)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(_grad(value, s), _grad(expected, s))


def test_backward_twice_through_one_forward_raises():
    s, t, _ = _inputs(11)
    value = chunked_kd_kl(s, t, chunk_size=4)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        value.backward()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"chunk_size": 0}, ValueError, "chunked_kd_kl: expected chunk_size"),
    ({"chunk_size": 2.5}, ValueError, "chunked_kd_kl: expected chunk_size"),
    ({"reduction": "max"}, ValueError, "chunked_kd_kl: expected reduction"),
    ({"temperature": 0.0}, ValueError, "chunked_kd_kl: expected temperature > 0"),
    ({"mask": torch.ones(B, dtype=torch.bool)}, ValueError, "chunked_kd_kl: expected mask of shape"),
])
def test_errors(kwargs, error, match):
    s, t, _ = _inputs(12)
    with pytest.raises(error, match=match):
        chunked_kd_kl(s, t, **kwargs)


def test_argument_errors():
    s, t, _ = _inputs(13)
    with pytest.raises(ValueError, match="chunked_kd_ce: expected student and teacher logits of the same shape"):
        chunked_kd_ce(s, t[..., :-1])
    with pytest.raises(TypeError, match="chunked_kd_ce: expected teacher logits to be a real floating-point"):
        chunked_kd_ce(s, t.long())
    with pytest.raises(ValueError, match="chunked_jsd: expected 0 <= beta <= 1"):
        chunked_jsd(s, t, beta=1.5)


# ------------------------------------------------------------------ the compiled chunk body (accelerators' default)
@pytest.mark.parametrize("kind", ["kd_kl", "jsd"])  # (each kind compiles once: ~10 s on 2 cores)
def test_the_compiled_chunk_body_equals_the_eager_one(kind):
    """On accelerators the torch chunk loop compiles its chunk body (one graph for every temperature); tested here
    with inductor on the CPU, through the chunked and the fused paths, against the dense formula."""
    gen = torch.Generator().manual_seed(5)
    s, t = (torch.randn(6, 5, 33, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(6, 5, generator=gen) > 0.3
    options = {"beta": 0.3} if kind == "jsd" else {"alpha": 0.2} if kind == "skew_kl" else {}
    for temperature in (1.0, 2.5, torch.tensor(1.5, dtype=torch.float64)):
        x = s.clone().requires_grad_()
        with dk.backends.compiled_chunk_body():
            value = getattr(dk, kind)(x, t, impl="chunked", chunk_size=7, mask=mask, temperature=temperature,
                                      **options)
            (grad,) = torch.autograd.grad(value, x)
        y = s.clone().requires_grad_()
        dense = getattr(dk, kind)(y, t, impl="dense", mask=mask, temperature=temperature, **options)
        (want,) = torch.autograd.grad(dense, y)
        torch.testing.assert_close(value, dense, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)
    eye = torch.eye(33, dtype=torch.float64)
    h = s.clone().requires_grad_()
    with dk.backends.compiled_chunk_body():
        fused = dk.fused_linear_kd(h, eye, t, eye, divergence=kind, mask=mask, chunk_size=4, **options)
    torch.testing.assert_close(fused, getattr(dk, kind)(s, t, impl="dense", mask=mask, **options), rtol=1e-9,
                               atol=1e-12)
    from distilkit.losses import _chunked
    assert _chunked._compiled_body is not None  # (the compiled body was used)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
