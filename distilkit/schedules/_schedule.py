"""Schedules: ``step -> 0-d tensor`` values for weights and temperatures that change during training.

A schedule is a frozen dataclass whose numbers are 0-d tensors (pytree *leaves*) and whose kind and nesting are
static (the pytree *structure*), as in optax (``optax/schedules/_schedule.py``, ``_join.py``), except that a schedule
is data rather than a closure: it can be moved with ``tree_map``, flattened into leaves for a compiled function and
rebuilt from its fields. Evaluation is branch-free tensor math (``clamp``, ``lerp``, ``where``), so a step given
as a tensor never causes a host synchronisation or a recompilation under ``torch.compile(fullgraph=True)``.

Steps are compared as floating-point numbers in the leaves' dtype (float32 by default): exact up to 2**24 steps.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ..losses._checks import values_readable

_N = TypeVar("_N", bound=type)


# --------------------------------------------------------------------------------------------------------------------
# Pytree nodes
# --------------------------------------------------------------------------------------------------------------------


class Node:
    """Common behaviour of schedules and adaptive temperatures: readable repr and structural equality.

    Two nodes are equal when :func:`tree_equal` says so (same kind and structure, equal leaf values, device ignored),
    so that a node rebuilt from its configuration equals the original. Hashing follows equality.
    """

    def _items(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{name}={_show(v)}' for name, v in self._items())})"

    def __eq__(self, other: object) -> bool:
        return tree_equal(self, other) if type(other) is type(self) else NotImplemented

    def __hash__(self) -> int:
        return tree_hash(self)


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return f"({', '.join(_show(v) for v in value)}{',' if len(value) == 1 else ''})"
    if isinstance(value, Tensor) and value.ndim == 0 and value.device.type != "meta":
        try:
            return f"{float(value):.7g}"
        except RuntimeError:  # fake or functional tensors while tracing
            pass
    return repr(value)


def _same_leaf(a: object, b: object) -> bool:
    """Leaves are equal when they hold the same numbers: two tensors of one dtype, shape and values (device ignored),
    or a Python number and a 0-d tensor holding that number in the tensor's dtype (what a config round trip gives)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu())
    if isinstance(b, Tensor):
        a, b = b, a
    if isinstance(a, Tensor):
        if a.ndim != 0 or isinstance(b, bool) or not isinstance(b, numbers.Real):
            return False
        return bool(torch.tensor(b, dtype=a.dtype) == a.detach().cpu())
    return type(a) is type(b) and a == b


def tree_equal(a: object, b: object) -> bool:
    """Structural equality of pytrees: the same static structure and equal leaves (see :func:`_same_leaf`)."""
    mine, my_spec = pytree.tree_flatten(a)
    theirs, their_spec = pytree.tree_flatten(b)
    return my_spec == their_spec and all(_same_leaf(x, y) for x, y in zip(mine, theirs, strict=True))


def tree_hash(x: object) -> int:
    """A hash that follows :func:`tree_equal`: the static structure and the leaves' shapes, never their values (so
    hashing reads nothing from a device, and a number hashes like the 0-d tensor that equals it)."""
    leaves, spec = pytree.tree_flatten(x)
    return hash((str(spec), tuple(tuple(v.shape) if isinstance(v, Tensor) else () for v in leaves)))


def node(cls: _N) -> _N:
    """Make ``cls`` a frozen dataclass and register it as a pytree whose children are its fields, in order.

    Unflattening bypasses ``__init__`` (and its checks), so leaves may be replaced by anything — other dtypes,
    devices, or tracer tensors inside a compiled function. Uses ``torch.utils._pytree.register_pytree_node``, which
    torch >= 2.6 has with the same keyword arguments (``register_dataclass`` would rebuild through ``__init__``).
    """
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))

    def flatten(obj: Any) -> tuple[list[Any], tuple[str, ...]]:
        return [getattr(obj, n) for n in names], names

    def unflatten(children: Any, context: tuple[str, ...]) -> Any:
        obj = object.__new__(cls)
        for i, child in enumerate(children):  # (no zip: traced by dynamo, also on older versions)
            object.__setattr__(obj, context[i], child)
        return obj

    extra: dict[str, Any] = {}
    if hasattr(pytree, "GetAttrKey"):
        extra["flatten_with_keys_fn"] = lambda obj: ([(pytree.GetAttrKey(n), getattr(obj, n)) for n in names], names)
    pytree.register_pytree_node(
        cls, flatten, unflatten, serialized_type_name=f"distilkit.{cls.__name__}", **extra
    )
    return cls


# --------------------------------------------------------------------------------------------------------------------
# Argument checks (construction time, Python values; tensor values only when on the CPU, where reading costs no sync)
# --------------------------------------------------------------------------------------------------------------------


def number(api: str, name: str, value: object, check: Callable[[float], bool] = math.isfinite,
           what: str = "a finite number") -> Tensor:
    """A real number or 0-d real tensor as a 0-d floating tensor leaf (float32, or float64 when given so)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{api}: expected {name} to be a number or a 0-d tensor, got {type(value).__name__}.")
    if isinstance(value, Tensor):
        if value.ndim != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"{api}: expected {name} to be a 0-d real tensor, got shape {tuple(value.shape)}, dtype {value.dtype}."
            )
        leaf = value.detach().to(torch.float64 if value.dtype == torch.float64 else torch.float32).clone()
        if values_readable(leaf) and not check(float(leaf)):
            raise ValueError(f"{api}: expected {name} to be {what}, got {float(leaf)}.")
        return leaf
    leaf = torch.tensor(float(value), dtype=torch.float32)
    if not (check(float(value)) and check(float(leaf))):  # the second catches overflow to inf in float32
        raise ValueError(f"{api}: expected {name} to be {what}, got {value}.")
    return leaf


MAX_STEP = 2**24
"""Steps are compared in float32, which holds every integer up to 2**24 exactly."""


def integer(api: str, name: str, value: object, minimum: int) -> Tensor:
    """An integral number (``int``, an integral float, or a 0-d tensor) in ``[minimum, 2**24]``, as a float leaf."""
    bound = "> 0" if minimum == 1 else f">= {minimum}"
    leaf = number(api, name, value, lambda v: math.isfinite(v) and v == int(v), "an integer")
    if values_readable(leaf) and not minimum <= float(leaf) <= MAX_STEP:
        shown = int(value) if isinstance(value, numbers.Real) else int(float(leaf))
        limit = f"{bound}" if float(leaf) < minimum else "<= 2**24 (steps are exact in float32 up to there)"
        raise ValueError(f"{api}: expected {name} {limit}, got {shown}.")
    return leaf


def boundaries(api: str, value: object) -> tuple[Tensor, ...]:
    """Strictly increasing non-negative integer step boundaries, as a tuple of leaves."""
    if isinstance(value, (str, bytes, Tensor)) or not isinstance(value, Sequence):
        raise TypeError(f"{api}: expected boundaries to be a sequence of integers, got {type(value).__name__}.")
    leaves = tuple(integer(api, "boundaries", b, 0) for b in value)
    read = [float(b) for b in leaves if values_readable(b)]
    if len(read) == len(leaves) and any(b >= c for b, c in itertools.pairwise(read)):
        raise ValueError(f"{api}: expected strictly increasing boundaries, got {[int(b) for b in read]}.")
    return leaves


def set_fields(obj: object, **fields: object) -> None:
    for name, value in fields.items():
        object.__setattr__(obj, name, value)


# --------------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------------


def as_step(api: str, step: object, like: Tensor | None) -> Tensor:
    """``step`` as a 0-d floating tensor in ``like``'s dtype (float32 when ``like`` is None).

    A tensor step keeps its device; a Python number is put on ``like``'s device (the CPU when ``like`` is None).
    """
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    if isinstance(step, Tensor):
        if step.ndim != 0:
            raise ValueError(f"{api}: expected step to be an int or a 0-d tensor, got shape {tuple(step.shape)}.")
        if step.dtype == torch.bool or step.is_complex():
            raise TypeError(f"{api}: expected step to be an integer or floating-point tensor, got dtype {step.dtype}.")
        return step.detach().to(dtype)
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(f"{api}: expected step to be an int or a 0-d tensor, got {type(step).__name__}.")
    return torch.tensor(float(step), dtype=dtype, device=None if like is None else like.device)


def _on(x: Tensor, s: Tensor) -> Tensor:
    return x.to(s.device)


# --------------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------------


class Schedule(Node, abc.ABC):
    """Base class: ``schedule(step)`` returns the value at ``step`` as a 0-d tensor.

    ``step`` is a Python int or a 0-d integer/floating tensor on any device; the result is a 0-d tensor in the
    leaves' dtype (float32 unless the leaves were mapped to another dtype) on the step's device (the leaves' device
    for a Python int). Pass the step as a tensor inside compiled code: a Python int is a constant there.

    ``schedule * number``, ``number * schedule`` and ``schedule * schedule`` give a :class:`product`.
    """

    @abc.abstractmethod
    def __call__(self, step: int | Tensor) -> Tensor:
        """The value at ``step`` (subclasses convert it with :func:`as_step`)."""

    def __mul__(self, other: object) -> product:
        factors = _factors(other)
        if factors is None:
            return NotImplemented
        return product((*_factors(self), *factors))  # type: ignore[misc]

    def __rmul__(self, other: object) -> product:
        factors = _factors(other)
        if factors is None:
            return NotImplemented
        return product((*factors, *_factors(self)))  # type: ignore[misc]


def _factors(x: object) -> tuple[Schedule, ...] | None:
    if isinstance(x, product):
        return x.factors
    if isinstance(x, Schedule):
        return (x,)
    if (isinstance(x, numbers.Real) and not isinstance(x, bool)) or (isinstance(x, Tensor) and x.ndim == 0):
        return (constant(x),)
    return None


@node
class constant(Schedule):
    """The same ``value`` at every step."""

    value: Tensor

    def __post_init__(self):
        set_fields(self, value=number("constant", "value", self.value))

    def __call__(self, step):
        s = as_step("constant", step, self.value)
        return _on(self.value, s).clone()


@node
class linear(Schedule):
    r"""Linear interpolation from ``start`` to ``end`` over ``steps`` steps, starting at step ``begin``.

    ``value = start + (end − start) · clamp((step − begin) / steps, 0, 1)``: ``start`` before ``begin``, ``end``
    from ``begin + steps`` on (optax ``linear_schedule`` with ``transition_begin``). Both ends are exact.
    """

    start: Tensor
    end: Tensor
    steps: Tensor
    begin: Tensor = 0  # type: ignore[assignment]

    def __post_init__(self):
        set_fields(self, start=number("linear", "start", self.start), end=number("linear", "end", self.end),
             steps=integer("linear", "steps", self.steps, 1), begin=integer("linear", "begin", self.begin, 0))

    def __call__(self, step):
        s = as_step("linear", step, self.start)
        progress = ((s - _on(self.begin, s)) / _on(self.steps, s)).clamp(0, 1)
        return torch.lerp(_on(self.start, s), _on(self.end, s), progress)


@node
class cosine(Schedule):
    r"""Cosine interpolation from ``start`` to ``end`` over ``steps`` steps, starting at step ``begin``.

    ``value = end + (start − end) · ½ (1 + cos(π p))`` with ``p = clamp((step − begin) / steps, 0, 1)``
    (Loshchilov & Hutter, 2017, "SGDR", arXiv:1608.03983; optax ``cosine_decay_schedule`` with
    ``end = alpha · start``): ``start`` before ``begin``, ``end`` from ``begin + steps`` on.
    """

    start: Tensor
    end: Tensor
    steps: Tensor
    begin: Tensor = 0  # type: ignore[assignment]

    def __post_init__(self):
        set_fields(self, start=number("cosine", "start", self.start), end=number("cosine", "end", self.end),
             steps=integer("cosine", "steps", self.steps, 1), begin=integer("cosine", "begin", self.begin, 0))

    def __call__(self, step):
        s = as_step("cosine", step, self.start)
        progress = ((s - _on(self.begin, s)) / _on(self.steps, s)).clamp(0, 1)
        weight = 0.5 * (1 + torch.cos(math.pi * progress))
        return torch.lerp(_on(self.end, s), _on(self.start, s), weight)


@node
class exponential(Schedule):
    r"""Exponential decay (or growth) ``value = start · rate^(step / steps)``, continuous (no staircase).

    optax ``exponential_decay`` with ``transition_steps = steps``; steps below 0 give ``start``. ``rate > 0``.
    """

    start: Tensor
    rate: Tensor
    steps: Tensor

    def __post_init__(self):
        set_fields(self, start=number("exponential", "start", self.start),
             rate=number("exponential", "rate", self.rate, lambda v: math.isfinite(v) and v > 0, "> 0 (and finite)"),
             steps=integer("exponential", "steps", self.steps, 1))

    def __call__(self, step):
        s = as_step("exponential", step, self.start)
        return _on(self.start, s) * torch.pow(_on(self.rate, s), s.clamp_min(0) / _on(self.steps, s))


@node
class piecewise_constant(Schedule):
    r"""``values[i]`` for ``boundaries[i−1] <= step < boundaries[i]`` (``values[0]`` before the first boundary,
    ``values[-1]`` from the last one on).

    ``len(values) == len(boundaries) + 1``; boundaries are strictly increasing non-negative integers. Unlike optax's
    ``piecewise_constant_schedule`` the values are absolute, not multiplicative scales; the boundary convention is
    that of optax ``join_schedules`` (a boundary step belongs to the segment it starts).
    """

    boundaries: tuple[Tensor, ...]
    values: tuple[Tensor, ...]

    def __post_init__(self):
        api = "piecewise_constant"
        bounds = boundaries(api, self.boundaries)
        if isinstance(self.values, (str, bytes, Tensor)) or not isinstance(self.values, Sequence):
            raise TypeError(f"{api}: expected values to be a sequence of numbers, got {type(self.values).__name__}.")
        if len(self.values) != len(bounds) + 1:
            raise ValueError(
                f"{api}: expected len(values) == len(boundaries) + 1 = {len(bounds) + 1}, got {len(self.values)}."
            )
        set_fields(self, boundaries=bounds, values=tuple(number(api, "values", v) for v in self.values))

    def __call__(self, step):
        s = as_step("piecewise_constant", step, self.values[0])
        out = _on(self.values[0], s)
        for i, bound in enumerate(self.boundaries):
            out = torch.where(s < _on(bound, s), out, _on(self.values[i + 1], s))
        return out.clone() if not self.boundaries else out


@node
class join(Schedule):
    r"""Schedule ``i`` on ``boundaries[i−1] <= step < boundaries[i]``, called with ``step − boundaries[i−1]``.

    optax ``join_schedules``: e.g. ``join([linear(0, 1, 100), cosine(1, 0, 900)], [100])`` warms up for 100 steps
    and then decays, the second schedule seeing step 0 at global step 100. ``len(schedules) == len(boundaries) + 1``.
    Every schedule is evaluated (branch-free) and the right one is selected.
    """

    schedules: tuple[Schedule, ...]
    boundaries: tuple[Tensor, ...]

    def __post_init__(self):
        api = "join"
        if not isinstance(self.schedules, Sequence) or isinstance(self.schedules, (str, bytes)):
            raise TypeError(f"{api}: expected schedules to be a sequence of schedules, "
                            f"got {type(self.schedules).__name__}.")
        for sched in self.schedules:
            if not isinstance(sched, Schedule):
                raise TypeError(f"{api}: expected every element of schedules to be a Schedule, "
                                f"got {type(sched).__name__}.")
        bounds = boundaries(api, self.boundaries)
        if len(self.schedules) != len(bounds) + 1:
            raise ValueError(f"{api}: expected len(schedules) == len(boundaries) + 1 = {len(bounds) + 1}, "
                             f"got {len(self.schedules)}.")
        set_fields(self, schedules=tuple(self.schedules), boundaries=bounds)

    def __call__(self, step):
        s = as_step("join", step, self.boundaries[0] if self.boundaries else None)
        out = self.schedules[0](s)
        for i, bound in enumerate(self.boundaries):
            b = _on(bound, s)
            out = torch.where(s < b, out, self.schedules[i + 1](s - b))
        return out


@node
class linear_growth(Schedule):
    r"""TextBrewer's ``linear_growth_weight_scheduler``: ``x`` with ``x = clamp(step / total_steps, 0, 1)``.

    TextBrewer calls its scheduler with ``global_step / total_steps`` and does not clamp; here ``x`` is clamped to
    [0, 1], so the weight stays 1 after ``total_steps``.
    """

    total_steps: Tensor

    def __post_init__(self):
        set_fields(self, total_steps=integer("linear_growth", "total_steps", self.total_steps, 1))

    def __call__(self, step):
        s = as_step("linear_growth", step, self.total_steps)
        return (s / _on(self.total_steps, s)).clamp(0, 1)


@node
class linear_decay(Schedule):
    r"""TextBrewer's ``linear_decay_weight_scheduler``: ``1 − x`` with ``x = clamp(step / total_steps, 0, 1)``.

    TextBrewer does not clamp; here the weight stays 0 after ``total_steps`` (it never turns negative).
    """

    total_steps: Tensor

    def __post_init__(self):
        set_fields(self, total_steps=integer("linear_decay", "total_steps", self.total_steps, 1))

    def __call__(self, step):
        s = as_step("linear_decay", step, self.total_steps)
        return 1 - (s / _on(self.total_steps, s)).clamp(0, 1)


@node
class product(Schedule):
    """The product of ``factors`` (schedules) at each step; what ``schedule * number`` and ``schedule * schedule``
    build (nested products are flattened, numbers become :class:`constant`)."""

    factors: tuple[Schedule, ...]

    def __post_init__(self):
        if not isinstance(self.factors, Sequence) or isinstance(self.factors, (str, bytes)) or not self.factors:
            raise TypeError(f"product: expected factors to be a non-empty sequence of schedules, got {self.factors!r}.")
        for factor in self.factors:
            if not isinstance(factor, Schedule):
                raise TypeError(f"product: expected every factor to be a Schedule, got {type(factor).__name__}.")
        set_fields(self, factors=tuple(self.factors))

    def __call__(self, step):
        as_step("product", step, None)  # checks only; each factor converts the step for its own leaves
        out = self.factors[0](step)
        for factor in self.factors[1:]:
            out = out * factor(step)
        return out
