"""Schedules and adaptive temperatures: reference values written from the formulas, optax's boundary conventions,
argument checks, the pytree structure, compilation without recompiles, and TextBrewer parity for flsw/cwsm."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter

import distilkit as dk
from distilkit import schedules as sch

# --------------------------------------------------------------------------------------------------------------------
# Plain-Python references (written from the formulas, not from the implementation)
# --------------------------------------------------------------------------------------------------------------------


def _progress(t, steps, begin=0):
    return min(max((t - begin) / steps, 0.0), 1.0)


def ref_linear(start, end, steps, begin=0):
    return lambda t: start + (end - start) * _progress(t, steps, begin)


def ref_cosine(start, end, steps, begin=0):
    return lambda t: end + (start - end) * 0.5 * (1 + math.cos(math.pi * _progress(t, steps, begin)))


def ref_exponential(start, rate, steps):
    return lambda t: start * rate ** (max(t, 0) / steps)


def ref_piecewise(boundaries, values):
    return lambda t: values[sum(1 for b in boundaries if t >= b)]


def ref_join(refs, boundaries):
    def f(t):
        i = sum(1 for b in boundaries if t >= b)
        return refs[i](t - (boundaries[i - 1] if i else 0))

    return f


def ref_growth(total):
    return lambda t: min(max(t / total, 0.0), 1.0)


def ref_decay(total):
    return lambda t: 1 - min(max(t / total, 0.0), 1.0)


STEPS = [0, 1, 2, 3, 5, 9, 10, 11, 19, 20, 21, 29, 30, 31, 49, 50, 51, 99, 100, 101, 150, 1000, 10**6]

CASES = {
    "constant": (sch.constant(0.25), lambda t: 0.25),
    "linear": (sch.linear(8.0, 2.0, steps=100), ref_linear(8.0, 2.0, 100)),
    "linear-up-begin": (sch.linear(0.0, 1.0, 20, begin=10), ref_linear(0.0, 1.0, 20, 10)),
    "cosine": (sch.cosine(1.0, 0.1, 50), ref_cosine(1.0, 0.1, 50)),
    "cosine-begin": (sch.cosine(2.0, 4.0, 20, begin=30), ref_cosine(2.0, 4.0, 20, 30)),
    "exponential": (sch.exponential(1.0, 0.5, 10), ref_exponential(1.0, 0.5, 10)),
    "exponential-growth": (sch.exponential(0.1, 1.5, 10_000), ref_exponential(0.1, 1.5, 10_000)),
    "piecewise": (sch.piecewise_constant([10, 20, 50], [1.0, 0.5, 0.25, 0.0]),
                  ref_piecewise([10, 20, 50], [1.0, 0.5, 0.25, 0.0])),
    "piecewise-at-0": (sch.piecewise_constant((0,), (3.0, 7.0)), ref_piecewise((0,), (3.0, 7.0))),
    "piecewise-single": (sch.piecewise_constant([], [2.5]), lambda t: 2.5),
    "join-warmup-cosine": (
        sch.join([sch.linear(0.0, 1.0, 10), sch.cosine(1.0, 0.0, 90)], [10]),
        ref_join([ref_linear(0.0, 1.0, 10), ref_cosine(1.0, 0.0, 90)], [10]),
    ),
    "join-three": (
        sch.join([sch.constant(5.0), sch.linear(1.0, 3.0, 10), sch.exponential(2.0, 0.5, 5)], [20, 30]),
        ref_join([lambda t: 5.0, ref_linear(1.0, 3.0, 10), ref_exponential(2.0, 0.5, 5)], [20, 30]),
    ),
    "join-nested": (
        sch.join([sch.join([sch.constant(1.0), sch.linear(1.0, 0.0, 10)], [5]), sch.constant(-1.0)], [11]),
        ref_join([ref_join([lambda t: 1.0, ref_linear(1.0, 0.0, 10)], [5]), lambda t: -1.0], [11]),
    ),
    "linear_growth": (sch.linear_growth(100), ref_growth(100)),
    "linear_decay": (sch.linear_decay(30), ref_decay(30)),
    "product": (
        sch.linear(0.0, 1.0, 10) * 0.5 * sch.cosine(1.0, 0.0, 100),
        lambda t: ref_linear(0.0, 1.0, 10)(t) * 0.5 * ref_cosine(1.0, 0.0, 100)(t),
    ),
}


def _close(actual: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_values_match_reference(name):
    sched, ref = CASES[name]
    for t in STEPS:
        out = sched(t)
        assert out.ndim == 0 and out.dtype == torch.float32 and out.device.type == "cpu", (t, out)
        _close(out, ref(t))


@pytest.mark.parametrize("name", CASES)
def test_int_and_tensor_steps_agree(name):
    sched, _ = CASES[name]
    for t in (0, 7, 10, 20, 30, 101):
        expected = sched(t)
        for step in (torch.tensor(t), torch.tensor(t, dtype=torch.int32), torch.tensor(float(t)),
                     torch.tensor(float(t), dtype=torch.float64)):
            out = sched(step)
            assert out.shape == () and out.dtype == torch.float32
            assert torch.equal(out, expected), (t, step.dtype)


def test_boundary_conventions_match_optax():
    # piecewise_constant: values[i] for boundaries[i-1] <= step < boundaries[i]
    pc = sch.piecewise_constant([10, 20], [1.0, 2.0, 3.0])
    assert [float(pc(t)) for t in (9, 10, 11, 19, 20, 21)] == [1.0, 2.0, 2.0, 2.0, 3.0, 3.0]
    # join: schedule i sees step - boundaries[i-1], i.e. 0 exactly at the boundary
    jn = sch.join([sch.constant(-1.0), sch.linear(0.0, 10.0, 10)], [5])
    assert [float(jn(t)) for t in (4, 5, 6, 15, 40)] == [-1.0, 0.0, 1.0, 10.0, 10.0]
    # begin delays: start before begin and at begin, end from begin + steps on
    lin = sch.linear(3.0, 5.0, 4, begin=2)
    assert [float(lin(t)) for t in (0, 2, 3, 6, 7)] == [3.0, 3.0, 3.5, 5.0, 5.0]
    cos = sch.cosine(3.0, 5.0, 4, begin=2)
    assert [float(cos(t)) for t in (0, 2, 6, 100)] == [3.0, 3.0, 5.0, 5.0]


def test_textbrewer_weight_schedulers():
    from textbrewer.schedulers import linear_decay_weight_scheduler, linear_growth_weight_scheduler

    total = 40
    for t in range(total + 1):
        _close(sch.linear_growth(total)(t), linear_growth_weight_scheduler(t / total))
        _close(sch.linear_decay(total)(t), linear_decay_weight_scheduler(t / total))
    assert float(sch.linear_growth(total)(2 * total)) == 1.0  # clamped, where TextBrewer would give 2
    assert float(sch.linear_decay(total)(2 * total)) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(-10, 10), end=st.floats(-10, 10), steps=st.integers(1, 1000), begin=st.integers(0, 100),
    t=st.integers(0, 2000),
)
def test_linear_and_cosine_property(start, end, steps, begin, t):
    for cls, ref in ((sch.linear, ref_linear), (sch.cosine, ref_cosine)):
        out = cls(start, end, steps, begin=begin)(torch.tensor(t))
        expected = ref(float(torch.tensor(start)), float(torch.tensor(end)), steps, begin)(t)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)
        assert min(start, end) - 1e-5 <= float(out) <= max(start, end) + 1e-5


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 50), min_size=0, max_size=4), first=st.integers(0, 20), t=st.integers(0, 300),
    data=st.data(),
)
def test_piecewise_and_join_property(gaps, first, t, data):
    bounds = [first + sum(gaps[:i]) for i in range(len(gaps))]
    values = data.draw(st.lists(st.floats(-5, 5, width=32), min_size=len(bounds) + 1, max_size=len(bounds) + 1))
    _close(sch.piecewise_constant(bounds, values)(torch.tensor(t)), ref_piecewise(bounds, values)(t))
    joined = sch.join([sch.linear(v, v + 1.0, 7) for v in values], bounds)
    _close(joined(torch.tensor(t)), ref_join([ref_linear(v, v + 1.0, 7) for v in values], bounds)(t))


# --------------------------------------------------------------------------------------------------------------------
# Devices, dtypes, products
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_result_follows_the_step_device(name):
    sched, _ = CASES[name]
    assert sched(torch.tensor(3, device="meta")).device.type == "meta"
    on_meta = pytree.tree_map(lambda x: x.to("meta"), sched)
    assert on_meta(3).device.type == "meta"  # an int step goes to the leaves' device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CASES)
def test_cuda_step(name):
    sched, ref = CASES[name]
    on_gpu = pytree.tree_map(lambda x: x.cuda(), sched)
    out = on_gpu(torch.tensor(21, device="cuda"))
    assert out.device.type == "cuda"
    _close(out.cpu(), ref(21))


def test_products():
    lin = sch.linear(0.0, 1.0, 10)
    cos = sch.cosine(2.0, 0.0, 10)
    for prod in (lin * 3, 3 * lin, torch.tensor(3.0) * lin, lin * torch.tensor(3.0)):
        assert isinstance(prod, sch.product) and len(prod.factors) == 2
        _close(prod(4), 1.2)
    both = 2 * (lin * cos) * 0.5
    assert isinstance(both, sch.product)
    assert [type(f).__name__ for f in both.factors] == ["constant", "linear", "cosine", "constant"]  # flattened
    for t in (0, 3, 10, 20):
        _close(both(t), ref_linear(0.0, 1.0, 10)(t) * ref_cosine(2.0, 0.0, 10)(t))
    with pytest.raises(TypeError):
        lin * "2"
    with pytest.raises(TypeError):
        lin * True

    class Term:  # how the algebra layer receives `schedule * term`
        def __rmul__(self, other):
            return ("scaled", other)

    assert lin * Term() == ("scaled", lin)


def test_float64_leaves_give_float64_values():
    sched, ref = CASES["join-three"]
    wide = pytree.tree_map(lambda x: x.to(torch.float64), sched)
    assert all(x.dtype == torch.float64 for x in pytree.tree_leaves(wide))
    for t in STEPS:
        out = wide(torch.tensor(t))
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, torch.tensor(ref(t), dtype=torch.float64), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Pytree structure, equality, rebuilding from fields
# --------------------------------------------------------------------------------------------------------------------

TEMPERATURES = {"flsw": dk.temperature.flsw(4.0, 1.0, 2.0), "cwsm": dk.temperature.cwsm(4.0, 0.5)}
NODES = {**{k: v for k, (v, _) in CASES.items()}, **TEMPERATURES}


@pytest.mark.parametrize("name", NODES)
def test_pytree_round_trip(name):
    obj = NODES[name]
    leaves, spec = pytree.tree_flatten(obj)
    assert leaves and all(isinstance(x, torch.Tensor) and x.shape == () and x.dtype == torch.float32 for x in leaves)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is type(obj) and rebuilt == obj and hash(rebuilt) == hash(obj)
    doubled = pytree.tree_map(lambda x: x * 2, obj)
    assert doubled != obj and pytree.tree_structure(doubled) == spec
    paths = [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(obj)[0]]
    assert all(p.startswith(".") for p in paths), paths


def test_leaves_of_each_kind():
    names = lambda s: [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(s)[0]]  # noqa: E731
    assert names(sch.linear(1, 0, 5, begin=2)) == [".start", ".end", ".steps", ".begin"]
    assert names(sch.piecewise_constant([3], [1, 2])) == [".boundaries[0]", ".values[0]", ".values[1]"]
    joined = sch.join([sch.constant(1.0), sch.exponential(1, 0.5, 3)], [4])
    assert names(joined) == [".schedules[0].value", ".schedules[1].start", ".schedules[1].rate",
                             ".schedules[1].steps", ".boundaries[0]"]
    assert [float(x) for x in pytree.tree_leaves(joined)] == [1.0, 1.0, 0.5, 3.0, 4.0]


@pytest.mark.parametrize("name", NODES)
def test_rebuild_from_fields(name):
    obj = NODES[name]
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    assert type(obj)(**fields) == obj  # what a config layer does, with tensor-valued fields
    as_numbers = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
    assert type(obj)(**as_numbers) == obj
    assert name.split("-")[0] in repr(obj) or type(obj).__name__ in repr(obj)


def test_frozen_and_repr():
    lin = sch.linear(8.0, 2.0, steps=10_000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lin.start = torch.tensor(1.0)  # type: ignore[misc]
    assert repr(lin) == "linear(start=8, end=2, steps=10000, begin=0)"
    assert repr(sch.piecewise_constant([5], [0.5, 0.25])) == "piecewise_constant(boundaries=(5,), values=(0.5, 0.25))"
    assert sch.linear(8, 2, 10) == sch.linear(8.0, 2.0, 10.0) != sch.cosine(8, 2, 10)


# --------------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------------

BAD = [
    (lambda: sch.linear(1.0, 0.0, 0), ValueError, r"^linear: expected steps > 0, got 0\.$"),
    (lambda: sch.linear(1.0, 0.0, -3), ValueError, r"^linear: expected steps > 0, got -3\.$"),
    (lambda: sch.linear(1.0, 0.0, 2.5), ValueError, r"^linear: expected steps to be an integer, got 2\.5\.$"),
    (lambda: sch.linear(1.0, 0.0, 10, begin=-1), ValueError, r"^linear: expected begin >= 0, got -1\.$"),
    (lambda: sch.linear(float("nan"), 0.0, 10), ValueError, r"^linear: expected start to be a finite number"),
    (lambda: sch.linear(True, 0.0, 10), TypeError, r"^linear: expected start to be a number or a 0-d tensor, got bool"),
    (lambda: sch.linear("1", 0.0, 10), TypeError, r"^linear: expected start to be a number"),
    (lambda: sch.linear(torch.ones(2), 0.0, 10), TypeError, r"^linear: expected start to be a 0-d real tensor"),
    (lambda: sch.cosine(1.0, float("inf"), 10), ValueError, r"^cosine: expected end to be a finite number"),
    (lambda: sch.cosine(1.0, 0.0, 0), ValueError, r"^cosine: expected steps > 0, got 0\.$"),
    (lambda: sch.exponential(1.0, 0.0, 10), ValueError, r"^exponential: expected rate to be > 0"),
    (lambda: sch.exponential(1.0, -0.5, 10), ValueError, r"^exponential: expected rate to be > 0"),
    (lambda: sch.exponential(1.0, 0.5, 0), ValueError, r"^exponential: expected steps > 0"),
    (lambda: sch.constant(None), TypeError, r"^constant: expected value to be a number"),
    (lambda: sch.constant(torch.tensor(float("nan"))), ValueError, r"^constant: expected value to be a finite"),
    (lambda: sch.piecewise_constant([10, 5], [1, 2, 3]), ValueError,
     r"^piecewise_constant: expected strictly increasing boundaries, got \[10, 5\]\.$"),
    (lambda: sch.piecewise_constant([5, 5], [1, 2, 3]), ValueError, r"^piecewise_constant: expected strictly incr"),
    (lambda: sch.piecewise_constant([-1], [1, 2]), ValueError,
     r"^piecewise_constant: expected boundaries >= 0, got -1\.$"),
    (lambda: sch.piecewise_constant([1.5], [1, 2]), ValueError, r"^piecewise_constant: expected boundaries to be an i"),
    (lambda: sch.piecewise_constant([10], [1, 2, 3]), ValueError,
     r"^piecewise_constant: expected len\(values\) == len\(boundaries\) \+ 1 = 2, got 3\.$"),
    (lambda: sch.piecewise_constant(10, [1, 2]), TypeError, r"^piecewise_constant: expected boundaries to be a seq"),
    (lambda: sch.piecewise_constant([10], [1, False]), TypeError, r"^piecewise_constant: expected values to be a num"),
    (lambda: sch.join([sch.constant(1.0)], [10]), ValueError,
     r"^join: expected len\(schedules\) == len\(boundaries\) \+ 1 = 2, got 1\.$"),
    (lambda: sch.join([sch.constant(1.0), 2.0], [10]), TypeError,
     r"^join: expected every element of schedules to be a Schedule, got float\.$"),
    (lambda: sch.join([sch.constant(1.0), sch.constant(2.0)], [3, 1]), ValueError, r"^join: expected strictly incr"),
    (lambda: sch.linear_growth(0), ValueError, r"^linear_growth: expected total_steps > 0, got 0\.$"),
    (lambda: sch.linear_decay(-5), ValueError, r"^linear_decay: expected total_steps > 0, got -5\.$"),
    (lambda: sch.product([]), TypeError, r"^product: expected factors to be a non-empty sequence"),
    (lambda: sch.product([1.0]), TypeError, r"^product: expected every factor to be a Schedule"),
    (lambda: sch.linear(1, 0, 10)(torch.zeros(2)), ValueError, r"^linear: expected step to be an int or a 0-d tensor"),
    (lambda: sch.cosine(1, 0, 10)(torch.tensor(True)), TypeError, r"^cosine: expected step to be an integer or float"),
    (lambda: sch.constant(1)(None), TypeError, r"^constant: expected step to be an int or a 0-d tensor, got NoneType"),
    (lambda: sch.join([sch.constant(1.0)], [])("3"), TypeError, r"^join: expected step"),
    (lambda: sch.Schedule(), TypeError, r"abstract"),
    (lambda: dk.temperature.flsw(0.0, 1.0, 2.0), ValueError, r"^flsw: expected base to be > 0"),
    (lambda: dk.temperature.flsw(1.0, float("nan"), 2.0), ValueError, r"^flsw: expected beta to be a finite number"),
    (lambda: dk.temperature.flsw(1.0, 1.0, -2.0), ValueError, r"^flsw: expected gamma to be > 0"),
    (lambda: dk.temperature.flsw(1.0, 1.0, 2.0, eps=0), ValueError, r"^flsw: expected eps to be > 0"),
    (lambda: dk.temperature.cwsm(-1.0, 1.0), ValueError, r"^cwsm: expected base to be > 0"),
    (lambda: dk.temperature.cwsm(1.0, None), TypeError, r"^cwsm: expected beta to be a number"),
    (lambda: dk.temperature.flsw(1.0, 1.0, 2.0)(torch.zeros(2, 3), torch.zeros(2, 4)), ValueError,
     r"^flsw: expected student and teacher logits of the same shape"),
    (lambda: dk.temperature.cwsm(1.0, 1.0)(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)), TypeError,
     r"^cwsm: expected student logits to be a real floating-point tensor"),
    (lambda: dk.temperature.cwsm(1.0, 1.0)(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3)), ValueError,
     r"^cwsm: expected mask of shape \(2,\)"),
]


@pytest.mark.parametrize("call, exc, pattern", BAD, ids=[p for _, _, p in BAD])
def test_bad_arguments(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_accepts_tensor_and_integral_float_arguments():
    assert sch.linear(torch.tensor(1.0), torch.tensor(0), torch.tensor(10), begin=2.0) == sch.linear(1, 0, 10, 2)
    assert sch.piecewise_constant((torch.tensor(3),), [torch.tensor(1.5, dtype=torch.float64), 2]).values[0].dtype \
        == torch.float64


# --------------------------------------------------------------------------------------------------------------------
# Compilation: one graph for every step
# --------------------------------------------------------------------------------------------------------------------

S_LOGITS = torch.randn(6, 4, 11, generator=torch.Generator().manual_seed(0))
T_LOGITS = torch.randn(6, 4, 11, generator=torch.Generator().manual_seed(1))
MASK = torch.rand(6, 4, generator=torch.Generator().manual_seed(2)) > 0.3


def _everything(step: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor):
    values = [sched(step) for sched, _ in CASES.values()]
    temps = [temp(student, teacher, mask) for temp in TEMPERATURES.values()]
    return torch.stack(values), torch.stack(temps)


@pytest.mark.parametrize("step_dtype", [torch.int64, torch.float32])
def test_compiles_once_for_all_steps(step_dtype):
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(_everything, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in [*range(0, 120, 5), 10**6]:
            step = torch.tensor(t, dtype=step_dtype)
            student, teacher = S_LOGITS + 0.01 * t, T_LOGITS - 0.01 * t
            got = compiled(step, student, teacher, MASK)
            want = _everything(step, student, teacher, MASK)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got[0], torch.tensor([ref(t) for _, ref in CASES.values()]), rtol=1e-5,
                                       atol=1e-5)
    assert counter.frame_count == 1


def test_leaves_as_inputs_do_not_recompile():
    """What the step function does: flatten the schedules, pass the leaves in, rebuild inside the compiled core."""
    nodes = [sched for sched, _ in CASES.values()]
    leaves, spec = pytree.tree_flatten(nodes)

    def core(leaves, step):
        return torch.stack([sched(step) for sched in pytree.tree_unflatten(leaves, spec)])

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(core, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(0, 60, 3):
            new_leaves = [x * (1 + t / 1000) if i % 3 else x for i, x in enumerate(leaves)]  # values change
            step = torch.tensor(t)
            torch.testing.assert_close(compiled(new_leaves, step), core(new_leaves, step), rtol=1e-6, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# --------------------------------------------------------------------------------------------------------------------
# Adaptive temperatures
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 10), (3, 5, 17)])
@pytest.mark.parametrize("beta, gamma", [(1.0, 2.0), (0.5, 1.0), (2.0, 0.5)])
def test_flsw_matches_textbrewer(shape, beta, gamma):
    from textbrewer.schedulers import flsw_temperature_scheduler_builder

    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    ours = dk.temperature.flsw(4.0, beta, gamma)(s, t)
    theirs = flsw_temperature_scheduler_builder(beta, gamma)(s, t, 4.0)
    assert ours.shape == shape[:-1] and theirs.min() > dk.temperature.MIN_TEMPERATURE
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    eps = 1e-2
    torch.testing.assert_close(dk.temperature.flsw(4.0, beta, gamma, eps=eps)(s, t),
                               flsw_temperature_scheduler_builder(beta, gamma, eps)(s, t, 4.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(8, 10), (3, 5, 17)])
@pytest.mark.parametrize("beta", [1.0, 0.1, 3.0])
def test_cwsm_matches_textbrewer(shape, beta):
    from textbrewer.schedulers import cwsm_temperature_scheduler_builder

    gen = torch.Generator().manual_seed(4)
    s, t = 2 * torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    ours = dk.temperature.cwsm(8.0, beta)(s, t)
    theirs = cwsm_temperature_scheduler_builder(beta)(s, t, 8.0)
    assert theirs.min() > dk.temperature.MIN_TEMPERATURE
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def _ref_weights(kind, s, t, gamma=2.0, eps=1e-4):
    """Per-row weights in float64 plain Python, one row at a time."""
    rows_s, rows_t = s.double().reshape(-1, s.shape[-1]).tolist(), t.double().reshape(-1, t.shape[-1]).tolist()
    out = []
    for a, b in zip(rows_s, rows_t, strict=True):
        if kind == "flsw":
            na, nb = math.sqrt(sum(x * x for x in a)) + eps, math.sqrt(sum(x * x for x in b)) + eps
            out.append((1 - sum(x / na * y / nb for x, y in zip(a, b, strict=True))) ** gamma)
        else:
            m = max(a)
            out.append(1 / (1 / sum(math.exp(x - m) for x in a) + 1e-3))
    return out


@pytest.mark.parametrize("kind", ["flsw", "cwsm"])
def test_masked_mean_is_over_kept_rows(kind):
    gen = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 6, 9, generator=gen), torch.randn(4, 6, 9, generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.4
    base, beta = 5.0, 1.5
    temp = dk.temperature.flsw(base, beta, 2.0) if kind == "flsw" else dk.temperature.cwsm(base, beta)
    garbage = s.masked_fill(~mask.unsqueeze(-1), float("nan"))  # masked rows never reach kept ones
    for m in (mask, mask.int(), mask.float()):
        out = temp(garbage, t, mask=m)
        weights, keep = _ref_weights(kind, s, t), mask.reshape(-1).tolist()
        kept = [w for w, k in zip(weights, keep, strict=True) if k]
        mean = sum(kept) / len(kept)
        expected = [base + (mean - w) * beta if k else base for w, k in zip(weights, keep, strict=True)]
        assert out.isfinite().all()
        torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32).reshape(4, 6), rtol=1e-5,
                                   atol=1e-5)
    all_masked = temp(s, t, mask=torch.zeros(4, 6, dtype=torch.bool))
    torch.testing.assert_close(all_masked, torch.full((4, 6), base))
    torch.testing.assert_close(temp(s, t, mask=torch.ones(4, 6)), temp(s, t), rtol=1e-6, atol=1e-6)


def test_temperature_is_floored_and_detached():
    s = torch.randn(16, 7, requires_grad=True)
    t = torch.randn(16, 7)
    for temp in (dk.temperature.flsw(1.0, 1e4, 1.0), dk.temperature.cwsm(1.0, 1e4)):
        out = temp(s, t)
        assert not out.requires_grad
        assert out.min() == dk.temperature.MIN_TEMPERATURE and out.max() > 1.0
    half = dk.temperature.cwsm(2.0, 1.0)(s.detach().half(), t.half())
    assert half.dtype == torch.float32
    wide = dk.temperature.flsw(2.0, 1.0, 2.0)(s.detach().double(), t.double())
    assert wide.dtype == torch.float64
