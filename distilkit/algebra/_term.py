"""Terms and specs: which loss, on which outputs, with which options and weight — and their evaluation.

A :class:`Term` is static structure (loss, selectors, key names, projection) plus hyperparameters (floats,
tensors, schedules, adaptive temperatures). A :class:`Spec` is a sum of uniquely named terms. Evaluation is split
in two so that the step can compile the second half with ``fullgraph=True``:

* :func:`gather` (eager, Python): resolves selectors and ``mask=`` / ``labels=`` keys, with errors naming the term;
* :func:`evaluate` (pure tensor code): projections, schedules, adaptive temperatures, losses, weights, metrics.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..losses import probability_shift as _probability_shift
from ..schedules import Schedule
from ..schedules._temperature import AdaptiveTemperature
from ._loss import Loss
from ._proj import Projection


class SpecKeyError(KeyError):
    """A key a term needs is missing from the outputs or the batch (a ``KeyError`` with a readable message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------- selectors
def _selector(sel: Any, where: str) -> tuple:
    """Normalise a selector: ``"key"`` → ``("key",)``; ``("key", i)`` as is; a list of two → a pair of them."""
    if isinstance(sel, str):
        return (sel,)
    if (isinstance(sel, tuple) and len(sel) == 2 and isinstance(sel[0], str) and isinstance(sel[1], int)
            and not isinstance(sel[1], bool)):
        return sel
    if isinstance(sel, list) and len(sel) == 2:
        pair = tuple(_selector(s, where) for s in sel)
        if any(_is_pair(p) for p in pair):
            raise ValueError(f"{where}: expected a pair of simple selectors, got {sel!r}.")
        return pair
    raise ValueError(
        f"{where}: expected a selector: a key ('logits'), a (key, index) pair (('hidden', 3)) or, for pair losses, "
        f"a list of two of those, got {sel!r}."
    )


def _is_pair(sel: tuple) -> bool:
    return isinstance(sel[0], tuple)


def _indices(sel: tuple) -> str:
    if _is_pair(sel):
        return ",".join(_indices(s) for s in sel)
    return str(sel[1]) if len(sel) == 2 else ""


def _source(sel: tuple) -> str:
    """A selector as it would be written: ``'logits'``, ``('hidden', 3)``, ``[('hidden', 0), ('hidden', 1)]``."""
    if _is_pair(sel):
        return "[" + ", ".join(_source(s) for s in sel) + "]"
    return repr(sel[0]) if len(sel) == 1 else repr(sel)


def _short(value: Any) -> str:
    if isinstance(value, Projection):
        return f"dk.proj.{value.kind}({value.in_features}, {value.out_features})"
    if isinstance(value, Tensor) and value.ndim == 0:
        return f"tensor({value.item():.6g})" if value.device.type == "cpu" else "tensor(...)"
    return repr(value)


def _describe(sel: tuple) -> str:
    if _is_pair(sel):
        return "[" + ", ".join(_describe(s) for s in sel) + "]"
    return repr(sel[0]) if len(sel) == 1 else repr(sel)


# -------------------------------------------------------------------------------------------------- terms
_OPTION_TYPES = (int, float, bool, str, type(None), Tensor, Schedule)
_RESERVED = {"reduction": "the step reduces every term itself", "mask": "give mask= as a key name to .on()"}


@dataclass(frozen=True)
class Term:
    """``weight × loss(student[sel], teacher[sel], mask=batch[mask], **options)``.

    Build terms with ``dk.<loss>.on(student, teacher=None, *, mask=None, labels=None, proj=None,
    probability_shift=None, **options)``:

    * ``student`` / ``teacher``: selectors into the output mappings — a key (``"logits"``), a ``(key, index)`` pair
      (``("hidden", 3)``), or for pair losses (fsp, mmd) a list of two. ``teacher`` defaults to ``student``. A
      selected list (TextBrewer's list of logits) is summed over its elements.
    * ``mask`` / ``labels``: key names looked up in the batch, then the student outputs, then the teacher outputs.
      A key ending in ``?`` is optional: the term runs unmasked when it is absent.
    * ``proj``: a ``dk.proj.linear/relu/tanh`` applied to the student feature(s); parameters from
      ``dk.init_params(spec)``, keyed by the term's name.
    * ``probability_shift``: a labels key; the teacher logits are first passed through ``dk.probability_shift``.
    * ``options``: the loss's own options — numbers, tensors, schedules, and for ``temperature`` an adaptive
      temperature (``dk.temperature.flsw/cwsm``).

    Terms combine with ``+`` into a :class:`Spec`, scale with ``number * term`` or ``schedule * term`` and are
    renamed with ``.named(name)``.
    """

    loss: Loss
    student: tuple
    teacher: tuple | None
    mask: str | None
    labels: str | None
    proj: Projection | None
    probability_shift: str | None
    options: tuple[tuple[str, Any], ...]
    weight: tuple = ()  # factors: floats and schedules, multiplied
    name: str = ""

    @classmethod
    def of(cls, loss: Loss, student, teacher=None, *, mask=None, labels=None, proj=None, probability_shift=None,
           options: Mapping[str, Any] | None = None) -> Term:
        where = f"{loss.name}.on"
        student = _selector(student, where)
        if loss.inputs == "teacher":
            teacher = student if teacher is None else _selector(teacher, where)
            if _is_pair(student) != _is_pair(teacher):
                raise ValueError(f"{where}: expected student and teacher selectors of the same kind (both pairs or "
                                 f"both single), got {_describe(student)} and {_describe(teacher)}.")
            if _is_pair(student) and not loss.pair:
                raise ValueError(f"{where}: {loss.name} is not a pair loss; expected a single selector, got "
                                 f"{_describe(student)}.")
        elif teacher is not None:
            raise ValueError(f"{where}: {loss.name} takes no teacher outputs; got teacher={teacher!r}.")
        if loss.inputs == "labels":
            labels = "labels" if labels is None else labels
        for key_name, key in (("mask", mask), ("labels", labels), ("probability_shift", probability_shift)):
            if key is not None and (not isinstance(key, str) or not key.rstrip("?")):
                raise TypeError(f"{where}: expected {key_name} to be a key name (str), got {key!r}.")
        if mask is not None and not loss.masked:
            raise ValueError(f"{where}: {loss.name} takes no mask; got mask={mask!r}.")
        if labels is not None and loss.inputs != "labels":
            raise ValueError(f"{where}: {loss.name} takes no labels; got labels={labels!r}.")
        if probability_shift is not None and not loss.temperature:
            raise ValueError(f"{where}: probability_shift applies to logit losses, not {loss.name}.")
        if proj is not None and not isinstance(proj, Projection):
            raise TypeError(f"{where}: expected proj to be dk.proj.linear/relu/tanh(...), got {type(proj).__name__}.")
        options = dict(options or {})
        _check_options(loss, options, where)
        term = cls(loss, student, teacher, mask, labels, proj, probability_shift, tuple(sorted(options.items())))
        return replace(term, name=_default_name(term))

    # ---- algebra
    def named(self, name: str) -> Term:
        """This term under another name (names key the metrics and the projection parameters)."""
        return replace(self, name=_check_name(name, "Term.named"))

    def __add__(self, other) -> Spec:
        return Spec((self,)) + other

    def __radd__(self, other) -> Spec:
        if other == 0:  # sum([...]) starts from 0
            return Spec((self,))
        return NotImplemented

    def __mul__(self, factor) -> Term:
        return replace(self, weight=(*self.weight, _factor(factor, "Term * factor")))

    __rmul__ = __mul__

    def __truediv__(self, number) -> Term:
        if not isinstance(number, (int, float)) or isinstance(number, bool) or number == 0:
            raise TypeError(f"Term / number: expected a non-zero number, got {number!r}.")
        return self * (1.0 / number)

    def __repr__(self) -> str:
        args = [_source(self.student)]
        if self.teacher is not None and self.teacher != self.student:
            args.append(_source(self.teacher))
        keys = {"mask": self.mask, "labels": None if self.labels == "labels" else self.labels,
                "proj": self.proj, "probability_shift": self.probability_shift}
        args += [f"{k}={_short(v)}" for k, v in (*keys.items(), *self.options) if v is not None]
        text = f"dk.{self.loss.name}.on({', '.join(args)})"
        if self.name != _default_name(self):
            text += f".named({self.name!r})"
        return "".join(f"{_short(w)} * " for w in self.weight) + text

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)

    def all_terms(self) -> tuple[Term, ...]:
        return (self,)

    def to_config(self):
        """A one-term spec's ``dk.SpecConfig`` (the config layer is imported on first use)."""
        return Spec((self,)).to_config()


def _check_options(loss: Loss, options: dict, where: str) -> None:
    params = inspect.signature(loss.fn).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = sorted(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _RESERVED)
    for name, value in options.items():
        if name in _RESERVED:
            raise ValueError(f"{where}: option {name!r} cannot be given to a term: {_RESERVED[name]}.")
        if not open_ended and name not in known:
            raise ValueError(f"{where}: {loss.name} has no option {name!r}; expected one of {known}.")
        if isinstance(value, AdaptiveTemperature):
            if name != "temperature" or not loss.temperature:
                raise ValueError(f"{where}: an adaptive temperature can only be given as temperature= of a logit loss.")
        elif not isinstance(value, _OPTION_TYPES):
            raise TypeError(f"{where}: option {name}: expected a number, str, tensor or schedule, got "
                            f"{type(value).__name__}.")


def _factor(factor, where: str):
    if isinstance(factor, bool) or not isinstance(factor, (int, float, Schedule)):
        raise TypeError(f"{where}: expected a number or a schedule, got {type(factor).__name__}.")
    if isinstance(factor, (int, float)):
        if not math.isfinite(factor):
            raise ValueError(f"{where}: expected a finite weight, got {factor}.")
        return float(factor)
    return factor


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{where}: expected a non-empty name without '.', got {name!r}.")
    return name


def _default_name(term: Term) -> str:
    s = _indices(term.student)
    t = _indices(term.teacher) if term.teacher is not None else ""
    if not s and not t:
        return term.loss.name
    return f"{term.loss.name}/{s}-{t}" if term.teacher is not None else f"{term.loss.name}/{s}"


# -------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Spec:
    """A sum of uniquely named terms; the loss is ``Σ weight_i × loss_i``."""

    terms: tuple[Term, ...]

    def __post_init__(self):
        seen: set[str] = set()
        for t in self.terms:
            if not isinstance(t, Term):
                raise TypeError(f"Spec: expected terms, got {type(t).__name__}.")
            if t.name in seen:
                raise ValueError(
                    f"Spec: duplicate term name {t.name!r}; give one of them another name with .named('...')."
                )
            seen.add(t.name)

    def __add__(self, other) -> Spec:
        if isinstance(other, Term):
            return Spec((*self.terms, other))
        if isinstance(other, Spec):
            return Spec((*self.terms, *other.terms))
        return NotImplemented

    def __radd__(self, other) -> Spec:
        return self if other == 0 else NotImplemented

    def __mul__(self, factor) -> Spec:
        return Spec(tuple(t * factor for t in self.terms))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return "\n + ".join(repr(t) for t in self.terms) if self.terms else "Spec(())"

    def __iter__(self):
        return iter(self.terms)

    def __len__(self) -> int:
        return len(self.terms)

    def __getitem__(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(name)

    def all_terms(self) -> tuple[Term, ...]:
        return self.terms

    def to_config(self):
        """This spec as a ``dk.SpecConfig`` pydantic model (the config layer is imported on first use)."""
        from ..config import to_config

        return to_config(self)


def as_spec(spec, where: str):
    """A ``Spec`` (or ``Tasks``) from a term, spec or tasks node."""
    from ._multi import Tasks

    if isinstance(spec, Term):
        return Spec((spec,))
    if isinstance(spec, (Spec, Tasks)):
        return spec
    raise TypeError(f"{where}: expected a dk term or spec (e.g. dk.kd_ce.on('logits')), got {type(spec).__name__}.")


def layers(loss: Loss, mapping: Sequence, *, feature: str, proj: Projection | None = None, mask=None,
           **options) -> Spec:
    """One term per ``(student_layer, teacher_layer)`` entry of ``mapping``, on ``outputs[feature][layer]``.

    For pair losses (fsp, mmd) an entry may be ``((s0, s1), (t0, t1))``; a single index uses that layer twice.
    Every term gets its own projection (when ``proj`` is given) and the default name ``<loss>/<s>-<t>``.
    """
    if not isinstance(loss, Loss):
        raise TypeError(f"layers: expected a dk loss such as dk.hidden_mse, got {type(loss).__name__}.")
    if not isinstance(feature, str):
        raise TypeError(f"layers: expected feature to be an output key (str), got {feature!r}.")
    terms = []
    for entry in mapping:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"layers: expected (student_layer, teacher_layer) entries, got {entry!r}.")
        s, t = entry
        kinds = {isinstance(x, int) and not isinstance(x, bool) for x in (s, t)}
        if len(kinds) != 1:
            raise ValueError(f"layers: expected both layers of an entry to be ints or both pairs, got {entry!r}.")
        if kinds == {True}:
            s_sel, t_sel = (feature, s), (feature, t)
        else:
            if not loss.pair:
                raise ValueError(f"layers: layer pairs like {entry!r} need a pair loss (fsp, mmd), not {loss.name}.")
            s_sel, t_sel = ([(feature, i) for i in x] for x in (s, t))
        terms.append(loss.on(s_sel, t_sel, mask=mask, proj=proj, **options))
    return Spec(tuple(terms))


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


def _weight(term: Term, step: Tensor) -> Tensor:
    weight = torch.ones((), device=step.device)
    for factor in term.weight:
        weight = weight * _at(factor, step)
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


def _project(term: Term, module: Callable, x):
    if isinstance(x, tuple):
        return tuple(_project(term, module, xi) for xi in x)
    width = term.proj.in_features
    if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[-1] != width:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{term.loss.name}: expected student features of width {width} for the projection "
                         f"dk.proj.{term.proj.kind}({width}, {term.proj.out_features}), got {got}.")
    return module(x)


def _apply(term: Term, x: TermInputs, step: Tensor, params, counts: Mapping | None):
    """``(value, temperature)`` of one term (unweighted; summed over listed elements)."""
    loss = term.loss
    total, temperatures = 0.0, []
    base = {k: _at(v, step) for k, v in term.options}
    for e in _elements(x, term):
        student = _project(term, params[term.name], e.student) if term.proj is not None else e.student
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
        args = {"teacher": (student, teacher), "labels": (student, e.labels), "student": (student,)}[loss.inputs]
        key = _count_key(term)
        if counts is not None and key in counts and loss.sum_count is not None:
            total = total + _globally_normalised(loss.sum_count(*args, **options), e.mask, counts[key])
        else:
            total = total + loss(*args, **options)
    temperature = None
    if temperatures:
        temperature = sum(torch.as_tensor(t, device=step.device).float().mean() for t in temperatures)
        temperature = temperature / len(temperatures)
    return total, temperature


def _count_key(term: Term) -> str | None:
    """The key whose global count normalises ``term``: its mask, or for label losses its labels."""
    key = term.mask if term.mask is not None else term.labels
    return None if key is None else key.rstrip("?")


def _globally_normalised(sum_count: tuple[Tensor, Tensor], mask: Tensor | None, global_positions) -> Tensor:
    """``sum / (count per kept position × global kept positions)`` — the full-batch mean's share."""
    total, count = sum_count
    positions = count if mask is None else (mask != 0).sum().to(total.dtype)
    per_position = torch.where(positions > 0, count / positions.clamp_min(1), torch.ones_like(count))
    return total / (per_position * global_positions).clamp_min(torch.finfo(total.dtype).tiny)


def evaluate(spec: Spec, inputs: Mapping[str, TermInputs], step: Tensor, params=None,
             counts: Mapping[str, Any] | None = None, name_errors: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """``(loss, metrics)`` of ``spec`` on gathered inputs. Pure tensor code (compiled by the step).

    ``counts`` maps a mask key to the number of kept positions of the whole optimizer step (all micro-batches,
    divided by the data-parallel world size): terms masked by that key are normalised by it instead of locally.
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
        weighted = weight * value
        loss = weighted if loss is None else loss + weighted
        metrics[f"{term.name}/loss"] = value.detach()
        metrics[f"{term.name}/weight"] = weight.detach()
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
