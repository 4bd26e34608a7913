"""Adaptive temperatures: a per-row temperature computed from the student's and teacher's logits.

Both follow TextBrewer's ``flsw`` / ``cwsm`` temperature schedulers (adapted from Liu et al., 2019,
"Knowledge Distillation via Instance-level Sequence Learning", arXiv:1911.07471), with its eps values: each row ``i``
gets a weight ``w_i`` and ``τ_i = base + (mean(w) − w_i) · beta``, so rows with a larger weight than average get a
lower temperature (a sharper target). Two differences from TextBrewer, which has neither masks nor a floor:

* with a ``mask`` the batch mean is over the kept rows only, ``Σ w·m / max(Σ m, 1)``, and masked rows get ``base``;
* ``τ`` is clamped to [:data:`MIN_TEMPERATURE` (0.01), the losses' ``MAX_TEMPERATURE`` (100)], so a large ``beta``
  can never make it zero, negative, or a temperature the losses refuse.

No gradient flows through the temperature (the logits are detached). Branch-free, so it compiles with
``fullgraph=True``.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

from ..losses import _checks as check
from ._schedule import Node, node, number, set_fields

MIN_TEMPERATURE = 1e-2
"""The floor an adaptive temperature is clamped to."""


class AdaptiveTemperature(Node, abc.ABC):
    """Base class: ``temp(student_logits, teacher_logits, mask=None)`` returns one temperature per row.

    Logits are ``[..., V]`` (``[B, C]`` or ``[B, L, V]``); the result has the leading shape ``[...]``, is
    detached, and lies on the logits' device in float32 (float64 for float64 logits).
    """

    @abc.abstractmethod
    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """The per-row temperature."""


def _inputs(api: str, student: object, teacher: object, mask: object) -> tuple[Tensor, Tensor, Tensor | None]:
    s = check.floating(api, "student logits", student).detach()
    t = check.floating(api, "teacher logits", teacher).detach()
    check.rank(api, "student logits", s, range(1, 64), "[..., V]")
    check.same_shape(api, s, t, "student and teacher logits")
    check.same_device(api, student=s, teacher=t)
    return s, t, check.mask(api, mask, tuple(s.shape[:-1]), s)


def _spread(w: Tensor, keep: Tensor | None, base: Tensor, beta: Tensor) -> Tensor:
    """``base + (mean(w) − w) · beta`` with the mean over kept rows, masked rows at ``base``, floored."""
    base, beta = base.to(w.device), beta.to(w.device)
    if keep is None:
        return (base + (w.mean() - w) * beta).clamp(MIN_TEMPERATURE, check.MAX_TEMPERATURE)
    kept = torch.where(keep, w, torch.zeros_like(w))  # selects out garbage (inf, NaN) in masked rows
    mean = kept.sum() / keep.sum().clamp_min(1).to(w.dtype)
    return torch.where(keep, base + (mean - kept) * beta, base).clamp(MIN_TEMPERATURE, check.MAX_TEMPERATURE)


def _positive(api: str, name: str, value: object) -> Tensor:
    return number(api, name, value, lambda v: math.isfinite(v) and v > 0, "> 0 (and finite)")


@node
class flsw(AdaptiveTemperature):
    r"""Focal-loss-style weights: ``w = (1 − v̂·t̂)^gamma``, ``τ = base + (mean(w) − w) · beta``.

    ``v̂ = z_S / (‖z_S‖ + eps)`` and ``t̂ = z_T / (‖z_T‖ + eps)`` per row, so ``1 − v̂·t̂`` is the cosine distance
    between the logit vectors: rows where the student disagrees more with the teacher get a lower temperature.
    Equals TextBrewer's ``flsw_temperature_scheduler_builder(beta, gamma, eps)`` without a mask (above the floor).
    ``base``, ``gamma`` and ``eps`` > 0; ``beta`` finite.
    """

    base: Tensor
    beta: Tensor
    gamma: Tensor
    eps: Tensor = 1e-4  # type: ignore[assignment]

    def __post_init__(self):
        set_fields(self, base=_positive("flsw", "base", self.base), beta=number("flsw", "beta", self.beta),
             gamma=_positive("flsw", "gamma", self.gamma), eps=_positive("flsw", "eps", self.eps))

    def __call__(self, student_logits, teacher_logits, mask=None):
        s, t, keep = _inputs("flsw", student_logits, teacher_logits, mask)
        eps = self.eps.to(s.device)
        v = s / (torch.linalg.vector_norm(s, dim=-1, keepdim=True) + eps)
        u = t / (torch.linalg.vector_norm(t, dim=-1, keepdim=True) + eps)
        w = torch.pow((1 - (v * u).sum(-1)).clamp_min(0), self.gamma.to(s.device))
        return _spread(w, keep, self.base, self.beta)


@node
class cwsm(AdaptiveTemperature):
    r"""Confidence-weighted by the student's max: ``w = 1 / (max_v softmax(z_S)_v + 1e-3)``,
    ``τ = base + (mean(w) − w) · beta``.

    Rows where the student is less confident get a lower temperature. Equals TextBrewer's
    ``cwsm_temperature_scheduler_builder(beta)`` without a mask (above the floor); the teacher's logits are checked
    but not used. ``base`` > 0; ``beta`` finite.
    """

    base: Tensor
    beta: Tensor

    def __post_init__(self):
        set_fields(self, base=_positive("cwsm", "base", self.base), beta=number("cwsm", "beta", self.beta))

    def __call__(self, student_logits, teacher_logits, mask=None):
        s, _, keep = _inputs("cwsm", student_logits, teacher_logits, mask)
        w = 1 / (torch.softmax(s, dim=-1).amax(dim=-1) + 1e-3)
        return _spread(w, keep, self.base, self.beta)
