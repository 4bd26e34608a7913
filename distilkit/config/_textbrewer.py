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
from ._json import load_json

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

    Invalid configs fail here with a ``ValueError`` naming the field (e.g. ``intermediate_matches.2.loss``): unknown
    keys (TextBrewer's ``DistillationConfig`` and its matches accept no other keyword either), a missing match key,
    an unknown ``kd_loss_type`` / loss / feature / projection / temperature or weight scheduler, ``"flsw"`` or
    ``"cwsm"`` without their arguments, ``layer_T`` / ``layer_S`` mixing an int and a pair, a pair of layers for a
    loss that takes one (or one layer for fsp/gram/mmd/nst, which need ``[i, j]``), non-positive temperatures.
    """
    raw = _load(config)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{API}: expected the config to be a JSON object (dict), got {type(raw).__name__}.")
    unknown = sorted(str(k) for k in raw if k not in DEFAULTS)
    if unknown:
        raise ValueError(f"{API}: {unknown[0]}: unknown key; a TextBrewer DistillationConfig has the keys "
                         f"{sorted(DEFAULTS)} (got unknown {unknown}).")
    cfg = {**DEFAULTS, **raw}
    steps = _total_steps(total_steps)

    terms: list[Term] = []
    kd = _kd_term(cfg, steps)
    if kd is not None:
        terms.append(kd)
    terms.extend(_match_terms(cfg["intermediate_matches"]))
    _boolean("is_caching_logits", cfg["is_caching_logits"])  # validated, then ignored
    hard = _weighted(
        A.precomputed.on("losses").named("hard_label"), cfg, "hard_label_weight", "hard_label_weight_scheduler", steps
    )
    if hard is not None:
        terms.append(hard)
    return Spec(tuple(terms))


# ------------------------------------------------------------------------------------------------------- input
def _load(config) -> Any:
    parsed_from_text = isinstance(config, (str, os.PathLike))
    config, _ = load_json(config, API)
    if isinstance(config, Mapping):
        return config
    if parsed_from_text:
        raise ValueError(f"{API}: expected a JSON object (a DistillationConfig), got a JSON {type(config).__name__}.")
    hint = ""
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{API}: {where}: expected a finite number, got {value!r}.")
    if positive and value <= 0:
        raise ValueError(f"{API}: {where}: expected a number > 0, got {value!r}.")
    return float(value)


def _boolean(where: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{API}: {where}: expected true or false, got {value!r}.")
    return value


def _choice(where: str, value, choices) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{API}: {where}: expected one of {sorted(choices)}, got {value!r}.")
    return value


# ---------------------------------------------------------------------------------------------------------- kd
def _temperature(cfg: Mapping[str, Any]):
    base = _number("temperature", cfg["temperature"], positive=True)
    sched = cfg["temperature_scheduler"]
    where = "temperature_scheduler"
    if sched in ("none", "constant"):
        return base
    if isinstance(sched, str):
        if sched in TEMPERATURE_ARGS:
            example = '["flsw", beta, gamma]' if sched == "flsw" else '["cwsm", beta]'
            raise ValueError(f"{API}: {where}: {sched!r} needs its arguments, e.g. {example} or "
                             f'["{sched}", {{"beta": ...}}].')
        _choice(where, sched, ("none", "constant", *TEMPERATURE_ARGS))
    if not isinstance(sched, (list, tuple)) or not sched:
        raise ValueError(f"{API}: {where}: expected 'none', 'constant', [\"flsw\", beta, gamma] or [\"cwsm\", beta], "
                         f"got {sched!r}.")
    name = _choice(f"{where}.0", sched[0], TEMPERATURE_ARGS)
    names, required = TEMPERATURE_ARGS[name], TEMPERATURE_REQUIRED[name]
    args = list(sched[1:])
    if len(args) == 1 and isinstance(args[0], Mapping):  # TextBrewer's DynamicKeyDict: builder(**args[0])
        kwargs = dict(args[0])
        unknown = sorted(str(k) for k in kwargs if k not in names)
        if unknown:
            raise ValueError(f"{API}: {where}.1.{unknown[0]}: unknown argument of {name!r}; expected {list(names)}.")
        missing = [n for n in names[:required] if n not in kwargs]
        if missing:
            raise ValueError(f"{API}: {where}.1: {name!r} needs the argument(s) {missing}.")
        values = {k: _number(f"{where}.1.{k}", v) for k, v in kwargs.items()}
    else:
        if not required <= len(args) <= len(names):
            raise ValueError(f"{API}: {where}: {name!r} takes {required} to {len(names)} arguments "
                             f"{list(names)}, got {len(args)}: {sched!r}.")
        values = {n: _number(f"{where}.{i + 1}", v) for i, (n, v) in enumerate(zip(names, args, strict=False))}
    try:
        return flsw(base, **values) if name == "flsw" else cwsm(base, **values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{API}: {where}: {error}") from error


def _kd_term(cfg: Mapping[str, Any], steps: int | None) -> Term | None:
    loss, options = KD_LOSSES[_choice("kd_loss_type", cfg["kd_loss_type"], KD_LOSSES)]
    shift = "labels" if _boolean("probability_shift", cfg["probability_shift"]) else None
    term = loss.on("logits", mask="logits_mask?", probability_shift=shift, temperature=_temperature(cfg),
                   **options).named("kd")
    return _weighted(term, cfg, "kd_loss_weight", "kd_loss_weight_scheduler", steps)


def _weighted(term: Term, cfg: Mapping[str, Any], weight_key: str, sched_key: str, steps: int | None) -> Term | None:
    """``term`` × its weight or weight schedule; ``None`` for a constant weight of 0."""
    weight = _number(weight_key, cfg[weight_key])
    sched = cfg[sched_key]
    if sched == "none":
        if weight == 0:
            return None
        return term if weight == 1 else weight * term
    name = _choice(sched_key, sched, ("none", *WEIGHT_SCHEDULERS))
    if steps is None:
        raise ValueError(f"{API}: {sched_key}: {name!r} needs total_steps (the number of optimizer steps of the "
                         f"training run): weight = {name}(step / total_steps). Pass from_textbrewer(config, "
                         "total_steps=...).")
    schedule: Schedule = WEIGHT_SCHEDULERS[name](steps)
    return schedule * term


# ----------------------------------------------------------------------------------------------------- matches
def _layers(where: str, value, pair: bool, loss: str):
    if isinstance(value, int) and not isinstance(value, bool):
        if pair:
            raise ValueError(f"{API}: {where}: {loss!r} compares two layers per model; expected a pair of layer "
                             f"indices [i, j] (e.g. [{value}, {value}]), got {value!r}.")
        return value
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError(f"{API}: {where}: expected a layer index or a pair of layer indices [i, j], "
                             f"got {value!r}.")
        if not pair:
            raise ValueError(f"{API}: {where}: {loss!r} takes one layer per model; expected a layer index, got "
                             f"{value!r} (pairs of layers are for fsp, gram, mmd and nst).")
        return tuple(value)
    raise ValueError(f"{API}: {where}: expected a layer index (int) or a pair of them, got {value!r}.")


def _layer_kind(value) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return "index"
    return "pair" if isinstance(value, (list, tuple)) else None


def _projection(where: str, value):
    if value is None or (isinstance(value, (list, tuple)) and not value):  # TextBrewer: `if proj:`
        return None
    if not isinstance(value, (list, tuple)) or len(value) not in (3, 4):
        raise ValueError(f"{API}: {where}: expected [kind, d_student, d_teacher] or [kind, d_student, d_teacher, "
                         f"{{optimizer options}}], got {value!r}.")
    kind = _choice(f"{where}.0", value[0], PROJECTIONS)
    for i in (1, 2):
        if isinstance(value[i], bool) or not isinstance(value[i], int) or value[i] <= 0:
            raise ValueError(f"{API}: {where}.{i}: expected a positive int (feature width), got {value[i]!r}.")
    if len(value) == 4 and not isinstance(value[3], Mapping):
        raise ValueError(f"{API}: {where}.3: expected a dict of optimizer options, got {value[3]!r}.")
    return PROJECTIONS[kind](value[1], value[2])


def _match_terms(matches) -> list[Term]:
    if matches is None:
        return []
    if not isinstance(matches, (list, tuple)):
        raise ValueError(f"{API}: intermediate_matches: expected a list of matches, got {type(matches).__name__}.")
    terms, names = [], set()
    for i, match in enumerate(matches):
        where = f"intermediate_matches.{i}"
        if not isinstance(match, Mapping):
            raise ValueError(f"{API}: {where}: expected a dict, got {match!r}.")
        unknown = sorted(str(k) for k in match if k not in (*MATCH_KEYS, "proj"))
        if unknown:
            raise ValueError(f"{API}: {where}.{unknown[0]}: unknown key; a match has the keys "
                             f"{[*MATCH_KEYS, 'proj']}.")
        missing = [k for k in MATCH_KEYS if k not in match]
        if missing:
            raise ValueError(f"{API}: {where}.{missing[0]}: missing (a match needs {list(MATCH_KEYS)}).")
        loss_name = _choice(f"{where}.loss", match["loss"], MATCH_LOSSES)
        loss, options, pair, masked = MATCH_LOSSES[loss_name]
        feature = _choice(f"{where}.feature", match["feature"], FEATURES)
        kinds = {_layer_kind(match[k]) for k in ("layer_S", "layer_T")}
        if kinds == {"index", "pair"}:
            raise ValueError(f"{API}: {where}.layer_S: expected layer_S and layer_T to be both layer indices or both "
                             f"pairs of them, got layer_S={match['layer_S']!r}, layer_T={match['layer_T']!r}.")
        s = _layers(f"{where}.layer_S", match["layer_S"], pair, loss_name)
        t = _layers(f"{where}.layer_T", match["layer_T"], pair, loss_name)
        weight = _number(f"{where}.weight", match["weight"])
        projection = _projection(f"{where}.proj", match.get("proj"))

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
            raise ValueError(f"{API}: {where}: {error}") from error
        term = term.named(name)
        terms.append(term if weight == 1 else weight * term)
    return terms
