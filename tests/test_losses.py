"""Every loss through the shared tester (see tester.py for the cases)."""

from __future__ import annotations

import math

import pytest
import torch
from tester import (
    CASES,
    F64,
    LOSS_NAMES,
    Case,
    dropped_entries,
    floating_leaves,
    generator,
    kept_only,
    leaves,
    prefix_mask,
    random_mask,
    requiring_grad,
    tmap,
)

by_id = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def _value_and_grads(case: Case, student, teacher, mask=None, fn=None, **kwargs):
    student = requiring_grad(student)
    value = case.call(student, teacher, mask, fn=fn, **kwargs)
    xs = floating_leaves(student)
    grads = torch.autograd.grad(value.sum(), xs, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs, strict=True)]


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.is_floating_point() else x


def _close(actual, expected, **tol):
    for a, e in zip(leaves(actual), leaves(expected), strict=True):
        torch.testing.assert_close(a, e.to(a.dtype), **tol)


def test_every_public_loss_has_a_case():
    assert sorted({c.name for c in CASES}) == LOSS_NAMES


# ---------------------------------------------------------------------------------------------- reference
@by_id
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_float64_reference(case: Case, masked: bool):
    gen = generator(1)
    student, teacher = case.make(gen)
    mask = random_mask(gen, case.mask_shape) if masked else None

    ref_student = requiring_grad(student)
    ref_sum, ref_count = case.call_reference(ref_student, teacher, mask)
    ref_mean = ref_sum / max(ref_count, 1.0)
    ref_grads = torch.autograd.grad(ref_mean, floating_leaves(ref_student))

    value, grads = _value_and_grads(case, student, teacher, mask)
    assert value.dtype == F64
    torch.testing.assert_close(value, ref_mean.detach(), rtol=1e-9, atol=1e-12)
    _close(grads, ref_grads, rtol=1e-8, atol=1e-11)
    total, count = case.call(student, teacher, mask, fn=case.loss.sum_count)
    torch.testing.assert_close(total, ref_sum.detach(), rtol=1e-9, atol=1e-12)
    assert count.item() == ref_count


@by_id
def test_gradcheck(case: Case):
    gen = generator(2)
    student, teacher = case.make(gen)
    mask = random_mask(gen, case.mask_shape)
    inputs = floating_leaves(requiring_grad(student))

    def fn(*xs):
        s = tuple(xs) if isinstance(student, tuple) else xs[0]
        return case.call(s, teacher, mask)

    if case.path in ("chunked", "fused"):  # once-per-forward gradients (no retain_graph reuse): one backward
        _finite_difference_check(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
        return
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _finite_difference_check(fn, inputs, eps, atol, rtol):
    """gradcheck for a scalar ``fn`` whose graph may be backpropagated once: one backward against central
    differences of fresh forwards."""
    analytical = torch.autograd.grad(fn(*inputs), inputs)
    for x, grad in zip(inputs, analytical, strict=True):
        numerical = torch.zeros_like(x)
        flat = x.detach().view(-1)
        for k in range(flat.numel()):
            with torch.no_grad():
                keep = flat[k].item()
                flat[k] = keep + eps
                up = fn(*inputs)
                flat[k] = keep - eps
                down = fn(*inputs)
                flat[k] = keep
            numerical.view(-1)[k] = (up - down) / (2 * eps)
        torch.testing.assert_close(grad, numerical, atol=atol, rtol=rtol)


# -------------------------------------------------------------------------------------------------- masks
@by_id
@pytest.mark.parametrize("garbage_kind", ["large", "nonfinite"])
def test_values_at_masked_positions_change_nothing(case: Case, garbage_kind: str):
    gen = generator(3)
    student, teacher = case.make(gen)
    mask = random_mask(gen, case.mask_shape)

    def spoil(x):
        if not x.is_floating_point():
            return x
        garbage = torch.randn(x.shape, generator=gen, dtype=x.dtype) * 1e3
        if garbage_kind == "nonfinite":  # NaN, +inf and −inf, as padding often holds
            pick = torch.randint(0, 3, x.shape, generator=gen)
            garbage = torch.tensor([math.nan, math.inf, -math.inf], dtype=x.dtype)[pick]
        return torch.where(dropped_entries(case, x, mask), garbage, x)

    clean = _value_and_grads(case, student, teacher, mask)
    spoiled = _value_and_grads(case, tmap(spoil, student), tmap(spoil, teacher), mask)
    torch.testing.assert_close(spoiled[0], clean[0], rtol=1e-12, atol=1e-12)
    _close(spoiled[1], clean[1], rtol=1e-12, atol=1e-12)
    for g, x in zip(clean[1], leaves(student), strict=True):  # no gradient reaches a dropped position
        assert not g[dropped_entries(case, x, mask)].any()


# pkd on [B, L, D] reads position 0 only, so dropping positions is not what its mask means; pkd-2d is covered.
COMPACTABLE = [c for c in CASES if c.compactable]


@pytest.mark.parametrize("case", COMPACTABLE, ids=[c.id for c in COMPACTABLE])
@pytest.mark.parametrize("kind", ["prefix", "random"])
def test_equals_loss_on_kept_positions_only(case: Case, kind: str):
    """The masked (sum, count) equals the sum of per-sample (sum, count) computed on the kept positions alone."""
    gen = generator(4)
    student, teacher = case.make(gen)
    if kind == "prefix" and len(case.mask_shape) == 2:
        mask = prefix_mask(case.mask_shape, [case.mask_shape[1], 2, 1])
    else:
        mask = random_mask(gen, case.mask_shape)
    if case.masked_keys_enter:  # as in a real model: the additive padding mask is already in the scores
        additive = torch.where(mask.bool()[:, None, None, :], 0.0, -1e4).to(F64)
        student, teacher = student + additive, teacher + additive

    total, count = case.call(student, teacher, mask, fn=case.loss.sum_count)
    per_sample = []
    for b in range(case.mask_shape[0]):
        if not mask[b].bool().any():
            continue
        s_b, t_b = (tmap(lambda x, b=b: kept_only(case, x, mask, b), x) for x in (student, teacher))
        options = {k: kept_only(case, v, mask, b) if torch.is_tensor(v) and v.shape == mask.shape else v
                   for k, v in case.options.items()}
        per_sample.append(Case(case.id, case.name, case.make, options=options, labels=case.labels).call(
            s_b, t_b, None, fn=case.loss.sum_count))
    torch.testing.assert_close(total, sum(s for s, _ in per_sample), rtol=1e-10, atol=1e-12)
    assert count.item() == sum(c.item() for _, c in per_sample)


@by_id
def test_fully_masked_is_zero_with_finite_gradients(case: Case):
    student, teacher = case.make(generator(5))
    mask = torch.zeros(case.mask_shape, dtype=torch.bool)
    for reduction in ("mean", "sum"):
        value, grads = _value_and_grads(case, student, teacher, mask, reduction=reduction)
        assert value.item() == 0.0
        assert all(torch.isfinite(g).all() for g in grads)


@by_id
def test_boolean_like_masks_agree(case: Case):
    gen = generator(6)
    student, teacher = case.make(gen)
    mask = random_mask(gen, case.mask_shape)
    expected = case.call(student, teacher, mask)
    for dtype in (torch.int64, torch.uint8, torch.float32):
        torch.testing.assert_close(case.call(student, teacher, mask.to(dtype)), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- reductions
@by_id
def test_reductions_are_one_sum_count_pair(case: Case):
    gen = generator(7)
    student, teacher = case.make(gen)
    mask = random_mask(gen, case.mask_shape)
    total, count = case.call(student, teacher, mask, fn=case.loss.sum_count)
    torch.testing.assert_close(case.call(student, teacher, mask, reduction="sum"), total)
    torch.testing.assert_close(case.call(student, teacher, mask, reduction="mean"), total / count)
    none = case.call(student, teacher, mask, reduction="none")
    torch.testing.assert_close(none.sum(), total)
    with pytest.raises(ValueError, match=f"{case.api}: expected reduction"):
        case.call(student, teacher, mask, reduction="average")


# ------------------------------------------------------------------------------------------------ compile
@by_id
def test_compiled_fullgraph_equals_eager(case: Case):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = generator(8)
    student, teacher = (tmap(_f32, x) for x in case.make(gen))
    options = {k: v.float() if torch.is_tensor(v) else v for k, v in case.options.items()}
    case = Case(case.id, case.name, case.make, case.mask_shape, case.mask_axes, options, labels=case.labels)
    mask = random_mask(gen, case.mask_shape)
    compiled = torch.compile(case.loss, fullgraph=True, backend="inductor")
    eager_value, eager_grads = _value_and_grads(case, student, teacher, mask)
    value, grads = _value_and_grads(case, student, teacher, mask, fn=compiled)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(value, eager_value, rtol=1e-5, atol=1e-6)
    _close(grads, eager_grads, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ precision
@by_id
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs_stay_finite_and_close(case: Case, dtype):
    gen = generator(9)
    student, teacher = case.make(gen)
    mask = random_mask(gen, case.mask_shape)
    low = lambda x: x.to(dtype) if x.is_floating_point() else x  # noqa: E731
    low64 = lambda x: low(x).double() if x.is_floating_point() else x  # noqa: E731
    value, grads = _value_and_grads(case, tmap(low, student), tmap(low, teacher), mask)
    ref_value, _ = _value_and_grads(case, tmap(low64, student), tmap(low64, teacher), mask)
    assert value.dtype == torch.float32, "losses compute and return float32 for half-precision inputs"
    assert torch.isfinite(value).all() and all(torch.isfinite(g).all() for g in grads)
    assert all(g.dtype == dtype for g in grads)
    # Upcast inside: the result equals float64 math on the same (rounded) inputs to float32 accuracy.
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    fp32_value, _ = _value_and_grads(case, tmap(_f32, student), tmap(_f32, teacher), mask)
    torch.testing.assert_close(value, fp32_value, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("case", [c for c in CASES if c.logits], ids=[c.id for c in CASES if c.logits])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_stay_finite(case: Case, dtype):
    gen = generator(10)
    student, teacher = case.make(gen)
    mask = random_mask(gen, case.mask_shape)
    huge = lambda x: (x.sign() * 1e4).to(dtype) if x.is_floating_point() else x  # noqa: E731
    value, grads = _value_and_grads(case, tmap(huge, student), tmap(lambda x: -huge(x) if x.is_floating_point() else x,
                                                                     teacher), mask)
    assert torch.isfinite(value).all()
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------- teacher
@by_id
def test_teacher_never_receives_gradient(case: Case):
    gen = generator(11)
    student, teacher = case.make(gen)
    student, teacher = requiring_grad(student), requiring_grad(teacher)
    value = case.call(student, teacher, random_mask(gen, case.mask_shape))
    value.backward()
    assert all(x.grad is not None for x in floating_leaves(student))
    assert all(x.grad is None for x in floating_leaves(teacher))


# ---------------------------------------------------------------------------------------------- torch.func column
def _call_with(case: Case, student, teacher, mask):
    return case.call(student, teacher, mask)


@by_id
def test_torch_func_grad_equals_autograd(case: Case):
    gen = generator(8)
    student, teacher = case.make(gen)
    mask = random_mask(gen, case.mask_shape)
    value, expected = _value_and_grads(case, student, teacher, mask)
    grads, fvalue = torch.func.grad_and_value(lambda s: _call_with(case, s, teacher, mask))(student)
    torch.testing.assert_close(fvalue, value)
    _close(floating_leaves(grads), expected, rtol=1e-10, atol=1e-12)


@by_id
def test_torch_func_vmap_over_inputs_equals_a_loop(case: Case):
    gen = generator(9)
    draws = [case.make(gen) for _ in range(3)]
    masks = [random_mask(gen, case.mask_shape) for _ in range(3)]

    def stack(parts):
        return tuple(torch.stack(p) for p in zip(*parts, strict=True)) if isinstance(parts[0], tuple) \
            else torch.stack(parts)

    students, teachers = stack([d[0] for d in draws]), stack([d[1] for d in draws])
    batched = torch.func.vmap(lambda s, t, m: _call_with(case, s, t, m))(students, teachers, torch.stack(masks))
    expected = torch.stack([_call_with(case, s, t, m) for (s, t), m in zip(draws, masks, strict=True)])
    torch.testing.assert_close(batched, expected, rtol=1e-10, atol=1e-12)


@by_id
def test_torch_func_jvp_equals_the_directional_derivative(case: Case):
    gen = generator(10)
    student, teacher = case.make(gen)
    mask = random_mask(gen, case.mask_shape)
    tangent = tmap(lambda x: torch.randn(x.shape, generator=gen, dtype=F64), student)  # students are floating
    value, derivative = torch.func.jvp(lambda s: _call_with(case, s, teacher, mask), (student,), (tangent,))
    expected_value, grads = _value_and_grads(case, student, teacher, mask)
    torch.testing.assert_close(value, expected_value)
    expected = sum((g * v).sum() for g, v in zip(grads, leaves(tangent), strict=True))
    torch.testing.assert_close(derivative, expected, rtol=1e-9, atol=1e-12)


HYPER = [(c, name) for c in CASES for name in ("temperature", "beta", "alpha")
         if name in c.options and (not isinstance(c.options[name], torch.Tensor) or c.options[name].ndim == 0)]


@pytest.mark.parametrize(("case", "name"), HYPER, ids=[f"{c.id}-{n}" for c, n in HYPER])
def test_torch_func_vmap_over_a_batch_of_hyperparameters_equals_a_loop(case: Case, name: str):
    gen = generator(11)
    student, teacher = case.make(gen)
    mask = random_mask(gen, case.mask_shape)
    values = torch.tensor([0.0, 0.3, 1.0] if name in ("beta", "alpha") else [0.5, 1.0, 3.0], dtype=F64)

    def at(value):
        options = {**case.options, name: value}
        return case.loss(student, teacher, mask=mask, **options)

    batched = torch.func.vmap(at)(values)
    expected = torch.stack([at(v) for v in values.tolist()])
    torch.testing.assert_close(batched, expected, rtol=1e-10, atol=1e-12)
