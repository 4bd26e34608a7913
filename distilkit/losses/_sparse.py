r"""Logit divergences against a sparse (top-k) teacher, e.g. one read back from ``dk.cache`` with ``("topk", k)``.

A top-k teacher is a mapping (what ``dk.cache`` returns under ``"logits"``)::

    {"indices": [..., k] int,     # the kept classes K of each row (distinct, in [0, V))
     "logprobs": [..., k] float,  # the teacher's log-probabilities of K at its stored temperature T_c:
                                  #   log softmax(z_T / T_c)[K]
     "tail": [...] float,         # optional: log of the leftover mass at T_c, log(1 − Σ_K p); −inf when none
     "temperature": T_c}          # optional (default 1.0): float, 0-d or per-row tensor

Both sides are compared on **k + 1 buckets**: the k kept classes and one *tail* bucket holding every other class.
The student's bucket log-probabilities are exact: ``log q_K = log_softmax(z_S / T)[K]`` and
``log q_tail = logsumexp_{v∉K}(z_S / T) − logsumexp_v(z_S / T)`` (no cancellation however small the tail). The
teacher's buckets depend on the ``policy`` for the mass that was not kept:

* ``policy="renormalize"``: the teacher is its top-k renormalised, ``p̃_T = softmax_K(logprobs · T_c / T)``
  (the shift of ``logprobs`` cancels, so raw logits at T_c also work), with **zero** tail mass. Any temperature
  ``T`` is exact. Every divergence is then *exactly* the dense divergence between ``p̃_T`` (zero outside K) and
  the full student ``softmax(z_S / T)``: outside K the ratio p̃/q is constant (0), so bucketing loses nothing.
  ``sparse_reverse_kl`` and ``sparse_jsd`` with ``beta=1`` would be +∞ when k < V (the student always has mass
  outside K), so this policy refuses them then with a ``ValueError`` (a 0-d tensor ``beta`` equal to 1 gives +∞
  rows instead); with k = V they equal the dense losses.
* ``policy="tail"``: the teacher keeps its real leftover mass as one category: ``(p_K, p_tail)`` =
  ``softmax(cat(logprobs, tail))`` (a renormalisation absorbing storage rounding; ≈ identity). This is exact at
  the stored temperature only — the leftover mass at another temperature is not recoverable from the top k — so
  the loss ``temperature`` must equal ``T_c`` (checked when both are floats, and eagerly for CPU tensors). The
  result is exactly the dense divergence between the two **bucketed** distributions, which by the
  data-processing inequality is ≤ the dense divergence between the full distributions (equal when k = V, or when
  p/q is constant on the tail). ``sparse_kd_ce`` is the bucketed cross-entropy
  ``−Σ_K p log q − p_tail log q_tail``.

With k = V (no tail) both policies equal the dense losses of :mod:`distilkit.losses._logits` (renormalize at any T,
tail at T = T_c). Truncation biases the teacher (Anshumann et al., 2025, "Sparse Logit Sampling: Accelerating
Knowledge Distillation in LLMs", arXiv:2503.16870); the tail bucket keeps the total teacher mass right.

Conventions as the dense losses: ``temperature`` (float, 0-d or per-row tensor) > 0, ``mask`` over the leading
positions, ``t2_scale`` multiplies each row by T², ``reduction`` via :func:`~distilkit.losses._reduce.masked_loss`;
inputs upcast to float32 (float64 stays); the teacher is detached; branch-free, no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

from . import _checks as check
from . import _table as table
from ._reduce import Parts, masked_loss

POLICIES = ("renormalize", "tail")
TEACHER_KEYS = ("indices", "logprobs", "tail", "temperature")
_INF = math.inf


@dataclass(frozen=True)
class TopK:
    """A top-k teacher, accepted as the ``teacher`` of ``dk.kd_ce``, ``kd_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``
    and ``tvd``: ``indices`` ``[..., k]`` (int, distinct classes in [0, V)), ``logprobs`` ``[..., k]`` (the teacher's
    log-probabilities of those classes at its stored temperature ``temperature``), optionally ``tail`` ``[...]`` (log
    of the leftover mass, log(1 − Σ_K p)), and ``policy`` for that mass: ``"renormalize"`` (default without a tail;
    exact at any temperature) or ``"tail"`` (default with one; exact at the stored temperature). See this module's
    docstring for the definitions. A pytree: its tensors are leaves, ``policy`` is structure."""

    indices: Tensor
    logprobs: Tensor
    tail: Tensor | None = None
    temperature: float | Tensor = 1.0
    policy: str | None = None

    def resolved_policy(self) -> str:
        return self.policy or ("renormalize" if self.tail is None else "tail")

    def as_mapping(self) -> dict:
        """The mapping form the ``sparse_*`` functions (and ``dk.cache``) use."""
        out = {"indices": self.indices, "logprobs": self.logprobs, "temperature": self.temperature}
        return out if self.tail is None else {**out, "tail": self.tail}


def _unflatten_topk(children, policy) -> TopK:
    node = object.__new__(TopK)
    for name, value in zip(("indices", "logprobs", "tail", "temperature"), children, strict=True):
        object.__setattr__(node, name, value)
    object.__setattr__(node, "policy", policy)
    return node


pytree.register_pytree_node(TopK, lambda k: ([k.indices, k.logprobs, k.tail, k.temperature], k.policy),
                            _unflatten_topk, serialized_type_name="distilkit.TopK")


# ------------------------------------------------------------------------------------------------ inputs
def _teacher(api: str, teacher: object, lead: tuple[int, ...], num_classes: int, policy: str, like: Tensor):
    """Validate a top-k teacher mapping; return ``(indices int64, logprobs, tail or None, T_c)``."""
    if not isinstance(teacher, Mapping):
        raise TypeError(
            f"{api}: expected the teacher to be a top-k mapping with keys 'indices', 'logprobs' (and 'tail', "
            f"'temperature'), e.g. from dk.cache with logits=('topk', k), got {type(teacher).__name__}. "
            "Use the dense losses (kd_kl, ...) for dense teacher logits."
        )
    unknown = sorted(str(k) for k in teacher if k not in TEACHER_KEYS)
    if unknown:
        raise ValueError(f"{api}: expected teacher keys among {TEACHER_KEYS}, got unknown keys {unknown}.")
    for key in ("indices", "logprobs"):
        if key not in teacher:
            raise ValueError(f"{api}: expected the top-k teacher to have key {key!r}, got keys {sorted(teacher)}.")
    indices = teacher["indices"]
    if not isinstance(indices, Tensor):
        raise TypeError(f"{api}: expected teacher indices to be a torch.Tensor, got {type(indices).__name__}.")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{api}: expected integer teacher indices, got dtype {indices.dtype}.")
    if indices.ndim != len(lead) + 1 or tuple(indices.shape[:-1]) != lead:
        raise ValueError(
            f"{api}: expected teacher indices of shape {(*lead, 'k')} (the student's leading shape, then k), "
            f"got {tuple(indices.shape)}."
        )
    k = indices.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"{api}: expected 1 <= k <= V = {num_classes} kept classes per row, got k = {k}.")
    logprobs = check.floating(api, "teacher logprobs", teacher["logprobs"]).detach()
    if tuple(logprobs.shape) != tuple(indices.shape):
        raise ValueError(
            f"{api}: expected teacher logprobs of the indices' shape {tuple(indices.shape)}, "
            f"got {tuple(logprobs.shape)}."
        )
    tail = teacher.get("tail")
    if policy == "tail":
        if tail is None:
            raise ValueError(
                f"{api}: policy='tail' needs the teacher's leftover mass under key 'tail' (log of 1 − Σ_K p, "
                "as dk.cache stores it); got none. Use policy='renormalize' without it."
            )
        tail = check.floating(api, "teacher tail", tail).detach()
        if tuple(tail.shape) != lead:
            raise ValueError(f"{api}: expected teacher tail of shape {lead}, got {tuple(tail.shape)}.")
    else:
        tail = None
    check.same_device(api, student=like, indices=indices, logprobs=logprobs, tail=tail)
    check.eager_check(api, (indices >= 0) & (indices < num_classes),
                      f"expected teacher indices in [0, {num_classes}).")
    stored = check.temperature(api, teacher.get("temperature", 1.0), lead, like, name="teacher temperature")
    return indices.long(), logprobs.to(like.dtype), None if tail is None else tail.to(like.dtype), stored


def _column(value: float | Tensor) -> float | Tensor:
    return value.unsqueeze(-1) if isinstance(value, Tensor) and value.ndim else value


def _same_temperature(api: str, temp: float | Tensor, stored: float | Tensor) -> None:
    def message() -> str:
        show = [float(x) if isinstance(x, Tensor) and x.ndim == 0 else x for x in (stored, temp)]
        return (f"expected temperature equal to the teacher's stored temperature {show[0]} under policy='tail', got "
                f"{show[1]}: the leftover mass at another temperature cannot be recovered from the top k. Cache the "
                "teacher at this temperature or use policy='renormalize'.")

    if isinstance(temp, float) and isinstance(stored, float):
        if not math.isclose(temp, stored, rel_tol=1e-6):
            raise ValueError(f"{api}: {message()}")
    else:
        difference = (torch.as_tensor(temp) - torch.as_tensor(stored)).abs()
        check.eager_check(api, difference <= 1e-6 * torch.as_tensor(stored), message)


def _buckets(api: str, student, teacher, temperature, mask, policy: str, infinite: str | None = None):
    """``(log q, log p, T, keep)``: student and teacher log-probabilities over the k (+ 1 tail) buckets.
    ``infinite``: what is +inf against a renormalised teacher with k < V (refused then)."""
    check.choice(api, "policy", policy, POLICIES)
    s = check.floating(api, "student logits", student)
    check.rank(api, "student logits", s, range(1, 64), "[..., V]")
    num_classes = s.shape[-1]
    if num_classes == 0:
        raise ValueError(f"{api}: expected at least one class in the last dimension, got shape {tuple(s.shape)}.")
    lead = tuple(s.shape[:-1])
    indices, logprobs, tail, stored = _teacher(api, teacher, lead, num_classes, policy, s)
    if infinite is not None and policy == "renormalize" and indices.shape[-1] < num_classes:
        raise ValueError(
            f"{api}: expected policy='tail' for {infinite}, got policy='renormalize': the renormalised teacher has "
            "no mass outside its top k while the student always has, so the divergence is +inf."
        )
    keep = check.mask(api, mask, lead, s)
    temp = check.temperature(api, temperature, lead, s)
    # dropped rows: selected to 0 (NaN or inf left there reaches neither the value nor a gradient)
    s, logprobs = check.zero_dropped(s, keep), check.zero_dropped(logprobs, keep)
    tail = None if tail is None else check.zero_dropped(tail, keep, trailing=0)
    zs = s / _column(temp)
    log_z = zs.logsumexp(-1, keepdim=True)
    ls = zs.gather(-1, indices) - log_z
    if policy == "renormalize":
        lt = F.log_softmax(logprobs * (_column(stored) / _column(temp)), dim=-1)
    else:
        _same_temperature(api, temp, stored)
        lt = logprobs
    if indices.shape[-1] < num_classes:  # static: a tail bucket exists
        ls_tail = zs.scatter(-1, indices, -_INF).logsumexp(-1, keepdim=True) - log_z
        lt_tail = tail.unsqueeze(-1) if tail is not None else torch.full_like(ls_tail, -_INF)
        ls, lt = torch.cat([ls, ls_tail], dim=-1), torch.cat([lt, lt_tail], dim=-1)
    if policy == "tail":
        lt = F.log_softmax(lt, dim=-1)
    return ls, lt, temp, keep


def _rows(api: str, kind: str, student, teacher, temperature, mask, t2_scale: bool, policy: str,
          param=None, infinite: str | None = None) -> Parts:
    """The divergence table's ``kind`` on the bucket log-probabilities (exact: buckets are distributions too)."""
    ls, lt, temp, keep = _buckets(api, student, teacher, temperature, mask, policy, infinite)
    values = table.value(kind, ls, lt, param)
    if t2_scale:
        values = values * temp**2
    return Parts(values, keep)


# ------------------------------------------------------------------------------------------------ losses
@masked_loss
def sparse_kd_ce(student: Tensor, teacher: Mapping, *, temperature=1.0, mask=None, t2_scale: bool = True,
                 policy: str = "renormalize") -> Parts:
    r"""Soft cross-entropy against a top-k teacher: ``T² · −Σ_b p_b log q_b`` over the buckets b ∈ K (∪ tail).

    renormalize: ``−Σ_K p̃_T log q`` — exactly dense :func:`kd_ce` with the truncated, renormalised teacher.
    tail: adds ``−p_tail log q_tail`` (the bucketed cross-entropy). Hinton et al. (2015, arXiv:1503.02531).

    Args:
        student: logits ``[..., V]``.
        teacher: top-k mapping ``{"indices", "logprobs"[, "tail", "temperature"]}`` (module docstring).
        temperature: float, 0-d tensor or per-row tensor of the leading shape; > 0 (tail: equal to T_c).
        mask: boolean-like keep-mask of the leading shape.
        t2_scale: multiply each row by ``T²``.
        policy: ``"renormalize"`` or ``"tail"`` (missing-mass policy; module docstring).
        reduction: ``"mean"`` over kept rows, ``"sum"``, or ``"none"`` (per row, 0 where masked).
    """
    return _rows("sparse_kd_ce", "kd_ce", student, teacher, temperature, mask, t2_scale, policy)


@masked_loss
def sparse_kd_kl(student: Tensor, teacher: Mapping, *, temperature=1.0, mask=None, t2_scale: bool = True,
                 policy: str = "renormalize") -> Parts:
    r"""Forward KL ``T² · Σ_b p_b (log p_b − log q_b)`` over the buckets; options as :func:`sparse_kd_ce`.

    renormalize: exactly ``KL(p̃_T ‖ q)``; tail: the bucketed KL, a lower bound of the full KL (equal at k = V).
    """
    return _rows("sparse_kd_kl", "kd_kl", student, teacher, temperature, mask, t2_scale, policy)


@masked_loss
def sparse_reverse_kl(student: Tensor, teacher: Mapping, *, temperature=1.0, mask=None, t2_scale: bool = True,
                      policy: str = "tail") -> Parts:
    r"""Reverse KL ``T² · Σ_b q_b (log q_b − log p_b)`` over the buckets (tail policy only; default ``"tail"``).

    Under renormalize it is +∞ (the student has mass outside K), so that policy is refused. MiniLLM (Gu et al.,
    2024, arXiv:2306.08543). Options as :func:`sparse_kd_ce`.
    """
    return _rows("sparse_reverse_kl", "reverse_kl", student, teacher, temperature, mask, t2_scale, policy,
                 infinite="the reverse KL")


@masked_loss
def sparse_jsd(student: Tensor, teacher: Mapping, *, beta=0.5, temperature=1.0, mask=None, t2_scale: bool = True,
               policy: str = "renormalize") -> Parts:
    r"""Generalised JSD ``β KL(p‖m) + (1−β) KL(q‖m)``, ``m = β p + (1−β) q``, over the buckets.

    As dense :func:`jsd` (GKD, Agarwal et al., 2024, arXiv:2306.13649): ``β = 0`` is forward KL and ``β = 1``
    reverse KL (refused under renormalize for a float ``beta``). Exact against the renormalised teacher under
    renormalize (the tail contributes ``−(1−β) log(1−β) q_tail``); bucketed under tail.
    """
    api = "sparse_jsd"
    b = check.unit_interval(api, "beta", beta)
    infinite = "beta=1 (the reverse KL)" if isinstance(b, float) and b == 1.0 else None
    return _rows(api, "jsd", student, teacher, temperature, mask, t2_scale, policy, b, infinite)


@masked_loss
def sparse_skew_kl(student: Tensor, teacher: Mapping, *, alpha=0.1, temperature=1.0, mask=None,
                   t2_scale: bool = True, policy: str = "renormalize") -> Parts:
    r"""Skew KL ``KL(p ‖ α p + (1−α) q)`` over the buckets (DistiLLM, Ko et al., 2024, arXiv:2402.03898).

    Exact against the renormalised teacher under renormalize (the tail adds nothing: p = 0 there); bucketed under
    tail. ``alpha`` is a float or 0-d tensor in [0, 1]; other options as :func:`sparse_kd_ce`.
    """
    api = "sparse_skew_kl"
    a = check.unit_interval(api, "alpha", alpha)
    return _rows(api, "skew_kl", student, teacher, temperature, mask, t2_scale, policy, a)


@masked_loss
def sparse_tvd(student: Tensor, teacher: Mapping, *, temperature=1.0, mask=None, t2_scale: bool = True,
               policy: str = "renormalize") -> Parts:
    r"""Total variation ``½ Σ_b |p_b − q_b|`` over the buckets; options as :func:`sparse_kd_ce`.

    renormalize: exactly ``½ Σ_v |p̃_T − q|`` (the tail bucket adds ``½ q_tail``); tail: bucketed.
    """
    return _rows("sparse_tvd", "tvd", student, teacher, temperature, mask, t2_scale, policy)
