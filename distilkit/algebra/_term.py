"""Terms and specs: which loss, on which outputs, with which options and weight.

A :class:`Term` is static structure (loss, selectors, key names, projection, options that are ints, bools or strings,
its name) plus hyperparameters (float options, tensors, schedules, adaptive temperatures, weights). A :class:`Spec` is
a sum of uniquely named terms. Both are pytrees: the hyperparameters are the leaves, everything else is the static
structure, and equality and hashing are structural (``tree_equal`` / ``tree_hash``), so a spec rebuilt from its
config is ``==`` to the original and hashes the same. How a spec is applied to a batch lives in ``_evaluate.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor
from torch.utils import _pytree as pytree

from ..losses._checks import values_readable
from ..schedules import Schedule
from ..schedules._schedule import tree_equal, tree_hash
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


@dataclass(frozen=True, eq=False)
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
    weight: tuple = ()  # factors: floats, 0-d tensors and schedules, multiplied
    name: str = ""
    #: the options that are pytree leaves (hyperparameters), fixed when the term is built: structure, so that a tree
    #: whose leaves were replaced by anything (vmap's in_dims, tracers) flattens the same way.
    leaf_options: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.leaf_options is None:
            object.__setattr__(self, "leaf_options",
                               tuple(name for name, value in self.options if _is_leaf_option(value)))

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
        if labels is not None and loss.inputs != "labels" and "labels" not in loss.keywords:
            raise ValueError(f"{where}: {loss.name} takes no labels; got labels={labels!r}.")
        if probability_shift is not None and not loss.temperature:
            raise ValueError(f"{where}: probability_shift applies to logit losses, not {loss.name}.")
        if proj is not None and not isinstance(proj, Projection):
            raise TypeError(f"{where}: expected proj to be dk.proj.linear/relu/tanh(...), got {type(proj).__name__}.")
        options = _check_options(loss, dict(options or {}), where)
        options = tuple(sorted(options.items(), key=lambda item: item[0]))  # by name (values may be tensors)
        term = cls(loss, student, teacher, mask, labels, proj, probability_shift, options)
        return replace(term, name=_default_name(term))

    def __eq__(self, other: object) -> bool:
        return tree_equal(self, other) if isinstance(other, Term) else NotImplemented

    def __hash__(self) -> int:
        return tree_hash(self)

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


def _is_leaf_option(value: Any) -> bool:
    """Hyperparameters (pytree leaves, tensors in a compiled step) as opposed to static options (ints, bools, str)."""
    return isinstance(value, (float, Tensor, Schedule, AdaptiveTemperature))


def _flatten_term(term: Term) -> tuple[list[Any], tuple]:
    leaf_names = term.leaf_options
    static = tuple((name, value) for name, value in term.options if name not in leaf_names)
    children = [value for name, value in term.options if name in leaf_names] + list(term.weight)
    context = (term.loss, term.student, term.teacher, term.mask, term.labels, term.proj, term.probability_shift,
               static, leaf_names, len(term.weight), term.name)
    return children, context


def _unflatten_term(children: Any, context: tuple) -> Term:
    loss, student, teacher, mask, labels, proj, shift, static, leaf_names, _, name = context
    children = list(children)
    k = len(leaf_names)
    options = tuple(sorted((*static, *zip(leaf_names, children[:k], strict=True)), key=lambda item: item[0]))
    term = object.__new__(Term)  # no checks: leaves may be tracers, batched tensors or other dtypes
    for field, value in (("loss", loss), ("student", student), ("teacher", teacher), ("mask", mask),
                         ("labels", labels), ("proj", proj), ("probability_shift", shift), ("options", options),
                         ("weight", tuple(children[k:])), ("name", name), ("leaf_options", leaf_names)):
        object.__setattr__(term, field, value)
    return term


def _check_options(loss: Loss, options: dict, where: str) -> dict:
    """Check the options against the loss's signature. An int given for an option whose default is a float becomes
    a float (a hyperparameter: a leaf of the spec, a tensor in a compiled step); a 0-d integer tensor becomes an int
    (structure, such as ``num_heads``)."""
    known = sorted(n for n in loss.keywords if n not in _RESERVED)
    for name, value in options.items():
        if name in _RESERVED:
            raise ValueError(f"{where}: option {name!r} cannot be given to a term: {_RESERVED[name]}.")
        if not loss.open_ended and name not in known:
            raise ValueError(f"{where}: {loss.name} has no option {name!r}; expected one of {known}.")
        if isinstance(value, AdaptiveTemperature):
            if name != "temperature" or not loss.temperature:
                raise ValueError(f"{where}: an adaptive temperature can only be given as temperature= of a logit loss.")
        elif not isinstance(value, _OPTION_TYPES):
            raise TypeError(f"{where}: option {name}: expected a number, str, tensor or schedule, got "
                            f"{type(value).__name__}.")
        default = loss.keywords.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(default, float):
            options[name] = float(value)
        elif (isinstance(value, Tensor) and value.ndim == 0 and not (value.is_floating_point() or value.is_complex())
              and values_readable(value)):
            options[name] = value.item()  # an integer or bool option is structure (num_heads), as its config reads
    return options


def _factor(factor, where: str):
    if isinstance(factor, Tensor):  # a 0-d tensor weight: a leaf like a number (batched under vmap, or learnable)
        if factor.ndim != 0 or not factor.is_floating_point():
            raise TypeError(f"{where}: expected a weight tensor to be 0-d and floating, got shape "
                            f"{tuple(factor.shape)}, dtype {factor.dtype}.")
        return factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float, Schedule)):
        raise TypeError(f"{where}: expected a number, a 0-d tensor or a schedule, got {type(factor).__name__}.")
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
@dataclass(frozen=True, eq=False)
class Spec:
    """A sum of uniquely named terms; the loss is ``Σ weight_i × loss_i``. A pytree whose children are its terms."""

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

    def __eq__(self, other: object) -> bool:
        return tree_equal(self, other) if isinstance(other, Spec) else NotImplemented

    def __hash__(self) -> int:
        return tree_hash(self)


def _unflatten_spec(children: Any, context: None) -> Spec:
    spec = object.__new__(Spec)
    object.__setattr__(spec, "terms", tuple(children))
    return spec


pytree.register_pytree_node(Term, _flatten_term, _unflatten_term, serialized_type_name="distilkit.Term")
pytree.register_pytree_node(Spec, lambda spec: (list(spec.terms), None), _unflatten_spec,
                            serialized_type_name="distilkit.Spec")


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
