"""−inf logits (padded or banned vocabulary entries) are exact in every logit-divergence path: 0·log 0 = 0, finite
gradients, and +inf exactly where the divergence is truly infinite.

The reference is written here from the definitions, in float64, summing only over the classes where the weighting
distribution has mass (so it never evaluates 0·log 0).
"""

from __future__ import annotations

import math

import pytest
import torch
from tester import on_path

import distilkit as dk
from distilkit.losses import _cpu_kernel

NEG_INF = -math.inf
T = 2.0


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_{p > 0} p (log p − log q) per row; +inf where p > 0 = q."""
    out = torch.zeros(p.shape[0], dtype=torch.float64)
    for r in range(p.shape[0]):
        for v in range(p.shape[1]):
            if p[r, v] > 0:
                out[r] += math.inf if q[r, v] == 0 else p[r, v] * (math.log(p[r, v]) - math.log(q[r, v]))
    return out


def reference(kind: str, s: torch.Tensor, t: torch.Tensor, param: float | None = None) -> float:
    ps, pt = (torch.softmax(x.double() / T, -1) for x in (s, t))
    if kind == "kd_ce":
        ent = torch.zeros(ps.shape[0], dtype=torch.float64)
        for r in range(ps.shape[0]):
            ent[r] = -sum(float(pt[r, v]) * math.log(pt[r, v]) for v in range(ps.shape[1]) if pt[r, v] > 0)
        rows = _kl(pt, ps) + ent
    elif kind == "kd_kl":
        rows = _kl(pt, ps)
    elif kind == "reverse_kl":
        rows = _kl(ps, pt)
    elif kind == "jsd":
        m = param * pt + (1 - param) * ps
        rows = param * _kl(pt, m) + (1 - param) * _kl(ps, m)
    elif kind == "skew_kl":
        rows = _kl(pt, param * pt + (1 - param) * ps)
    else:
        rows = 0.5 * (pt - ps).abs().sum(-1)
    return float((rows * T * T).mean())


KINDS = [("kd_ce", None), ("kd_kl", None), ("reverse_kl", None), ("jsd", 0.3), ("skew_kl", 0.1), ("tvd", None)]
PLACES = ["teacher", "student", "both"]


def truly_infinite(kind: str, place: str) -> bool:
    return (kind in ("kd_ce", "kd_kl") and place == "student") or (kind == "reverse_kl" and place == "teacher")


def logits(place: str, dtype: torch.dtype, one_row: bool = True):
    gen = torch.Generator().manual_seed(0)
    s, t = (torch.randn(4, 9, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    if place in ("teacher", "both"):
        t[:, [2, 7]] = NEG_INF
    if place in ("student", "both"):
        s[:, [2, 7]] = NEG_INF
    if one_row:  # (not for the fused path, whose −inf come from a bias: the same classes in every row)
        s[3, 5] = t[3, 5] = NEG_INF  # a class that is −inf in both models, in every case
    return s, t


def call(path: str, kind: str, param, s, t, monkeypatch):
    options = {"temperature": T}
    if param is not None:
        options["beta" if kind == "jsd" else "alpha"] = param
    if path == "dense":
        return getattr(dk, kind)(s, t, **options)
    if path == "topk":  # the tester's top-k teacher keeping every class, on the same logits
        return on_path(kind, "topk")(s, t, **options)
    if path.startswith("fused"):  # −inf from the output layer's bias (banned classes), as in an LLM head
        if path == "fused":
            monkeypatch.setattr(_cpu_kernel, "usable", lambda *args: False)
        eye = torch.eye(s.shape[-1], dtype=s.dtype)
        head = [(x.nan_to_num(neginf=0.0), torch.where((x == NEG_INF).all(0), NEG_INF, 0.0).to(x.dtype))
                for x in (s, t)]
        return dk.fused_linear_kd(head[0][0], eye, head[1][0], eye, student_bias=head[0][1], teacher_bias=head[1][1],
                                  divergence=kind, chunk_size=3, **options)
    if path == "torch-loop":
        monkeypatch.setattr(_cpu_kernel, "usable", lambda *args: False)
    elif not _cpu_kernel.usable(s, t):
        pytest.fail(f"the CPU kernel should take float32 CPU inputs here ({_cpu_kernel.status()})")
    return getattr(dk, f"chunked_{kind}")(s, t, chunk_size=3, **options)


PATHS = ["dense", "torch-loop", "kernel", "topk", "fused", "fused-kernel"]


def _dtypes(path):
    return [torch.float32] if path.endswith("kernel") else [torch.float32, torch.float64]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(("kind", "param"), KINDS, ids=[k for k, _ in KINDS])
@pytest.mark.parametrize(("path", "dtype"), [(p, d) for p in PATHS for d in _dtypes(p)],
                         ids=[f"{p}-{str(d)[6:]}" for p in PATHS for d in _dtypes(p)])
def test_neg_inf_logits_are_exact(path, dtype, kind, param, place, monkeypatch):
    if path == "kernel" and not _cpu_kernel.available():
        pytest.fail(f"the CPU kernel should build on this machine: {_cpu_kernel.status()}")
    s, t = logits(place, dtype, one_row=not path.startswith("fused"))
    s.requires_grad_()
    value = call(path, kind, param, s, t, monkeypatch)
    (grad,) = torch.autograd.grad(value, s)
    expected = reference(kind, s.detach(), t, param)
    if truly_infinite(kind, place):
        assert value.item() == math.inf
        # the gradient stays finite in every path (an infinite term adds none: the divergence table's rule), and
        # every path gives the same one
        assert torch.isfinite(grad).all()
        s_dense = s.detach().double().requires_grad_()
        (dense_grad,) = torch.autograd.grad(call("dense", kind, param, s_dense, t.double(), monkeypatch), s_dense)
        # (the fused path's −inf come from a bias: the logit there has no hidden entry to receive a gradient)
        at = torch.isfinite(s.detach()) if path.startswith("fused") else slice(None)
        torch.testing.assert_close(grad.double()[at], dense_grad[at], rtol=1e-4, atol=1e-6)
        return
    assert math.isfinite(expected)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(value.double(), torch.tensor(expected, dtype=torch.float64), **tol)
    assert torch.isfinite(grad).all(), grad
    finite = torch.isfinite(s.detach())
    assert (grad[~finite] == 0).all()  # nothing reaches a −inf logit


FINITE = [(k, p, place) for k, p in KINDS for place in PLACES if k != "tvd" and not truly_infinite(k, place)]


@pytest.mark.parametrize(("kind", "param", "place"), FINITE, ids=[f"{k}-{place}" for k, _, place in FINITE])
def test_dense_gradient_at_neg_inf_matches_finite_differences(kind, param, place):
    # gradcheck over the finite logits only (a −inf entry is fixed: it has no neighbourhood)
    s, t = logits(place, torch.float64)
    finite = torch.isfinite(s)
    base = s.clone()

    def f(x):
        full = base.masked_scatter(finite, x)
        options = {"temperature": T}
        if param is not None:
            options["beta" if kind == "jsd" else "alpha"] = param
        return getattr(dk, kind)(full, t, **options)

    assert torch.autograd.gradcheck(f, (s[finite].clone().requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_paths_agree_on_gradients_at_neg_inf(monkeypatch):
    for kind, param in KINDS:
        for place in PLACES:
            if truly_infinite(kind, place):
                continue
            for path in PATHS[1:]:
                s, t = logits(place, torch.float32, one_row=not path.startswith("fused"))
                grads = []
                for on in ("dense", path):
                    x = s.clone().requires_grad_()
                    with monkeypatch.context() as m:
                        grads.append(torch.autograd.grad(call(on, kind, param, x, t, m), x)[0])
                torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6, msg=f"{kind} {place} {path}")
