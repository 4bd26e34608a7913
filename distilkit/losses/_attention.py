"""Attention and self-relation losses on ``[B, H, L, L]`` maps (``[B, L, L]`` is one head).

The mask ``[B, L]`` marks kept positions; a map entry ``(q, k)`` is kept when both are. Rows (queries) are
reduced over kept keys, then averaged over (batch, head, kept query). ``reduction="none"`` keeps a head dimension,
of size 1 for ``[B, L, L]`` inputs and after ``head_reduce``. Scores must be finite: mask with a large negative
number (as Hugging Face does with ``finfo.min``), not ``-inf``.

Global normalisation (``counts=``, see :func:`~distilkit.losses._reduce.count_units`): the row losses
(attention_kl, attention_ce, relation_kl) divide by heads × kept queries, so they count kept positions (count kind
``tokens``); attention_mse divides by heads × kept (query, key) pairs, so it counts ``Σ_b n_b²`` (``pairs``). Both
are exact. Zero-length maps give 0; relation_kl refuses zero-width heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from . import _checks as check
from ._reduce import Parts, masked_loss
from ._table import kl_rows


def _maps(api: str, student, teacher, mask, *, zero_keys: bool = True):
    """Checked ``[B, H, L, L]`` maps and the ``[B, L]`` mask; entries of dropped queries (and, with ``zero_keys``, of
    dropped keys) are 0, so that NaN or ±inf there reach no value or gradient."""
    s = check.floating(api, "student attention", student)
    t = check.floating(api, "teacher attention", teacher).detach()
    check.rank(api, "student attention", s, (3, 4), "[B, H, L, L] or [B, L, L]")
    check.same_shape(api, s, t, "student and teacher attention")
    check.same_device(api, student=s, teacher=t)
    if s.shape[-1] != s.shape[-2]:
        raise ValueError(f"{api}: expected square attention maps [..., L, L], got shape {tuple(s.shape)}.")
    if s.ndim == 3:
        s, t = s.unsqueeze(1), t.unsqueeze(1)
    keep = check.mask(api, mask, (s.shape[0], s.shape[-1]), s)
    if keep is not None:
        entries = _pairs(keep) if zero_keys else keep[:, None, :, None]
        s, t = torch.where(entries, s, 0), torch.where(entries, t, 0)
    return s, t, keep


def _keys(keep: Tensor | None) -> Tensor | None:
    return None if keep is None else keep[:, None, None, :]


def _queries(keep: Tensor | None) -> Tensor | None:
    return None if keep is None else keep[:, None, :]


def _log_softmax_over(scores: Tensor, keys: Tensor | None) -> Tensor:
    """log-softmax over the kept keys; dropped keys get a finite, negligible log-probability (exp → 0)."""
    if keys is None:
        return F.log_softmax(scores, dim=-1)
    return F.log_softmax(torch.where(keys, scores, torch.finfo(scores.dtype).min / 2), dim=-1)


def _kl_over_kept_keys(student_scores: Tensor, teacher_scores: Tensor, keep: Tensor | None) -> Parts:
    keys = _keys(keep)
    rows = kl_rows(_log_softmax_over(teacher_scores, keys), _log_softmax_over(student_scores, keys))
    return Parts(rows, _queries(keep))


def _pairs(keep: Tensor | None) -> Tensor | None:
    """Kept (query, key) entries ``[B, 1, L, L]``."""
    return None if keep is None else keep[:, None, :, None] & keep[:, None, None, :]


def _renormalised(probs: Tensor, pairs: Tensor | None) -> Tensor:
    """Rows restricted to kept keys and renormalised; dropped rows become 0 (never inf/NaN from garbage)."""
    if pairs is not None:
        probs = torch.where(pairs, probs, 0)
    return probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


@masked_loss
def attention_kl(student: Tensor, teacher: Tensor, *, mask=None, inputs: str = "probs", eps: float = 1e-8) -> Parts:
    r"""``KL(t_row ‖ s_row)`` over kept keys, averaged over (batch, head, kept query).

    MiniLM's self-attention distribution transfer (Wang et al., 2020, arXiv:2002.10957).
    ``inputs="logits"``: raw scores, softmax over kept keys first. ``inputs="probs"`` (Hugging Face
    ``attentions``): rows restricted to kept keys and renormalised, the student clamped below at ``eps`` before
    the log — attention dropout makes exact zeros, so distil with the student's attention dropout off.
    Global normalisation counts kept positions (``counts[mask key]``; the count is heads × that): exact.
    """
    api = "attention_kl"
    check.choice(api, "inputs", inputs, ("probs", "logits"))
    s, t, keep = _maps(api, student, teacher, mask)
    eps = check.positive(api, "eps", eps, (), s)
    if inputs == "logits":
        return _kl_over_kept_keys(s, t, keep)
    pairs = _pairs(keep)
    pt, ps = _renormalised(t, pairs), _renormalised(s, pairs).clamp_min(eps)
    return Parts((torch.xlogy(pt, pt) - pt * ps.log()).sum(-1), _queries(keep))


@masked_loss(count="pairs")
def attention_mse(student: Tensor, teacher: Tensor, *, mask=None, head_reduce: str | None = None) -> Parts:
    r"""MSE of attention scores over kept (query, key) pairs: ``Σ (s−t)² m_q m_k / (H · Σ_b n_b²)``.

    TinyBERT's attention loss (Jiao et al., 2020, arXiv:1909.10351); TextBrewer's ``att_mse_loss``, and with
    ``head_reduce="sum"`` (heads summed first, divided by ``Σ_b n_b²``) its ``att_mse_sum_loss``. Without a mask,
    plain MSE over every entry (TextBrewer's zeroing of scores ≤ −1e-3 is not copied). The mean is over kept
    pairs, so global normalisation counts ``Σ_b n_b²`` (``counts["<mask key>@pairs"]``): exact.
    """
    api = "attention_mse"
    check.choice(api, "head_reduce", head_reduce, (None, "sum"))
    s, t, keep = _maps(api, student, teacher, mask)
    if head_reduce == "sum":
        s, t = s.sum(1, keepdim=True), t.sum(1, keepdim=True)
    return Parts((s - t).square(), _pairs(keep))


@masked_loss
def attention_ce(student: Tensor, teacher: Tensor, *, mask=None, head_reduce: str | None = None) -> Parts:
    r"""``−Σ_{kept k} softmax(t)_k log softmax(s)_k`` per kept query, both softmaxes over **all** keys.

    TextBrewer's ``att_ce_loss`` (``head_reduce="mean"``: heads' scores averaged first, its ``att_ce_mean_loss``).
    Real scores already carry the model's additive padding mask, which is why the softmaxes need not exclude
    masked keys; the values at masked keys therefore do enter the normalisers (unlike :func:`attention_kl`).
    Global normalisation counts kept positions (``counts[mask key]``; the count is heads × that): exact.
    """
    api = "attention_ce"
    check.choice(api, "head_reduce", head_reduce, (None, "mean"))
    s, t, keep = _maps(api, student, teacher, mask, zero_keys=False)  # masked keys enter the normalisers
    if head_reduce == "mean":
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    terms = F.softmax(t, dim=-1) * F.log_softmax(s, dim=-1)
    keys = _keys(keep)
    if keys is not None:
        terms = torch.where(keys, terms, 0)
    return Parts(-terms.sum(-1), _queries(keep))


@masked_loss
def relation_kl(student: Tensor, teacher: Tensor, *, num_heads: int, mask=None) -> Parts:
    r"""Self-relation KL: ``KL(R_T ‖ R_S)`` over kept keys, ``R = softmax(X Xᵀ / √d)`` per relation head.

    MiniLM / MiniLMv2 (Wang et al., 2020, arXiv:2002.10957; 2021, arXiv:2012.15828): ``X`` ``[B, L, D]`` (e.g. the
    queries, keys or values of a layer) is split into ``num_heads`` heads of width ``d = D / num_heads``; student
    and teacher widths may differ. Averaged over (batch, relation head, kept query); global normalisation counts
    kept positions (``counts[mask key]``): exact. Zero-width features are refused (heads of width 0).
    """
    api = "relation_kl"
    s, t, keep = check.sequences(api, student, teacher, mask)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"{api}: expected num_heads to be a positive int, got {num_heads!r}.")
    for name, x in (("student", s), ("teacher", t)):
        if x.shape[-1] % num_heads:
            raise ValueError(
                f"{api}: expected num_heads={num_heads} to divide the {name} width, got width {x.shape[-1]}."
            )
        if x.shape[-1] == 0:
            raise ValueError(f"{api}: expected {name} features of width ≥ 1 (heads of width ≥ 1), got shape "
                             f"{tuple(x.shape)}.")
    rs, rt = (_relations(x, num_heads) for x in (s, t))
    return _kl_over_kept_keys(rs, rt, keep)


def _relations(x: Tensor, num_heads: int) -> Tensor:
    heads = rearrange(x, "b l (a d) -> b a l d", a=num_heads)
    return heads @ heads.transpose(-1, -2) / math.sqrt(heads.shape[-1])
