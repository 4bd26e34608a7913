"""``to_config`` (spec → pydantic model) and ``from_config`` (model, dict, JSON text or file → an equal spec)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor

from .. import schedules, temperature
from ..algebra._loss import REGISTRY, get_loss
from ..algebra._multi import Tasks, tasks
from ..algebra._proj import Projection
from ..algebra._term import Spec, Term
from ..schedules import Schedule
from ..temperature import AdaptiveTemperature
from . import _models as M
from ._errors import config_error, merge, problems
from ._json import Loaded, load
from ._options import general_problem, option_problems

# kind → (config model, the dk.schedules / dk.temperature class it describes)
_NODES: dict[str, tuple[type[M._Node], type]] = {
    m.model_fields["kind"].default: (m, getattr(temperature if m in (M.FlswConfig, M.CwsmConfig) else schedules,
                                                m.model_fields["kind"].default))
    for m in (*M._SCHEDULES, M.FlswConfig, M.CwsmConfig)
}
_INT_FIELDS = frozenset({"steps", "begin", "total_steps", "boundaries"})


# ------------------------------------------------------------------------------------------------ to_config
def to_config(spec) -> M.SpecConfig | M.TasksConfig:
    """A term, spec or ``dk.tasks(...)`` as a :class:`SpecConfig` / :class:`TasksConfig` (``from_config`` rebuilds an
    equal spec). Write it with ``.model_dump_json(indent=2)``.

    0-d tensor options become numbers; other tensor options cannot be written and raise a ``ValueError`` naming the
    term and the option. Only registered losses (``dk.register_loss``) can be written.
    """
    if isinstance(spec, Term):
        spec = Spec((spec,))
    if isinstance(spec, Spec):
        return M.SpecConfig(version=M.VERSION, terms=[_term_config(t) for t in spec.terms])
    if isinstance(spec, Tasks):
        specs = {name: M.SpecConfig(version=M.VERSION, terms=[_term_config(t) for t in s.terms])
                 for name, s in spec.specs}
        return M.TasksConfig(version=M.VERSION, key=spec.key, specs=specs)
    raise TypeError(f"to_config: expected a dk term, spec or dk.tasks(...), got {type(spec).__name__}.")


def _term_config(term: Term) -> M.TermConfig:
    where = f"to_config (term '{term.name}')"
    if REGISTRY.get(term.loss.name) is not term.loss:
        raise ValueError(f"{where}: expected a registered loss, got {term.loss!r}, which is not the loss registered "
                         f"under {term.loss.name!r}; register it with dk.register_loss so that spec files can name it.")
    teacher = None if term.teacher is None or term.teacher == term.student else _selector_out(term.teacher)
    proj = term.proj
    return M.TermConfig(
        loss=term.loss.name,
        student=_selector_out(term.student),
        teacher=teacher,
        mask=term.mask,
        labels=term.labels,
        proj=None if proj is None else M.ProjConfig(kind=proj.kind, in_features=proj.in_features,
                                                    out_features=proj.out_features),
        probability_shift=term.probability_shift,
        options={name: _option_out(value, f"{where}: option {name!r}") for name, value in term.options},
        weight=[_factor_out(f, where) for f in term.weight],
        name=term.name,
    )


def _selector_out(sel: tuple) -> str | tuple:
    if isinstance(sel[0], tuple):
        return tuple(_selector_out(s) for s in sel)
    return sel[0] if len(sel) == 1 else sel


def _plain(x: Tensor, where: str) -> bool | int | float:
    """A 0-d tensor as a Python number: floats the shortest decimal that reads back to the same float32."""
    if x.ndim != 0:
        raise ValueError(f"{where}: expected a number or a 0-d tensor, got a tensor of shape {tuple(x.shape)}; "
                         "only 0-d tensors can be written to a config.")
    value = x.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value}.")
        if x.dtype != torch.float64:
            single = np.float32(value)
            if float(single) == value:
                for digits in range(1, 10):
                    short = float(f"{value:.{digits}g}")
                    if np.float32(short) == single:
                        return short
    return value


def _option_out(value: Any, where: str) -> Any:
    if isinstance(value, Tensor):
        return _plain(value, where)
    if isinstance(value, (Schedule, AdaptiveTemperature)):
        return _node_out(value, where)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value}.")
    return value


def _factor_out(factor: Any, where: str) -> Any:
    if isinstance(factor, Tensor):
        return _plain(factor, f"{where}: weight")
    return _node_out(factor, f"{where}: weight") if isinstance(factor, Schedule) else factor


def _node_out(node: Schedule | AdaptiveTemperature, where: str) -> M._Node:
    model, cls = _NODES.get(type(node).__name__, (None, None))
    if model is None or cls is not type(node):
        raise ValueError(f"{where}: expected a dk.schedules or dk.temperature object, got {type(node).__name__}, "
                         "which has no config form.")
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(node):  # type: ignore[arg-type]
        value = getattr(node, f.name)
        if isinstance(value, tuple):
            fields[f.name] = [_field_out(v, f.name, where) for v in value]
        else:
            fields[f.name] = _field_out(value, f.name, where)
    return model(**fields)


def _field_out(value: Any, name: str, where: str) -> Any:
    if isinstance(value, (Schedule, AdaptiveTemperature)):
        return _node_out(value, where)
    if isinstance(value, Tensor):
        number = _plain(value, f"{where}: {name}")
        return int(number) if name in _INT_FIELDS and float(number).is_integer() else number
    return value


# ------------------------------------------------------------------------------------------------ from_config
def from_config(config) -> Spec | Tasks:
    """Rebuild a spec from a config: a :class:`SpecConfig` / :class:`TasksConfig`, a dict, JSON text (a str starting
    with ``{``) or the path of a JSON file (str or ``os.PathLike``).

    ``from_config(to_config(spec)) == spec``. Losses are looked up in the registry (``dk.register_loss``) only.
    Raises :class:`ConfigError` listing every problem as ``<path>: <message>`` (``terms.2.options.temperature: ...``).

    Every input goes through one loader and the same checks (see :mod:`distilkit.config._options` for the limits):
    nesting at most 64 deep, no key twice, floats finite and within float32's range, integers within ±2**53, and
    the options of the built-in losses within their ranges (a temperature in [1e-4, 100], β and α in [0, 1], ...),
    schedules at every step. What it accepts runs.
    """
    return build(load(config, "from_config"))


def build(loaded: Loaded) -> Spec | Tasks:
    """The spec of a loaded config (:func:`distilkit.config._json.load`), or a ``ConfigError`` with every problem."""
    if loaded.fatal:
        raise config_error(loaded.problems, loaded.source)
    config = loaded.value
    if not isinstance(config, dict):
        if loaded.text:
            kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(config), "number")
            raise config_error([("<root>", f"expected a JSON object (a spec config), got a JSON {kind}")],
                               loaded.source)
        raise TypeError("from_config: expected a SpecConfig/TasksConfig, a dict, JSON text or the path of a JSON "
                        f"file, got {type(config).__name__}.")
    found: list[tuple[str, str]] = []
    spec = None
    try:
        model = M.ADAPTER.validate_python(config)
    except ValidationError as error:
        found.extend(problems(error))
        _check_raw(config, found)  # the terms that are valid on their own: checked as far as they go
    else:
        spec = _build(model, found)
    found = merge(loaded.problems, found, loaded.refused, loaded.order)
    if found:
        raise config_error(found, loaded.source)
    return spec


def _build(model: M.SpecConfig | M.TasksConfig, found: list[tuple[str, str]]) -> Spec | Tasks | None:
    upgraded = upgrade(model)
    if isinstance(model, M.SpecConfig):
        return _spec(model, upgraded, "", found)  # type: ignore[arg-type]
    built = {name: _spec(s, upgraded.specs[name], f"specs.{name}", found)  # type: ignore[union-attr]
             for name, s in model.specs.items()}
    if found:
        return None
    try:
        return tasks(built, key=model.key)
    except (TypeError, ValueError) as error:
        found.append(("specs", str(error)))
        return None


def _check_raw(config: dict, found: list[tuple[str, str]]) -> None:
    """Check each term of a config that failed validation on its own, so that its problems are reported with the
    others."""
    if config.get("kind") == "tasks":
        specs = config.get("specs")
        groups = [(f"specs.{name}.terms", s.get("terms")) for name, s in specs.items()
                  if isinstance(s, dict)] if isinstance(specs, dict) else []
    else:
        groups = [("terms", config.get("terms"))]
    for at, terms in groups:
        if not isinstance(terms, list):
            continue
        for i, raw in enumerate(terms):
            try:
                term = M.TermConfig.model_validate(raw)
            except ValidationError:
                continue  # reported already
            _term_problems(term, f"{at}.{i}", found)


#: version 1 → 2: the chunked logit losses became ``impl="chunked"`` of the one name per divergence
_RENAMED_V1 = {f"chunked_{kind}": kind for kind in ("kd_ce", "kd_kl", "reverse_kl", "jsd", "skew_kl", "tvd")}


def upgrade(model: M.SpecConfig | M.TasksConfig) -> M.SpecConfig | M.TasksConfig:
    """The same config in the current version (version-1 files keep loading): ``chunked_<kind>`` terms become
    ``<kind>`` with ``impl="chunked"``. (The ``sparse_*`` names, deprecated too, still load as they are: their top-k
    teacher mappings are not :class:`~distilkit.TopK` objects.)"""
    if isinstance(model, M.TasksConfig):
        return model.model_copy(update={"version": M.VERSION,
                                        "specs": {k: upgrade(v) for k, v in model.specs.items()}})
    if model.version == M.VERSION:
        return model
    terms = [_renamed(t) if t.loss in _RENAMED_V1 else t for t in model.terms]
    return model.model_copy(update={"version": M.VERSION, "terms": terms})


def _renamed(term: M.TermConfig) -> M.TermConfig:
    """A version-1 ``chunked_<kind>`` term as ``<kind>`` with ``impl="chunked"``, keeping the name it had (metrics
    and projection parameters are keyed by it)."""
    name = term.name
    if name is None:
        try:
            name = _term(get_loss(term.loss), term).name
        except (TypeError, ValueError):  # reported when the upgraded term is built
            name = None
    return term.model_copy(update={"loss": _RENAMED_V1[term.loss], "options": {**term.options, "impl": "chunked"},
                                   "name": name})


def _spec(model: M.SpecConfig, upgraded: M.SpecConfig, prefix: str, found: list[tuple[str, str]]) -> Spec | None:
    """The spec of ``upgraded`` (``model`` in the current version), its problems reported at ``model``'s paths."""
    at = f"{prefix}.terms" if prefix else "terms"
    terms: list[Term] = []
    first: dict[str, int] = {}
    for i, (config, current) in enumerate(zip(model.terms, upgraded.terms, strict=True)):
        if _term_problems(config, f"{at}.{i}", found):
            continue
        try:
            term = _term(get_loss(current.loss), current)
        except (TypeError, ValueError) as error:  # (the upgrade of a version-1 term: not expected)
            found.append((f"{at}.{i}", str(error)))
            continue
        if term.name in first:
            found.append((f"{at}.{i}.name", f"duplicate term name {term.name!r} (also {at}.{first[term.name]}); give "
                                            "one of them another name"))
            continue
        first[term.name] = i
        terms.append(term)
    return None if found else Spec(tuple(terms))


def _term_problems(config: M.TermConfig, at: str, found: list[tuple[str, str]]) -> bool:
    """Report what is wrong with one (validated) term: an unknown loss, options unknown, missing or out of range,
    weights that leave the numbers' range, or whatever building it raises. Whether anything was."""
    before = len(found)
    try:
        loss = get_loss(config.loss, "loss")
    except ValueError as error:
        found.append((f"{at}.loss", str(error).removeprefix("loss: ")))
        return True
    for name, message in option_problems(loss, dict(config.options)):
        found.append((f"{at}.options.{name}" if name else f"{at}.options", message))
    for j, factor in enumerate(config.weight):
        message = general_problem("the weight", factor)
        if message:
            found.append((f"{at}.weight.{j}", message))
    if len(found) == before:
        try:
            _term(loss, config)
        except (TypeError, ValueError) as error:
            found.append((at, str(error)))
    return len(found) > before


def _term(loss, config: M.TermConfig) -> Term:
    proj = None if config.proj is None else Projection(config.proj.kind, config.proj.in_features,
                                                       config.proj.out_features)
    options = {name: value.build() if isinstance(value, BaseModel) else value for name, value in config.options.items()}
    teacher = None if config.teacher is None else _selector_in(config.teacher)
    term = Term.of(loss, _selector_in(config.student), teacher, mask=config.mask, labels=config.labels, proj=proj,
                   probability_shift=config.probability_shift, options=options)
    for factor in config.weight:
        term = term * (factor.build() if isinstance(factor, BaseModel) else factor)
    return term if config.name is None else term.named(config.name)


def _selector_in(sel: str | tuple) -> Any:
    if isinstance(sel, str) or isinstance(sel[1], int):
        return sel
    return list(sel)  # a pair: Term.of takes a list of two selectors
