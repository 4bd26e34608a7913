"""Logit losses: divergences between temperature-softened distributions, logit MSE and hard-label CE.

Every divergence is computed per row (all leading positions of ``[..., V]`` logits) from log-probabilities
``log p = log_softmax(z / T)``, multiplied by ``T²`` per row when ``t2_scale`` (Hinton et al., 2015, "Distilling the
Knowledge in a Neural Network", arXiv:1503.02531: the factor keeps the soft-target gradients' scale independent
of T), and reduced over the kept rows.

−inf logits (padded or banned classes) are exact, with 0·log 0 = 0: a class that is −inf in both models, or that
has no mass under the distribution weighing the term, adds 0 to the value and nothing but finite numbers to the
gradient. A divergence that is truly infinite is +inf: kd_ce and kd_kl where the teacher has mass on a class the
student gives −inf, reverse_kl where the student has mass on a class the teacher gives −inf; their gradients stay
finite (an infinite term adds none). jsd, skew_kl (α > 0) and tvd are always finite. The formulas are those of the
divergence table, :mod:`distilkit.losses._table`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks as check
from . import _table as table
from ._reduce import Parts, masked_loss


def _soft_rows(kind: str, student, teacher, temperature, mask, t2_scale: bool, param=None) -> Parts:
    """Checks, upcast, temperature, log-softmax; the divergence table gives the per-row value."""
    zs, zt, temp, keep = _scaled_logits(kind, student, teacher, temperature, mask)
    values = table.value(kind, F.log_softmax(zs, dim=-1), F.log_softmax(zt, dim=-1), param)
    if t2_scale:
        values = values * temp**2
    return Parts(values, keep)


def _scaled_logits(api, student, teacher, temperature, mask):
    s = check.floating(api, "student logits", student)
    t = check.floating(api, "teacher logits", teacher).detach()
    check.rank(api, "student logits", s, range(1, 64), "[..., V]")
    check.same_shape(api, s, t, "student and teacher logits")
    check.same_device(api, student=s, teacher=t)
    if s.shape[-1] == 0:
        raise ValueError(f"{api}: expected at least one class in the last dimension, got shape {tuple(s.shape)}.")
    lead = tuple(s.shape[:-1])
    keep = check.mask(api, mask, lead, s)
    temp = check.temperature(api, temperature, lead, s)
    column = temp.unsqueeze(-1) if isinstance(temp, Tensor) and temp.ndim else temp
    s, t = check.zero_dropped(s, keep), check.zero_dropped(t, keep)
    return s / column, t / column, temp, keep


@masked_loss
def kd_ce(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None, t2_scale: bool = True) -> Parts:
    r"""Soft cross-entropy ``T² · −Σ_v p_T log p_S`` per kept row, ``p = softmax(z / T)``.

    Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531).
    ``t2_scale=False`` equals TextBrewer's ``kd_ce_loss``. Differs from :func:`kd_kl` by the teacher's entropy,
    which carries no gradient.

    Args:
        student, teacher: logits ``[..., V]`` of the same shape (``[B, C]`` or ``[B, L, V]``).
        temperature: float, 0-d tensor, or per-row tensor of the leading shape; > 0.
        mask: boolean-like keep-mask of the leading shape.
        t2_scale: multiply each row by ``T²``.
        reduction: ``"mean"`` over kept rows, ``"sum"``, or ``"none"`` (per row, 0 where masked).
    """
    return _soft_rows("kd_ce", student, teacher, temperature, mask, t2_scale)


@masked_loss
def kd_kl(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None, t2_scale: bool = True) -> Parts:
    r"""Forward KL ``T² · Σ_v p_T (log p_T − log p_S)`` per kept row (mean-seeking), as :func:`kd_ce`."""
    return _soft_rows("kd_kl", student, teacher, temperature, mask, t2_scale)


@masked_loss
def reverse_kl(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None, t2_scale: bool = True) -> Parts:
    r"""Reverse KL ``T² · Σ_v p_S (log p_S − log p_T)`` per kept row (mode-seeking).

    As used for LLM distillation by MiniLLM (Gu et al., 2024, arXiv:2306.08543). Options as :func:`kd_ce`.
    """
    return _soft_rows("reverse_kl", student, teacher, temperature, mask, t2_scale)


@masked_loss
def jsd(student: Tensor, teacher: Tensor, *, beta=0.5, temperature=1.0, mask=None, t2_scale: bool = True) -> Parts:
    r"""Generalised Jensen–Shannon divergence ``β KL(p_T‖m) + (1−β) KL(p_S‖m)``, ``m = β p_T + (1−β) p_S``.

    GKD (Agarwal et al., 2024, arXiv:2306.13649). The formula tends to 0 at both ends, so, as TRL and Liger-Kernel
    do, ``β = 0`` is defined as forward KL(p_T‖p_S) and ``β = 1`` as reverse KL(p_S‖p_T). ``beta`` is a float or a
    0-d tensor in [0, 1]; other options as :func:`kd_ce`. Near the ends the divergence behaves like β·KL and
    (1−β)·KL, so the defined endpoints are the limits of ``jsd / β`` and ``jsd / (1 − β)``, not of ``jsd`` itself:
    the value jumps at β = 0 and β = 1.
    """
    b = check.unit_interval("jsd", "beta", beta)
    return _soft_rows("jsd", student, teacher, temperature, mask, t2_scale, b)


@masked_loss
def skew_kl(student: Tensor, teacher: Tensor, *, alpha=0.1, temperature=1.0, mask=None,
            t2_scale: bool = True) -> Parts:
    r"""Skew KL ``KL(p_T ‖ α p_T + (1−α) p_S)`` per kept row.

    DistiLLM (Ko et al., 2024, arXiv:2402.03898): the skew bounds the divergence and its gradient when the student
    puts little mass where the teacher puts much. ``alpha`` is a float or 0-d tensor in [0, 1] (0 gives forward
    KL); other options as :func:`kd_ce`.
    """
    a = check.unit_interval("skew_kl", "alpha", alpha)
    return _soft_rows("skew_kl", student, teacher, temperature, mask, t2_scale, a)


@masked_loss
def tvd(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None, t2_scale: bool = True) -> Parts:
    r"""Total variation distance ``½ Σ_v |p_T − p_S|`` per kept row (in [0, 1] before the T² factor).

    TVD shrinks only like 1/T as the temperature grows (KL shrinks like 1/T²), so with ``t2_scale`` it grows with T;
    pass ``t2_scale=False`` to keep it in [0, 1].
    """
    return _soft_rows("tvd", student, teacher, temperature, mask, t2_scale)


@masked_loss
def kd_mse(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None) -> Parts:
    r"""Mean squared error of temperature-scaled logits ``(z_S/T − z_T/T)²`` over kept rows × classes.

    Logit matching (Ba & Caruana, 2014, "Do Deep Nets Really Need to be Deep?"); equals TextBrewer's
    ``kd_mse_loss``. No T² factor. ``reduction="none"`` is per element ``[..., V]``.
    """
    zs, zt, _, keep = _scaled_logits("kd_mse", student, teacher, temperature, mask)
    return Parts((zs - zt).square(), None if keep is None else keep.unsqueeze(-1))


@masked_loss
def prob_mse(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None) -> Parts:
    r"""Mean squared error of the probabilities ``(softmax(z_S/T) − softmax(z_T/T))²`` over kept rows × classes.

    Matching the softened output distributions in L2 instead of KL, as the Transformer Distiller's ``LogitMSE``
    (MSE after the softmax) does; Kim et al. (2021), "Comparing Kullback-Leibler Divergence and Mean Squared Error
    Loss in Knowledge Distillation" (arXiv:2105.08919), study it against KL. No T² factor. ``reduction="none"`` is
    per element ``[..., V]``; a −inf logit is a probability of 0.
    """
    zs, zt, _, keep = _scaled_logits("prob_mse", student, teacher, temperature, mask)
    diff = F.softmax(zs, dim=-1) - F.softmax(zt, dim=-1)
    return Parts(diff.square(), None if keep is None else keep.unsqueeze(-1))


@masked_loss
def pseudo_label_ce(student: Tensor, teacher: Tensor, *, mask=None) -> Parts:
    r"""Cross-entropy of the student with the teacher's top class as the label: ``−log softmax(z_S)[argmax z_T]``.

    Pseudo-labelling: the teacher labels the data and the student learns the labels as hard targets, as in NLP
    Architect's pseudo-labelling distillation (Intel AI Lab); Lee (2013), "Pseudo-Label: The Simple and Efficient
    Semi-Supervised Learning Method for Deep Neural Networks". Ties go to the first largest class; the teacher's
    argmax carries no gradient. +inf where the student gives the teacher's class a −inf logit.
    """
    api = "pseudo_label_ce"
    zs, zt, _, keep = _scaled_logits(api, student, teacher, 1.0, mask)
    label = zt.argmax(-1, keepdim=True)
    return Parts(-F.log_softmax(zs, dim=-1).gather(-1, label).squeeze(-1), keep)


@masked_loss
def hard_ce(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Parts:
    r"""Cross-entropy with integer ``labels`` ``[...]`` for ``logits`` ``[..., V]``; ``ignore_index`` rows are masked.

    The student's ordinary supervised loss, reduced like every other loss (mean over non-ignored rows, 0 when
    every row is ignored).
    """
    api = "hard_ce"
    z = check.floating(api, "logits", logits)
    check.integer_labels(api, labels)  # (before the logits' rank, as the labels are the likelier mistake)
    check.rank(api, "logits", z, range(1, 64), "[..., V]")
    check.labels(api, labels, z.shape[:-1], z.shape[-1], ignore_index, "the logits'", logits=z)
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    values = -F.log_softmax(check.zero_dropped(z, keep), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return Parts(values, keep)


def probability_shift(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    r"""Swap each row's largest teacher logit with the logit of the true label, so the label ranks first.

    TextBrewer's ``probability_shift`` (Wen et al., 2019, "Preparing Lessons", arXiv:1911.07471), but pure: returns
    new logits and never changes its input. Rows whose label is negative (e.g. ``-100``, ignored) are unchanged.
    ``labels`` has the logits' leading shape.
    """
    api = "probability_shift"
    z = check.floating(api, "teacher_logits", teacher_logits).detach()
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{api}: expected integer labels, got {getattr(labels, 'dtype', type(labels).__name__)}.")
    if tuple(labels.shape) != tuple(z.shape[:-1]):
        raise ValueError(f"{api}: expected labels of shape {tuple(z.shape[:-1])}, got {tuple(labels.shape)}.")
    check.same_device(api, teacher_logits=z, labels=labels)
    top = z.argmax(-1, keepdim=True)
    label = labels.long().unsqueeze(-1)
    label = torch.where(label >= 0, label, top)
    classes = torch.arange(z.shape[-1], device=z.device)
    shifted = torch.where(classes == top, z.gather(-1, label), z)
    return torch.where(classes == label, z.gather(-1, top), shifted)
