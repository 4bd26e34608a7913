"""Adversarial numerics (issue 12, item 4): temperatures at and beyond the documented range, T² overflow, labels out
of range on a later batch of a compiled step, fractional float masks in compiled code, empty inputs — each gives the
right value or a clear error, eager and compiled. (NaN and ±inf at masked positions: the loss tester's "nonfinite"
garbage, through every path of every loss.)"""

from __future__ import annotations

import math

import pytest
import torch
from tester import on_path

import distilkit as dk
from distilkit.losses import _checks

KINDS = [("kd_ce", {}), ("kd_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("skew_kl", {"alpha": 0.2}),
         ("tvd", {})]
PATHS = ["dense", "chunked", "topk", "fused"]


def _fn(kind, path):
    return getattr(dk, kind) if path == "dense" else on_path(kind, path)


def _logits(dtype=torch.float32, shape=(64, 1000)):
    g = torch.Generator().manual_seed(0)
    return (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype), \
        (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("kind", "options"), KINDS, ids=[k for k, _ in KINDS])
def test_the_largest_accepted_temperature_is_accurate_in_float32(kind, options, path):
    """At T = MAX_TEMPERATURE the divergences are ~1/T² small; float32 must still give them (and their gradients)
    to 1e-3 of float64 — the accuracy the documented range promises (chunked float32 takes the C kernel)."""
    s, t = _logits()
    T = _checks.MAX_TEMPERATURE
    x = s.clone().requires_grad_()
    value = _fn(kind, path)(x, t, temperature=T, **options)
    (grad,) = torch.autograd.grad(value, x)
    x64 = s.double().requires_grad_()
    want = getattr(dk, kind)(x64, t.double(), temperature=T, impl="dense", **options)
    (want_grad,) = torch.autograd.grad(want, x64)
    assert abs(value.item() - want.item()) <= 1e-3 * abs(want.item())
    assert (grad.double() - want_grad).norm() <= 1e-3 * want_grad.norm()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [100.5, 1e4, 1e20, 1e300, math.inf, math.nan, 0.0, -1.0])
def test_temperatures_outside_the_range_are_refused(bad, path):
    s, t = _logits(shape=(4, 9))
    with pytest.raises(ValueError, match=r"expected temperature > 0 \(and at most 100"):
        _fn("kd_kl", path)(s, t, temperature=bad)
    row = torch.full((4,), 2.0, dtype=torch.float64)
    row[1] = bad
    with pytest.raises(ValueError, match=r"expected temperature > 0 \(and at most 100.*everywhere"):
        _fn("kd_kl", path)(s, t, temperature=row)


def test_an_adaptive_temperature_stays_in_the_range():
    s, t = _logits(shape=(8, 9))
    temp = dk.temperature.flsw(base=90.0, beta=1e4, gamma=1.0)(s, t)
    assert (temp <= _checks.MAX_TEMPERATURE).all() and (temp >= dk.temperature.MIN_TEMPERATURE).all()


@pytest.mark.parametrize("compile", [False, "aot_eager", True])
def test_a_spec_with_an_out_of_range_temperature_fails_at_its_first_step(compile):
    step = dk.make_step(dk.kd_kl.on("logits", temperature=1e4), compile=compile)
    s, t = _logits(shape=(4, 9))
    with pytest.raises(ValueError, match=r"kd_kl \(term 'kd_kl'\): expected temperature > 0 \(and at most"):
        step({"logits": s}, {"logits": t})


@pytest.mark.parametrize("compile", ["aot_eager", True])
def test_labels_out_of_range_on_a_later_batch_of_a_compiled_step(compile):
    """Validation is cached per input signature; the label range is checked in the graph on every batch (its
    assertion fails the compiled call, and the step's eager re-evaluation then names the term)."""
    step = dk.make_step(dk.hard_ce.on("logits"), compile=compile)
    logits = torch.randn(4, 9, requires_grad=True)
    good = torch.tensor([0, 8, -100, 3])
    step({"logits": logits}, {}, {"labels": good}).loss.backward()
    with pytest.raises(ValueError, match=r"hard_ce \(term 'hard_ce'\): expected labels in \[0, 9\) or equal to "
                                         r"ignore_index=-100"):
        step({"logits": logits}, {}, {"labels": torch.tensor([0, 9, -100, 3])})
    with pytest.raises(ValueError, match=r"hard_ce \(term 'hard_ce'\): expected labels in \[0, 9\)"):
        step({"logits": logits}, {}, {"labels": torch.tensor([0, -5, -100, 3])})


@pytest.mark.parametrize("compile", ["aot_eager", True])
def test_a_fractional_float_mask_on_a_later_batch_of_a_compiled_step(compile):
    step = dk.make_step(dk.kd_kl.on("logits", mask="mask"), compile=compile)
    s, t = _logits(shape=(4, 9))
    step({"logits": s}, {"logits": t}, {"mask": torch.tensor([1.0, 0.0, 1.0, 1.0])})
    with pytest.raises(ValueError, match=r"kd_kl \(term 'kd_kl'\): expected a 0/1 mask"):
        step({"logits": s}, {"logits": t}, {"mask": torch.tensor([1.0, 0.5, 1.0, 1.0])})
    with pytest.raises(ValueError, match="kd_kl: expected a 0/1 mask"):  # eager: a ValueError
        dk.kd_kl(s, t, mask=torch.tensor([1.0, 0.5, 1.0, 1.0]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("kind", "options"), KINDS, ids=[k for k, _ in KINDS])
def test_zero_rows_give_zero_with_a_zero_gradient(kind, options, path):
    for shape in ((0, 7), (3, 0, 7)):
        s = torch.randn(*shape, requires_grad=True)
        t = torch.randn(*shape)
        value = _fn(kind, path)(s, t, temperature=2.0, **options)
        assert value.item() == 0.0
        (grad,) = torch.autograd.grad(value, s)
        assert grad.shape == s.shape
    with pytest.raises(ValueError, match="expected at least one class"):
        getattr(dk, kind)(torch.randn(3, 0), torch.randn(3, 0), **options)
