"""Applying a spec to one batch: the pure core :func:`loss_fn`, in two halves so that the step can compile the
second with ``fullgraph=True``:

* :func:`gather` (Python): resolves selectors and ``mask=`` / ``labels=`` keys, with errors naming the term;
* :func:`evaluate` (pure tensor code): projections, schedules, adaptive temperatures, losses, weights, metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..losses import probability_shift as _probability_shift
from ..losses._reduce import COUNT_KINDS, count_units
from ..schedules import Schedule
from ..schedules._temperature import AdaptiveTemperature
from ._multi import Tasks, terms_of
from ._proj import check_params
from ._term import Spec, SpecKeyError, Term, _is_pair, as_spec

Metrics = dict[str, Tensor]


# -------------------------------------------------------------------------------------------------- gather
class TermInputs(NamedTuple):
    """What one term reads: tensors, pairs (tuple) or lists (summed over)."""

    student: Any
    teacher: Any
    mask: Any
    labels: Any
    shift: Any


def _lookup_output(outputs: Mapping, sel: tuple, side: str, term: Term):
    if _is_pair(sel):
        return tuple(_lookup_output(outputs, s, side, term) for s in sel)
    if not isinstance(outputs, Mapping):
        raise TypeError(f"{term.loss.name} (term '{term.name}'): expected the {side} outputs to be a mapping "
                        f"(e.g. a dict or dk.adapters.hf(...)), got {type(outputs).__name__}.")
    key = sel[0]
    if key not in outputs:
        raise SpecKeyError(f"{term.loss.name} (term '{term.name}'): expected key {key!r} in the {side} outputs, "
                           f"got keys {sorted(map(str, outputs))}.")
    value = outputs[key]
    if len(sel) == 1:
        return list(value) if isinstance(value, (list, tuple)) else value
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{term.loss.name} (term '{term.name}'): expected {side} outputs[{key!r}] to be a list or "
                        f"tuple of layers to index with {sel[1]}, got {type(value).__name__}.")
    if not -len(value) <= sel[1] < len(value):
        raise SpecKeyError(f"{term.loss.name} (term '{term.name}'): layer index {sel[1]} is out of range for "
                           f"{side} outputs[{key!r}], which has {len(value)} layers.")
    return value[sel[1]]


def _lookup_key(key: str | None, batch, student_out, teacher_out, term: Term, what: str):
    if key is None:
        return None
    optional = key.endswith("?")
    name = key.rstrip("?")
    for source in (batch, student_out, teacher_out):
        if isinstance(source, Mapping) and name in source:
            value = source[name]
            return list(value) if isinstance(value, (list, tuple)) else value
    if optional:
        return None
    raise SpecKeyError(f"{term.loss.name} (term '{term.name}'): expected {what} key {name!r} in the batch, the "
                       "student outputs or the teacher outputs; it is in none of them.")


def gather(spec: Spec, student_out, teacher_out, batch) -> dict[str, TermInputs]:
    """Resolve what every term reads (eager; errors name the term)."""
    inputs = {}
    for term in spec.terms:
        student = _lookup_output(student_out, term.student, "student", term)
        teacher = None if term.teacher is None else _lookup_output(teacher_out, term.teacher, "teacher", term)
        inputs[term.name] = TermInputs(
            student, teacher,
            _lookup_key(term.mask, batch, student_out, teacher_out, term, "mask"),
            _lookup_key(term.labels, batch, student_out, teacher_out, term, "labels"),
            _lookup_key(term.probability_shift, batch, student_out, teacher_out, term, "probability_shift labels"),
        )
    return inputs


# ------------------------------------------------------------------------------------------------ evaluate
def _at(value, step: Tensor):
    return value(step) if isinstance(value, Schedule) else value


def _weight(term: Term, step: Tensor) -> Tensor | float | None:
    """The product of the term's weight factors at ``step``; ``None`` without factors (the value is then used as it
    is: under inductor a constant ``ones() * value`` returned beside ``value.detach()`` loses its grad)."""
    weight = None
    for factor in term.weight:
        value = _at(factor, step)
        weight = value if weight is None else weight * value
    return weight


def _elements(x: TermInputs, term: Term) -> list[TermInputs]:
    """The (student, teacher, mask, labels, shift) tuples to sum over: one, or one per listed element."""
    if not isinstance(x.student, list):
        return [x]
    n = len(x.student)

    def spread(value, what: str) -> list:
        if not isinstance(value, list):
            return [value] * n
        if len(value) == 1:
            return value * n
        if len(value) != n:
            raise ValueError(f"{term.loss.name} (term '{term.name}'): expected {what} to list 1 or {n} entries "
                             f"(one per selected tensor), got {len(value)}.")
        return value

    return [TermInputs(*row) for row in zip(*(spread(v, w) for v, w in zip(
        x, ("student outputs", "teacher outputs", "masks", "labels", "labels"), strict=True)), strict=True)]


def _project(term: Term, params, x):
    if isinstance(x, tuple):
        return tuple(_project(term, params, xi) for xi in x)
    width = term.proj.in_features
    if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[-1] != width:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{term.loss.name}: expected student features of width {width} for the projection "
                         f"dk.proj.{term.proj.kind}({width}, {term.proj.out_features}), got {got}.")
    return term.proj.apply(params, term.name, x)


def _apply(term: Term, x: TermInputs, step: Tensor, params, counts: Mapping | None):
    """``(value, temperature)`` of one term (unweighted; summed over listed elements)."""
    loss = term.loss
    total, temperatures = None, []
    base = {k: _at(v, step) for k, v in term.options}
    for e in _elements(x, term):
        student = _project(term, params, e.student) if term.proj is not None else e.student
        teacher = e.teacher
        if term.probability_shift is not None:
            teacher = _probability_shift(teacher, e.shift)
        options = dict(base)
        if isinstance(options.get("temperature"), AdaptiveTemperature):
            options["temperature"] = options["temperature"](student, teacher, mask=e.mask)
        if loss.temperature:
            temperatures.append(options.get("temperature", 1.0))
        if e.mask is not None:
            options["mask"] = e.mask
        if loss.inputs == "teacher" and e.labels is not None:  # a teacher loss that also takes labels (fused)
            options["labels"] = e.labels
        args = {"teacher": (student, teacher), "labels": (student, e.labels), "student": (student,)}[loss.inputs]
        key = count_key(term)
        if counts is not None and key in counts and loss.sum_count is not None:
            part, count = loss.sum_count(*args, **options)
            # the units the count is a multiple of, from the mask alone (label losses: the count itself)
            units = count if term.mask is None else count_units(count_kind(loss), e.mask)
            value = _globally_normalised(_loss_of(part), count, units, counts[key])
        else:
            value = _loss_of(loss(*args, **options))
        total = value if total is None else total + value  # (no 0.0 + value: forward AD would make it float64)
    if total is None:  # an empty list of selected tensors
        total = torch.zeros((), device=step.device)
    temperature = None
    if temperatures:
        temperature = sum(torch.as_tensor(t, device=step.device).float().mean() for t in temperatures)
        temperature = temperature / len(temperatures)
    return total, temperature


def _loss_of(value):
    """A loss may return a named tuple whose ``loss`` field is the value (and the rest parts for its caller, e.g.
    ``dk.fused_linear_kd`` with labels); a term takes that field."""
    return value.loss if isinstance(value, tuple) and hasattr(value, "loss") else value


def count_kind(loss) -> str:
    """The units ``loss``'s count is a constant multiple of (:data:`~distilkit.losses._reduce.COUNT_KINDS`): what its
    function declares as ``count_kind``, else ``"tokens"`` (kept positions)."""
    kind = getattr(loss.fn, "count_kind", "tokens")
    if kind not in COUNT_KINDS:
        raise ValueError(f"{loss.name}: expected its count_kind to be one of {tuple(COUNT_KINDS)}, got {kind!r}.")
    return kind


def count_key(term: Term) -> str | None:
    """The ``counts`` key whose global count normalises ``term``: its mask key, with ``@<kind>`` appended when its
    loss counts other units than kept positions (``"attention_mask@pairs"``); for label losses its labels key."""
    if term.mask is not None:
        key, kind = term.mask.rstrip("?"), count_kind(term.loss)
        return key if kind == "tokens" else f"{key}@{kind}"
    return None if term.labels is None else term.labels.rstrip("?")


def _globally_normalised(total: Tensor, count: Tensor, units: Tensor, global_units) -> Tensor:
    """``sum / (count per unit × global units)`` — the full-batch mean's share. The count per unit is the same in
    every micro-batch (a width, a number of heads, or 1), so the result sums over micro-batches (and, as DDP averages,
    over ranks: the global units are divided by the world size) to ``Σ sum / full-batch count``."""
    units = units.to(total.dtype)
    per_unit = torch.where(units > 0, count / units.clamp_min(1), torch.ones_like(count))
    return total / (per_unit * global_units).clamp_min(torch.finfo(total.dtype).tiny)


def evaluate(spec: Spec, inputs: Mapping[str, TermInputs], step: Tensor, params=None,
             counts: Mapping[str, Any] | None = None, name_errors: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """``(loss, metrics)`` of ``spec`` on gathered inputs. Pure tensor code (compiled by the step).

    ``counts`` maps a counts key (:func:`count_key`) to the units of the whole optimizer step (all micro-batches,
    divided by the data-parallel world size): terms normalised by that key divide their sum by it instead of locally.
    """
    loss = None
    metrics: dict[str, Tensor] = {}
    for term in spec.terms:
        try:
            value, temperature = _apply(term, inputs[term.name], step, params, counts)
        except (ValueError, TypeError, KeyError) as error:
            if not name_errors:
                raise
            raise _named(error, term) from error
        weight = _weight(term, step)
        weighted = value if weight is None else weight * value
        loss = weighted if loss is None else loss + weighted
        metrics[f"{term.name}/loss"] = value.detach()
        metrics[f"{term.name}/weight"] = (torch.ones((), device=step.device) if weight is None
                                          else torch.as_tensor(weight, device=step.device).detach())
        if temperature is not None:
            metrics[f"{term.name}/temperature"] = temperature.detach()
    if loss is None:
        loss = torch.zeros((), device=step.device)
    metrics["loss"] = loss.detach()
    return loss, metrics


def _named(error: Exception, term: Term) -> Exception:
    message = str(error)
    api = term.loss.name
    if f"(term '{term.name}')" in message:
        return error
    if message.startswith(f"{api}:"):
        message = f"{api} (term '{term.name}'):" + message[len(api) + 1:]
    else:
        message = f"{api} (term '{term.name}'): {message}"
    cls = SpecKeyError if isinstance(error, KeyError) else type(error)
    return cls(message)


# ------------------------------------------------------------------------------------------------- the pure core
def loss_fn(spec) -> Callable[..., tuple[Tensor, Metrics]]:
    """The spec's loss as a pure function ``f(student_out, teacher_out, batch=None, *, step=0, params=None,
    counts=None) -> (loss, metrics)``.

    No hidden state: the same arguments give the same result, so ``f`` composes with ``torch.func`` (``grad``,
    ``vmap``, ``jvp``, ``functional_call``) and ``torch.compile`` like any tensor function. ``dk.make_step`` is this
    function with eager validation and a compiled core.

    Args:
        spec: a term, a spec (``term + term``) or ``dk.tasks(...)``.

    The returned function takes:
        student_out, teacher_out: output mappings (``{"logits": ..., "hidden": [...], ...}``).
        batch: extra inputs looked up by ``mask=`` / ``labels=`` keys (and the task key of ``dk.tasks``).
        step: the optimizer step (int or 0-d tensor) at which schedules are evaluated.
        params: the projections' parameters: ``dk.init_params(spec)`` or a mapping of its tensors (as
            ``dict(params.named_parameters())`` or ``torch.func.functional_call`` give).
        counts: global normalisation — ``{counts key: units of the whole optimizer step per rank}``, as
            ``dk.distributed.global_counts(micro_batches, spec=spec)`` computes them. The key is the term's mask
            key (kept positions), ``"<mask key>@samples"`` / ``"@pairs"`` / ``"@first"`` / ``"@rows"`` for losses
            that average over other units (nst; attention_mse, mmd; pkd; fsp), or its labels key for label
            losses. Every term of a spec that can be normalised must find its key (else a ``KeyError``); terms
            without a mask or labels key are averaged over their own micro-batch.

    It returns the weighted total ``loss`` and ``metrics``: 0-d detached tensors ``loss`` and, per term,
    ``<name>/loss`` (unweighted), ``<name>/weight`` and ``<name>/temperature`` (logit losses).
    """
    spec = as_spec(spec, "loss_fn")

    def loss(student_out: Mapping, teacher_out: Mapping, batch: Mapping | None = None, *, step: int | Tensor = 0,
             params=None, counts: Mapping[str, Any] | None = None) -> tuple[Tensor, Metrics]:
        chosen, inputs, step_t, counts_t = prepare(spec, student_out, teacher_out, batch, step, params, counts,
                                                   "loss_fn")
        return evaluate(chosen, inputs, step_t, params, counts_t, name_errors=True)

    loss.spec = spec  # type: ignore[attr-defined]
    return loss


def prepare(spec: Spec | Tasks, student_out, teacher_out, batch, step, params, counts, where: str):
    """The eager half: the task's spec, its gathered inputs, and ``step`` / ``counts`` as tensors on their device."""
    batch = {} if batch is None else batch
    chosen = spec.spec_for(batch) if isinstance(spec, Tasks) else spec
    inputs = gather(chosen, student_out, teacher_out, batch)
    device = input_device(inputs)
    check_params(where, chosen.terms, params)
    if isinstance(counts, Mapping):
        used = {count_key(t) for t in terms_of(spec) if t.loss.sum_count is not None}  # any task's
        unused = sorted(str(k) for k in counts if k not in used)
        if unused:
            raise KeyError(f"{where}: counts has keys {unused} that no term is normalised by; expected keys among "
                           f"{sorted(k for k in used if k is not None)} (the mask= or labels= keys of the terms, "
                           "with '@<kind>' for losses that count other units than kept positions).")
        for term in chosen.terms:
            check_counted(term, inputs[term.name], counts)
    return chosen, inputs, step_tensor(step, device, where), count_tensors(counts, device, where)


def check_counted(term: Term, x: TermInputs, counts: Mapping) -> None:
    """Refuse what global normalisation cannot make exact for ``term``: a missing counts key, a mask that counts
    cannot describe (both ``mask=`` and ``labels=``), an optional mask absent from this batch."""
    key = count_key(term)
    api = f"{term.loss.name} (term '{term.name}')"
    if key is None or term.loss.sum_count is None:
        return  # averaged over its own micro-batch (documented)
    if term.mask is not None and term.labels is not None and term.loss.inputs != "labels":
        raise ValueError(f"{api}: cannot be normalised globally with both mask= and labels=: it averages over the "
                         "positions its mask keeps *and* that have a label, which no counts key counts. Give "
                         f"labels={term.labels!r} only (with ignore_index where {term.mask.rstrip('?')!r} drops a "
                         f"position) and counts[{term.labels.rstrip('?')!r}].")
    if term.mask is not None and x.mask is None:  # an optional mask ("key?") absent from this batch
        if key in counts:
            raise ValueError(f"{api}: its optional mask {term.mask.rstrip('?')!r} is absent from this batch, so "
                             f"counts[{key!r}] does not count its units; put the mask in every micro-batch, or "
                             "leave the key out of counts (the term is then averaged over its micro-batch).")
        return
    if key not in counts:
        kind = "tokens" if term.mask is None else count_kind(term.loss)
        what = "positions with a label" if term.mask is None else COUNT_KINDS[kind]
        raise SpecKeyError(f"{api}: expected counts[{key!r}]: the {what} of the whole optimizer step (per rank), "
                           f"which {term.loss.name} averages over; compute every key with "
                           "dk.distributed.global_counts(micro_batches, spec=spec).")


def tensors_of(inputs: Mapping[str, TermInputs]):
    """Every tensor the gathered inputs hold, in order (a plain walk: much cheaper than a pytree flatten)."""
    stack = list(reversed(list(inputs.values())))
    while stack:
        x = stack.pop()
        if isinstance(x, Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            stack.extend(reversed(x))


def input_device(inputs: Mapping[str, TermInputs]) -> torch.device:
    return next((x.device for x in tensors_of(inputs)), torch.device("cpu"))


def step_tensor(step, device: torch.device, where: str) -> Tensor:
    if isinstance(step, Tensor):
        if step.ndim != 0:
            raise ValueError(f"{where}: expected step to be an int or a 0-d tensor, got shape {tuple(step.shape)}.")
        return step.to(device)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"{where}: expected step to be an int or a 0-d tensor, got {type(step).__name__}.")
    return torch.tensor(step, device=device)


def count_tensors(counts, device: torch.device, where: str) -> dict[str, Tensor] | None:
    if counts is None:
        return None
    if not isinstance(counts, Mapping):
        raise TypeError(f"{where}: expected counts to be a mapping {{mask key: count}}, got {type(counts).__name__}.")
    out = {}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
            raise TypeError(f"{where}: expected counts[{key!r}] to be a number or 0-d tensor, got {value!r}.")
        value = torch.as_tensor(value, dtype=torch.float32).to(device)
        if value.ndim != 0:
            raise ValueError(f"{where}: expected counts[{key!r}] to be 0-d, got shape {tuple(value.shape)}.")
        out[key] = value
    return out
