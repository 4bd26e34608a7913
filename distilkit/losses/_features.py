"""Feature losses on hidden states ``[..., D]`` (usually ``[B, L, D]``).

hidden_mse and cosine average over kept positions (count kind ``tokens``); pkd over kept samples, a sample being kept
when its position 0 ([CLS]) is (count kind ``first``). See :func:`~distilkit.losses._reduce.count_units`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import _checks as check
from ._reduce import Parts, masked_loss


def _features(api: str, student, teacher, mask):
    s = check.floating(api, "student features", student)
    t = check.floating(api, "teacher features", teacher).detach()
    check.rank(api, "student features", s, range(1, 64), "[..., D]")
    check.same_shape(api, s, t, "student and teacher features")
    check.same_device(api, student=s, teacher=t)
    keep = check.mask(api, mask, tuple(s.shape[:-1]), s)
    return check.zero_dropped(s, keep), check.zero_dropped(t, keep), keep


@masked_loss
def hidden_mse(student: Tensor, teacher: Tensor, *, mask=None) -> Parts:
    r"""Mean squared error of hidden states: ``Σ_kept ‖s − t‖² / (kept positions × D)``.

    TinyBERT's hidden-state loss (Jiao et al., 2020, arXiv:1909.10351); equals TextBrewer's ``hid_mse_loss``.
    Widths must match: give the student a projection (``dk.proj.linear``) when they differ; width 0 gives 0.
    ``reduction="none"`` is per element ``[..., D]``. Global normalisation counts kept positions (``counts[mask
    key]``; the count is ``D ×`` that): exact.
    """
    s, t, keep = _features("hidden_mse", student, teacher, mask)  # (0 at dropped positions)
    diff = s - t
    return Parts(diff * diff, None if keep is None else keep.unsqueeze(-1))


@masked_loss
def cosine(student: Tensor, teacher: Tensor, *, mask=None) -> Parts:
    r"""Cosine embedding loss ``1 − cos(s, t)`` per kept position, averaged.

    DistilBERT's hidden-state alignment (Sanh et al., 2019, arXiv:1910.01108); equals TextBrewer's ``cos_loss``
    without its dynamic-shape ``masked_select``. Width 0 is refused (no cosine). Global normalisation counts kept
    positions (``counts[mask key]``): exact.
    """
    s, t, keep = _features("cosine", student, teacher, mask)
    if s.shape[-1] == 0:
        raise ValueError("cosine: expected features of width ≥ 1 (the cosine of zero-width vectors is undefined), "
                         f"got shape {tuple(s.shape)}.")
    return Parts(1 - F.cosine_similarity(s, t, dim=-1), keep)


@masked_loss(count="first")
def pkd(student: Tensor, teacher: Tensor, *, mask=None) -> Parts:
    r"""Patient-KD loss ``‖ŝ − t̂‖²`` averaged over samples, ``ŝ = c / ‖c‖`` with ``c`` the [CLS] vector.

    BERT-PKD (Sun et al., 2019, arXiv:1908.09355). ``[B, L, D]`` inputs use position 0; ``[B, D]`` inputs are used
    as they are (student and teacher independently). ``mask`` is over the student's leading positions (``[B]`` or
    ``[B, L]``, of which position 0 decides); equals TextBrewer's ``pkd_loss``. The mean is over the samples whose
    position 0 is kept, so global normalisation counts those (``counts["<mask key>@first"]``): exact. A ``[B, 0, D]``
    input (no [CLS] position) is refused.
    """
    api = "pkd"
    s = check.floating(api, "student features", student)
    t = check.floating(api, "teacher features", teacher).detach()
    for name, x in (("student", s), ("teacher", t)):
        check.rank(api, f"{name} features", x, (2, 3), "[B, L, D] or [B, D]")
        if x.ndim == 3 and x.shape[1] == 0:
            raise ValueError(f"{api}: expected {name} features with at least one position (the [CLS] vector at "
                             f"position 0), got shape {tuple(x.shape)}.")
    check.same_device(api, student=s, teacher=t)
    keep = check.mask(api, mask, tuple(s.shape[:-1]), s)
    cs, ct = (x[:, 0] if x.ndim == 3 else x for x in (s, t))
    check.same_shape(api, cs, ct, "student and teacher [CLS] vectors")
    if keep is not None and keep.ndim == 2:
        keep = keep[:, 0]
    cs, ct = check.zero_dropped(cs, keep), check.zero_dropped(ct, keep)
    values = (F.normalize(cs, dim=-1) - F.normalize(ct, dim=-1)).square().sum(-1)
    return Parts(values, keep)
