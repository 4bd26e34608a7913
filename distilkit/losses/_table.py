r"""The divergence table: each logit divergence written once, every path derived from it.

A divergence ``D(p_S, p_T)`` between ``p_S = softmax(x_S)`` and a teacher distribution ``p_T`` (``x = z / T``) is
given here by

* ``value(log p_S, log p_T, θ)``: its value per row (the last dimension summed), exact at −inf logits;
* ``grad(log p_S, log p_T, θ)``: its closed-form gradient ``∂D/∂x_S`` (what autograd would give);
* ``param``: the name of θ (jsd's β, skew_kl's α) and its default;
* ``ends``: the parameter values where the divergence is *defined* as another entry (jsd: β = 0 is forward KL and
  β = 1 reverse KL, as TRL and Liger-Kernel define them; skew_kl: α = 0 is forward KL);
* its position in :data:`KINDS`, which is the id the C kernel uses (the kernel is built with ``-D<NAME>=<id>``
  from this table).

The dense path (``_logits.py``) applies ``value`` to ``log_softmax`` under autograd; the top-k path (``_sparse.py``)
applies it to the bucket log-probabilities; the chunk loop (``_chunked.py``) and the fused path (``_fused.py``) use
``value`` and ``grad`` per chunk (:func:`rows_and_grad`); the C kernel implements the same formulas in one sweep per
row (tested equal).

0·log 0 = 0 everywhere: a class without mass under the distribution weighing a term adds 0 to the value and only
finite numbers to the gradient, so −inf logits (padded or banned classes) are exact. Where a divergence is truly
infinite it is +inf: kd_ce and kd_kl where the teacher has mass on a class the student gives −inf (their gradient
``p_S − p_T`` stays finite), reverse_kl where the student has mass on a class the teacher gives −inf (its gradient
is that of the finite terms: an infinite term's log-ratio counts as 0 there, so it stays finite). jsd, skew_kl
(α > 0) and tvd are bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_NEG_INF = float("-inf")
Param = float | Tensor | None


# ------------------------------------------------------------------------------------------------ pieces
def _log(value: float | Tensor) -> float | Tensor:
    if isinstance(value, Tensor):
        return value.log()
    return math.log(value) if value > 0 else _NEG_INF


def log_mixture(log_p: Tensor, log_q: Tensor, weight: float | Tensor) -> Tensor:
    """log(w·p + (1−w)·q), stable, with w = 0 or 1 allowed; −inf (with zero gradient) where both terms are 0."""
    a, b = log_p + _log(weight), log_q + _log(1 - weight)
    dead = (a == _NEG_INF) & (b == _NEG_INF)  # logaddexp's gradient there would be 0/0
    mixed = torch.logaddexp(torch.where(dead, 0.0, a), torch.where(dead, 0.0, b))
    return torch.where(dead, _NEG_INF, mixed)


def p_times(p: Tensor, value: Tensor) -> Tensor:
    """``p · value`` with 0 · anything = 0 where ``p`` = 0 (0·log 0 = 0), in value and gradient: ``value`` is selected
    before the product, so a −inf or NaN there never reaches either."""
    return p * torch.where(p > 0, value, 0.0)


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p (log p − log q) over the last dimension, exact at −inf: 0 where p = 0; +inf where p > 0 = q.

    An infinite term (p > 0 = q) passes its gradient to ``log q`` (−p, as a finite term does) but adds none through
    ``p``, whose factor would be ∞; so the gradient stays finite, and a branch of this selected out elsewhere
    (``torch.where``) never turns a zero gradient into 0·∞ = NaN."""
    p = log_p.exp()
    has, q_zero = p > 0, log_q == _NEG_INF
    finite_q = torch.where(q_zero, log_p.detach(), log_q)  # an infinite term's log-ratio counts as 0 ...
    terms = p_times(p, log_p - finite_q)
    return (terms + torch.where(has & q_zero, -p.detach() * log_q, 0.0)).sum(-1)  # ... and its value is +inf


def _softmax_chain(ps: Tensor, a: Tensor) -> Tensor:
    """``∂row/∂x = p ⊙ (a − ⟨p, a⟩)`` for ``a = ∂row/∂p`` (the softmax Jacobian-vector product)."""
    return ps * (a - torch.linalg.vecdot(ps, a).unsqueeze(-1))


# --------------------------------------------------------------------------------------------- entries
def _kd_ce(ls: Tensor, lt: Tensor, _: Param) -> Tensor:
    return -p_times(lt.exp(), ls).sum(-1)


def _kd_kl(ls: Tensor, lt: Tensor, _: Param) -> Tensor:
    return kl_rows(lt, ls)


def _reverse_kl(ls: Tensor, lt: Tensor, _: Param) -> Tensor:
    return kl_rows(ls, lt)


def _jsd(ls: Tensor, lt: Tensor, b: Param) -> Tensor:
    lm = log_mixture(lt, ls, b)
    return b * kl_rows(lt, lm) + (1 - b) * kl_rows(ls, lm)


def _skew_kl(ls: Tensor, lt: Tensor, a: Param) -> Tensor:
    return kl_rows(lt, log_mixture(lt, ls, a))


def _tvd(ls: Tensor, lt: Tensor, _: Param) -> Tensor:
    return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)


def _grad_p_minus_q(ls: Tensor, lt: Tensor, _: Param) -> Tensor:  # kd_ce and kd_kl: p_S − p_T
    return ls.exp() - lt.exp()


def _grad_reverse_kl(ls: Tensor, lt: Tensor, _: Param) -> Tensor:  # p_S ⊙ (log p_S − log p_T − KL(p_S‖p_T))
    ps = ls.exp()
    return _softmax_chain(ps, torch.where((ps > 0) & (lt > _NEG_INF), ls - lt, 0.0))  # (an infinite term: 0)


def _grad_jsd(ls: Tensor, lt: Tensor, b: Param) -> Tensor:  # a = (1−β)(log p_S − log m)
    ps = ls.exp()
    return _softmax_chain(ps, (1 - b) * torch.where(ps > 0, ls - log_mixture(lt, ls, b), 0.0))


def _grad_skew_kl(ls: Tensor, lt: Tensor, a: Param) -> Tensor:  # a = −(1−α) p_T / m
    pt = lt.exp()
    ratio = torch.where(pt > 0, (lt - log_mixture(lt, ls, a)).exp(), 0.0)
    return _softmax_chain(ls.exp(), -(1 - a) * ratio)


def _grad_tvd(ls: Tensor, lt: Tensor, _: Param) -> Tensor:  # a = ½ sign(p_S − p_T)
    ps = ls.exp()
    return _softmax_chain(ps, 0.5 * (ps - lt.exp()).sign())


@dataclass(frozen=True)
class Divergence:
    """One row of the table (see the module docstring)."""

    name: str
    value: Callable[[Tensor, Tensor, Param], Tensor]
    grad: Callable[[Tensor, Tensor, Param], Tensor]
    param: str | None = None
    default: float | None = None
    ends: tuple[tuple[float, str], ...] = ()

    @property
    def id(self) -> int:
        """The C kernel's number for this divergence."""
        return KINDS.index(self.name)


TABLE: dict[str, Divergence] = {d.name: d for d in (
    Divergence("kd_ce", _kd_ce, _grad_p_minus_q),
    Divergence("kd_kl", _kd_kl, _grad_p_minus_q),
    Divergence("reverse_kl", _reverse_kl, _grad_reverse_kl),
    Divergence("jsd", _jsd, _grad_jsd, "beta", 0.5, ((0.0, "kd_kl"), (1.0, "reverse_kl"))),
    Divergence("skew_kl", _skew_kl, _grad_skew_kl, "alpha", 0.1, ((0.0, "kd_kl"),)),
    Divergence("tvd", _tvd, _grad_tvd),
)}
#: the divergences in the C kernel's numbering
KINDS: tuple[str, ...] = tuple(TABLE)


def resolve(kind: str, param: Param) -> str:
    """The entry that computes ``kind`` at a float ``param``: another one at a defined end point, else ``kind``."""
    if isinstance(param, float):
        for end, other in TABLE[kind].ends:
            if param == end:
                return other
    return kind


def _apply(kind: str, which: str, ls: Tensor, lt: Tensor, param: Param) -> Tensor:
    """``value`` or ``grad`` of ``kind``, with its end points: by dispatch for a float parameter, by selection for a
    tensor one (the parameter is moved off an end point inside the selected-out branch, so that no 0·∞ reaches the
    parameter's gradient)."""
    entry = TABLE[resolve(kind, param)]
    if not isinstance(param, Tensor) or not entry.ends:
        return getattr(entry, which)(ls, lt, param)
    inner = param
    for end, _ in entry.ends:
        inner = torch.where(param == end, torch.full_like(param, 0.5), inner)
    out = getattr(entry, which)(ls, lt, inner)
    for end, other in entry.ends:  # (the parameter is 0-d: it broadcasts over rows and classes)
        out = torch.where(param == end, getattr(TABLE[other], which)(ls, lt, None), out)
    return out


def value(kind: str, ls: Tensor, lt: Tensor, param: Param = None) -> Tensor:
    """Per-row divergence ``kind`` of ``exp(ls)`` from ``exp(lt)`` (log-probabilities over the last dimension)."""
    return _apply(kind, "value", ls, lt, param)


def grad(kind: str, ls: Tensor, lt: Tensor, param: Param = None) -> Tensor:
    """Closed-form ``∂ value / ∂x_S`` where ``ls = log_softmax(x_S)``."""
    return _apply(kind, "grad", ls, lt, param)


def rows_and_grad(kind: str, xs: Tensor, xt: Tensor, param: Param = None) -> tuple[Tensor, Tensor]:
    """``(value, grad)`` from temperature-scaled logits ``xs``, ``xt`` ``[c, V]`` in the compute dtype: the chunk body
    of the chunked and fused paths (pure, so that it can be compiled)."""
    ls, lt = torch.log_softmax(xs, -1), torch.log_softmax(xt, -1)
    return value(kind, ls, lt, param), grad(kind, ls, lt, param)
