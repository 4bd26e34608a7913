r"""Cross-tokenizer distillation: the Universal Logit Distillation loss (ULD).

Boizard et al. (2024), "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"
(arXiv:2402.12030). A student and a teacher with different vocabularies have no common class index, so no KL
between their distributions exists; ULD compares the *sorted* probability vectors instead, which needs no
correspondence between the vocabularies:

    ULD(p_S, p_T) = Σ_i | p_S^(i) − p_T^(i) |,

with ``p^(i)`` the i-th largest probability of ``softmax(z / T)`` and the shorter vocabulary padded with zeros. This
is the closed form of the Wasserstein-1 distance between the two distributions when every pair of tokens is at the
same transport cost (the paper's assumption): it matches the *shapes* of the distributions (how peaked, how spread),
not which token gets the mass.

What it assumes about alignment: the rows compared are the same positions of the same text. With two tokenizers a
position of one sequence has no exact counterpart in the other; the paper (and this function) compares the i-th
kept position of each — e.g. the i-th token of the generated answer — and ignores the rest of the longer sequence.
Pack each model's kept positions to the left and cut both to the shorter length before calling this loss (for a
batch: ``mask`` keeps positions where both still have a token).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import _checks as check
from ._reduce import Parts, masked_loss


@masked_loss
def uld(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None) -> Parts:
    r"""Universal Logit Distillation ``Σ_i |sort(p_S)_i − sort(p_T)_i|`` per kept row (module docstring).

    Args:
        student: logits ``[..., V_S]``.
        teacher: logits ``[..., V_T]`` with the same leading shape (the vocabularies may differ in size and order).
        temperature: float, 0-d tensor or per-row tensor of the leading shape; > 0 (the paper uses 1).
        mask: boolean-like keep-mask of the leading shape.
        reduction: ``"mean"`` over kept rows, ``"sum"``, or ``"none"`` (per row, 0 where masked).
    """
    api = "uld"
    s = check.floating(api, "student logits", student)
    t = check.floating(api, "teacher logits", teacher).detach()
    check.rank(api, "student logits", s, range(1, 64), "[..., V_S]")
    check.same_shape(api, s, t, "student and teacher logits", dims=slice(0, -1))
    check.same_device(api, student=s, teacher=t)
    if s.ndim != t.ndim:
        raise ValueError(f"{api}: expected teacher logits [..., V_T] of the student's rank {s.ndim}, got shape "
                         f"{tuple(t.shape)}.")
    if s.shape[-1] == 0 or t.shape[-1] == 0:
        raise ValueError(f"{api}: expected at least one class in each vocabulary, got shapes {tuple(s.shape)} and "
                         f"{tuple(t.shape)}.")
    lead = tuple(s.shape[:-1])
    keep = check.mask(api, mask, lead, s)
    temp = check.temperature(api, temperature, lead, s)
    column = temp.unsqueeze(-1) if isinstance(temp, Tensor) and temp.ndim else temp
    s, t = check.zero_dropped(s, keep), check.zero_dropped(t, keep)
    ps = F.softmax(s / column, dim=-1).sort(dim=-1, descending=True).values
    pt = F.softmax(t.to(ps.dtype) / column, dim=-1).sort(dim=-1, descending=True).values
    width = max(ps.shape[-1], pt.shape[-1])
    ps, pt = F.pad(ps, (0, width - ps.shape[-1])), F.pad(pt, (0, width - pt.shape[-1]))
    return Parts((ps - pt).abs().sum(-1), keep)
