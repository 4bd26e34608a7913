"""Feature losses on hidden states ``[..., D]`` (usually ``[B, L, D]``)."""

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
    Widths must match: give the student a projection (``dk.proj.linear``) when they differ.
    ``reduction="none"`` is per element ``[..., D]``.
    """
    s, t, keep = _features("hidden_mse", student, teacher, mask)  # (0 at dropped positions)
    diff = s - t
    return Parts(diff * diff, None if keep is None else keep.unsqueeze(-1))


@masked_loss
def cosine(student: Tensor, teacher: Tensor, *, mask=None) -> Parts:
    r"""Cosine embedding loss ``1 − cos(s, t)`` per kept position, averaged.

    DistilBERT's hidden-state alignment (Sanh et al., 2019, arXiv:1910.01108); equals TextBrewer's ``cos_loss``
    without its dynamic-shape ``masked_select``.
    """
    s, t, keep = _features("cosine", student, teacher, mask)
    return Parts(1 - F.cosine_similarity(s, t, dim=-1), keep)


@masked_loss
def pkd(student: Tensor, teacher: Tensor, *, mask=None) -> Parts:
    r"""Patient-KD loss ``‖ŝ − t̂‖²`` averaged over samples, ``ŝ = c / ‖c‖`` with ``c`` the [CLS] vector.

    BERT-PKD (Sun et al., 2019, arXiv:1908.09355). ``[B, L, D]`` inputs use position 0; ``[B, D]`` inputs are used
    as they are (student and teacher independently). ``mask`` is over the student's leading positions (``[B]`` or
    ``[B, L]``, of which position 0 decides); equals TextBrewer's ``pkd_loss``.
    """
    api = "pkd"
    s = check.floating(api, "student features", student)
    t = check.floating(api, "teacher features", teacher).detach()
    for name, x in (("student", s), ("teacher", t)):
        check.rank(api, f"{name} features", x, (2, 3), "[B, L, D] or [B, D]")
    check.same_device(api, student=s, teacher=t)
    keep = check.mask(api, mask, tuple(s.shape[:-1]), s)
    cs, ct = (x[:, 0] if x.ndim == 3 else x for x in (s, t))
    check.same_shape(api, cs, ct, "student and teacher [CLS] vectors")
    if keep is not None and keep.ndim == 2:
        keep = keep[:, 0]
    cs, ct = check.zero_dropped(cs, keep), check.zero_dropped(ct, keep)
    values = (F.normalize(cs, dim=-1) - F.normalize(ct, dim=-1)).square().sum(-1)
    return Parts(values, keep)
