"""Second-order losses that compare Gram matrices of hidden states ``[B, L, D]``: fsp, mmd, nst.

Pair losses take a pair ``(X0, X1)`` of hidden states per model or a single tensor, used as both members. Nothing at
masked positions reaches the result or the gradients: the student's masked positions are zeroed before any product;
the teacher's too where they would enter a kept entry (``fsp``), while ``mmd``, whose kept entries ``(i, j)`` only read
kept rows, selects the masked pairs of the difference out instead (the teacher has no gradient to protect).

What each mean divides by, and so what global normalisation (``counts=``) counts over the whole optimizer step (see
:func:`~distilkit.losses._reduce.count_units`): fsp every sample, kept or not (count kind ``rows``, × D0·D1); mmd the
kept (i, j) position pairs of each sample, ``Σ_b n_b²`` (``pairs``); nst the samples with at least one kept position
(``samples``). Each is exact. Zero-length inputs give 0; zero-width inputs give 0 (fsp) or a ``ValueError`` (mmd and
nst divide by the width).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as check
from ._reduce import Parts, masked_loss


def _pair(api: str, name: str, x) -> tuple[Tensor, Tensor]:
    if isinstance(x, Tensor):
        x = (x, x)
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise TypeError(
            f"{api}: expected {name} to be a tensor [B, L, D] or a pair (tuple or list of two) of them, "
            f"got {type(x).__name__}" + (f" of length {len(x)}." if isinstance(x, (tuple, list)) else ".")
        )
    return _each(tuple(x), lambda xi, i: check.floating(api, f"{name}[{i}]", xi))


def _each(pair: tuple, f) -> tuple:
    """``(f(a, 0), f(b, 1))``, computing ``f`` once when the pair holds one tensor twice (and keeping it so)."""
    first = f(pair[0], 0)
    return (first, first) if pair[1] is pair[0] else (first, f(pair[1], 1))


class _SelfGram(torch.autograd.Function):
    r"""``G = X Xᵀ`` over the last two dimensions, with the one-product backward ``dX = (dG + dGᵀ) X``.

    Autograd would differentiate ``X @ X.mT`` as a product of two inputs, ``dX = dG X + dGᵀ X``: two batched
    products where the sum of ``dG`` and its transpose (elementwise, and fused by ``torch.compile``) needs one.
    The backward is itself made of differentiable operations, so higher derivatives work.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.bmm(x, x.mT) if x.ndim == 3 else x @ x.mT

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        sym = grad + grad.mT
        return torch.bmm(sym, x) if x.ndim == 3 else sym @ x


def _gram(a: Tensor, b: Tensor) -> Tensor:
    """``a bᵀ``; when ``a`` is ``b`` (one tensor as both members), through :class:`_SelfGram` — except inside a
    ``torch.func`` transform, where the plain product serves every transform (forward mode included)."""
    if a is b and not check.in_transform():
        return _SelfGram.apply(a)
    return a @ b.mT


def _hidden_pairs(api: str, student, teacher, mask, *, mask_teacher: bool = True):
    """Checked, upcast student and teacher pairs (teacher detached), masked positions zeroed (the teacher's only
    with ``mask_teacher``); and the mask."""
    s, t = _pair(api, "student", student), _pair(api, "teacher", teacher)
    t = _each(t, lambda x, _: x.detach())
    members = {"student[0]": s[0], "student[1]": s[1], "teacher[0]": t[0], "teacher[1]": t[1]}
    for name, x in members.items():
        check.rank(api, name, x, (3,), "[B, L, D]")
        check.same_shape(api, s[0], x, f"student[0] and {name}", dims=slice(0, 2))
    check.same_device(api, **members)
    keep = check.mask(api, mask, tuple(s[0].shape[:2]), s[0])
    if keep is not None:
        rows = keep.unsqueeze(-1)
        s = _each(s, lambda x, _: torch.where(rows, x, 0))
        if mask_teacher:
            t = _each(t, lambda x, _: torch.where(rows, x, 0))
    return s, t, keep


def _lengths(keep: Tensor | None, like: Tensor) -> Tensor | int:
    return max(like.shape[1], 1) if keep is None else keep.sum(1).to(like.dtype).clamp_min(1)[:, None, None]


@masked_loss(count="rows")
def fsp(student, teacher, *, mask=None) -> Parts:
    r"""Flow-of-solution-procedure loss: MSE between ``G = X0ᵀ X1 / n_b`` of student and teacher.

    Yim et al. (2017), "A Gift from Knowledge Distillation" (CVPR). ``G`` is ``[B, D0, D1]``, masked positions are
    zeroed and ``n_b`` is sample b's kept length (``L`` without a mask); averaged over ``B·D0·D1``, every sample
    counted (a fully masked one has ``G = 0``), so global normalisation counts samples, kept or not
    (``counts["<mask key>@rows"]``): exact. Widths must match between student and teacher (use a projection).
    Equals TextBrewer's ``fsp_loss``.
    """
    api = "fsp"
    (s0, s1), (t0, t1), keep = _hidden_pairs(api, student, teacher, mask)
    for i, (a, b) in enumerate(((s0, t0), (s1, t1))):
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(
                f"{api}: expected student[{i}] and teacher[{i}] of the same width, got {a.shape[-1]} and "
                f"{b.shape[-1]}. Give the student a projection (dk.proj.linear)."
            )
    n = _lengths(keep, s0)
    gs = s0.transpose(1, 2) @ s1 / n
    gt = t0.transpose(1, 2) @ t1 / n
    return Parts((gs - gt).square(), None)


@masked_loss(count="pairs")
def mmd(student, teacher, *, mask=None) -> Parts:
    r"""MSE between token-similarity matrices ``X0 X1ᵀ / D`` over kept ``(i, j)`` pairs (``/ Σ_b n_b²``).

    TextBrewer's ``mmd_loss`` (its ``nst`` / ``mmd`` presets), a variant of NST (Huang & Wang, 2017,
    arXiv:1707.01219). Student and teacher widths may differ. TextBrewer 0.2.1.post1 divides the *masked* grams by
    the padded length instead of ``D``; distilkit divides by ``D`` in both cases, as its current source does.
    The mean is over kept pairs, so global normalisation counts them (``counts["<mask key>@pairs"]``): exact.
    Zero-width features are refused (the grams divide by ``D``).
    """
    api = "mmd"
    (s0, s1), (t0, t1), keep = _hidden_pairs(api, student, teacher, mask, mask_teacher=False)
    for name, (a, b) in (("student", (s0, s1)), ("teacher", (t0, t1))):
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(
                f"{api}: expected {name}[0] and {name}[1] of the same width, got {a.shape[-1]} and {b.shape[-1]}."
            )
        if b.shape[-1] == 0:
            raise ValueError(f"{api}: expected {name} features of width ≥ 1 (the grams divide by the width), got "
                             f"shape {tuple(b.shape)}.")
    # Kept (i, j) read kept rows only, so the teacher needs no zeroing: its masked pairs (NaN there included) are
    # selected out of the difference, before the square, so that its gradient is 0 there too.
    diff = _gram(s0, s1) / s1.shape[-1] - _gram(t0, t1) / t1.shape[-1]
    if keep is None:
        return Parts(diff.square(), None)
    pairs = keep[:, :, None] & keep[:, None, :]
    return Parts(torch.where(pairs, diff, 0).square(), pairs)


@masked_loss(count="samples")
def nst(student: Tensor, teacher: Tensor, *, mask=None, eps: float = 1e-12) -> Parts:
    r"""Neuron Selectivity Transfer: squared MMD between the student's and teacher's neuron distributions.

    Huang & Wang (2017), "Like What You Like" (arXiv:1707.01219), polynomial kernel ``k(x, y) = (xᵀy)²``. Per
    sample, each neuron (feature column) is L2-normalised over the kept positions (norms clamped at ``eps``),
    ``ŝ_j``, ``t̂_i``; then ``MMD² = ‖P_S − P_T‖²_F`` with ``P = X̂ X̂ᵀ / D``, which expands to the paper's
    ``(1/D_T²) Σ k(t̂_i, t̂_i') + (1/D_S²) Σ k(ŝ_j, ŝ_j') − (2/(D_S D_T)) Σ k(ŝ_j, t̂_i)``. Averaged over samples
    with at least one kept position, so global normalisation counts those (``counts["<mask key>@samples"]``):
    exact. Widths may differ; zero-width features are refused (no neurons to compare).
    """
    s, t, keep = check.sequences("nst", student, teacher, mask)
    for name, x in (("student", s), ("teacher", t)):
        if x.shape[-1] == 0:
            raise ValueError(f"nst: expected {name} features of width ≥ 1 (neurons to compare), got shape "
                             f"{tuple(x.shape)}.")
    eps = check.positive("nst", "eps", eps, (), s)

    def position_gram(x: Tensor) -> Tensor:
        if keep is not None:
            x = torch.where(keep.unsqueeze(-1), x, 0)
        norms = x.square().sum(1, keepdim=True).clamp_min(eps * eps).sqrt()
        unit = x / norms
        return unit @ unit.transpose(1, 2) / x.shape[-1]

    values = (position_gram(s) - position_gram(t)).square().sum((1, 2))
    return Parts(values, None if keep is None else keep.any(1))
