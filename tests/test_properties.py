"""Hypothesis property tests for the loss layer.

The properties follow the public contract (DESIGN.md) and the (sum, count) table of the loss layer:
divergences are non-negative and vanish when student == teacher, ``jsd(beta=0.5)`` is symmetric, ``tvd`` is
bounded by 1, ``nst`` is invariant to positive per-neuron scaling, the reductions satisfy
``none.sum() == sum`` and ``mean == sum / max(count, 1)`` with the tabulated counts, an all-True mask equals no
mask, a fully masked input gives exactly 0 with finite gradients, and a per-row temperature whose entries are
all ``T`` equals the float ``T``.

All inputs are float64 so that the tolerances can be tight. Shapes, temperatures, masks (and the mask dtype)
and values are drawn by hypothesis; values avoid subnormals so that the comparisons test the maths, not the
underflow behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import distilkit as dk

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation, which gets very slow (x4 measured) when
    the CPUs are shared, e.g. with pytest-xdist workers. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NEG_TOL = 1e-12  # a divergence may come out this far below 0 by rounding
ZERO_TOL = 1e-9  # a divergence at student == teacher is at most this far from 0
RTOL, ATOL = 1e-7, 1e-10  # comparisons between two ways of computing the same value

_FLOATS = {"allow_nan": False, "allow_infinity": False, "allow_subnormal": False}
_MASK_DTYPES = (torch.bool, torch.int64, torch.float64)


# --------------------------------------------------------------------------------------------------------------
# strategies and helpers
# --------------------------------------------------------------------------------------------------------------


def _arr(draw: Callable, shape: tuple[int, ...], lo: float = -5.0, hi: float = 5.0) -> torch.Tensor:
    a = draw(hnp.arrays(np.float64, shape, elements=st.floats(lo, hi, **_FLOATS)))
    return torch.tensor(a, dtype=torch.float64)


def _snap(x: torch.Tensor, tiny: float = 1e-3) -> torch.Tensor:
    """Set |x| < tiny to exactly 0, so that a vector is either zero or has a norm well above any eps clamp."""
    return torch.where(x.abs() < tiny, torch.zeros_like(x), x)


def _nonzero_vectors(x: torch.Tensor) -> torch.Tensor:
    """Make every vector along the last dim non-zero (cosine / pkd are undefined for zero vectors)."""
    x = _snap(x)
    dead = x.norm(dim=-1) == 0
    x[..., 0] = torch.where(dead, torch.ones_like(x[..., 0]), x[..., 0])
    return x


def _random_mask(draw: Callable, shape: tuple[int, ...]) -> torch.Tensor:
    m = torch.tensor(draw(hnp.arrays(np.bool_, shape)))
    return m.to(draw(st.sampled_from(_MASK_DTYPES)))


def _const_mask(draw: Callable, shape: tuple[int, ...], value: bool) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.bool).to(draw(st.sampled_from(_MASK_DTYPES)))


def _keep(mask: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.bool) if mask is None else mask.ne(0)


def _lengths(mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """n_b: kept positions per sample for a [B, L] mask (L without a mask)."""
    return _keep(mask, shape).sum(-1)


def _temperatures(lead: tuple[int, ...]) -> st.SearchStrategy:
    t = st.floats(0.25, 8.0, **_FLOATS)
    return st.one_of(
        t,
        t.map(lambda v: torch.tensor(v, dtype=torch.float64)),
        hnp.arrays(np.float64, lead, elements=t).map(lambda a: torch.tensor(a, dtype=torch.float64)),
    )


def _leading(draw: Callable) -> tuple[int, ...]:
    b = draw(st.integers(1, 3))
    return (b,) if draw(st.booleans()) else (b, draw(st.integers(1, 4)))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor | float, **kw: Any) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=kw.get("rtol", RTOL), atol=kw.get("atol", ATOL))


def _leaves(x: Any) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _fresh(x: Any, grad: bool, dtype: torch.dtype = torch.float64) -> Any:
    """A detached copy of a tensor or tuple of tensors; floating leaves get `dtype` and require grad when `grad`."""

    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        if t.is_floating_point():
            t = t.to(dtype)
        return t.requires_grad_(grad and t.is_floating_point())

    return tuple(one(t) for t in x) if isinstance(x, (tuple, list)) else one(x)


# --------------------------------------------------------------------------------------------------------------
# cases: one drawn input per loss, with its expected count and (where the contract fixes it) the layout of
# reduction="none"
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    s: Any
    t: Any
    kw: dict[str, Any]
    mask_shape: tuple[int, ...]
    count: Callable[[torch.Tensor | None], int]
    # mask -> bool tensor with the exact shape of reduction="none"; entries that are False must be 0.
    # None where the contract leaves the shape of "none" open.
    layout: Callable[[torch.Tensor | None], torch.Tensor] | None = None
    fn: Callable[..., torch.Tensor] | None = None

    def __call__(self, s: Any = None, t: Any = None, **kw: Any) -> torch.Tensor:
        fn = self.fn if self.fn is not None else getattr(dk, self.name)
        return fn(self.s if s is None else s, self.t if t is None else t, **{**self.kw, **kw})


LOGIT_DIVERGENCES = ("kd_ce", "kd_kl", "reverse_kl", "jsd", "skew_kl", "tvd")


def logit_case(name: str, draw: Callable, same: bool = False) -> Case:
    lead = _leading(draw)
    v = draw(st.integers(1, 6))
    s = _arr(draw, (*lead, v), -10.0, 10.0)
    t = s.clone() if same else _arr(draw, (*lead, v), -10.0, 10.0)
    kw: dict[str, Any] = {"temperature": draw(_temperatures(lead))}
    if name != "kd_mse":
        kw["t2_scale"] = draw(st.booleans())
    if name == "jsd":
        kw["beta"] = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0, **_FLOATS)))
    if name == "skew_kl":
        kw["alpha"] = draw(st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0, **_FLOATS)))
    if name == "kd_mse":  # MSE-style: "none" per element, count #kept rows x V
        return Case(
            name,
            s,
            t,
            kw,
            lead,
            count=lambda m: int(_keep(m, lead).sum()) * v,
            layout=lambda m: _keep(m, lead)[..., None].expand(*lead, v),
        )
    return Case(
        name,
        s,
        t,
        kw,
        lead,
        count=lambda m: int(_keep(m, lead).sum()),
        layout=lambda m: _keep(m, lead),
    )


def _hard_ce(logits: torch.Tensor, labels: torch.Tensor, *, mask: torch.Tensor | None = None, **kw: Any):
    """hard_ce has no mask: a masked position is a label equal to ignore_index."""
    if mask is not None:
        labels = torch.where(mask.ne(0), labels, torch.full_like(labels, -100))
    return dk.hard_ce(logits, labels, **kw)


def hard_ce_case(draw: Callable, same: bool = False) -> Case:
    lead = _leading(draw)
    v = draw(st.integers(1, 6))
    s = _arr(draw, (*lead, v), -10.0, 10.0)
    labels = torch.tensor(draw(hnp.arrays(np.int64, lead, elements=st.integers(0, v - 1))))
    return Case(
        "hard_ce",
        s,
        labels,
        {},
        lead,
        count=lambda m: int(_keep(m, lead).sum()),
        layout=lambda m: _keep(m, lead),
        fn=_hard_ce,
    )


def _bld(draw: Callable) -> tuple[int, int, int]:
    return draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))


def hidden_mse_case(draw: Callable, same: bool = False) -> Case:
    b, l, d = _bld(draw)
    s = _arr(draw, (b, l, d))
    t = s.clone() if same else _arr(draw, (b, l, d))
    return Case(
        "hidden_mse",
        s,
        t,
        {},
        (b, l),
        count=lambda m: int(_keep(m, (b, l)).sum()) * d,
        layout=lambda m: _keep(m, (b, l))[..., None].expand(b, l, d),
    )


def cosine_case(draw: Callable, same: bool = False) -> Case:
    b, l, d = _bld(draw)
    s = _nonzero_vectors(_arr(draw, (b, l, d)))
    t = s.clone() if same else _nonzero_vectors(_arr(draw, (b, l, d)))
    return Case(
        "cosine",
        s,
        t,
        {},
        (b, l),
        count=lambda m: int(_keep(m, (b, l)).sum()),
        layout=lambda m: _keep(m, (b, l)),
    )


def pkd_case(draw: Callable, same: bool = False) -> Case:
    b, l, d = _bld(draw)
    shape, mask_shape = ((b, d), (b,)) if draw(st.booleans()) else ((b, l, d), (b, l))
    s = _nonzero_vectors(_arr(draw, shape))
    t = s.clone() if same else _nonzero_vectors(_arr(draw, shape))

    def count(m: torch.Tensor | None) -> int:
        k = _keep(m, mask_shape)
        return int((k if k.ndim == 1 else k[:, 0]).sum())

    return Case("pkd", s, t, {}, mask_shape, count=count)


def attention_case(name: str, draw: Callable, same: bool = False) -> Case:
    b, l = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    four_d = draw(st.booleans())
    h = draw(st.integers(1, 3)) if four_d else 1
    shape = (b, h, l, l) if four_d else (b, l, l)
    kw: dict[str, Any] = {}
    if name == "attention_kl":
        kw["inputs"] = draw(st.sampled_from(["probs", "logits"]))
        # scores in [-4, 4]: probabilities stay far above eps=1e-8, so the eps clamp never acts
        s = _arr(draw, shape, -4.0, 4.0)
        t = s.clone() if same else _arr(draw, shape, -4.0, 4.0)
        if kw["inputs"] == "probs":
            s, t = s.softmax(-1), t.softmax(-1)
    else:
        s = _arr(draw, shape)
        t = s.clone() if same else _arr(draw, shape)
        if four_d:
            reduce = {"attention_mse": "sum", "attention_ce": "mean"}[name]
            head_reduce = draw(st.sampled_from([None, reduce]))
            if head_reduce is not None:
                kw["head_reduce"] = head_reduce
    heads = 1 if "head_reduce" in kw else h

    if name == "attention_mse":

        def count(m: torch.Tensor | None) -> int:
            return heads * int((_lengths(m, (b, l)) ** 2).sum())

        def layout(m: torch.Tensor | None) -> torch.Tensor:
            k = _keep(m, (b, l))
            pairs = k[:, :, None] & k[:, None, :]
            return pairs[:, None].expand(b, h, l, l) if four_d else pairs

        return Case(name, s, t, kw, (b, l), count=count, layout=None if "head_reduce" in kw else layout)

    return Case(name, s, t, kw, (b, l), count=lambda m: heads * int(_lengths(m, (b, l)).sum()))


def relation_kl_case(draw: Callable, same: bool = False) -> Case:
    b, l = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    a, ds = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dt = ds if same else draw(st.integers(1, 3))
    s = _arr(draw, (b, l, a * ds), -3.0, 3.0)
    t = s.clone() if same else _arr(draw, (b, l, a * dt), -3.0, 3.0)
    return Case(
        "relation_kl",
        s,
        t,
        {"num_heads": a},
        (b, l),
        count=lambda m: a * int(_lengths(m, (b, l)).sum()),
    )


def fsp_case(draw: Callable, same: bool = False) -> Case:
    b, l = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    d0, d1 = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    s = (_arr(draw, (b, l, d0)), _arr(draw, (b, l, d1)))
    t = tuple(x.clone() for x in s) if same else (_arr(draw, (b, l, d0)), _arr(draw, (b, l, d1)))
    return Case("fsp", s, t, {}, (b, l), count=lambda m: b * d0 * d1)


def mmd_case(draw: Callable, same: bool = False) -> Case:
    b, l = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    ds = draw(st.integers(1, 4))
    dt = ds if same else draw(st.integers(1, 4))
    single = draw(st.booleans())

    def member(d: int) -> Any:
        return _arr(draw, (b, l, d)) if single else (_arr(draw, (b, l, d)), _arr(draw, (b, l, d)))

    s = member(ds)
    t = (s.clone() if single else tuple(x.clone() for x in s)) if same else member(dt)
    return Case("mmd", s, t, {}, (b, l), count=lambda m: int((_lengths(m, (b, l)) ** 2).sum()))


def nst_case(draw: Callable, same: bool = False) -> Case:
    b, l = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    ds = draw(st.integers(1, 4))
    dt = ds if same else draw(st.integers(1, 4))
    # snapped: a neuron is either exactly 0 over the kept positions ("dead") or has a norm far above any eps
    s = _snap(_arr(draw, (b, l, ds)))
    t = s.clone() if same else _snap(_arr(draw, (b, l, dt)))
    return Case("nst", s, t, {}, (b, l), count=lambda m: int((_lengths(m, (b, l)) > 0).sum()))


BUILDERS: dict[str, Callable[..., Case]] = {
    **{name: partial(logit_case, name) for name in (*LOGIT_DIVERGENCES, "kd_mse")},
    "hard_ce": hard_ce_case,
    "hidden_mse": hidden_mse_case,
    "cosine": cosine_case,
    "pkd": pkd_case,
    **{name: partial(attention_case, name) for name in ("attention_kl", "attention_mse", "attention_ce")},
    "relation_kl": relation_kl_case,
    "fsp": fsp_case,
    "mmd": mmd_case,
    "nst": nst_case,
}

# kd_ce (teacher entropy included), attention_ce and hard_ce are not divergences
DIVERGENCES = [n for n in BUILDERS if n not in ("kd_ce", "attention_ce", "hard_ce")]
ALL_LOSSES = list(BUILDERS)
REDUCTIONS = ("mean", "sum", "none")


def _maybe_mask(draw: Callable, case: Case) -> torch.Tensor | None:
    return _random_mask(draw, case.mask_shape) if draw(st.booleans()) else None


# --------------------------------------------------------------------------------------------------------------
# namespace
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_losses_are_exported_at_top_level_and_in_losses(name: str) -> None:
    # dk.<name> is the algebra's Loss (callable, with .on); it wraps the pure dk.losses.<name> unchanged.
    assert getattr(dk, name).fn is getattr(dk.losses, name)


# --------------------------------------------------------------------------------------------------------------
# 1. divergences: >= 0, and 0 at student == teacher; kd_ce obeys Gibbs' inequality
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_divergence_is_nonnegative(name: str, data: st.DataObject) -> None:
    case = BUILDERS[name](data.draw)
    mask = _maybe_mask(data.draw, case)
    for reduction in REDUCTIONS:
        out = case(mask=mask, reduction=reduction)
        assert out.dtype == torch.float64
        assert torch.isfinite(out).all(), (reduction, out)
        if reduction != "none":
            assert out.ndim == 0
        assert (out >= -NEG_TOL).all(), (reduction, out)


@pytest.mark.parametrize("name", DIVERGENCES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_divergence_is_zero_when_student_equals_teacher(name: str, data: st.DataObject) -> None:
    case = BUILDERS[name](data.draw, same=True)
    mask = _maybe_mask(data.draw, case)
    for reduction in REDUCTIONS:
        out = case(mask=mask, reduction=reduction)
        assert torch.isfinite(out).all(), (reduction, out)
        assert (out.abs() <= ZERO_TOL).all(), (reduction, out)
    # the very same tensor object as student and teacher
    out = case(s=case.s, t=case.s, mask=mask)
    assert abs(float(out)) <= ZERO_TOL


@PROPERTY_SETTINGS
@given(data=st.data())
def test_kd_ce_gibbs_inequality_and_kl_decomposition(data: st.DataObject) -> None:
    case = logit_case("kd_ce", data.draw)
    mask = _maybe_mask(data.draw, case)
    for reduction in REDUCTIONS:
        cross = case(mask=mask, reduction=reduction)
        entropy = case(s=case.t, mask=mask, reduction=reduction)  # kd_ce(t, t) = c_r * H(p_T)
        assert (cross - entropy >= -1e-10 * (1.0 + entropy.abs())).all(), (reduction, cross, entropy)
        # kd_ce(s, t) - kd_ce(t, t) == kd_kl(s, t) with the same options (T^2 factors included)
        kl = dk.kd_kl(case.s, case.t, **case.kw, mask=mask, reduction=reduction)
        _assert_close(cross - entropy, kl, rtol=RTOL, atol=1e-9)


# --------------------------------------------------------------------------------------------------------------
# 2. jsd(beta=0.5) is symmetric (and bounded by ln 2 per row); beta / alpha endpoints
# --------------------------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(data=st.data())
def test_jsd_half_is_symmetric(data: st.DataObject) -> None:
    case = logit_case("jsd", data.draw)
    case.kw["beta"] = 0.5
    mask = _maybe_mask(data.draw, case)
    for reduction in REDUCTIONS:
        ab = case(mask=mask, reduction=reduction)
        ba = case(s=case.t, t=case.s, mask=mask, reduction=reduction)
        _assert_close(ab, ba, rtol=RTOL, atol=1e-12)
    rows = case(mask=mask, reduction="none", t2_scale=False)
    assert (rows <= math.log(2.0) + 1e-12).all(), rows


@PROPERTY_SETTINGS
@given(data=st.data())
def test_jsd_and_skew_kl_endpoints(data: st.DataObject) -> None:
    case = logit_case("kd_kl", data.draw)
    mask = _maybe_mask(data.draw, case)
    args = (case.s, case.t)
    kw = {**case.kw, "mask": mask, "reduction": "none"}
    forward, reverse = dk.kd_kl(*args, **kw), dk.reverse_kl(*args, **kw)
    _assert_close(dk.jsd(*args, beta=0.0, **kw), forward)  # special-cased: forward KL(p_T || p_S)
    _assert_close(dk.jsd(*args, beta=1.0, **kw), reverse)  # special-cased: reverse KL(p_S || p_T)
    _assert_close(dk.skew_kl(*args, alpha=0.0, **kw), forward)  # KL(p_T || p_S)
    _assert_close(dk.skew_kl(*args, alpha=1.0, **kw), torch.zeros_like(forward), atol=ZERO_TOL)


@PROPERTY_SETTINGS
@given(data=st.data(), weight=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, **_FLOATS)))
def test_jsd_and_skew_kl_accept_0d_tensor_weights(data: st.DataObject, weight: float) -> None:
    """beta / alpha may be 0-d tensors (e.g. from a schedule): same value, endpoints included, finite grads."""
    case = logit_case("kd_kl", data.draw)
    mask = _maybe_mask(data.draw, case)
    kw = {**case.kw, "mask": mask, "reduction": "none"}
    for fn, key in ((dk.jsd, "beta"), (dk.skew_kl, "alpha")):
        ref = fn(case.s, case.t, **kw, **{key: weight})
        s = _fresh(case.s, grad=True)
        out = fn(s, case.t, **kw, **{key: torch.tensor(weight, dtype=torch.float64)})
        _assert_close(out, ref)
        out.sum().backward()
        assert torch.isfinite(s.grad).all(), (key, weight, s.grad)


# --------------------------------------------------------------------------------------------------------------
# 3. tvd is in [0, 1] without the T^2 factor
# --------------------------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(data=st.data())
def test_tvd_is_bounded_by_one(data: st.DataObject) -> None:
    case = logit_case("tvd", data.draw)
    if data.draw(st.booleans(), label="temperature one"):
        case.kw["temperature"] = 1.0
    else:
        case.kw["t2_scale"] = False
    mask = _maybe_mask(data.draw, case)
    for reduction in ("mean", "none"):
        out = case(mask=mask, reduction=reduction)
        assert ((out >= -NEG_TOL) & (out <= 1.0 + 1e-12)).all(), (reduction, out)


# --------------------------------------------------------------------------------------------------------------
# 4. nst is invariant to a positive scaling of each neuron
# --------------------------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(data=st.data())
def test_nst_is_invariant_to_positive_per_neuron_scaling(data: st.DataObject) -> None:
    case = nst_case(data.draw)
    mask = _maybe_mask(data.draw, case)
    b = case.s.shape[0]
    # one factor per (sample, neuron): nst normalises each neuron of each sample separately
    scale = st.floats(0.1, 10.0, **_FLOATS)
    fs = torch.tensor(data.draw(hnp.arrays(np.float64, (b, 1, case.s.shape[-1]), elements=scale)))
    ft = torch.tensor(data.draw(hnp.arrays(np.float64, (b, 1, case.t.shape[-1]), elements=scale)))
    for reduction in REDUCTIONS:
        ref = case(mask=mask, reduction=reduction)
        _assert_close(case(s=case.s * fs, mask=mask, reduction=reduction), ref)
        _assert_close(case(t=case.t * ft, mask=mask, reduction=reduction), ref)
        _assert_close(case(s=case.s * fs, t=case.t * ft, mask=mask, reduction=reduction), ref)


# --------------------------------------------------------------------------------------------------------------
# 5. the (sum, count) contract
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_reductions_follow_the_sum_count_contract(name: str, data: st.DataObject) -> None:
    case = BUILDERS[name](data.draw)
    mask = _random_mask(data.draw, case.mask_shape)
    for m in (mask, None):
        total = case(mask=m, reduction="sum")
        mean = case(mask=m, reduction="mean")
        none = case(mask=m, reduction="none")
        for out in (total, mean, none):
            assert out.dtype == torch.float64
            assert torch.isfinite(out).all(), out
        assert total.ndim == 0 and mean.ndim == 0
        _assert_close(none.sum(), total)
        count = case.count(m)
        _assert_close(mean, total / max(count, 1))
        if case.layout is not None:
            keep = case.layout(m)
            if name == "attention_mse" and case.s.ndim == 3:
                # contract leaves open whether one-head [B, L, L] input gives "none" as [B, L, L] or [B, 1, L, L]
                none = none.reshape(keep.shape) if none.numel() == keep.numel() else none
            assert none.shape == keep.shape, (none.shape, keep.shape)
            assert (none[~keep] == 0).all(), none


@pytest.mark.parametrize("name", ALL_LOSSES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_all_true_mask_equals_no_mask(name: str, data: st.DataObject) -> None:
    case = BUILDERS[name](data.draw)
    full = _const_mask(data.draw, case.mask_shape, True)
    for reduction in REDUCTIONS:
        _assert_close(case(mask=full, reduction=reduction), case(mask=None, reduction=reduction))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ALL_LOSSES)
@settings(PROPERTY_SETTINGS, max_examples=20)
@given(data=st.data())
def test_fully_masked_input_gives_zero_and_finite_gradients(name: str, dtype: torch.dtype, data: st.DataObject) -> None:
    # float32 too: overflow / 0-division guards (finfo.tiny, finfo.min) are dtype-specific
    case = BUILDERS[name](data.draw)
    empty = _const_mask(data.draw, case.mask_shape, False)
    for reduction in REDUCTIONS:
        s, t = _fresh(case.s, grad=True, dtype=dtype), _fresh(case.t, grad=True, dtype=dtype)
        out = case(s=s, t=t, mask=empty, reduction=reduction)
        assert out.dtype == dtype
        assert (out == 0).all(), (reduction, out)
        out.sum().backward()
        for leaf in _leaves(s):
            if leaf.requires_grad:
                # the loss is identically 0 in the student, so its gradient is 0 (and above all not NaN)
                assert leaf.grad is None or (torch.isfinite(leaf.grad).all() and (leaf.grad == 0).all()), (
                    reduction,
                    leaf.grad,
                )
        for leaf in _leaves(t):
            assert leaf.grad is None, f"{name}: the teacher got a gradient"  # teacher tensors are detached


# --------------------------------------------------------------------------------------------------------------
# 6. a per-row temperature whose entries are all T equals the float T
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*LOGIT_DIVERGENCES, "kd_mse"])
@PROPERTY_SETTINGS
@given(data=st.data(), temperature=st.floats(0.25, 8.0, **_FLOATS))
def test_constant_per_row_temperature_equals_float(name: str, data: st.DataObject, temperature: float) -> None:
    case = logit_case(name, data.draw)
    mask = _maybe_mask(data.draw, case)
    lead = case.s.shape[:-1]
    for reduction in REDUCTIONS:
        ref = case(mask=mask, reduction=reduction, temperature=temperature)
        per_row = torch.full(lead, temperature, dtype=torch.float64)
        _assert_close(case(mask=mask, reduction=reduction, temperature=per_row), ref, rtol=1e-10, atol=1e-12)
        zero_d = torch.tensor(temperature, dtype=torch.float64)
        _assert_close(case(mask=mask, reduction=reduction, temperature=zero_d), ref, rtol=1e-10, atol=1e-12)
