"""One name per logit divergence: ``impl="dense" | "chunked" | "auto"`` give the same values and gradients, ``"auto"``
takes the CPU kernel exactly where it may, and the ``chunked_*`` names are deprecated aliases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distilkit as dk
from distilkit.losses import _cpu_kernel, _table

KINDS = ["kd_ce", "kd_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]
EXTRA = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}}


def inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(3, 5, 40, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    t = (2 * torch.randn(3, 5, 40, generator=gen, dtype=torch.float64)).to(dtype)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    return s, t, mask


def value_and_grad(kind, s, t, **options):
    x = s.detach().clone().requires_grad_()
    value = getattr(dk, kind)(x, t, **EXTRA.get(kind, {}), **options)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32-kernel", "f64-loop"])
@pytest.mark.parametrize("kind", KINDS)
def test_dense_and_chunked_agree(kind, dtype, reduction):
    s, t, mask = inputs(dtype)
    options = {"temperature": torch.tensor([1.0, 2.0, 4.0], dtype=dtype)[:, None].expand(3, 5), "mask": mask,
               "reduction": reduction}
    dense = value_and_grad(kind, s, t, impl="dense", **options)
    chunked = value_and_grad(kind, s, t, impl="chunked", chunk_size=4, **options)
    tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for a, b in zip(dense, chunked, strict=True):
        torch.testing.assert_close(b, a, **tol)
    total, count = getattr(dk, kind).sum_count(s, t, impl="chunked", **EXTRA.get(kind, {}), mask=mask)
    dense_total, dense_count = getattr(dk, kind).sum_count(s, t, impl="dense", **EXTRA.get(kind, {}), mask=mask)
    torch.testing.assert_close(total, dense_total, **tol)
    assert count.item() == dense_count.item() == mask.sum().item()


def _kernel_calls(monkeypatch):
    calls = []
    op = _cpu_kernel.rows_grad
    monkeypatch.setattr(_cpu_kernel, "rows_grad", lambda *a: calls.append(1) or op(*a))
    return calls


@pytest.mark.skipif(not _cpu_kernel.available(), reason=f"CPU kernel {_cpu_kernel.status()}")
def test_auto_takes_the_kernel_only_where_it_may(monkeypatch):
    calls = _kernel_calls(monkeypatch)
    small, t_small, _ = inputs()
    dk.kd_kl(small, t_small).backward()  # a few hundred logits: the kernel's fixed cost would dominate
    assert not calls
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(8, 70, 128, generator=gen).requires_grad_()  # 71,680 logits: above KERNEL_MIN_ELEMENTS (32,768)
    t, mask = torch.randn(8, 70, 128, generator=gen), torch.rand(8, 70, generator=gen) > 0.3
    auto = value_and_grad("kd_kl", s, t, mask=mask, temperature=2.0)
    assert len(calls) == 1  # a plain eager call with grad: the kernel
    dense = value_and_grad("kd_kl", s, t, mask=mask, temperature=2.0, impl="dense")
    torch.testing.assert_close(auto, dense, rtol=2e-5, atol=1e-6)
    with torch.no_grad():
        dk.kd_kl(s, t)  # no gradient wanted: dense, nothing written
    dk.kd_kl(s.detach(), t)
    dk.kd_kl(s.double(), t.double())  # float64: not the kernel's
    dk.kd_kl(s, t, temperature=torch.tensor(2.0, requires_grad=True))  # a learnable temperature needs dense
    torch.func.grad(lambda x: dk.kd_kl(x, t))(s.detach())  # a transform needs dense
    assert len(calls) == 1
    compiled = torch.compile(lambda x: dk.kd_kl(x, t, mask=mask, temperature=2.0), fullgraph=True,
                             backend="aot_eager")
    s2 = s.detach().clone().requires_grad_()
    got = compiled(s2)
    got.backward()
    assert len(calls) == 2  # compiled: the kernel too (a custom op), with the same value and gradient
    torch.testing.assert_close((got.detach(), s2.grad), dense, rtol=2e-5, atol=1e-6)
    dk.kd_kl(s, t, chunk_size=2).sum()  # a chunk size asks for the chunked path
    assert len(calls) == 3


def test_impl_is_checked():
    s, t, _ = inputs()
    with pytest.raises(ValueError, match=r"kd_kl: expected impl to be one of \('auto', 'dense', 'chunked'\)"):
        dk.kd_kl(s, t, impl="fast")
    with pytest.raises(ValueError, match="kd_kl: chunk_size applies to impl='chunked'"):
        dk.kd_kl(s, t, impl="dense", chunk_size=8)
    with pytest.raises(ValueError, match="kd_kl: expected chunk_size to be a positive int"):
        dk.kd_kl(s, t, impl="chunked", chunk_size=0)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_names_are_deprecated_aliases(kind):
    s, t, mask = inputs()
    with pytest.warns(DeprecationWarning, match=rf"dk.chunked_{kind} is deprecated.*impl='chunked'"):
        old = getattr(dk, f"chunked_{kind}")(s, t, mask=mask, **EXTRA.get(kind, {}))
    new = getattr(dk, kind)(s, t, mask=mask, impl="chunked", **EXTRA.get(kind, {}))
    torch.testing.assert_close(old, new)


def test_impl_is_static_structure_of_a_term():
    term = dk.kd_kl.on("logits", impl="chunked", chunk_size=64, temperature=2.0)
    leaves = torch.utils._pytree.tree_leaves(term)
    assert leaves == [2.0]
    rebuilt = dk.from_config(dk.to_config(term).model_dump_json())
    assert rebuilt == dk.algebra.Spec((term,))
    s, t, _ = inputs()
    out = dk.make_step(term, compile="aot_eager")({"logits": s}, {"logits": t})
    torch.testing.assert_close(out.loss, dk.kd_kl(s, t, temperature=2.0, impl="dense"), rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ top-k teachers
def top_k(t: torch.Tensor, k: int, temperature: float = 1.0):
    logprobs = torch.log_softmax(t / temperature, -1)
    top = logprobs.topk(k)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp_max(1.0))
    return top.indices, top.values, tail


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_top_k_teacher_equals_the_dense_teacher(kind):
    s, t, mask = inputs()
    indices, logprobs, _ = top_k(t, t.shape[-1])
    teacher = dk.TopK(indices, logprobs, tail=torch.full(t.shape[:-1], float("-inf")))  # k = V: nothing left
    got = value_and_grad(kind, s, teacher, mask=mask)
    expected = value_and_grad(kind, s, t, mask=mask, impl="dense")
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# (reverse_kl and jsd are +inf under renormalize — the student has mass outside the top k — and refused: see below)
POLICY_CASES = [(k, p) for k in KINDS for p in ("renormalize", "tail")
                if not (p == "renormalize" and k in ("reverse_kl", "jsd"))]


@pytest.mark.parametrize(("kind", "policy"), POLICY_CASES, ids=[f"{k}-{p}" for k, p in POLICY_CASES])
def test_a_top_k_teacher_equals_the_deprecated_sparse_name(kind, policy):
    s, t, mask = inputs()
    indices, logprobs, tail = top_k(t, 7, temperature=2.0)
    teacher = dk.TopK(indices, logprobs, tail=tail, temperature=2.0, policy=policy)
    got = value_and_grad(kind, s, teacher, mask=mask, temperature=2.0)
    mapping = {"indices": indices, "logprobs": logprobs, "tail": tail, "temperature": 2.0}
    with pytest.warns(DeprecationWarning, match=rf"dk.sparse_{kind} is deprecated.*dk.TopK"):
        expected = value_and_grad(f"sparse_{kind}", s, mapping, mask=mask, temperature=2.0, policy=policy,
                                  **EXTRA.get(kind, {}))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_top_k_policies_and_errors():
    s, t, _ = inputs()
    indices, logprobs, tail = top_k(t, 5)
    assert dk.TopK(indices, logprobs).resolved_policy() == "renormalize"
    assert dk.TopK(indices, logprobs, tail=tail).resolved_policy() == "tail"
    with pytest.raises(ValueError, match="reverse_kl"):
        dk.reverse_kl(s, dk.TopK(indices, logprobs))  # +inf under renormalize: refused
    with pytest.raises(ValueError, match=r"kd_kl: a dk\.TopK teacher has one implementation"):
        dk.kd_kl(s, dk.TopK(indices, logprobs), impl="chunked")
    moved = torch.utils._pytree.tree_map(lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point()
                                         else x, dk.TopK(indices, logprobs, tail=tail))
    assert moved.logprobs.dtype == torch.float64 and moved.policy is None and moved.indices.dtype == torch.long


def test_a_top_k_teacher_in_a_compiled_step():
    s, t, mask = inputs()
    indices, logprobs, tail = top_k(t, 6)
    teacher = {"logits": dk.TopK(indices, logprobs, tail=tail)}
    spec = dk.kd_kl.on("logits", mask="mask") + 0.5 * dk.jsd.on("logits", beta=0.4, mask="mask")
    eager = dk.make_step(spec, compile=False)({"logits": s}, teacher, {"mask": mask})
    compiled = dk.make_step(spec, compile="aot_eager")({"logits": s}, teacher, {"mask": mask})
    torch.testing.assert_close(compiled.loss, eager.loss)
    g_eager, g_compiled = (torch.autograd.grad(o.loss, s)[0] for o in (eager, compiled))
    torch.testing.assert_close(g_compiled, g_eager)


# ------------------------------------------------------------------------------------- the divergence table
@pytest.mark.parametrize("kind", list(_table.TABLE))
@pytest.mark.parametrize("neg_inf", ["none", "teacher", "student", "both"])
def test_table_closed_form_gradient_is_the_gradient_of_its_value(kind, neg_inf):
    """The chunked, fused and kernel paths use ``grad``; the dense and top-k paths differentiate ``value``: one table
    row, so the two must agree, −inf logits included (where the value is +inf: the gradient of the finite terms)."""
    gen = torch.Generator().manual_seed(3)
    xs, xt = (torch.randn(5, 9, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    if neg_inf in ("teacher", "both"):
        xt[:, 1] = -math.inf
    if neg_inf in ("student", "both"):
        xs[:, 4] = -math.inf
    params = [None] if _table.TABLE[kind].param is None else [0.0, 0.3, 1.0, torch.tensor(0.0, dtype=torch.float64),
                                                               torch.tensor(0.3, dtype=torch.float64)]
    for param in params:
        x = xs.clone().requires_grad_()
        value = _table.value(kind, torch.log_softmax(x, -1), torch.log_softmax(xt, -1), param)
        (autograd,) = torch.autograd.grad(value.sum(), x)
        rows, closed = _table.rows_and_grad(kind, xs, xt, param)
        torch.testing.assert_close(rows, value.detach(), rtol=1e-12, atol=0)
        assert closed.isfinite().all() and autograd.isfinite().all(), (kind, param)
        torch.testing.assert_close(closed, autograd, rtol=1e-9, atol=1e-12, msg=f"{kind} {param}")


def test_the_kernel_numbers_the_kinds_as_the_table():
    assert tuple(_table.TABLE) == _cpu_kernel.KINDS
    assert tuple(f"-D{k.upper()}={i}" for i, k in enumerate(_table.TABLE)) == _cpu_kernel.DEFINES
    source = _cpu_kernel.SOURCE.read_text()
    assert "enum {" not in source  # (no second numbering in the C source)


def test_no_gradient_wanted_none_computed(monkeypatch):
    """Without grad (no_grad, or no input requiring it) the chunked and fused paths compute the rows only: no kernel
    call (it writes a gradient), no [N, V] gradient buffer; the values equal the dense ones."""
    calls = _kernel_calls(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(8, 70, 128, generator=gen), torch.randn(8, 70, 128, generator=gen)
    allocated = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.is_mutable or func.is_view or func in (torch.ops.aten.detach.default,
                                                                   torch.ops.aten.alias.default):
                return out  # (views and in-place ops allocate nothing)
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(x, torch.Tensor):
                    allocated.append((x.numel(), str(func)))
            return out

    for kind in KINDS:
        options = EXTRA.get(kind, {})
        want = getattr(dk, kind)(s, t, temperature=2.0, impl="dense", **options)
        with Sizes():
            got = getattr(dk, kind)(s, t, temperature=2.0, impl="chunked", chunk_size=16, **options)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with torch.no_grad(), Sizes():
            got = getattr(dk, kind)(s.requires_grad_(), t, temperature=2.0, impl="chunked", chunk_size=16, **options)
        s.requires_grad_(False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    eye = torch.eye(128)
    with torch.no_grad(), Sizes():
        fused = dk.losses.fused_linear_kd(s, eye.requires_grad_(), t, eye, temperature=2.0, chunk_size=16)
    torch.testing.assert_close(fused, dk.kd_kl(s, t, temperature=2.0, impl="dense"), rtol=1e-5, atol=1e-6)
    assert not calls
    biggest = max(allocated)
    assert biggest[0] < s.numel(), biggest  # nothing of the logits' size: one chunk at a time
