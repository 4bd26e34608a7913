"""Global normalisation is exact for every registered loss (issue 12, item 3).

A batch of 6 samples is split into uneven micro-batches — one sample, two fully masked samples, no sample at all,
three samples — and each micro-batch's step is normalised by ``dk.distributed.global_counts(micro_batches,
spec=term)``: the accumulated value and gradients equal the full batch's (float64). Each check can fail: the usual
accumulation of local means, and (for losses that count other units than kept positions) the kept-position count
the step used to apply to every loss, both miss the full-batch gradient on this data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest
import torch
from tester import CASES, F64, Case, leaves

import distilkit as dk
from distilkit.losses._reduce import COUNT_KINDS

B = 6
MICRO = ([0], [1, 2], [], [3, 4, 5])  # uneven; samples 1 and 2 fully masked; one micro-batch holds no sample
MASK_BL = torch.tensor([[1, 1, 1, 1, 1],
                        [0, 0, 0, 0, 0],
                        [0, 0, 0, 0, 0],
                        [0, 1, 1, 0, 1],  # position 0 dropped, others kept: "first" ≠ "samples"
                        [1, 0, 0, 0, 0],
                        [1, 1, 0, 1, 0]], dtype=torch.bool)
MASK_B = torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool)
#: losses without a mask= or labels= key: nothing to count, averaged over their own micro-batch (documented)
UNCOUNTED = {"precomputed"}
RTOL, ATOL = 1e-9, 1e-12


@dataclass
class GCase:
    """One term on full-batch outputs ``{key: value}`` whose values hold the batch on dim 0 (except ``shared`` keys,
    e.g. an output layer's weight, used whole by every micro-batch)."""

    id: str
    loss: str  # registry name
    term: Callable[[], dk.Term]
    student: dict
    teacher: dict
    batch: dict
    shared: tuple[str, ...] = ()
    deprecated: bool = False
    grads: list = field(default_factory=list)


def _cat(make: Callable, gen: torch.Generator):
    """``case.make`` twice, concatenated along the batch: B = 6 (the tester's B is 3)."""
    (s1, t1), (s2, t2) = make(gen), make(gen)

    def join(a, b):
        return tuple(torch.cat(p) for p in zip(a, b, strict=True)) if isinstance(a, tuple) else torch.cat((a, b))

    return join(s1, s2), join(t1, t2)


def _selector(x) -> object:
    return [("x", 0), ("x", 1)] if isinstance(x, tuple) else "x"


def _wrap(x) -> dict:
    return {"x": list(x) if isinstance(x, tuple) else x}


def _requiring_grad(x):
    return tuple(_requiring_grad(v) for v in x) if isinstance(x, tuple) else (
        x.detach().clone().requires_grad_(x.is_floating_point()))


def _from_case(case: Case) -> GCase | None:
    if any(torch.is_tensor(v) and v.ndim > 0 for v in case.options.values()):
        return None  # a per-row option is data, not a spec constant (kd_ce-2d-rowT: the other kd_ce cases cover it)
    gen = torch.Generator().manual_seed(hash(case.id) % 2**31)
    student, teacher = _cat(case.make, gen)
    student = _requiring_grad(student)
    mask = MASK_B if case.mask_shape == (3,) else MASK_BL
    name, options = case.name, dict(case.options)
    if case.labels:
        labels = torch.where(mask, teacher, -100)
        return GCase(case.id, name, lambda: getattr(dk, name).on("x", labels="y", **options), _wrap(student), {},
                     {"y": labels})
    if case.path == "chunked":
        options.update(impl="chunked", chunk_size=2)
    if case.path == "topk":
        v = teacher.shape[-1]
        teacher = dk.TopK(torch.arange(v).expand(teacher.shape), torch.log_softmax(teacher, -1))
    if case.path == "fused":
        w = _requiring_grad(torch.randn(7, student.shape[-1], generator=gen, dtype=F64))
        wt = torch.randn(7, teacher.shape[-1], generator=gen, dtype=F64)
        return GCase(case.id, "fused_linear_kd",
                     lambda: dk.fused_linear_kd.on(["h", "w"], mask="m", divergence=name, **options),
                     {"h": student, "w": w}, {"h": teacher, "w": wt}, {"m": mask}, shared=("w",))
    return GCase(case.id, name, lambda: getattr(dk, name).on(_selector(student), mask="m", **options),
                 _wrap(student), _wrap(teacher), {"m": mask})


def _extra_cases() -> list[GCase]:
    """What the tester's cases do not reach: the deprecated aliases, and fused KD + CE normalised by its labels."""
    out = []
    gen = torch.Generator().manual_seed(11)
    logits = lambda: torch.randn(B, 5, 6, generator=gen, dtype=F64) * 2  # noqa: E731
    for alias in ("chunked_kd_ce", "chunked_kd_kl", "chunked_reverse_kl", "chunked_jsd", "chunked_skew_kl",
                  "chunked_tvd"):
        s, t = _requiring_grad(logits()), logits()
        out.append(GCase(alias, alias, lambda a=alias: getattr(dk, a).on("x", mask="m", temperature=2.0, chunk_size=4),
                         {"x": s}, {"x": t}, {"m": MASK_BL}, deprecated=True))
    for alias in ("sparse_kd_ce", "sparse_kd_kl", "sparse_reverse_kl", "sparse_jsd", "sparse_skew_kl", "sparse_tvd"):
        s, z = _requiring_grad(logits()), logits()
        top = {"indices": torch.arange(6).expand(z.shape), "logprobs": torch.log_softmax(z, -1)}
        out.append(GCase(alias, alias, lambda a=alias: getattr(dk, a).on("x", mask="m", temperature=2.0,
                                                                           policy="renormalize"),
                         {"x": s}, {"x": top}, {"m": MASK_BL}, deprecated=True))
    h, w = _requiring_grad(torch.randn(B, 5, 4, generator=gen, dtype=F64)), _requiring_grad(
        torch.randn(6, 4, generator=gen, dtype=F64))
    ht, wt = torch.randn(B, 5, 3, generator=gen, dtype=F64), torch.randn(6, 3, generator=gen, dtype=F64)
    labels = torch.where(MASK_BL, torch.randint(0, 6, (B, 5), generator=gen), -100)
    labels[0, 4] = -100  # a kept position without a label
    out.append(GCase("fused_linear_kd-labels", "fused_linear_kd",
                     lambda: dk.fused_linear_kd.on(["h", "w"], labels="y", ce_weight=0.5, temperature=2.0),
                     {"h": h, "w": w}, {"h": ht, "w": wt}, {"y": labels}, shared=("w",)))
    return out


GCASES = [g for g in map(_from_case, CASES) if g is not None] + _extra_cases()


def _take(value, rows: list[int]):
    index = torch.tensor(rows, dtype=torch.long)
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    if isinstance(value, list):
        return [_take(v, rows) for v in value]
    if isinstance(value, dk.TopK):
        return dk.TopK(_take(value.indices, rows), _take(value.logprobs, rows))
    if isinstance(value, Mapping):
        return {k: _take(v, rows) for k, v in value.items()}
    raise TypeError(type(value))


def _micro(g: GCase, rows: list[int]) -> tuple[dict, dict, dict]:
    def part(d: dict) -> dict:
        return {k: v if k in g.shared else _take(v, rows) for k, v in d.items()}

    return part(g.student), part(g.teacher), part(g.batch)


def _params(g: GCase) -> list[torch.Tensor]:
    return [x for v in g.student.values() for x in leaves(tuple(v) if isinstance(v, list) else v)
            if x.requires_grad]


def _value_and_grads(g: GCase, f, calls) -> tuple[torch.Tensor, list[torch.Tensor]]:
    total = sum(f(*args, **kwargs)[0] for args, kwargs in calls)
    return total.detach(), list(torch.autograd.grad(total, _params(g), allow_unused=True, materialize_grads=True))


def _accumulate(g: GCase, f, counts) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return _value_and_grads(g, f, [(_micro(g, rows), {"counts": counts}) for rows in MICRO])


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-6, atol=1e-9) for x, y in zip(a, b, strict=True))


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def test_every_registered_loss_is_covered():
    covered = {g.loss for g in GCASES}
    from distilkit.algebra import _loss  # the built-in losses (other tests register their own in this process)

    builtin = {name for name, loss in _loss.REGISTRY.items() if getattr(_loss, name, None) is loss}
    assert covered | UNCOUNTED == builtin, builtin - covered - UNCOUNTED


@pytest.mark.parametrize("g", GCASES, ids=[g.id for g in GCASES])
def test_uneven_micro_batches_with_global_counts_give_the_full_batch(g: GCase):
    term = g.term()
    f = dk.loss_fn(term)
    full_value, full_grads = _value_and_grads(g, f, [((g.student, g.teacher, g.batch), {})])
    assert any(x.abs().max() > 0 for x in full_grads), "a zero gradient proves nothing"
    micro_batches = [_micro(g, rows)[2] for rows in MICRO]
    counts = dk.distributed.global_counts(micro_batches, spec=term)
    value, grads = _accumulate(g, f, counts)
    torch.testing.assert_close(value, full_value, rtol=RTOL, atol=ATOL)
    for got, want in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)

    # The test can fail: accumulating local means (loss / micro-batches) misses the full batch's gradient ...
    _, naive = _value_and_grads(g, f, [(_micro(g, rows), {}) for rows in MICRO])
    assert not _close([x / len(MICRO) for x in naive], full_grads)
    # ... and so does the count of kept positions for a loss that averages over other units (the old behaviour).
    (key,) = counts
    name, _, kind = key.partition("@")
    if kind and g.batch[name].ndim > 1:  # (a [B] mask has one position per sample: "first" is kept positions there)
        tokens = dk.distributed.global_counts(micro_batches, masks=[name])[name]
        assert tokens != counts[key]
        _, wrong = _accumulate(g, f, {key: tokens})
        assert not _close(wrong, full_grads)


def _kind_of(g: GCase) -> str:
    return dk.algebra._evaluate.count_kind(g.term().loss)


def test_the_count_kinds():
    kinds = {g.loss: _kind_of(g) for g in GCASES}
    assert {k: v for k, v in kinds.items() if v != "tokens"} == {
        "pkd": "first", "attention_mse": "pairs", "fsp": "rows", "mmd": "pairs", "nst": "samples"}
    m = MASK_BL
    units = {kind: dk.losses._reduce.count_units(kind, m).item() for kind in COUNT_KINDS}
    assert units == {"tokens": 12, "samples": 4, "pairs": 25 + 9 + 1 + 9, "first": 3, "rows": 6}
    assert {kind: dk.losses._reduce.count_units(kind, MASK_B).item() for kind in COUNT_KINDS} == {
        "tokens": 3, "samples": 3, "pairs": 3, "first": 3, "rows": 6}
    empty = torch.zeros(0, 5, dtype=torch.bool)
    assert all(dk.losses._reduce.count_units(kind, empty).item() == 0 for kind in COUNT_KINDS)


# ------------------------------------------------------------------------------------------ through make_step
def _spec_of_every_kind():
    return (dk.hidden_mse.on("h", mask="m")
            + dk.nst.on("h", mask="m")
            + dk.mmd.on("h", mask="m")
            + dk.pkd.on("h", mask="m")
            + dk.fsp.on([("hs", 0), ("hs", 1)], mask="m")
            + dk.attention_mse.on("a", mask="m")
            + dk.hard_ce.on("z", labels="y"))


@pytest.mark.parametrize("compile", [False, "aot_eager"], ids=["eager", "compiled"])
def test_a_spec_of_every_kind_through_make_step(compile):
    gen = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=F64)  # noqa: E731
    student = {"h": r(B, 5, 4), "hs": [r(B, 5, 4), r(B, 5, 3)], "a": r(B, 2, 5, 5), "z": r(B, 5, 6)}
    student = {k: [x.requires_grad_() for x in v] if isinstance(v, list) else v.requires_grad_()
               for k, v in student.items()}
    teacher = {"h": r(B, 5, 4), "hs": [r(B, 5, 4), r(B, 5, 3)], "a": r(B, 2, 5, 5)}
    batch = {"m": MASK_BL, "y": torch.where(MASK_BL, torch.randint(0, 6, (B, 5), generator=gen), -100)}
    spec = _spec_of_every_kind()
    g = GCase("spec", "spec", lambda: spec, student, teacher, batch)
    step = dk.make_step(spec, compile=compile)

    def f(*args, **kwargs):
        return (step(*args, **kwargs).loss,)

    full_value, full_grads = _value_and_grads(g, f, [((student, teacher, batch), {})])
    counts = dk.distributed.global_counts([_micro(g, rows)[2] for rows in MICRO], spec=spec)
    assert sorted(counts) == ["m", "m@first", "m@pairs", "m@rows", "m@samples", "y"]
    value, grads = _accumulate(g, f, counts)
    torch.testing.assert_close(value, full_value, rtol=RTOL, atol=ATOL)
    for got, want in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------- the API
def test_explicit_keys_equal_the_spec_keys():
    batches = [{"m": MASK_BL[rows], "y": torch.where(MASK_BL[rows], 1, -100)} for rows in MICRO]
    by_spec = dk.distributed.global_counts(batches, spec=_spec_of_every_kind())
    explicit = dk.distributed.global_counts(
        batches, masks=["m", "m@samples", "m@pairs", "m@first", "m@rows"], labels=["y"])
    assert by_spec == explicit
    assert {k: v.item() for k, v in explicit.items()} == {
        "m": 12, "m@samples": 4, "m@pairs": 44, "m@first": 3, "m@rows": 6, "y": 12}


def test_a_missing_kind_is_refused_naming_the_term_and_the_key():
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    f = dk.loss_fn(dk.hidden_mse.on("h", mask="m") + dk.mmd.on("h", mask="m"))
    with pytest.raises(KeyError, match=r"mmd \(term 'mmd'\): expected counts\['m@pairs'\]: the kept \(i, j\) "
                                       r"position pairs .*global_counts\(micro_batches, spec=spec\)"):
        f({"h": s}, {"h": t}, {"m": MASK_BL[:2]}, counts={"m": 7})
    # a kept-position count given for a loss that needs another kind is a key no term uses
    with pytest.raises(KeyError, match=r"counts has keys \['m'\] that no term is normalised by; expected keys "
                                       r"among \['m@pairs'\]"):
        dk.loss_fn(dk.mmd.on("h", mask="m"))({"h": s}, {"h": t}, {"m": MASK_BL[:2]}, counts={"m": 7})


def test_every_term_of_the_spec_needs_its_count():
    s, t = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    f = dk.loss_fn(dk.kd_kl.on("z", mask="m") + dk.hard_ce.on("z", labels="y"))
    batch = {"m": MASK_BL[:2], "y": torch.zeros(2, 5, dtype=torch.long)}
    with pytest.raises(KeyError, match=r"hard_ce \(term 'hard_ce'\): expected counts\['y'\]: the positions with "
                                       "a label"):
        f({"z": s}, {"z": t}, batch, counts={"m": 7})


def test_mask_and_labels_together_are_refused():
    h, w = torch.randn(2, 5, 4), torch.randn(6, 4)
    term = dk.fused_linear_kd.on(["h", "w"], mask="m", labels="y").named("fused")
    batch = {"m": MASK_BL[:2], "y": torch.zeros(2, 5, dtype=torch.long)}
    for compile in (False, "aot_eager"):
        with pytest.raises(ValueError, match=r"fused_linear_kd \(term 'fused'\): cannot be normalised "
                                             r"globally with both mask= and labels=.* labels='y' only"):
            dk.make_step(term, compile=compile)({"h": h, "w": w}, {"h": h, "w": w}, batch, counts={"m": 7})


def test_an_optional_mask_is_counted_only_where_present():
    spec = dk.nst.on("h", mask="m?")
    present, absent = {"m": MASK_BL[:2]}, {}
    assert dk.distributed.global_counts([absent, absent], spec=spec) == {}  # the term is then averaged locally
    counts = dk.distributed.global_counts([present, absent], spec=spec)
    assert counts == {"m@samples": torch.tensor(1.0)}
    s = torch.randn(2, 5, 4)
    f = dk.loss_fn(spec)
    f({"h": s}, {"h": s}, present, counts=counts)
    with pytest.raises(ValueError, match=r"nst \(term 'nst'\): its optional mask 'm' is absent from this batch"):
        f({"h": s}, {"h": s}, absent, counts=counts)
    f({"h": s}, {"h": s}, absent, counts={})  # no key: averaged over the micro-batch


def test_tasks_count_each_micro_batch_for_its_own_task():
    spec = dk.tasks({"a": dk.pkd.on("h", mask="m"), "b": dk.kd_kl.on("z", mask="n")})
    batches = [{"task": "a", "m": MASK_BL[:3]}, {"task": "b", "n": MASK_BL[3:]}]
    counts = dk.distributed.global_counts(batches, spec=spec)
    assert {k: v.item() for k, v in counts.items()} == {"m@first": 1, "n": 7}


def test_a_label_term_is_counted_with_its_own_ignore_index():
    spec = dk.hard_ce.on("z", labels="y", ignore_index=-1)
    y = torch.tensor([[0, -1, -100, 2]])
    assert dk.distributed.global_counts([{"y": y}], spec=spec)["y"].item() == 3
    assert dk.distributed.global_counts([{"y": y}], labels=["y"])["y"].item() == 3  # != -100


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"masks": ["m@tokens"]}, ValueError, r"global_counts: expected 'm' for kept positions"),
    ({"masks": ["m@heads"]}, ValueError, r"global_counts: expected a mask key 'name' or 'name@kind' with kind one of"),
    ({"labels": ["y@pairs"]}, ValueError, r"global_counts: expected label keys to be plain key names"),
    ({"masks": ["y"], "labels": ["y"]}, ValueError, r"global_counts: key 'y' is asked for as a mask counting tokens "
                                                    r"and as labels"),
    ({}, ValueError, r"global_counts: expected spec= or at least one key"),
    ({"masks": ["q"]}, KeyError, r"global_counts: expected key 'q' in micro-batch 0"),
])
def test_global_counts_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        dk.distributed.global_counts([{"m": MASK_BL, "y": MASK_BL.long()}], **kwargs)


# --------------------------------------------------------------------- zero-size inputs (issue 12, item 4)
def _zero_size_inputs(name: str, b: int, length: int, d: int):
    gen = torch.Generator().manual_seed(5)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=F64)  # noqa: E731
    if name.startswith("attention"):
        return r(b, 2, length, length), r(b, 2, length, length), {"inputs": "logits"} if name == "attention_kl" else {}
    if name == "relation_kl":
        return r(b, length, 2 * d), r(b, length, 2 * d), {"num_heads": 2}
    if name == "fsp":
        return (r(b, length, d), r(b, length, d + 1)), (r(b, length, d), r(b, length, d + 1)), {}
    return r(b, length, d), r(b, length, d), {}


ZERO_SIZE_LOSSES = ["hidden_mse", "cosine", "pkd", "attention_kl", "attention_mse", "attention_ce", "relation_kl",
                    "fsp", "mmd", "nst"]
#: (loss, which size is 0) refused with a ValueError: no [CLS] position, or a division by the width
REFUSED = {("cosine", "width"): "expected features of width ≥ 1",
           ("pkd", "length"): "expected student features with at least one position",
           ("relation_kl", "width"): "expected student features of width ≥ 1",
           ("mmd", "width"): "expected student features of width ≥ 1",
           ("nst", "width"): "expected student features of width ≥ 1"}


ZERO_SIZE_CASES = [(name, zero) for name in ZERO_SIZE_LOSSES for zero in ("batch", "length", "width")
                   if not (zero == "width" and name.startswith("attention"))]  # (attention maps have no width)


@pytest.mark.parametrize("compile", [False, "aot_eager"], ids=["eager", "compiled"])
@pytest.mark.parametrize(("name", "zero"), ZERO_SIZE_CASES, ids=[f"{n}-{z}" for n, z in ZERO_SIZE_CASES])
def test_zero_size_inputs_give_zero_or_a_clear_error(name, zero, compile):
    """Eager: the loss itself, with and without a mask; compiled: a masked term through ``dk.make_step`` (which
    validates eagerly, so errors name the term)."""
    b, length, d = {"batch": (0, 4, 3), "length": (2, 0, 3), "width": (2, 4, 0)}[zero]
    student, teacher, options = _zero_size_inputs(name, b, length, d)
    masks = [torch.ones(b, length, dtype=torch.bool)] if compile else [None, torch.ones(b, length, dtype=torch.bool)]
    for mask in masks:
        s = _requiring_grad(student)
        if compile:
            term = getattr(dk, name).on(_selector(s), mask=None if mask is None else "m", **options)
            step = dk.make_step(term, compile=compile)
            call = lambda s=s, step=step, mask=mask: step(_wrap(s), _wrap(teacher), {"m": mask}).loss  # noqa: E731
        else:
            call = lambda s=s, mask=mask: getattr(dk.losses, name)(s, teacher, mask=mask, **options)  # noqa: E731
        if (name, zero) in REFUSED:
            term_name = rf" \(term '{name}'\)" if compile else ""
            with pytest.raises(ValueError, match=f"{name}{term_name}: {REFUSED[name, zero]}"):
                call()
            continue
        value = call()
        assert value.item() == 0.0
        grads = torch.autograd.grad(value, list(leaves(s)), allow_unused=True, materialize_grads=True)
        assert all((g == 0).all() for g in grads)
