"""The one masked reduction every loss goes through.

A loss computes ``values`` (per row or per element) and a 0/1 ``weight`` that broadcasts to ``values`` by size-1
(or missing leading) dimensions, or ``None`` when everything is kept. From them:

* ``sum``   = Σ values · weight  (entries with weight 0 are *selected out*, so garbage there — even inf or NaN —
  never reaches the result),
* ``count`` = Σ weight broadcast to ``values``' shape,
* ``mean``  = sum / max(count, 1), so a fully masked (or empty) input gives 0, never NaN,
* ``none``  = values with weight-0 entries set to 0, so that ``none.sum() == sum``.

Branch-free and free of host synchronisation, so it compiles with ``fullgraph=True``.

Global normalisation (``counts=`` of the step) needs each loss's ``count`` from the masks alone: every loss declares
the *count kind* its ``count`` is a constant multiple of (the multiple set by shapes only: the width ``D``, the heads
``H``, ...). :func:`count_units` computes a kind's units from a keep-mask; ``count == c × count_units(kind, mask)``
holds for every mask, with the same ``c`` for every micro-batch of a step.

=========== ====================================================== ==========================================
kind        units of a keep-mask ``[B, ...]``                      losses
=========== ====================================================== ==========================================
``tokens``  kept positions, ``Σ m``                                logit losses, hidden_mse, cosine, attention
                                                                   kl / ce, relation_kl (× D or × heads)
``samples`` samples with at least one kept position               nst
``pairs``   kept position pairs within a sample, ``Σ_b n_b²``      attention_mse (× heads), mmd
``first``   samples whose first position is kept                   pkd (its [CLS] at position 0)
``rows``    samples, kept or not (the mask's first dimension)      fsp (× D0·D1)
=========== ====================================================== ==========================================
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")
CountKind = Literal["tokens", "samples", "pairs", "first", "rows"]
#: what each count kind counts (used in docs and error messages)
COUNT_KINDS: dict[str, str] = {
    "tokens": "kept positions",
    "samples": "samples with at least one kept position",
    "pairs": "kept (i, j) position pairs within each sample, Σ_b n_b²",
    "first": "samples whose first position is kept",
    "rows": "samples, kept or not",
}


class Parts(NamedTuple):
    """Unreduced loss: ``values`` and the 0/1 ``weight`` broadcasting to them (``None``: all kept)."""

    values: Tensor
    weight: Tensor | None


def sum_and_count(parts: Parts) -> tuple[Tensor, Tensor]:
    """Return ``(sum, count)`` of ``parts`` as 0-d tensors (``count`` in the values' dtype)."""
    values, weight = parts
    if weight is None:
        return values.sum(), values.new_tensor(float(values.numel()))
    kept = torch.where(weight != 0, values, values.new_zeros(()))
    # Each weight entry counts once per value it broadcasts to.
    factor = values.numel() // weight.numel() if weight.numel() else 0
    return kept.sum(), weight.to(values.dtype).sum() * factor


def count_units(kind: str, mask: Tensor) -> Tensor:
    """The units of ``kind`` (see :data:`COUNT_KINDS`) in the keep-mask ``mask`` ``[B, ...]`` (nonzero = kept), as
    a 0-d int64 tensor. A ``[B]`` mask has one position per sample. Branch-free (compiles with ``fullgraph``)."""
    if kind not in COUNT_KINDS:
        raise ValueError(f"count_units: expected kind to be one of {tuple(COUNT_KINDS)}, got {kind!r}.")
    if not isinstance(mask, Tensor) or mask.ndim == 0:
        got = f"shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"count_units: expected a keep-mask [B, ...], got {got}.")
    keep = mask != 0
    if kind == "tokens":
        return keep.sum()
    if kind == "rows":
        return torch.full((), keep.shape[0], dtype=torch.int64, device=keep.device)
    per_sample = keep.unsqueeze(1) if keep.ndim == 1 else keep.flatten(1)  # [B, positions], also for B = 0
    if kind == "samples":
        return per_sample.any(1).sum()
    if kind == "first":
        return per_sample[:, :1].sum()
    n = per_sample.sum(1)
    return (n * n).sum()


def reduce(parts: Parts, reduction: str, api: str) -> Tensor:
    """Reduce ``parts`` as ``reduction`` asks (``"mean"``, ``"sum"`` or ``"none"``)."""
    if reduction == "none":
        values, weight = parts
        if weight is None:
            return values
        return torch.where(weight != 0, values, values.new_zeros(()))
    if reduction not in REDUCTIONS:
        raise ValueError(f"{api}: expected reduction to be one of {REDUCTIONS}, got {reduction!r}.")
    total, count = sum_and_count(parts)
    if reduction == "sum":
        return total
    return total / count.clamp_min(1)


def masked_loss(parts_fn: Callable[..., Parts] | None = None, *, count: CountKind = "tokens"):
    """Make a public loss from ``parts_fn(...) -> Parts`` (``@masked_loss`` or ``@masked_loss(count="pairs")``).

    The returned function takes the same arguments plus the keyword ``reduction="mean"``; its ``sum_count``
    attribute returns the ``(sum, count)`` pair instead (what global normalisation needs), ``parts`` is
    ``parts_fn`` itself and ``count_kind`` is ``count``: the kind of units (:data:`COUNT_KINDS`) that ``count`` is
    a constant multiple of, which global normalisation counts over the whole optimizer step.
    """
    if count not in COUNT_KINDS:
        raise ValueError(f"masked_loss: expected count to be one of {tuple(COUNT_KINDS)}, got {count!r}.")
    if parts_fn is None:
        return functools.partial(masked_loss, count=count)
    api = parts_fn.__name__

    @functools.wraps(parts_fn)
    def loss(*args, reduction: Reduction = "mean", **kwargs) -> Tensor:
        if reduction not in REDUCTIONS:  # before any work, so a typo fails fast
            raise ValueError(f"{api}: expected reduction to be one of {REDUCTIONS}, got {reduction!r}.")
        return reduce(parts_fn(*args, **kwargs), reduction, api)

    def sum_count(*args, **kwargs) -> tuple[Tensor, Tensor]:
        return sum_and_count(parts_fn(*args, **kwargs))

    signature = inspect.signature(parts_fn)
    reduction_param = inspect.Parameter(
        "reduction", inspect.Parameter.KEYWORD_ONLY, default="mean", annotation="Reduction"
    )
    loss.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), reduction_param], return_annotation="Tensor"
    )
    sum_count.__doc__ = f"``(sum, count)`` of :func:`{api}` (same arguments, no ``reduction``)."
    loss.sum_count = sum_count  # type: ignore[attr-defined]
    loss.parts = parts_fn  # type: ignore[attr-defined]
    loss.count_kind = sum_count.count_kind = count  # type: ignore[attr-defined]
    return loss
