r"""KL estimators from the log-probabilities of sampled tokens (on-policy distillation).

When the student generates the sequences (on-policy distillation: GKD, Agarwal et al., 2024, arXiv:2306.13649;
MiniLLM; Qwen3-style on-policy distillation) and the teacher, often behind an inference server, returns only the
log-probability of each sampled token, the per-token reverse KL ``KL(q‖p) = E_{x∼q}[log q(x) − log p(x)]``
(q the student, p the teacher) is estimated from ``log q(x)`` and ``log p(x)`` of the sampled ``x``. With
``log r = log p(x) − log q(x)`` (Schulman, 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):

* ``k1 = −log r``: unbiased for KL(q‖p), high variance, negative for some tokens;
* ``k2 = ½ (log r)²``: biased (its mean is KL(q‖p) only to second order in log r), low variance, ≥ 0;
* ``k3 = (r − 1) − log r``: unbiased for KL(q‖p), low variance, ≥ 0 for every token.

As a *loss* (differentiated through the student's ``log q(x)`` of a fixed sample, the tokens themselves not
differentiated) their expected gradients differ from their values' meaning, which decides what training does:

* ``k1``: ``∇k1 = ∇log q``, whose mean under q is 0 — no learning signal as a loss (use it as a per-token reward,
  ``-k1`` detached, in a policy-gradient loss instead, as on-policy distillation trainers do);
* ``k2``: ``E_q[∇k2] = E_q[(log q − log p) ∇log q] = ∇KL(q‖p)`` — the reverse-KL gradient (the usual choice);
* ``k3``: ``E_q[∇k3] = E_q[(1 − r) ∇log q] = −Σ p ∇log q = ∇KL(p‖q)`` — the *forward* KL's gradient.

Tested: the three estimators' means over many samples against the exact KL, and the gradients' means against
``∇KL(q‖p)`` and ``∇KL(p‖q)``. Inputs are upcast to float32 (float64 stays); the teacher's log-probabilities are
detached; masked tokens (padding, the prompt) are selected out, so nothing there reaches the value or a gradient.
"""

from __future__ import annotations

from torch import Tensor

from . import _checks as check
from ._reduce import Parts, masked_loss

ESTIMATORS = ("k1", "k2", "k3")


@masked_loss
def sampled_kl(student: Tensor, teacher: Tensor, *, estimator: str = "k2", mask=None) -> Parts:
    r"""Per-token estimate of ``KL(q‖p)`` from the sampled tokens' log-probabilities (see the module docstring).

    Args:
        student: ``log q(x)`` of each sampled token ``[...]`` (e.g. ``[B, L]``), with its gradient.
        teacher: ``log p(x)`` of the same tokens, same shape (detached).
        estimator: ``"k1"`` (``log q − log p``), ``"k2"`` (default: ``½ (log q − log p)²``, whose gradient is the
            reverse KL's) or ``"k3"`` (``p/q − 1 − log(p/q)``, whose gradient is the forward KL's).
        mask: boolean-like keep-mask of the same shape (the generated tokens).
        reduction: ``"mean"`` over kept tokens, ``"sum"``, or ``"none"`` (per token, 0 where masked).
    """
    api = "sampled_kl"
    check.choice(api, "estimator", estimator, ESTIMATORS)
    s = check.floating(api, "student log-probabilities", student)
    t = check.floating(api, "teacher log-probabilities", teacher).detach()
    check.same_shape(api, s, t, "student and teacher log-probabilities")
    check.same_device(api, student=s, teacher=t)
    keep = check.mask(api, mask, tuple(s.shape), s)
    log_r = check.zero_dropped(t, keep, trailing=0) - check.zero_dropped(s, keep, trailing=0)
    if estimator == "k1":
        values = -log_r
    elif estimator == "k2":
        values = 0.5 * log_r.square()
    else:
        values = log_r.expm1() - log_r  # (r − 1) − log r, accurate for r near 1
    return Parts(values, keep)
