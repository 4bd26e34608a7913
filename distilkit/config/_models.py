"""Pydantic models of spec files: one model per algebra node, frozen, ``extra="forbid"``, discriminated on ``kind``.

A spec file is a :class:`SpecConfig` (``{"kind": "spec", "version": 2, "terms": [...]}``) or a :class:`TasksConfig`
(one spec per task). Schedules and adaptive temperatures are objects with a ``kind`` naming the
``dk.schedules`` / ``dk.temperature`` function and its arguments as fields; they are checked by building them, so a
bad argument is reported at the schedule's path. Losses are names looked up in the registry (``dk.register_loss``)
when the spec is rebuilt: nothing is imported from a name written in a file.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PlainValidator,
    Strict,
    Tag,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .. import schedules as S
from .. import temperature as T
from ._options import EPS_MIN, FLOAT_MAX, FLSW_GAMMA_MAX, INT_MAX, MAX_DEPTH, T_MAX, T_MIN, loss_schema

VERSION = 2
#: the versions this distilkit reads; older ones are upgraded when read (``_convert.upgrade``).
READS = (1, 2)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _integral(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Number = Annotated[float, Strict()]  # ints are accepted (as floats); bools and strings are not; finite
Int = Annotated[int, Strict(), BeforeValidator(_integral)]  # integral floats (1e4) are accepted


def _built(value: Any) -> Any:
    if isinstance(value, _Node):
        return value.build()
    if isinstance(value, (list, tuple)):
        return tuple(_built(v) for v in value)
    return value


class _Node(_Model):
    """A schedule or adaptive temperature: built (and so checked) by the function its ``kind`` names."""

    def build(self) -> Any:
        """The ``dk.schedules`` / ``dk.temperature`` object this config describes."""
        module = T if self.kind in ("flsw", "cwsm") else S  # type: ignore[attr-defined]
        fields = {name: _built(getattr(self, name)) for name in type(self).model_fields if name != "kind"}
        return getattr(module, self.kind)(**fields)  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _check(self):
        try:
            self.build()
        except (TypeError, ValueError) as error:  # pydantic locates ValueErrors only
            raise ValueError(str(error)) from None
        return self


# ------------------------------------------------------------------------------------------------ schedules
_STEPS = "number of steps of the transition (an integer > 0)"
_BEGIN = "step at which the transition begins (an integer >= 0)"
_STEP_MAX = {"maximum": 2**24}  # the schedules' own limit (steps are exact in float32 up to there)


class ConstantConfig(_Node):
    """``dk.schedules.constant(value)``: the same value at every step."""

    kind: Literal["constant"] = "constant"
    value: Number = Field(description="the value")


class LinearConfig(_Node):
    """``dk.schedules.linear(start, end, steps, begin)``: linear from ``start`` to ``end`` over ``steps`` steps."""

    kind: Literal["linear"] = "linear"
    start: Number = Field(description="value up to step `begin`")
    end: Number = Field(description="value from step `begin + steps` on")
    steps: Int = Field(ge=1, description=_STEPS, json_schema_extra=_STEP_MAX)
    begin: Int = Field(0, ge=0, description=_BEGIN, json_schema_extra=_STEP_MAX)


class CosineConfig(_Node):
    """``dk.schedules.cosine(start, end, steps, begin)``: cosine from ``start`` to ``end`` over ``steps`` steps."""

    kind: Literal["cosine"] = "cosine"
    start: Number = Field(description="value up to step `begin`")
    end: Number = Field(description="value from step `begin + steps` on")
    steps: Int = Field(ge=1, description=_STEPS, json_schema_extra=_STEP_MAX)
    begin: Int = Field(0, ge=0, description=_BEGIN, json_schema_extra=_STEP_MAX)


class ExponentialConfig(_Node):
    """``dk.schedules.exponential(start, rate, steps)``: ``start · rate^(step / steps)``."""

    kind: Literal["exponential"] = "exponential"
    start: Number = Field(description="value at step 0")
    rate: Number = Field(gt=0, description="factor applied every `steps` steps (> 0)")
    steps: Int = Field(ge=1, description="steps per factor of `rate` (an integer > 0)", json_schema_extra=_STEP_MAX)


class PiecewiseConstantConfig(_Node):
    """``dk.schedules.piecewise_constant(boundaries, values)``: ``values[i]`` for
    ``boundaries[i-1] <= step < boundaries[i]``."""

    kind: Literal["piecewise_constant"] = "piecewise_constant"
    boundaries: list[Annotated[Int, Field(ge=0)]] = Field(description="strictly increasing steps (integers >= 0)")
    values: list[Number] = Field(description="one more value than boundaries")


class JoinConfig(_Node):
    """``dk.schedules.join(schedules, boundaries)``: schedule ``i`` from ``boundaries[i-1]`` on, called with
    ``step - boundaries[i-1]``."""

    kind: Literal["join"] = "join"
    schedules: list[ScheduleConfig] = Field(description="one more schedule than boundaries")
    boundaries: list[Annotated[Int, Field(ge=0)]] = Field(description="strictly increasing steps (integers >= 0)")


class LinearGrowthConfig(_Node):
    """``dk.schedules.linear_growth(total_steps)``: 0 → 1 over ``total_steps`` steps (TextBrewer)."""

    kind: Literal["linear_growth"] = "linear_growth"
    total_steps: Int = Field(ge=1, description="steps until the value reaches 1 (an integer > 0)",
                             json_schema_extra=_STEP_MAX)


class LinearDecayConfig(_Node):
    """``dk.schedules.linear_decay(total_steps)``: 1 → 0 over ``total_steps`` steps (TextBrewer)."""

    kind: Literal["linear_decay"] = "linear_decay"
    total_steps: Int = Field(ge=1, description="steps until the value reaches 0 (an integer > 0)",
                             json_schema_extra=_STEP_MAX)


class ProductConfig(_Node):
    """``dk.schedules.product(factors)``: the product of schedules (what ``schedule * schedule`` builds)."""

    kind: Literal["product"] = "product"
    factors: list[ScheduleConfig] = Field(description="the schedules multiplied (at least one)")


_SCHEDULES = (ConstantConfig, LinearConfig, CosineConfig, ExponentialConfig, PiecewiseConstantConfig, JoinConfig,
              LinearGrowthConfig, LinearDecayConfig, ProductConfig)
ScheduleConfig = Annotated[
    ConstantConfig | LinearConfig | CosineConfig | ExponentialConfig | PiecewiseConstantConfig | JoinConfig
    | LinearGrowthConfig | LinearDecayConfig | ProductConfig,
    Field(discriminator="kind"),
]


# ------------------------------------------------------------------------------------------------ temperatures
# Adaptive temperatures are read with the range of temperatures (checked by from_config, stated by the schema), but
# built without it: to_config writes any spec that runs for its user (a file it cannot read back says why).
_BASE = f"base temperature, in [{T_MIN:g}, {T_MAX:g}] (the range of temperatures)"
_BASE_RANGE = {"minimum": T_MIN, "maximum": T_MAX}


class FlswConfig(_Node):
    """``dk.temperature.flsw(base, beta, gamma, eps)``: per-row temperature from focal-loss-style weights,
    ``base + (mean(w) − w) · beta`` with ``w = (1 − cos)^gamma`` in ``[0, 2^gamma]``, clamped to [0.01, 100]. Read
    with ``base`` in the range of temperatures, ``gamma <= 64`` and ``eps >= 1e-18``."""

    kind: Literal["flsw"] = "flsw"
    base: Number = Field(gt=0, description=_BASE, json_schema_extra=_BASE_RANGE)
    beta: Number = Field(description="spread of the temperatures around `base`")
    gamma: Number = Field(gt=0, description=f"focal exponent (> 0, at most {FLSW_GAMMA_MAX:g})",
                          json_schema_extra={"maximum": FLSW_GAMMA_MAX})
    eps: Number = Field(1e-4, gt=0, description=f"added to the logit norms (>= {EPS_MIN:g})",
                        json_schema_extra={"minimum": EPS_MIN})


class CwsmConfig(_Node):
    """``dk.temperature.cwsm(base, beta)``: per-row temperature from the student's confidence,
    ``base + (mean(w) − w) · beta`` with ``w = 1 / (max p + 1e-3)``, clamped to [0.01, 100]. Read with ``base`` in
    the range of temperatures."""

    kind: Literal["cwsm"] = "cwsm"
    base: Number = Field(gt=0, description=_BASE, json_schema_extra=_BASE_RANGE)
    beta: Number = Field(description="spread of the temperatures around `base`")


TemperatureConfig = Annotated[FlswConfig | CwsmConfig, Field(discriminator="kind")]

for _model in (JoinConfig, ProductConfig):
    _model.model_rebuild()


# ------------------------------------------------------------------------------------------------ term fields
def _kind_of(value: Any) -> Any:
    return value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)


def _option_tag(value: Any) -> str | None:
    if value is None:
        return "null"
    for tag, types in (("bool", bool), ("int", int), ("float", float), ("str", str), ("node", (dict, BaseModel))):
        if isinstance(value, types):
            return tag
    return None


def _factor_tag(value: Any) -> str | None:
    if isinstance(value, (int, float)):
        return "number"  # bools fail as numbers, with pydantic's message
    return "schedule" if isinstance(value, (dict, BaseModel)) else None


_NodeConfig = Annotated[
    ConstantConfig | LinearConfig | CosineConfig | ExponentialConfig | PiecewiseConstantConfig | JoinConfig
    | LinearGrowthConfig | LinearDecayConfig | ProductConfig | FlswConfig | CwsmConfig,
    Field(discriminator="kind"),
]
OptionValue = Annotated[
    Annotated[None, Tag("null")]
    | Annotated[bool, Strict(), Tag("bool")]
    | Annotated[int, Strict(), Tag("int")]
    | Annotated[float, Strict(), Tag("float")]
    | Annotated[str, Strict(), Tag("str")]
    | Annotated[_NodeConfig, Tag("node")],
    Discriminator(_option_tag, custom_error_type="option_value", custom_error_message=(
        "expected a number, a string, a boolean, null, a schedule or an adaptive temperature (an object with a "
        "'kind')")),
]
Factor = Annotated[
    Annotated[Number, Tag("number")] | Annotated[ScheduleConfig, Tag("schedule")],
    Discriminator(_factor_tag, custom_error_type="weight_factor",
                  custom_error_message="expected a number or a schedule (an object with a 'kind')"),
]


def _indexed(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _selector(value: Any) -> str | tuple:
    if isinstance(value, str):
        return value
    if _indexed(value):
        return (value[0], value[1])
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) or _indexed(v) for v in value):
        return tuple(v if isinstance(v, str) else (v[0], v[1]) for v in value)
    raise ValueError(
        "expected a selector: a key ('logits'), a [key, index] pair (['hidden', 3]) or, for pair losses, a list of "
        f"two of those ([['hidden', 0], ['hidden', 2]]), got {value!r}"
    )


_KEY = {"type": "string"}
_INDEXED = {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 2, "maxItems": 2}
_SELECTOR_SCHEMA = {"anyOf": [_KEY, _INDEXED, {"type": "array", "items": {"anyOf": [_KEY, _INDEXED]},
                                               "minItems": 2, "maxItems": 2}]}
def _dump_selector(value: Any) -> Any:
    return [_dump_selector(v) for v in value] if isinstance(value, (list, tuple)) else value


Selector = Annotated[Any, PlainValidator(_selector), PlainSerializer(_dump_selector), WithJsonSchema(_SELECTOR_SCHEMA)]


class ProjConfig(_Model):
    """``dk.proj.linear/relu/tanh(in_features, out_features)``: projects the student feature to the teacher's width;
    its parameters come from ``dk.init_params(spec)``, keyed by the term's name."""

    kind: Literal["linear", "relu", "tanh"] = Field(description="activation after the linear map")
    in_features: Annotated[int, Strict()] = Field(gt=0, description="student width")
    out_features: Annotated[int, Strict()] = Field(gt=0, description="teacher width")


def _term_schema(schema: dict[str, Any]) -> None:
    # Option values are a union of JSON types in which an integer is also a number: "anyOf", not "oneOf".
    values = schema["properties"]["options"]["additionalProperties"]
    if "oneOf" in values:
        values["anyOf"] = values.pop("oneOf")


_SELECTOR = ("a key ('logits'), a [key, index] pair (['hidden', 3]) or, for pair losses (fsp, mmd), a list of two "
             "of those")
_KEY_NAME = ("looked up in the batch, then the student outputs, then the teacher outputs; a trailing '?' makes it "
             "optional")


class TermConfig(_Model):
    """One term: ``weight × loss(student[student], teacher[teacher], mask=..., **options)``, as built by
    ``dk.<loss>.on(student, teacher, mask=..., labels=..., proj=..., probability_shift=..., **options)``."""

    model_config = ConfigDict(json_schema_extra=_term_schema)

    loss: Annotated[str, Strict()] = Field(
        description="name of a registered loss (kd_ce, kd_kl, hidden_mse, ... or one given to dk.register_loss)")
    student: Selector = Field(description=f"what the loss reads from the student outputs: {_SELECTOR}")
    teacher: Selector | None = Field(
        None, description="what the loss reads from the teacher outputs (default: the student selector; none for "
                          "losses on labels or on the student alone)")
    mask: Annotated[str, Strict()] | None = Field(None, description=f"mask key, {_KEY_NAME}")
    labels: Annotated[str, Strict()] | None = Field(
        None, description=f"labels key of label losses (default 'labels'), {_KEY_NAME}")
    proj: ProjConfig | None = Field(None, description="projection of the student feature(s)")
    probability_shift: Annotated[str, Strict()] | None = Field(
        None, description="labels key: shift the teacher logits with dk.probability_shift first")
    options: dict[str, OptionValue] = Field(
        default_factory=dict, description=(
            "the loss's own options (temperature, beta, ...): numbers, strings, booleans, null, schedules and, for "
            f"temperature, adaptive temperatures. Ranges (schedules at every step): temperature in [{T_MIN:g}, "
            f"{T_MAX:g}] (beyond 100 the float32 divergences lose their accuracy; below 1e-4 the scaled logits head "
            "for overflow; real temperatures lie in 0.5-20), beta and alpha in [0, 1], eps >= 1e-18, chunk_size, "
            "num_heads and vocab_size integers >= 1, ce_weight >= 0; choices as the loss's documentation says. "
            "Every number in a spec file is finite and within float32's range (integers within ±2**53)"))
    weight: list[Factor] = Field(default_factory=list, description="factors multiplied into the weight: numbers "
                                                                   "and schedules (none: weight 1)")
    name: Annotated[str, Strict()] | None = Field(
        None, description="term name, keying metrics and projection parameters (default '<loss>/<layers>')")


def _check_version(value: object) -> object:
    if isinstance(value, bool) or value not in READS:
        raise ValueError(f"expected version 1 or 2, got {value!r}; this distilkit reads spec files of versions "
                         f"{' and '.join(map(str, READS))} (it writes {VERSION})")
    return value


class SpecConfig(_Model):
    """A distilkit loss spec: the sum of its terms (``dk.from_config`` rebuilds it, ``dk.to_config(spec)`` writes
    it)."""

    kind: Literal["spec"] = Field("spec", description="'spec'")
    version: Literal[1, 2] = Field(description="spec file format version (2; 1 is read and upgraded)")
    terms: list[TermConfig] = Field(description="the terms, summed; their names must be unique")

    _version = field_validator("version", mode="before")(_check_version)


class TasksConfig(_Model):
    """Multi-task distillation (``dk.tasks``): one spec per task, chosen per batch by ``batch[key]``."""

    kind: Literal["tasks"] = Field("tasks", description="'tasks'")
    version: Literal[1, 2] = Field(description="spec file format version (2; 1 is read and upgraded)")
    key: Annotated[str, Strict()] = Field("task", description="batch key holding the task name")
    specs: dict[str, SpecConfig] = Field(min_length=1, description="a spec per task name (their 'version' may be "
                                                                   "left out)")

    _version = field_validator("version", mode="before")(_check_version)

    @field_validator("specs", mode="before")
    @classmethod
    def _nested_version(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, dict):
            return {k: {"version": info.data.get("version", VERSION), **v} if isinstance(v, dict) and "version" not in v
                    else v for k, v in value.items()}
        return value


def _top_tag(value: Any) -> Any:
    kind = _kind_of(value)
    return "spec" if kind is None else kind  # a file without 'kind' is a spec


Config = Annotated[
    Annotated[SpecConfig, Tag("spec")] | Annotated[TasksConfig, Tag("tasks")],
    Discriminator(_top_tag, custom_error_type="config_kind",
                  custom_error_message="expected 'kind' to be 'spec' or 'tasks'"),
]
ADAPTER: TypeAdapter[SpecConfig | TasksConfig] = TypeAdapter(Config)


def schema() -> dict[str, Any]:
    """The JSON Schema of a spec file (a spec or tasks config), for editors and validators.

    Stricter than ``SpecConfig.model_json_schema()``: ``loss`` is one of the losses registered when it is called
    (distilkit's own and any given to ``dk.register_loss`` before), each loss's ``options`` are the options it takes
    (``oneOf`` one branch per loss, discriminated by ``loss``), those of the built-in losses with their types, choices
    and ranges (``minimum``/``maximum``), and ``teacher``, ``mask``, ``labels`` and ``probability_shift`` are null
    where the loss takes none. Ranges that a schema cannot state (a schedule's values at every step, the largest
    temperature of flsw/cwsm, the limits on numbers and nesting) are :func:`~distilkit.from_config`'s to check.
    """
    from ..algebra._loss import REGISTRY

    out = ADAPTER.json_schema()
    defs = out["$defs"]
    refs = {"schedule": [{"$ref": f"#/$defs/{m.__name__}"} for m in _SCHEDULES],
            "adaptive": [{"$ref": "#/$defs/FlswConfig"}, {"$ref": "#/$defs/CwsmConfig"}]}
    term = defs["TermConfig"]
    names = sorted(REGISTRY)
    term["properties"]["loss"]["enum"] = names
    branches = []
    for name in names:
        branch = loss_schema(REGISTRY[name], refs)
        branch["properties"] = {"loss": {"const": name}, **branch["properties"]}
        defs[f"Term_{name}"] = {"title": f"{name} term", **branch}
        branches.append({"if": {"properties": {"loss": {"const": name}}, "required": ["loss"]},
                         "then": {"$ref": f"#/$defs/Term_{name}"}})
    term["allOf"] = branches
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "distilkit spec file",
            "description": f"A distilkit loss spec (version {VERSION}): a 'spec' (a sum of terms) or 'tasks' (a spec "
                           "per task). Read with distilkit.from_config, written with dk.to_config(spec). Every "
                           f"number is finite and within float32's range (|x| <= {FLOAT_MAX:.4g}; integers within "
                           f"±2**53 = ±{INT_MAX}), nesting at most {MAX_DEPTH} deep, no key twice.", **out}
