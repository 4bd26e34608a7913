"""dk.sampled_kl: the documented meaning of each estimator, checked by sampling (exact expectations, computed by
summing over the whole vocabulary with the sampling probabilities as weights, so no Monte-Carlo noise)."""

from __future__ import annotations

import pytest
import torch

import distilkit as dk

F64 = torch.float64


def _models(seed: int = 0, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(vocab, generator=g, dtype=F64).requires_grad_()
    zt = 1.5 * torch.randn(vocab, generator=g, dtype=F64)
    return zs, zt


def _expectation(estimator: str, zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """E_{x∼q}[estimator(x)] for a loss differentiated through log q(x) only: every token x is a 'sample', weighted
    by q(x) held fixed (detached), as a Monte-Carlo average over many samples would be."""
    lq, lp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    per_token = dk.sampled_kl(lq, lp, estimator=estimator, reduction="none")
    return (lq.exp().detach() * per_token).sum()


def test_values_k1_and_k3_are_unbiased_and_k2_is_not():
    zs, zt = _models()
    lq, lp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    reverse = (lq.exp() * (lq - lp)).sum()
    torch.testing.assert_close(_expectation("k1", zs, zt), reverse)
    torch.testing.assert_close(_expectation("k3", zs, zt), reverse)
    assert abs(_expectation("k2", zs, zt) - reverse) > 1e-3 * reverse  # biased (second order in log r)
    assert (dk.sampled_kl(lq, lp, estimator="k3", reduction="none") >= 0).all()
    assert (dk.sampled_kl(lq, lp, estimator="k1", reduction="none") < 0).any()


@pytest.mark.parametrize(("estimator", "target"), [("k1", "zero"), ("k2", "reverse"), ("k3", "forward")])
def test_expected_gradients(estimator, target):
    """As losses: E[∇k1] = 0, E[∇k2] = ∇KL(q‖p), E[∇k3] = ∇KL(p‖q)."""
    zs, zt = _models(1)
    (got,) = torch.autograd.grad(_expectation(estimator, zs, zt), zs)
    lq, lp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    if target == "zero":
        want = torch.zeros_like(zs)
    else:
        kl = (lq.exp() * (lq - lp)).sum() if target == "reverse" else (lp.exp() * (lp - lq)).sum()
        (want,) = torch.autograd.grad(kl, zs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_errors_and_masking():
    s, t = -torch.rand(2, 3), -torch.rand(2, 3)
    with pytest.raises(ValueError, match="sampled_kl: expected estimator to be one of"):
        dk.sampled_kl(s, t, estimator="k4")
    with pytest.raises(ValueError, match="sampled_kl: expected student and teacher log-probabilities"):
        dk.sampled_kl(s, t[:, :2])
    t_bad = t.clone()
    t_bad[1, 2] = float("nan")
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    x = s.clone().requires_grad_()
    value = dk.sampled_kl(x, t_bad, mask=mask, estimator="k3")
    (grad,) = torch.autograd.grad(value, x)
    assert value.isfinite() and grad.isfinite().all() and grad[1, 2] == 0


# ------------------------------------------------------------------------------ ULD (cross-tokenizer), the formula
def test_uld_ignores_which_token_gets_the_mass():
    """ULD compares sorted probabilities: permuting a vocabulary, or adding classes of zero probability, changes
    nothing; a different shape of distribution does (Boizard et al., 2024)."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, 9, generator=g, dtype=F64)
    base = dk.uld(s, t)
    torch.testing.assert_close(dk.uld(s[:, torch.randperm(6, generator=g)], t[:, torch.randperm(9, generator=g)]),
                               base)
    padded = torch.cat([t, torch.full((4, 3), -torch.inf, dtype=F64)], -1)  # three more classes of probability 0
    torch.testing.assert_close(dk.uld(s, padded), base)
    assert dk.uld(s, s).item() == 0.0
    assert dk.uld(s, 3 * s) > 0.05  # sharper teacher: another shape
