"""``dk.from_textbrewer``: a TextBrewer ``DistillationConfig`` (dict, JSON text or JSON file) as a distilkit spec.

The spec's loss equals TextBrewer's ``GeneralDistiller.compute_loss`` on the same adaptor outputs (given an
``inputs_mask``; see the TextBrewer defects in DESIGN.md), with the weight schedulers applied as TextBrewer's training
loop applies them. TextBrewer itself is never imported: the preset names are mapped here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from .. import algebra as A
from ..algebra import Loss, Spec, Term, proj
from ..schedules import Schedule, linear_decay, linear_growth
from ..schedules._temperature import cwsm, flsw
from ._errors import config_error, merge
from ._json import Loaded, Rejected, load
from ._options import TEMPERATURE, adaptive_problem

API = "from_textbrewer"

# TextBrewer's MATCH_LOSS_MAP name → (distilkit loss, options, takes a pair of layers, reads the inputs mask).
MATCH_LOSSES: dict[str, tuple[Loss, dict[str, Any], bool, bool]] = {
    "attention_mse": (A.attention_mse, {}, False, True),
    "attention_mse_sum": (A.attention_mse, {"head_reduce": "sum"}, False, True),
    "attention_ce": (A.attention_ce, {}, False, True),
    "attention_ce_mean": (A.attention_ce, {"head_reduce": "mean"}, False, True),
    "hidden_mse": (A.hidden_mse, {}, False, True),
    "cos": (A.cosine, {}, False, True),
    "pkd": (A.pkd, {}, False, False),  # TextBrewer's pkd_loss ignores the mask
    "fsp": (A.fsp, {}, True, True),
    "gram": (A.fsp, {}, True, True),
    "mmd": (A.mmd, {}, True, True),
    "nst": (A.mmd, {}, True, True),  # TextBrewer's "nst" preset is its mmd_loss, not dk.nst
}
KD_LOSSES = {"ce": (A.kd_ce, {"t2_scale": False}), "mse": (A.kd_mse, {})}
WEIGHT_SCHEDULERS = {"linear_growth": linear_growth, "linear_decay": linear_decay}
PROJECTIONS = {"linear": proj.linear, "relu": proj.relu, "tanh": proj.tanh}
FEATURES = ("hidden", "attention")

# DistillationConfig's keyword arguments and their defaults (TextBrewer rejects any other key).
DEFAULTS: dict[str, Any] = {
    "temperature": 4,
    "temperature_scheduler": "none",
    "hard_label_weight": 0,
    "hard_label_weight_scheduler": "none",
    "kd_loss_type": "ce",
    "kd_loss_weight": 1,
    "kd_loss_weight_scheduler": "none",
    "probability_shift": False,
    "intermediate_matches": None,
    "is_caching_logits": False,
}
MATCH_KEYS = ("layer_T", "layer_S", "weight", "loss", "feature")  # required; "proj" is optional
TEMPERATURE_ARGS = {"flsw": ("beta", "gamma", "eps"), "cwsm": ("beta",)}
TEMPERATURE_REQUIRED = {"flsw": 2, "cwsm": 1}


def from_textbrewer(config: Mapping[str, Any] | str | os.PathLike, total_steps: int | None = None) -> Spec:
    """The distilkit spec of a TextBrewer ``DistillationConfig``.

    Args:
        config: the keyword arguments of ``textbrewer.DistillationConfig`` as a dict, as JSON text, or the path of a
            JSON file (what ``DistillationConfig.from_json_file`` reads). Not a ``DistillationConfig`` object: its
            schedulers are already functions; pass the dict it was built from.
        total_steps: the number of optimizer steps of the whole training run (TextBrewer's ``num_steps``, or
            ``len(dataloader) // gradient_accumulation_steps * num_epochs``). Required when the config has a
            ``kd_loss_weight_scheduler`` or ``hard_label_weight_scheduler``; ignored otherwise.

    The spec reads TextBrewer's adaptor dicts unchanged (student outputs, teacher outputs; the batch may be omitted):

    * ``"kd"``: ``kd_loss_type`` ``"ce"`` → ``dk.kd_ce(t2_scale=False)`` (TextBrewer never multiplies by T²),
      ``"mse"`` → ``dk.kd_mse``, at ``temperature`` (or ``dk.temperature.flsw(temperature, beta, gamma[, eps])`` /
      ``cwsm(temperature, beta)`` for the ``temperature_scheduler`` ``["flsw", beta, gamma]`` /
      ``["cwsm", beta]``, also with a dict of arguments), on ``"logits"`` (a tensor, or a list summed over as
      TextBrewer does), masked by ``"logits_mask"`` when present (one per logits tensor or one shared; for
      ``[B, L, V]`` logits), with ``probability_shift`` reading the ``"labels"`` (one per logits tensor or one
      shared; TextBrewer's ``zip`` silently drops the logits that have no labels). Weight ``kd_loss_weight``.
    * one term per intermediate match, named as TextBrewer logs it, ``<feature>_<loss>_<layer_S>_<layer_T>``
      (e.g. ``hidden_hidden_mse_1_3``, ``hidden_mmd_0-0_3-3``; a repeated match gets ``_<index>`` appended), on
      ``outputs[feature][layer]`` (a pair of layers for fsp/gram/mmd/nst), masked by ``"inputs_mask"`` when present
      (TextBrewer uses the student's ``inputs_mask`` for every match; pkd takes no mask, as TextBrewer's
      ``pkd_loss`` ignores it), with weight ``weight`` and the projection ``proj`` (``["linear"|"relu"|"tanh",
      d_student, d_teacher, {optimizer options}]``) of the student feature, its parameters from
      ``dk.init_params(spec)`` (the 4th element, optimizer param-group options, is for your optimizer: ignored).
      Loss names map as ``attention_mse`` → ``dk.attention_mse``, ``attention_mse_sum`` →
      ``dk.attention_mse(head_reduce="sum")``, ``attention_ce`` → ``dk.attention_ce``, ``attention_ce_mean`` →
      ``dk.attention_ce(head_reduce="mean")``, ``hidden_mse`` → ``dk.hidden_mse``, ``cos`` → ``dk.cosine``,
      ``pkd`` → ``dk.pkd``, ``nst`` / ``mmd`` → ``dk.mmd``, ``fsp`` / ``gram`` → ``dk.fsp``.
    * ``"hard_label"``: ``dk.precomputed`` on the student's ``"losses"`` (the sum of each loss's mean) with weight
      ``hard_label_weight``.

    A term whose weight is a constant 0 (``kd_loss_weight=0``, or the default ``hard_label_weight=0``) is left out,
    as TextBrewer skips the KD and hard-label terms when the adaptor returns no ``logits`` / ``losses``; every term
    that is kept needs its keys. Masks are looked up in the batch, then the student outputs, then the teacher outputs.

    Weight schedulers (``"linear_growth"`` / ``"linear_decay"``; ``"none"`` for none): TextBrewer's training loop
    sets ``weight = scheduler(global_step / total_steps)`` after each optimizer step, where ``global_step`` counts the
    optimizer steps done so far, so the spec's weight is ``scheduler(step / total_steps)`` with distilkit's ``step``
    equal to TextBrewer's ``global_step``: pass the number of optimizer steps already taken (0 during the first
    one, the same value for every micro-batch of a gradient-accumulation window). The scheduled weight replaces
    ``kd_loss_weight`` / ``hard_label_weight``, as in TextBrewer, with one difference: during its very first
    optimizer step (before its first scheduler update) TextBrewer still uses the static weight; distilkit uses
    ``scheduler(0)``. Past ``total_steps`` distilkit clamps (growth stays 1, decay 0).

    ``is_caching_logits`` is accepted and ignored: caching teacher outputs is outside the loss spec.

    Where TextBrewer's behaviour is a defect or undefined, distilkit differs: unmasked attention scores ``<= -1e-3``
    and masked ``mmd`` grams (see DESIGN.md); one ``logits_mask`` (the first found) masks both sides, and a single
    shared mask serves several ``[B, L, V]`` logits (TextBrewer's ``select_logits_with_mask`` fails from the second
    one); a ``logits_mask`` on ``[B, C]`` logits (ignored by TextBrewer) must be ``[B]`` and is applied; with
    ``probability_shift`` the labels have the logits' leading shape (TextBrewer shifts the mask-selected rows, so
    it needs labels selected the same way); ``flsw`` / ``cwsm`` temperatures are clamped at 0.01; ``"none"`` read
    from JSON is accepted (TextBrewer's ``from_json_file`` rejects it: it tests ``is not 'none'``).

    Invalid configs fail here with a :class:`~distilkit.ConfigError` (a ``ValueError``) listing every problem with
    its path (e.g. ``intermediate_matches.2.loss``), read by the same loader as spec files (no key twice, nesting at
    most 64 deep, numbers within float32's range): unknown keys (TextBrewer's ``DistillationConfig`` and its matches
    accept no other keyword either), a missing match key, an unknown ``kd_loss_type`` / loss / feature / projection /
    temperature or weight scheduler, ``"flsw"`` or ``"cwsm"`` without their arguments, ``layer_T`` / ``layer_S``
    mixing an int and a pair, a pair of layers for a loss that takes one (or one layer for fsp/gram/mmd/nst, which
    need ``[i, j]``), a temperature outside [1e-4, 100], or an adaptive temperature that cannot run.
    """
    return build(load(config, API), total_steps, config)


def build(loaded: Loaded, total_steps: int | None = None, given: Any = None) -> Spec:
    """The spec of a loaded TextBrewer config (:func:`distilkit.config._json.load`; ``given``: what was passed, for
    the error when it was no mapping), or a ``ConfigError`` with every problem."""
    steps = _total_steps(total_steps)
    _check_loaded(loaded, given)
    raw = loaded.value
    found: list[tuple[str, str]] = []
    for key in raw:
        if key not in DEFAULTS:
            found.append((str(key), f"unknown key; a TextBrewer DistillationConfig has the keys {sorted(DEFAULTS)}"))
    cfg = {**DEFAULTS, **{k: v for k, v in raw.items() if k in DEFAULTS}}

    terms: list[Term | None] = [_kd_term(cfg, steps, found)]
    terms.extend(_match_terms(cfg["intermediate_matches"], found))
    _check(found, _boolean, "is_caching_logits", cfg["is_caching_logits"])  # validated, then ignored
    terms.append(_weighted(A.precomputed.on("losses").named("hard_label"), cfg, "hard_label_weight",
                           "hard_label_weight_scheduler", steps, found))
    found = merge(loaded.problems, found, loaded.refused, loaded.order)
    if found:
        raise config_error(found, loaded.source, api=API, what="TextBrewer config", one_line=True)
    return Spec(tuple(t for t in terms if t is not None))


# ------------------------------------------------------------------------------------------------------- input
class _Problem(Exception):
    """One problem at ``path`` (collected by :func:`_check`, never raised out of this module)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


_FAILED = object()


def _check(found: list[tuple[str, str]], fn, *args) -> Any:
    """``fn(*args)``, or ``_FAILED`` after adding its problem to ``found``."""
    try:
        return fn(*args)
    except _Problem as problem:
        found.append((problem.path, problem.message))
        return _FAILED


def _check_loaded(loaded: Loaded, config: Any) -> None:
    if loaded.fatal:
        raise config_error(loaded.problems, loaded.source, api=API, what="TextBrewer config", one_line=True)
    if isinstance(loaded.value, Mapping):
        return
    if loaded.text:
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(loaded.value), "number")
        raise config_error([("<root>", f"expected a JSON object (a DistillationConfig), got a JSON {kind}")],
                           loaded.source, api=API, what="TextBrewer config", one_line=True)
    hint = ""
    config = loaded.value if config is None else config
    if type(config).__name__ == "DistillationConfig":
        hint = " (a DistillationConfig object holds its schedulers as functions: pass the dict it was built from)"
    raise TypeError(f"{API}: expected a dict, JSON text or the path of a JSON file, got "
                    f"{type(config).__name__}{hint}.")


def _total_steps(total_steps) -> int | None:
    if total_steps is None:
        return None
    if isinstance(total_steps, bool) or not isinstance(total_steps, int):
        raise TypeError(f"{API}: expected total_steps to be a positive int, got {total_steps!r}.")
    if total_steps <= 0:
        raise ValueError(f"{API}: expected total_steps to be a positive int, got {total_steps}.")
    return total_steps


def _number(where: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, Rejected)) or (
            not isinstance(value, Rejected) and not math.isfinite(value)):
        raise _Problem(where, f"expected a finite number, got {value!r}")
    if isinstance(value, Rejected):
        raise _Problem(where, value.message)  # (reported by the loader; merged away)
    if positive and value <= 0:
        raise _Problem(where, f"expected a number > 0, got {value!r}")
    return float(value)


def _temperature_value(value) -> float:
    base = _number("temperature", value)
    message = TEMPERATURE.problem("temperature", base)
    if message:
        raise _Problem("temperature", message)
    return base


def _boolean(where: str, value) -> bool:
    if not isinstance(value, bool):
        raise _Problem(where, f"expected true or false, got {value!r}")
    return value


def _choice(where: str, value, choices) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise _Problem(where, f"expected one of {sorted(choices)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------- kd
def _temperature(cfg: Mapping[str, Any], found: list[tuple[str, str]]):
    base = _check(found, _temperature_value, cfg["temperature"])
    sched = cfg["temperature_scheduler"]
    if sched in ("none", "constant"):
        return base
    value = _check(found, _adaptive, sched, base)
    return _FAILED if base is _FAILED else value


def _adaptive(sched, base):
    where = "temperature_scheduler"
    if isinstance(sched, str):
        if sched in TEMPERATURE_ARGS:
            example = '["flsw", beta, gamma]' if sched == "flsw" else '["cwsm", beta]'
            raise _Problem(where, f"{sched!r} needs its arguments, e.g. {example} or "
                                  f'["{sched}", {{"beta": ...}}]')
        _choice(where, sched, ("none", "constant", *TEMPERATURE_ARGS))
    if not isinstance(sched, (list, tuple)) or not sched:
        raise _Problem(where, "expected 'none', 'constant', [\"flsw\", beta, gamma] or [\"cwsm\", beta], "
                              f"got {sched!r}")
    name = _choice(f"{where}.0", sched[0], TEMPERATURE_ARGS)
    names, required = TEMPERATURE_ARGS[name], TEMPERATURE_REQUIRED[name]
    args = list(sched[1:])
    if len(args) == 1 and isinstance(args[0], Mapping):  # TextBrewer's DynamicKeyDict: builder(**args[0])
        kwargs = dict(args[0])
        unknown = sorted(str(k) for k in kwargs if k not in names)
        if unknown:
            raise _Problem(f"{where}.1.{unknown[0]}", f"unknown argument of {name!r}; expected {list(names)}")
        missing = [n for n in names[:required] if n not in kwargs]
        if missing:
            raise _Problem(f"{where}.1", f"{name!r} needs the argument(s) {missing}")
        values = {k: _number(f"{where}.1.{k}", v) for k, v in kwargs.items()}
    else:
        if not required <= len(args) <= len(names):
            raise _Problem(where, f"{name!r} takes {required} to {len(names)} arguments {list(names)}, got "
                                  f"{len(args)}: {sched!r}")
        values = {n: _number(f"{where}.{i + 1}", v) for i, (n, v) in enumerate(zip(names, args, strict=False))}
    if base is _FAILED:
        return _FAILED
    message = adaptive_problem(name, base, values["beta"], values.get("gamma"), values.get("eps"))
    if message:
        raise _Problem(where, message)
    try:
        return flsw(base, **values) if name == "flsw" else cwsm(base, **values)
    except (ValueError, TypeError) as error:
        raise _Problem(where, str(error)) from None


def _kd_term(cfg: Mapping[str, Any], steps: int | None, found: list[tuple[str, str]]) -> Term | None:
    kind = _check(found, _choice, "kd_loss_type", cfg["kd_loss_type"], KD_LOSSES)
    shift = _check(found, _boolean, "probability_shift", cfg["probability_shift"])
    temperature = _temperature(cfg, found)
    if _FAILED in (kind, shift, temperature):
        _weighted(None, cfg, "kd_loss_weight", "kd_loss_weight_scheduler", steps, found)  # its problems too
        return None
    loss, options = KD_LOSSES[kind]
    term = loss.on("logits", mask="logits_mask?", probability_shift="labels" if shift else None,
                   temperature=temperature, **options).named("kd")
    return _weighted(term, cfg, "kd_loss_weight", "kd_loss_weight_scheduler", steps, found)


def _weighted(term: Term | None, cfg: Mapping[str, Any], weight_key: str, sched_key: str, steps: int | None,
              found: list[tuple[str, str]]) -> Term | None:
    """``term`` × its weight or weight schedule; ``None`` for a constant weight of 0 (or after a problem)."""
    weight = _check(found, _number, weight_key, cfg[weight_key])
    schedule = _check(found, _weight_schedule, sched_key, cfg[sched_key], steps)
    if term is None or _FAILED in (weight, schedule):
        return None
    if schedule is None:
        if weight == 0:
            return None
        return term if weight == 1 else weight * term
    return schedule * term


def _weight_schedule(sched_key: str, sched, steps: int | None) -> Schedule | None:
    if sched == "none":
        return None
    name = _choice(sched_key, sched, ("none", *WEIGHT_SCHEDULERS))
    if steps is None:
        raise _Problem(sched_key, f"{name!r} needs total_steps (the number of optimizer steps of the training run): "
                                  f"weight = {name}(step / total_steps). Pass from_textbrewer(config, "
                                  "total_steps=...)")
    return WEIGHT_SCHEDULERS[name](steps)


# ----------------------------------------------------------------------------------------------------- matches
def _layers(where: str, value, pair: bool | None, loss: str | None):
    """A layer index or pair; ``pair`` None: the loss is unknown, either is accepted."""
    if isinstance(value, int) and not isinstance(value, bool):
        if pair:
            raise _Problem(where, f"{loss!r} compares two layers per model; expected a pair of layer indices [i, j] "
                                  f"(e.g. [{value}, {value}]), got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise _Problem(where, f"expected a layer index or a pair of layer indices [i, j], got {value!r}")
        if pair is False:
            raise _Problem(where, f"{loss!r} takes one layer per model; expected a layer index, got {value!r} (pairs "
                                  "of layers are for fsp, gram, mmd and nst)")
        return tuple(value)
    raise _Problem(where, f"expected a layer index (int) or a pair of them, got {value!r}")


def _layer_kind(value) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return "index"
    return "pair" if isinstance(value, (list, tuple)) else None


def _projection(where: str, value):
    if value is None or (isinstance(value, (list, tuple)) and not value):  # TextBrewer: `if proj:`
        return None
    if not isinstance(value, (list, tuple)) or len(value) not in (3, 4):
        raise _Problem(where, f"expected [kind, d_student, d_teacher] or [kind, d_student, d_teacher, "
                              f"{{optimizer options}}], got {value!r}")
    kind = _choice(f"{where}.0", value[0], PROJECTIONS)
    for i in (1, 2):
        if isinstance(value[i], bool) or not isinstance(value[i], int) or value[i] <= 0:
            raise _Problem(f"{where}.{i}", f"expected a positive int (feature width), got {value[i]!r}")
    if len(value) == 4 and not isinstance(value[3], Mapping):
        raise _Problem(f"{where}.3", f"expected a dict of optimizer options, got {value[3]!r}")
    return PROJECTIONS[kind](value[1], value[2])


def _match_terms(matches, found: list[tuple[str, str]]) -> list[Term | None]:
    if matches is None:
        return []
    if not isinstance(matches, (list, tuple)):
        found.append(("intermediate_matches", f"expected a list of matches, got {type(matches).__name__}"))
        return []
    terms: list[Term | None] = []
    names: set[str] = set()
    for i, match in enumerate(matches):
        terms.append(_match_term(f"intermediate_matches.{i}", i, match, names, found))
    return terms


def _match_term(where: str, i: int, match, names: set[str], found: list[tuple[str, str]]) -> Term | None:
    if not isinstance(match, Mapping):
        found.append((where, f"expected a dict, got {match!r}"))
        return None
    before = len(found)
    for key in match:
        if key not in (*MATCH_KEYS, "proj"):
            found.append((f"{where}.{key}", f"unknown key; a match has the keys {[*MATCH_KEYS, 'proj']}"))
    for key in MATCH_KEYS:
        if key not in match:
            found.append((f"{where}.{key}", f"missing (a match needs {list(MATCH_KEYS)})"))
    loss_name = _check(found, _choice, f"{where}.loss", match["loss"], MATCH_LOSSES) if "loss" in match else _FAILED
    known = loss_name is not _FAILED
    loss, options, pair, masked = MATCH_LOSSES[loss_name] if known else (None, {}, None, False)
    feature = _check(found, _choice, f"{where}.feature", match["feature"], FEATURES) if "feature" in match else None
    layers = {}
    if "layer_S" in match and "layer_T" in match and {_layer_kind(match[k]) for k in ("layer_S", "layer_T")} == {
            "index", "pair"}:
        found.append((f"{where}.layer_S", f"expected layer_S and layer_T to be both layer indices or both pairs of "
                                          f"them, got layer_S={match['layer_S']!r}, layer_T={match['layer_T']!r}"))
    else:
        for key in ("layer_S", "layer_T"):
            if key in match:
                layers[key] = _check(found, _layers, f"{where}.{key}", match[key], pair, loss_name if known else None)
    weight = _check(found, _number, f"{where}.weight", match["weight"]) if "weight" in match else None
    projection = _check(found, _projection, f"{where}.proj", match.get("proj"))
    if len(found) > before:
        return None

    s, t = layers["layer_S"], layers["layer_T"]
    if pair:
        s_sel, t_sel = [(feature, j) for j in s], [(feature, j) for j in t]
        s_name, t_name = "-".join(map(str, s)), "-".join(map(str, t))
    else:
        s_sel, t_sel, s_name, t_name = (feature, s), (feature, t), str(s), str(t)
    name = f"{feature}_{loss_name}_{s_name}_{t_name}"
    if name in names:  # a repeated match (TextBrewer logs only the last one under this name)
        name = f"{name}_{i}"
    names.add(name)
    try:
        term = loss.on(s_sel, t_sel, mask="inputs_mask?" if masked else None, proj=projection, **options)
    except (ValueError, TypeError) as error:  # not expected: everything was checked above
        found.append((where, str(error)))
        return None
    term = term.named(name)
    return term if weight == 1 else weight * term
