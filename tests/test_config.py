"""Spec files: pydantic models mirroring the algebra, the JSON round trip (an equal spec that evaluates identically),
the JSON Schema, and errors located by their path in the config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import distilkit as dk
from distilkit.config import ConfigError, SpecConfig, TasksConfig, TermConfig, from_config, schema, to_config

sched = dk.schedules
B, L, V, D, H = 2, 4, 7, 6, 2


# ------------------------------------------------------------------------------------------------ helpers
def outputs(gen: torch.Generator, layers: int = 3) -> dict:
    def r(*shape):
        return torch.randn(*shape, generator=gen)

    return {"logits": r(B, L, V), "hidden": [r(B, L, D) for _ in range(layers)],
            "attention": [r(B, H, L, L).softmax(-1) for _ in range(layers)], "losses": r(2).abs()}


def batch(gen: torch.Generator) -> dict:
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, -1] = False
    return {"attention_mask": mask, "labels": torch.randint(0, V, (B, L), generator=gen)}


def json_round_trip(spec):
    text = dk.to_config(spec).model_dump_json(indent=2)
    json.loads(text)  # plain JSON
    return from_config(text)


def assert_same_values(spec, rebuilt, steps=(0, 3, 7, 40, 1000), extra=None):
    gen = torch.Generator().manual_seed(0)
    so, to, b = outputs(gen), outputs(gen), {**batch(gen), **(extra or {})}
    params = dk.init_params(spec)
    for step in steps:
        a = dk.make_step(spec, compile=False)(so, to, b, step=step, params=params)
        r = dk.make_step(rebuilt, compile=False)(so, to, b, step=step, params=params)
        assert a.metrics.keys() == r.metrics.keys()
        for key in a.metrics:
            # A 0-d tensor option comes back as a number, which a loss may apply along another (equally exact)
            # path: equal to float32 rounding, not bit for bit.
            torch.testing.assert_close(r.metrics[key], a.metrics[key], rtol=2e-6, atol=1e-7,
                                       msg=f"{key} at step {step}")
        assert torch.isfinite(a.loss)


def every_loss_spec():
    T = dk.temperature
    return (
        dk.kd_ce.on("logits", temperature=2.0, mask="attention_mask")
        + dk.kd_kl.on("logits", temperature=sched.linear(4.0, 1.0, 10), t2_scale=False)
        + dk.reverse_kl.on("logits", temperature=T.flsw(2.0, 1.0, 0.5), mask="attention_mask")
        + dk.jsd.on("logits", beta=sched.cosine(0.1, 0.9, 20, begin=2), temperature=T.cwsm(2.0, 0.5))
        + dk.skew_kl.on("logits", alpha=torch.tensor(0.25), temperature=torch.tensor(1.5))
        + dk.tvd.on("logits", probability_shift="labels")
        + dk.kd_mse.on("logits", mask="attention_mask?",  # (an exponential temperature needs an end: it decays to 0)
                       temperature=sched.join([sched.exponential(3.0, 0.9, 100), sched.constant(1.0)], [1000]))
        + 0.3 * dk.hard_ce.on("logits", labels="labels", ignore_index=-1)
        + dk.hidden_mse.on(("hidden", 1), ("hidden", 2), mask="attention_mask", proj=dk.proj.tanh(D, D))
        + dk.cosine.on(("hidden", 0), mask="no_such_mask?")
        + dk.pkd.on(("hidden", -1)) / 3
        + dk.attention_kl.on(("attention", 0), ("attention", 1), mask="attention_mask", inputs="probs", eps=1e-6)
        + dk.attention_mse.on(("attention", 1), head_reduce="sum", mask="attention_mask")
        + dk.attention_ce.on(("attention", 0), head_reduce="mean").named("att_ce")
        + dk.relation_kl.on(("hidden", 2), num_heads=2, mask="attention_mask")
        + dk.layers(dk.fsp, [((0, 1), (0, 2)), (1, 1)], feature="hidden", mask="attention_mask",
                    proj=dk.proj.relu(D, D))
        + dk.layers(dk.mmd, [(0, 0), ((1, 2), (0, 2))], feature="hidden")
        + dk.nst.on(("hidden", 1), eps=1e-10)
        + sched.linear_decay(100) * dk.precomputed.on("losses")
    )


SCHEDULES = {
    "constant": sched.constant(0.7),
    "linear": sched.linear(0.1, 1.0, 30, begin=5),
    "cosine": sched.cosine(1.0, 0.1, 25),
    "exponential": sched.exponential(2.0, 0.3, 7),
    "piecewise_constant": sched.piecewise_constant([3, 10], [0.2, 0.5, 1.3]),
    "join": sched.join([sched.linear(0.0, 1.0, 4), sched.join([sched.constant(1.0), sched.cosine(1.0, 0.0, 9)], [2]),
                        sched.piecewise_constant([1], [0.25, 0.75])], [4, 20]),
    "linear_growth": sched.linear_growth(50),
    "linear_decay": sched.linear_decay(50),
    "product": sched.linear(0.0, 1.0, 10) * sched.cosine(1.0, 0.5, 30) * 0.5,
}


# ------------------------------------------------------------------------------------------------ round trips
def test_every_loss_round_trips_to_an_equal_spec_that_evaluates_identically():
    spec = every_loss_spec()
    rebuilt = json_round_trip(spec)
    assert isinstance(rebuilt, dk.Spec)
    assert rebuilt == spec
    assert [t.name for t in rebuilt] == [t.name for t in spec]
    assert_same_values(spec, rebuilt)
    assert from_config(dk.to_config(spec)) == spec  # the model itself
    assert from_config(dk.to_config(spec).model_dump()) == spec  # a dict


def _scaled_mse(student, teacher, *, mask=None, scale=1.0):
    return scale * (student - teacher).pow(2).mean()


SCALED = dk.register_loss(_scaled_mse, name="test_config_scaled_mse", replace=True)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_every_schedule_kind_round_trips_as_weight_and_option(kind):
    schedule = SCHEDULES[kind]
    spec = (schedule * dk.kd_kl.on("logits", temperature=2.0)
            + 0.5 * schedule * 2.0 * SCALED.on(("hidden", 0), ("hidden", 1), scale=schedule))
    config = dk.to_config(spec)
    assert config.terms[0].weight[0].kind == kind
    assert config.terms[1].options["scale"].kind == kind
    assert config.terms[1].weight[0].kind == "product"
    rebuilt = json_round_trip(spec)
    assert rebuilt == spec
    option = rebuilt.terms[1].option_dict["scale"]
    assert option == schedule
    for step in (0, 1, 4, 5, 6, 12, 22, 60):
        assert torch.equal(option(step), schedule(step))
    assert_same_values(spec, rebuilt, steps=(0, 4, 21, 60))


def test_numbers_are_written_as_short_json_numbers():
    spec = sched.linear(0.1, 1e-3, 10_000, begin=3) * dk.jsd.on("logits", beta=torch.tensor(0.3), temperature=2.0)
    spec = spec + dk.relation_kl.on(("hidden", 0), num_heads=torch.tensor(2)) + dk.hard_ce.on("logits")
    data = json.loads(dk.to_config(spec).model_dump_json())
    assert data["terms"][0]["weight"] == [{"kind": "linear", "start": 0.1, "end": 0.001, "steps": 10000, "begin": 3}]
    assert data["terms"][0]["options"] == {"beta": 0.3, "temperature": 2.0}
    assert data["terms"][1]["options"] == {"num_heads": 2} and isinstance(data["terms"][1]["options"]["num_heads"],
                                                                           int)
    assert data["terms"][0]["teacher"] is None  # the same as the student: left out
    assert data["terms"][2]["labels"] == "labels"
    assert from_config(data) == spec  # tensor options come back as numbers, equal to the 0-d tensors


def test_adaptive_temperatures_projections_and_probability_shift_round_trip():
    spec = (dk.kd_kl.on("logits", temperature=dk.temperature.flsw(3.0, 0.5, 2.0, eps=1e-3), probability_shift="labels")
            + dk.kd_ce.on("logits", temperature=dk.temperature.cwsm(2.5, 1.0), mask="attention_mask")
            + dk.layers(dk.hidden_mse, [(0, 1), (2, 2)], feature="hidden", proj=dk.proj.linear(D, D)))
    data = json.loads(dk.to_config(spec).model_dump_json())
    assert data["terms"][0]["options"]["temperature"] == {"kind": "flsw", "base": 3.0, "beta": 0.5, "gamma": 2.0,
                                                          "eps": 0.001}
    assert data["terms"][2]["proj"] == {"kind": "linear", "in_features": D, "out_features": D}
    rebuilt = from_config(data)
    assert rebuilt == spec
    assert dk.init_params(rebuilt).keys() == dk.init_params(spec).keys()
    assert_same_values(spec, rebuilt, steps=(0,))


def test_pair_selectors_and_optional_masks_round_trip():
    spec = (dk.layers(dk.fsp, [((0, 1), (0, 2)), (2, 2)], feature="hidden", mask="attention_mask?")
            + dk.layers(dk.mmd, [(0, 0), ((2, 1), (1, 0))], feature="hidden", mask="attention_mask")
            + dk.mmd.on(["logits", ("hidden", 1)], [("hidden", 0), ("hidden", 1)]).named("mixed"))
    data = json.loads(dk.to_config(spec).model_dump_json())
    assert data["terms"][0]["student"] == [["hidden", 0], ["hidden", 1]]
    assert data["terms"][1]["student"] == ["hidden", 2] and data["terms"][1]["teacher"] is None  # the same
    assert data["terms"][4]["student"] == ["logits", ["hidden", 1]]
    rebuilt = from_config(data)
    assert rebuilt == spec
    gen = torch.Generator().manual_seed(1)
    so = {**outputs(gen), "logits": torch.randn(B, L, D, generator=gen)}
    to = outputs(gen)
    a = dk.make_step(spec, compile=False)(so, to, batch(gen))
    r = dk.make_step(rebuilt, compile=False)(so, to, batch(gen))
    assert torch.equal(a.loss, r.loss)


def test_a_single_term_gives_a_one_term_spec():
    term = dk.kd_ce.on("logits", temperature=4.0).named("kd")
    config = to_config(term)
    assert isinstance(config, SpecConfig) and len(config.terms) == 1
    assert from_config(config) == dk.Spec((term,))


def test_tasks_round_trip():
    kd = dk.kd_ce.on("logits", temperature=2.0)
    spec = dk.tasks({"cls": kd + dk.hidden_mse.on(("hidden", 0), proj=dk.proj.linear(D, D)),
                     "ner": sched.linear_growth(10) * kd}, key="which")
    config = dk.to_config(spec)
    assert isinstance(config, TasksConfig) and config.key == "which" and list(config.specs) == ["cls", "ner"]
    rebuilt = json_round_trip(spec)
    assert isinstance(rebuilt, dk.Tasks) and rebuilt == spec
    assert_same_values(spec, rebuilt, steps=(0, 5), extra={"which": "cls"})
    assert_same_values(spec, rebuilt, steps=(0, 5), extra={"which": "ner"})
    # a task's spec may leave out its version
    data = json.loads(config.model_dump_json())
    del data["specs"]["ner"]["version"], data["specs"]["ner"]["kind"]
    assert from_config(data) == spec


def test_a_registered_user_loss_round_trips():
    def clipped_l1(student, teacher, *, mask=None, clip=1.0):
        d = (student - teacher).abs().clamp_max(clip)
        return d.mean() if mask is None else (d.mean(-1) * mask).sum() / mask.sum()

    loss = dk.register_loss(clipped_l1, name="test_config_clipped_l1", replace=True)
    spec = 2 * loss.on(("hidden", 0), ("hidden", 1), mask="attention_mask", clip=0.5) + dk.kd_ce.on("logits")
    assert json.loads(dk.to_config(spec).model_dump_json())["terms"][0]["loss"] == "test_config_clipped_l1"
    rebuilt = json_round_trip(spec)
    assert rebuilt == spec and rebuilt.terms[0].loss is loss
    assert_same_values(spec, rebuilt, steps=(0,))


def test_a_file_json_text_and_paths_are_read(tmp_path: Path):
    spec = every_loss_spec()
    text = dk.to_config(spec).model_dump_json(indent=2)
    file = tmp_path / "spec.json"
    file.write_text(text)
    assert from_config(file) == spec
    assert from_config(str(file)) == spec
    assert from_config("\n  " + text) == spec
    with pytest.raises(TypeError, match="from_config: expected a SpecConfig/TasksConfig, a dict"):
        from_config([1, 2])


def test_a_file_without_kind_is_a_spec():
    assert from_config({"version": 1, "terms": [{"loss": "kd_ce", "student": "logits"}]}) == dk.Spec(
        (dk.kd_ce.on("logits"),))


# ------------------------------------------------------------------------------------------------ to_config errors
def test_tensor_options_that_are_not_0d_cannot_be_written():
    spec = dk.kd_ce.on("logits", temperature=torch.full((B, L), 2.0)).named("kd")
    with pytest.raises(ValueError, match=r"to_config \(term 'kd'\): option 'temperature'.*shape \(2, 4\)"):
        to_config(spec)


def test_unregistered_losses_cannot_be_written():
    rogue = dk.Loss(dk.losses.hidden_mse, "test_config_rogue")
    with pytest.raises(ValueError, match=r"to_config \(term 'test_config_rogue/0-0'\): expected a registered loss"):
        to_config(rogue.on(("hidden", 0)))
    with pytest.raises(TypeError, match="to_config: expected a dk term, spec"):
        to_config("kd_ce")


# ------------------------------------------------------------------------------------------------ from_config errors
def spec_with(**term) -> dict:
    return {"kind": "spec", "version": 1, "terms": [{"loss": "kd_ce", "student": "logits", **term}]}


LINEAR = {"kind": "linear", "start": 1.0, "end": 2.0, "steps": 10}
ERRORS = [
    # (id, config, [(path, message pattern), ...])
    ("unknown-loss", spec_with(loss="nope"), [("terms.0.loss", r"unknown loss 'nope'; expected one of: .*kd_ce")]),
    ("bad-schedule-arg", spec_with(weight=[{**LINEAR, "steps": 0}]),
     [("terms.0.weight.0.steps", "greater than or equal to 1")]),
    ("schedule-check", spec_with(options={"temperature": {"kind": "join", "schedules": [LINEAR, LINEAR],
                                                           "boundaries": [3, 4]}}),
     [("terms.0.options.temperature", r"join: expected len\(schedules\) == len\(boundaries\) \+ 1 = 3, got 2")]),
    ("nested-schedule-field", spec_with(weight=[{"kind": "product", "factors": [LINEAR, {**LINEAR, "end": "x"}]}]),
     [("terms.0.weight.0.factors.1.end", "valid number")]),
    ("temperature-check", spec_with(options={"temperature": {"kind": "flsw", "base": 0.0, "beta": 1, "gamma": 1}}),
     [("terms.0.options.temperature.base", "greater than 0")]),
    ("piecewise-check", spec_with(weight=[{"kind": "piecewise_constant", "boundaries": [5, 5], "values": [1, 2, 3]}]),
     [("terms.0.weight.0", r"piecewise_constant: expected strictly increasing boundaries, got \[5, 5\]")]),
    ("unknown-schedule", spec_with(weight=[{"kind": "warmup"}]), [("terms.0.weight.0", "Input tag 'warmup'")]),
    ("extra-field", spec_with(temperature=2.0), [("terms.0.temperature", "Extra inputs are not permitted")]),
    ("extra-field-schedule", spec_with(weight=[{**LINEAR, "stop": 3}]),
     [("terms.0.weight.0.stop", "Extra inputs are not permitted")]),
    ("option-value", spec_with(options={"temperature": [1.0, 2.0]}),
     [("terms.0.options.temperature", "expected a number, a string, a boolean, null, a schedule")]),
    ("non-finite", spec_with(options={"temperature": float("inf")}), [("terms.0.options.temperature", "finite")]),
    ("bad-selector", spec_with(student=["hidden", "1", 2]), [("terms.0.student", "expected a selector")]),
    ("bad-option", spec_with(options={"beta": 0.5}), [("terms.0.options.beta", r"kd_ce has no option 'beta'")]),
    ("teacher-for-labels", {"version": 1, "terms": [{"loss": "hard_ce", "student": "logits", "teacher": "logits"}]},
     [("terms.0", "hard_ce takes no teacher outputs")]),
    ("duplicate-names", {"version": 1, "terms": [{"loss": "kd_ce", "student": "logits"}] * 2},
     [("terms.1.name", r"duplicate term name 'kd_ce' \(also terms.0\)")]),
    ("wrong-version", {"version": 3, "terms": []}, [("version", "expected version 1 or 2, got 3")]),
    ("missing-version", {"terms": []}, [("version", "Field required")]),
    ("wrong-kind", {"kind": "model", "version": 1, "terms": []}, [("<root>", "expected 'kind' to be 'spec' or")]),
    ("tasks", {"kind": "tasks", "version": 1, "specs": {"linear": {"terms": [{"loss": "zz", "student": "x"}]}}},
     [("specs.linear.terms.0.loss", "unknown loss 'zz'")]),
    ("tasks-version", {"kind": "tasks", "version": 1, "specs": {"a": {"version": 3, "terms": []}}},
     [("specs.a.version", "expected version 1 or 2")]),
    ("tasks-projections", {"kind": "tasks", "version": 1, "specs": {
        task: {"terms": [{"loss": "hidden_mse", "student": ["hidden", 0],
                          "proj": {"kind": "linear", "in_features": n, "out_features": 3}}]}
        for task, n in (("a", 2), ("b", 4))}},
     [("specs", "term 'hidden_mse/0-0' of task 'b' has a different projection")]),
    ("several", {"version": 1, "terms": [{"loss": "kd_ce", "student": "logits", "weight": [True]},
                                         {"loss": "kd_ce", "student": "logits", "proj": {"kind": "gelu"}}]},
     [("terms.0.weight.0", "valid number"),  # (in the order of the file; missing fields first in their object)
      ("terms.1.proj.in_features", "Field required"), ("terms.1.proj.out_features", "Field required"),
      ("terms.1.proj.kind", "'linear', 'relu' or 'tanh'")]),
]


@pytest.mark.parametrize(("config", "expected"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_errors_are_located_by_path(config, expected):
    with pytest.raises(ConfigError) as info:
        from_config(config)
    assert isinstance(info.value, ValueError)
    problems = info.value.problems
    assert [p for p, _ in problems] == [p for p, _ in expected], problems
    for (path, message), (_, pattern) in zip(problems, expected, strict=True):
        assert re.search(pattern, message), (path, message)
        assert f"  {path}: {message}" in str(info.value)
    assert str(info.value).startswith("from_config: invalid spec config")


def test_malformed_json_gives_the_position(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"malformed JSON at line 2, column 14: Expecting ',' delimiter"):
        from_config('{"version": 1,\n "terms": [] ')
    file = tmp_path / "bad.json"
    file.write_text('{"version": 1, "terms": [}')
    with pytest.raises(ConfigError, match=r"malformed JSON in '.*bad\.json' at line 1, column 26"):
        from_config(file)
    file.write_text('{"version": 5, "terms": []}')
    with pytest.raises(ConfigError, match=r"invalid spec config in '.*bad\.json' \(1 problem\):\n  version: expected"):
        from_config(file)


def test_a_missing_file_is_reported():
    with pytest.raises(FileNotFoundError, match=r"from_config: no such file: 'no/such/spec\.json'"):
        from_config("no/such/spec.json")
    with pytest.raises(FileNotFoundError):
        from_config(Path("no/such/spec.json"))


# ------------------------------------------------------------------------------------------------ models and schema
def test_models_are_frozen_and_forbid_extra_fields():
    config = dk.to_config(every_loss_spec())
    with pytest.raises(ValidationError, match="frozen"):
        config.version = 2
    with pytest.raises(ValidationError, match="frozen"):
        config.terms[0].loss = "kd_kl"
    with pytest.raises(ValidationError, match="Extra inputs"):
        TermConfig(loss="kd_ce", student="logits", temperature=2.0)
    assert TermConfig(loss="kd_ce", student=["hidden", 2]).student == ("hidden", 2)


def test_schema_documents_the_format():
    spec_schema = SpecConfig.model_json_schema()
    term = spec_schema["$defs"]["TermConfig"]
    assert set(term["properties"]) == set(TermConfig.model_fields)
    assert all(p.get("description") for p in term["properties"].values())
    assert "registered loss" in term["properties"]["loss"]["description"]
    assert {"LinearConfig", "JoinConfig", "ProductConfig", "FlswConfig", "CwsmConfig"} <= set(spec_schema["$defs"])
    top = schema()
    assert top["title"] == "distilkit spec file"
    assert len(top["oneOf"]) == 2 and {"SpecConfig", "TasksConfig"} <= set(top["$defs"])
    json.dumps(top)


def test_written_configs_validate_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema())
    written = [every_loss_spec(), *(dk.Spec((s * dk.kd_ce.on("logits"),)) for s in SCHEDULES.values()),
               dk.tasks({"a": dk.kd_ce.on("logits"), "b": dk.hard_ce.on("logits")})]
    for spec in written:
        validator.validate(json.loads(dk.to_config(spec).model_dump_json()))
    assert not validator.is_valid({"version": 1, "terms": [{"loss": "kd_ce", "student": "logits", "x": 1}]})


def test_version_1_files_load_upgraded_and_version_2_is_written():
    v1 = {"version": 1, "terms": [{"loss": "chunked_kd_kl", "student": "logits", "options": {"temperature": 2.0,
                                                                                              "chunk_size": 64}},
                                  {"loss": "kd_ce", "student": "logits"}]}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the upgraded spec uses no deprecated name
        spec = from_config(v1)
        assert spec == dk.kd_kl.on("logits", temperature=2.0, chunk_size=64, impl="chunked").named(
            "chunked_kd_kl") + dk.kd_ce.on("logits")
    assert json.loads(dk.to_config(spec).model_dump_json())["version"] == 2
    tasks = from_config({"kind": "tasks", "version": 1, "specs": {"a": {"terms": v1["terms"]}}})
    assert tasks.specs[0][1]["chunked_kd_kl"].loss is dk.kd_kl
