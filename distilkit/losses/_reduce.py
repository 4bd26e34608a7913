"""The one masked reduction every loss goes through.

A loss computes ``values`` (per row or per element) and a 0/1 ``weight`` that broadcasts to ``values`` by size-1
(or missing leading) dimensions, or ``None`` when everything is kept. From them:

* ``sum``   = Σ values · weight  (entries with weight 0 are *selected out*, so garbage there — even inf or NaN —
  never reaches the result),
* ``count`` = Σ weight broadcast to ``values``' shape,
* ``mean``  = sum / max(count, 1), so a fully masked (or empty) input gives 0, never NaN,
* ``none``  = values with weight-0 entries set to 0, so that ``none.sum() == sum``.

Branch-free and free of host synchronisation, so it compiles with ``fullgraph=True``.
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


def masked_loss(parts_fn: Callable[..., Parts]) -> Callable[..., Tensor]:
    """Make a public loss from ``parts_fn(...) -> Parts``.

    The returned function takes the same arguments plus the keyword ``reduction="mean"``; its ``sum_count``
    attribute returns the ``(sum, count)`` pair instead (what global normalisation needs), and ``parts`` is
    ``parts_fn`` itself.
    """
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
    return loss
