"""What a spec file may say: the limits every number obeys, the range of each option of the built-in losses, and the
values a schedule takes (so that a schedule given as a temperature is checked at every step, not at the first).

Everything the loader accepts runs: these are the ranges inside which every built-in loss gives a finite loss and
finite gradients (``tests/test_config_hardening.py`` runs each option at both ends of its range, and at 1e6 where
float32 alone bounds it). Weights, and ``ce_weight``, multiply a loss: a finite loss times a weight near float32's
largest value can still overflow (``make_step(..., check_finite=True)`` names the term).

* Numbers (:data:`FLOAT_MAX`, :data:`INT_MAX`): floats finite and within float32's range (hyperparameters become
  float32 tensors in the step), integers within ±2**53 (exact as floats, so every JSON reader agrees on them).
* Temperatures (:data:`T_MIN`, :data:`T_MAX`): ``1e-4 <= T <= 100``. The upper bound is the logit losses' own
  (``distilkit.losses._checks.MAX_TEMPERATURE``: the divergences of ``softmax(z / T)`` shrink like 1/T² while float32
  rounding does not, so beyond it they lose their accuracy; T² itself would overflow only from about 1e19). The lower
  bound is this loader's: below it ``z / T`` and ``kd_mse``'s ``(Δz / T)²`` head for float32's overflow (non-finite
  from about T = 1e-20 for logits of size 10); real temperatures lie between 0.5 and 20.
* β and α (``jsd``, ``skew_kl``): ``[0, 1]``. Small constants (``eps``): at least :data:`EPS_MIN`.

A schedule given where a range applies must stay inside it at every step ``>= 0``: ``exponential`` decays towards 0
and grows without bound, so it needs a ``join`` that ends it (``join([exponential(4, 0.5, 1000), constant(1)],
[2000])``) where a positive lower bound (temperatures) or any bound applies.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

from ..losses._checks import MAX_TEMPERATURE
from ..losses._chunked import KINDS
from ..losses._divergences import IMPLS
from ..losses._fused import LOSSES as FUSED_LOSSES
from ..losses._sparse import POLICIES

#: the largest magnitude of a float in a spec file: float32's largest finite value.
FLOAT_MAX = 3.4028234663852886e38
#: the largest magnitude of an integer in a spec file: 2**53, below which every integer is exact as a float.
INT_MAX = 2**53
#: the deepest nesting of arrays and objects a spec or TextBrewer file may have (real files nest about 10 deep).
MAX_DEPTH = 64
#: temperatures (numbers, schedules at every step, flsw/cwsm bases); the upper bound is the losses' own.
T_MIN, T_MAX = 1e-4, MAX_TEMPERATURE
#: small positive constants (``eps``): at least this, so that even their square is a normal float32.
EPS_MIN = 1e-18
#: flsw's largest ``gamma``: its weights ``(1 − cos)^gamma`` reach ``2^gamma``, which must stay far inside float32
#: (also summed over many rows): beyond, ``mean(w) − w`` is ``inf − inf`` and the temperature NaN.
FLSW_GAMMA_MAX = 64.0


def number_text(value: float) -> str:
    return f"{value:g}"


def interval_text(lo: float, hi: float) -> str:
    return f"[{number_text(lo)}, {number_text(hi)}]"


# ------------------------------------------------------------------------------------------------ schedule ranges
def _hull(*values: float) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    return (min(finite), max(finite)) if finite else (-math.inf, math.inf)


def _power(rate: float, exponent: float) -> float:
    """``rate ** exponent`` for ``rate > 0`` and ``exponent >= 0`` (possibly infinite), saturating at inf."""
    if rate == 1 or exponent == 0:
        return 1.0
    log = math.log(rate) * exponent
    if log > 709:
        return math.inf
    return math.exp(log) if log > -745 else 0.0


def _clamp01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def _value(node: Any, step: float) -> float:
    """The value of a monotone schedule (every kind but join, piecewise_constant and product) at ``step`` (may be
    inf); pure Python, from the config's fields."""
    kind = node.kind
    if kind == "constant":
        return float(node.value)
    if kind in ("linear", "cosine"):
        p = _clamp01((step - node.begin) / node.steps) if math.isfinite(step) else 1.0
        if kind == "linear":
            return node.start + (node.end - node.start) * p
        return node.end + (node.start - node.end) * 0.5 * (1 + math.cos(math.pi * p))
    if kind == "exponential":
        factor = _power(node.rate, max(step, 0.0) / node.steps)
        return 0.0 if node.start == 0 else node.start * factor
    x = _clamp01(step / node.total_steps) if math.isfinite(step) else 1.0
    return x if kind == "linear_growth" else 1 - x


def value_range(node: Any, first: float = 0.0, last: float = math.inf) -> tuple[float, float]:
    """``(lo, hi)``: an interval holding every value ``node`` (a schedule config) takes at the (integer) steps in
    ``[first, last]``, limits included (an exponential decay's range reaches 0). Every kind but a product is monotone
    between its boundaries, so its ends tell and the interval is the smallest; a product's is that of its factors'
    intervals (it may be wider than the values)."""
    kind = node.kind
    if kind == "product":
        lo, hi = 1.0, 1.0
        for factor in node.factors:
            a, b = value_range(factor, first, last)
            lo, hi = _hull(lo * a, lo * b, hi * a, hi * b)
        return lo, hi
    if kind in ("piecewise_constant", "join"):
        parts = node.values if kind == "piecewise_constant" else node.schedules
        bounds = [-math.inf, *node.boundaries, math.inf]
        found: list[float] = []
        for i, part in enumerate(parts):
            start, end = max(first, bounds[i]), min(last, bounds[i + 1] - 1)  # segment i: steps [b_i-1, b_i - 1]
            if start > end:
                continue  # the segment holds no step of [first, last]
            if kind == "piecewise_constant":
                found.append(float(part))
            else:
                offset = bounds[i] if i > 0 else 0.0
                found.extend(value_range(part, start - offset, end - offset))
        return _hull(*found)
    return _hull(_value(node, first), _value(node, last))


# ------------------------------------------------------------------------------------------------ option kinds
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_node(value: Any) -> bool:
    return hasattr(value, "kind") and not isinstance(value, (str, bytes))


def _shown(value: Any) -> str:
    if _is_node(value):
        return f"a {value.kind!r} object"
    return "null" if value is None else repr(value)


@dataclass(frozen=True)
class Range:
    """A float hyperparameter: a number or a schedule in ``[lo, hi]`` (at every step); ``adaptive``: also
    ``dk.temperature.flsw/cwsm``."""

    lo: float
    hi: float
    adaptive: bool = False
    label: str = ""  # how the range reads, instead of "in [lo, hi]"

    def text(self) -> str:
        return self.label or f"in {interval_text(self.lo, self.hi)}"

    def problem(self, name: str, value: Any) -> str | None:
        if _is_number(value):
            return None if self.lo <= value <= self.hi else (
                f"expected {name} {self.text()}, got {number_text(value)}")
        if _is_node(value) and value.kind in ("flsw", "cwsm"):
            if not self.adaptive:
                return (f"expected {name} to be a number or a schedule, got an adaptive temperature ({value.kind!r}), "
                        "which only a logit loss's temperature takes")
            return adaptive_problem(value.kind, value.base, value.beta, getattr(value, "gamma", None),
                                    getattr(value, "eps", None))
        if _is_node(value):
            lo, hi = value_range(value)
            if self.lo <= lo and hi <= self.hi:
                return None
            hint = ""
            if not (math.isfinite(lo) and math.isfinite(hi)):
                hint = " (it grows without bound: end it with a join)"
            elif any(n.kind == "exponential" for n in _nodes(value)):
                hint = " (an exponential decays towards 0: end it with a join)"
            return (f"expected {name} {self.text()} at every step, got a schedule ({value.kind!r}) taking values in "
                    f"{interval_text(lo, hi)}{hint}")
        return f"expected {name} to be a number {self.text()} or a schedule, got {_shown(value)}"

    def schema(self, refs: dict[str, list[dict]]) -> dict:
        number = {"type": "number", "minimum": self.lo, "maximum": self.hi}
        return {"anyOf": [number, *refs["schedule"], *(refs["adaptive"] if self.adaptive else [])],
                "description": f"a number {self.text()}, or a schedule staying there"
                               + (", or an adaptive temperature (flsw, cwsm)" if self.adaptive else "")}


def _nodes(node: Any):
    yield node
    for child in (*getattr(node, "factors", ()), *getattr(node, "schedules", ())):
        yield from _nodes(child)


@dataclass(frozen=True)
class Choice:
    values: tuple

    def problem(self, name: str, value: Any) -> str | None:
        if isinstance(value, (str, type(None))) and value in self.values:
            return None
        shown = ", ".join("null" if v is None else repr(v) for v in self.values)
        return f"expected {name} to be one of {shown}, got {_shown(value)}"

    def schema(self, refs: dict[str, list[dict]]) -> dict:
        return {"enum": list(self.values)}


@dataclass(frozen=True)
class Integer:
    minimum: int | None = None
    nullable: bool = False

    def problem(self, name: str, value: Any) -> str | None:
        if value is None and self.nullable:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and (self.minimum is None or value >= self.minimum):
            return None
        what = "an integer" if self.minimum is None else f"an integer >= {self.minimum}"
        return f"expected {name} to be {what}{' or null' if self.nullable else ''}, got {_shown(value)}"

    def schema(self, refs: dict[str, list[dict]]) -> dict:
        out: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        return {"anyOf": [out, {"type": "null"}]} if self.nullable else out


@dataclass(frozen=True)
class Boolean:
    def problem(self, name: str, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"expected {name} to be true or false, got {_shown(value)}"

    def schema(self, refs: dict[str, list[dict]]) -> dict:
        return {"type": "boolean"}


@dataclass(frozen=True)
class NotInFile:
    why: str

    def problem(self, name: str, value: Any) -> str | None:
        return f"{name} cannot be given in a spec file: {self.why}"

    def schema(self, refs: dict[str, list[dict]]) -> dict:
        return {"not": {}, "description": f"not in a spec file: {self.why}"}


Option = Range | Choice | Integer | Boolean | NotInFile

TEMPERATURE = Range(T_MIN, T_MAX, adaptive=True)
UNIT = Range(0.0, 1.0)
EPS = Range(EPS_MIN, FLOAT_MAX, label=f">= {EPS_MIN:g}")
ANY_FLOAT = Range(-FLOAT_MAX, FLOAT_MAX, label=f"within float32's range (|x| <= {FLOAT_MAX:.4g})")
CHUNK_SIZE = Integer(1, nullable=True)

#: the options of the built-in losses, by name (the same name means the same thing in every loss) ...
OPTIONS: dict[str, Option] = {
    "temperature": TEMPERATURE,
    "beta": UNIT,
    "alpha": UNIT,
    "t2_scale": Boolean(),
    "impl": Choice(IMPLS),
    "chunk_size": CHUNK_SIZE,
    "policy": Choice(POLICIES),
    "ignore_index": Integer(),
    "inputs": Choice(("probs", "logits")),
    "eps": EPS,
    "num_heads": Integer(1),
    "divergence": Choice(tuple(KINDS)),
    "loss": Choice((*FUSED_LOSSES, None)),
    "ce_weight": Range(0.0, FLOAT_MAX, label=">= 0"),
    "estimator": Choice(("k1", "k2", "k3")),
    "vocab_size": Integer(1, nullable=True),
    "recompute": Boolean(),
    "labels": NotInFile("give the labels key as the term's 'labels'"),
    "student_bias": NotInFile("a tensor; put [weight, bias] in the outputs and select them"),
    "teacher_bias": NotInFile("a tensor; put [weight, bias] in the outputs and select them"),
}
#: ... except these (loss, option) pairs.
OVERRIDES: dict[tuple[str, str], Option] = {
    ("attention_kl", "eps"): Range(EPS_MIN, 1.0),  # a floor for probabilities
    ("attention_mse", "head_reduce"): Choice((None, "sum")),
    ("attention_ce", "head_reduce"): Choice((None, "mean")),
}
#: keyword parameters that are never options in a file (the term gives them).
NOT_OPTIONS = frozenset({"mask", "reduction"})


def builtin_losses() -> dict[str, Any]:
    """The losses distilkit registers itself (name → ``Loss``), whatever the user registered since."""
    from ..algebra import _loss

    return {name: loss for name, loss in _loss.REGISTRY.items() if getattr(_loss, name, None) is loss}


def options_of(loss: Any) -> dict[str, Option | None]:
    """Each option name of ``loss`` with its kind; ``None`` where nothing is known (a user's loss: any value)."""
    builtin = builtin_losses().get(loss.name) is loss
    found: dict[str, Option | None] = {}
    for name in loss.keywords:
        if name in NOT_OPTIONS:
            continue
        found[name] = (OVERRIDES.get((loss.name, name), OPTIONS.get(name)) if builtin else None)
    return found


def required_options(loss: Any) -> list[str]:
    return [name for name, default in loss.keywords.items()
            if default is inspect.Parameter.empty and name not in NOT_OPTIONS]


def option_problems(loss: Any, options: dict[str, Any]) -> list[tuple[str, str]]:
    """``(option name or '', message)`` for each option of a term of ``loss`` that is unknown, missing or out of
    range; schedules are checked at every step."""
    known = options_of(loss)
    found: list[tuple[str, str]] = []
    for name, value in options.items():
        if name in NOT_OPTIONS:
            found.append((name, f"{name} is not an option: " + (
                "give the mask key as the term's 'mask'" if name == "mask" else "the step reduces every term itself")))
        elif name not in known and not loss.open_ended:
            found.append((name, f"{loss.name} has no option {name!r}; expected one of {sorted(known)}"))
        elif known.get(name) is not None:
            message = known[name].problem(name, value)  # type: ignore[union-attr]
            if message:
                found.append((name, message))
        else:  # a user's option: any value, but schedules stay within the numbers' range
            message = general_problem(name, value)
            if message:
                found.append((name, message))
    missing = [name for name in required_options(loss) if name not in options]
    if missing:
        found.append(("", f"{loss.name} needs the option(s) {missing}"))
    return found


def general_problem(name: str, value: Any) -> str | None:
    """A schedule must stay within the numbers' range (float32) at every step; anything else is the loss's to judge."""
    if _is_node(value) and value.kind not in ("flsw", "cwsm"):
        return ANY_FLOAT.problem(name, value)
    return None


def adaptive_problem(kind: str, base: float, beta: float, gamma: float | None = None,
                     eps: float | None = None) -> str | None:
    """What keeps ``dk.temperature.flsw/cwsm(base, beta[, gamma, eps])`` running: ``base`` in the range of
    temperatures, and flsw's ``gamma <= 64`` and ``eps >= 1e-18``. (``beta`` may be any number: the temperatures
    they give are clamped to [0.01, the losses' largest temperature].)"""
    if not T_MIN <= base <= T_MAX:
        return f"expected {kind}'s base in {interval_text(T_MIN, T_MAX)}, got {number_text(base)}"
    if kind == "flsw" and eps is not None and eps < EPS_MIN:
        return f"expected flsw's eps >= {EPS_MIN:g}, got {number_text(eps)}"
    if kind == "flsw" and gamma is not None and gamma > FLSW_GAMMA_MAX:
        return f"expected flsw's gamma <= {FLSW_GAMMA_MAX:g} (its weights reach 2^gamma), got {number_text(gamma)}"
    return None


# ------------------------------------------------------------------------------------------------ schema
def loss_schema(loss: Any, refs: dict[str, list[dict]]) -> dict:
    """The JSON Schema of a term of ``loss`` (its options; its mask, teacher, labels where it takes none)."""
    known = options_of(loss)
    properties = {}
    for name, kind in known.items():
        properties[name] = kind.schema(refs) if kind is not None else {}
    options: dict[str, Any] = {"type": "object", "properties": properties}
    if not loss.open_ended:
        options["additionalProperties"] = False
    required = required_options(loss)
    if required:
        options["required"] = required
    term: dict[str, Any] = {"options": options}
    if loss.inputs != "teacher":
        term["teacher"] = {"type": "null"}
    if not loss.masked:
        term["mask"] = {"type": "null"}
    if not loss.temperature:
        term["probability_shift"] = {"type": "null"}
    if loss.inputs != "labels" and "labels" not in loss.keywords:
        term["labels"] = {"type": "null"}
    return {"properties": term, **({"required": ["options"]} if required else {})}
