"""Spec and TextBrewer files from untrusted hands (issue 12, "Files"): one loader that bounds nesting and numbers,
refuses duplicate keys and reports every problem with its path — from the API as one ``dk.ConfigError``, from the
command line as one line each with exit status 2, never a traceback — and option ranges such that whatever it
accepts runs. The JSON Schema (``distilkit schema``) states the same names, options and ranges."""

from __future__ import annotations

import io
import json
import math
import re
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distilkit as dk
from distilkit import cli
from distilkit.config import _options as O
from distilkit.config._json import check, parse
from distilkit.config._models import ADAPTER

S = dk.schedules
DEEP = 100_000
HUGE = 10**400
T_RANGE = O.interval_text(O.T_MIN, O.T_MAX)  # "[0.0001, 100]"
T_RANGE_RE = re.escape(T_RANGE)
B, L, V, D, H = 2, 3, 5, 4, 2


def spec(*terms: dict, version: int = 2) -> dict:
    return {"kind": "spec", "version": version, "terms": list(terms)}


def kd(**options) -> dict:
    return {"loss": "kd_kl", "student": "logits", "options": options}


def problems_of(call) -> list[tuple[str, str]]:
    with pytest.raises(dk.ConfigError) as info:
        call()
    error = info.value
    assert isinstance(error, ValueError)
    for where, message in error.problems:  # the message lists every problem
        assert where in str(error) and message.split(",")[0] in str(error), (where, str(error))
    return list(error.problems)


def paths(found) -> list[str]:
    return [p for p, _ in found]


def run_cli(capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, list[str]]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8"))
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err.strip().splitlines()


def nested(depth: int) -> list:
    root: list = []
    inner = root
    for _ in range(depth - 1):
        inner.append([])
        inner = inner[0]
    return root


# ------------------------------------------------------------------------------------------------ nesting
def test_deep_nesting_in_spec_text_is_a_config_error_with_its_path(tmp_path):
    text = '{"version": 2, "terms": [' + "[" * DEEP + "]" * DEEP + "]}"
    found = problems_of(lambda: dk.from_config(text))
    assert len(found) == 1
    (where, message), = found
    assert where == "terms" + ".0" * (O.MAX_DEPTH - 1)  # the container that goes past 64 levels
    assert f"at most {O.MAX_DEPTH} nested" in message and "line 1, column" in message
    file = tmp_path / "deep.json"
    file.write_text(text)
    assert problems_of(lambda: dk.from_config(file)) == found


def test_deep_nesting_from_python_and_cycles_are_config_errors():
    found = problems_of(lambda: dk.from_config(spec(nested(DEEP))))
    assert paths(found) == ["terms" + ".0" * (O.MAX_DEPTH - 1)]  # as from the text
    cyclic: dict = {"version": 2, "terms": []}
    cyclic["terms"].append(cyclic)
    found = problems_of(lambda: dk.from_config(cyclic))
    assert len(found) == 1 and "nested" in found[0][1]


def test_deep_nesting_in_textbrewer_configs_is_a_config_error():
    text = '{"intermediate_matches": ' + "[" * DEEP + "]" * DEEP + "}"
    with pytest.raises(dk.ConfigError, match=r"^from_textbrewer: intermediate_matches\.0\.0.*at most 64 nested"):
        dk.from_textbrewer(text)
    with pytest.raises(dk.ConfigError, match="at most 64 nested"):
        dk.from_textbrewer({"intermediate_matches": nested(DEEP)})


@pytest.mark.parametrize("depth", [O.MAX_DEPTH, O.MAX_DEPTH + 1])
def test_the_depth_limit_is_exact(depth):
    value = nested(depth)
    text = json.dumps(value)
    too_deep = depth > O.MAX_DEPTH
    for loaded in (parse(text, "t", None), check(value)):
        assert loaded.fatal is too_deep
        assert bool(loaded.problems) is too_deep
        if not too_deep:
            assert loaded.value == value


def test_the_depth_scan_skips_brackets_in_strings_and_stays_linear():
    text = json.dumps({"a[{": ["]" * 200, "[" * 200], "b": nested(10)})
    assert not parse(text, "t", None).problems
    # an unterminated string of escaped quotes: a naive string pattern rescans it from every quote (quadratic)
    with pytest.raises(dk.ConfigError, match="malformed JSON"):
        dk.from_config('{"a": "' + '\\"' * 200_000 + "[" * 100)


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(("term", "where"), [
    ('{"loss": "kd_kl", "student": "logits", "options": {"temperature": HUGE}}', "terms.0.options.temperature"),
    ('{"loss": "kd_kl", "student": "logits", "weight": [{"kind": "linear", "start": 0, "end": 1, "steps": HUGE}]}',
     "terms.0.weight.0.steps"),
    ('{"loss": "kd_kl", "student": "logits", "weight": [-HUGE]}', "terms.0.weight.0"),
    ('{"loss": "hidden_mse", "student": ["hidden", 0], "proj": {"kind": "linear", "in_features": HUGE, '
     '"out_features": 4}}', "terms.0.proj.in_features"),
    ('{"loss": "kd_kl", "student": "logits", "options": {"temperature": 1e400}}', "terms.0.options.temperature"),
    ('{"loss": "kd_kl", "student": "logits", "options": {"temperature": NaN}}', "terms.0.options.temperature"),
    ('{"loss": "kd_kl", "student": "logits", "weight": [-Infinity]}', "terms.0.weight.0"),
])
def test_numbers_too_large_are_config_errors(term, where):
    text = '{"version": 2, "terms": [' + term.replace("HUGE", str(HUGE)) + "]}"
    found = problems_of(lambda: dk.from_config(text))
    assert paths(found) == [where]
    assert re.search(r"expected an integer within ±2\*\*53|expected a finite number", found[0][1]), found


def test_numbers_too_large_from_python_are_config_errors():
    found = problems_of(lambda: dk.from_config(spec(kd(temperature=HUGE), {**kd(), "weight": [float("inf")]},
                                                    {**kd(), "weight": [3.5e38], "name": "b"})))
    assert paths(found) == ["terms.0.options.temperature", "terms.1.weight.0", "terms.2.weight.0"]
    assert "401 digits" in found[0][1] and "finite" in found[1][1] and "float32" in found[2][1]
    with pytest.raises(dk.ConfigError, match=r"temperature: expected an integer within ±2\*\*53"):
        dk.from_textbrewer({"temperature": HUGE})
    with pytest.raises(dk.ConfigError, match=r"intermediate_matches\.0\.layer_T: expected an integer"):
        dk.from_textbrewer('{"intermediate_matches": [{"layer_T": ' + str(HUGE) + ', "layer_S": 0, "feature": '
                           '"hidden", "loss": "hidden_mse", "weight": 1}]}')


def test_number_limits_are_exact():
    assert not check({"a": 2**53, "b": -(2**53), "c": O.FLOAT_MAX, "d": -O.FLOAT_MAX, "e": 1e-300}).problems
    assert paths(check({"a": 2**53 + 1, "b": -(2**53) - 1, "c": 3.41e38}).problems) == ["a", "b", "c"]
    assert paths(parse('{"a": 9007199254740993, "b": 3.5e38, "c": 9007199254740992}', "t", None).problems) == [
        "a", "b"]
    assert dk.from_config(spec({"loss": "hard_ce", "student": "logits", "options": {"ignore_index": 2**53}}))


# ------------------------------------------------------------------------------------------------ duplicate keys
def test_duplicate_keys_are_reported_at_every_level():
    text = """{"version": 2, "version": 2, "terms": [
      {"loss": "kd_kl", "student": "logits", "options": {"temperature": 2, "temperature": 3}},
      {"loss": "jsd", "loss": "jsd", "student": "logits",
       "weight": [{"kind": "join", "boundaries": [3], "schedules": [{"kind": "constant", "value": 1, "value": 2},
                                                                    {"kind": "constant", "value": 1}]}]}]}"""
    found = problems_of(lambda: dk.from_config(text))
    assert paths(found) == ["version", "terms.0.options.temperature", "terms.1.loss",
                            "terms.1.weight.0.schedules.0.value"]
    assert all("expected each key once" in m and "2 times" in m for _, m in found)


def test_duplicate_keys_in_tasks_and_textbrewer_configs():
    tasks = '{"kind": "tasks", "version": 2, "specs": {"a": {"terms": []}, "a": {"terms": []}}}'
    assert paths(problems_of(lambda: dk.from_config(tasks))) == ["specs.a"]
    text = ('{"temperature": 4, "temperature": 8, "intermediate_matches": [{"layer_T": 1, "layer_S": 0, "layer_S": 1, '
            '"feature": "hidden", "loss": "hidden_mse", "weight": 1}]}')
    found = problems_of(lambda: dk.from_textbrewer(text))
    assert paths(found) == ["temperature", "intermediate_matches.0.layer_S"]


# ------------------------------------------------------------------------------------------------ ranges
@pytest.mark.parametrize(("options", "where", "pattern"), [
    ({"temperature": 1e300}, "temperature", "float32"),
    ({"temperature": 2e4}, "temperature", rf"in {T_RANGE_RE}, got 20000"),
    ({"temperature": -1.0}, "temperature", rf"in {T_RANGE_RE}, got -1"),
    ({"temperature": 0}, "temperature", rf"in {T_RANGE_RE}, got 0"),
    ({"temperature": O.T_MAX * 1.01}, "temperature", rf"in {T_RANGE_RE}"),
    ({"temperature": O.T_MIN * 0.99}, "temperature", rf"in {T_RANGE_RE}"),
    ({"temperature": S.exponential(4.0, 0.5, 100)}, "temperature", r"at every step.*\[0, 4\].*decays towards 0"),
    ({"temperature": S.linear(-1.0, 2.0, 10)}, "temperature", r"at every step.*\[-1, 2\]"),
    ({"temperature": dk.temperature.flsw(2.0, 0.0, 65.0)}, "temperature", r"flsw's gamma <= 64"),
    ({"temperature": dk.temperature.flsw(2.0, 1.0, 2.0, eps=1e-20)}, "temperature", r"flsw's eps >= 1e-18"),
    ({"temperature": dk.temperature.cwsm(1e-5, 0.0)}, "temperature", rf"cwsm's base in {T_RANGE_RE}"),
    ({"temperature": dk.temperature.cwsm(O.T_MAX * 2, 0.0)}, "temperature", rf"cwsm's base in {T_RANGE_RE}"),
    ({"t2_scale": 1}, "t2_scale", "true or false"),
    ({"impl": "fast"}, "impl", r"one of 'auto', 'dense', 'chunked'"),
    ({"chunk_size": 0}, "chunk_size", "integer >= 1 or null"),
    ({"chunk_size": 64.0}, "chunk_size", "integer >= 1 or null"),
    ({"tempreature": 2.0}, "tempreature", "kd_kl has no option 'tempreature'"),
])
def test_option_ranges(options, where, pattern):
    found = problems_of(lambda: dk.from_config(spec(kd(**{k: as_json(v) for k, v in options.items()}))))
    assert paths(found) == [f"terms.0.options.{where}"]
    assert re.search(pattern, found[0][1]), found


def as_json(value):
    """An option value as a spec file writes it (schedules and adaptive temperatures as objects)."""
    if isinstance(value, (dk.schedules.Schedule, dk.temperature.AdaptiveTemperature)):
        written = dk.to_config(dk.kd_kl.on("logits", temperature=value)).model_dump_json()
        return json.loads(written)["terms"][0]["options"]["temperature"]
    return value


@pytest.mark.parametrize(("loss", "options", "where"), [
    ("jsd", {"beta": 1.5}, "beta"), ("jsd", {"beta": as_json(S.linear(0.0, 2.0, 5))}, "beta"),
    ("skew_kl", {"alpha": -0.1}, "alpha"), ("attention_kl", {"eps": 0.0}, "eps"),
    ("attention_kl", {"inputs": "scores"}, "inputs"), ("attention_mse", {"head_reduce": "mean"}, "head_reduce"),
    ("attention_ce", {"head_reduce": "sum"}, "head_reduce"), ("nst", {"eps": 1e-30}, "eps"),
    ("relation_kl", {"num_heads": 0}, "num_heads"), ("relation_kl", {}, ""),
    ("fused_linear_kd", {"divergence": "kl"}, "divergence"), ("fused_linear_kd", {"ce_weight": -1.0}, "ce_weight"),
    ("fused_linear_kd", {"labels": "labels"}, "labels"), ("sparse_kd_kl", {"policy": "drop"}, "policy"),
    ("hard_ce", {"ignore_index": -1.5}, "ignore_index"), ("kd_mse", {"temperature": 1e5}, "temperature"),
])
def test_option_ranges_of_other_losses(loss, options, where):
    found = problems_of(lambda: dk.from_config(spec({"loss": loss, "student": "logits", "options": options})))
    assert paths(found) == [f"terms.0.options.{where}" if where else "terms.0.options"], found


def test_a_temperature_schedule_that_a_join_ends_is_accepted_and_runs():
    temperature = S.join([S.exponential(4.0, 0.5, 100), S.constant(1.0)], [500])
    rebuilt = dk.from_config(dk.to_config(dk.kd_kl.on("logits", temperature=temperature)).model_dump_json())
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(B, L, V, generator=gen, requires_grad=True)
    for step in (0, 499, 500, 10**7):
        out = dk.make_step(rebuilt, compile=False)({"logits": student}, {"logits": torch.randn(B, L, V)}, step=step)
        assert torch.isfinite(out.loss)


def test_models_and_dicts_from_python_go_through_the_same_checks():
    model = dk.SpecConfig(version=2, terms=[dk.config.TermConfig(loss="kd_kl", student="logits",
                                                                  options={"temperature": -2.0})])
    assert paths(problems_of(lambda: dk.from_config(model))) == ["terms.0.options.temperature"]
    assert paths(problems_of(lambda: dk.from_config(model.model_dump()))) == ["terms.0.options.temperature"]


def test_textbrewer_ranges():
    for config, where in [({"temperature": 1e300}, "temperature"), ({"temperature": 2e4}, "temperature"),
                          ({"temperature": O.T_MAX * 1.01}, "temperature"),
                          ({"temperature": 4, "temperature_scheduler": ["flsw", 1, 65]}, "temperature_scheduler"),
                          ({"temperature_scheduler": ["flsw", 1, 2, 0.0]}, "temperature_scheduler")]:
        assert paths(problems_of(lambda config=config: dk.from_textbrewer(config))) == [where], config


# ------------------------------------------------------------------------------------------------ every problem
def test_three_problems_give_three_problems():
    text = """{"version": 2, "terms": [
      {"loss": "kd_kl", "student": "logits", "options": {"temperature": -1}},
      {"loss": "kd_kl", "student": "logits", "mask": 3, "name": "b"},
      {"loss": "hidden_msee", "student": ["hidden", 0], "name": "c", "name": "c"}]}"""
    found = problems_of(lambda: dk.from_config(text))
    assert paths(found) == ["terms.0.options.temperature", "terms.1.mask", "terms.2.loss", "terms.2.name"]
    with pytest.raises(dk.ConfigError, match=r"^from_config: invalid spec config \(4 problems\):\n  terms\.0"):
        dk.from_config(text)
    tb = {"temperature": -1, "kd_loss_type": "kl", "intermediate_matches": [
        {"layer_T": 1, "layer_S": [0, 1], "feature": "hidden", "loss": "hidden_mse", "weight": "1"}]}
    found = problems_of(lambda: dk.from_textbrewer(tb))
    assert paths(found) == ["temperature", "kd_loss_type", "intermediate_matches.0.layer_S",
                            "intermediate_matches.0.weight"]  # in the order of the document


def test_a_refused_number_is_reported_once():
    found = problems_of(lambda: dk.from_config(spec(kd(temperature=HUGE), {**kd(), "weight": [HUGE], "name": "b"})))
    assert paths(found) == ["terms.0.options.temperature", "terms.1.weight.0"]


# ------------------------------------------------------------------------------------------------ command line
def write(tmp_path, text: str, name: str = "spec.json"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_cli_deep_nesting_huge_numbers_and_duplicates(capsys, tmp_path):
    cases = [
        ('{"version": 2, "terms": [' + "[" * DEEP + "]" * DEEP + "]}", ["terms.0.0", "at most 64 nested"]),
        ('{"version": 2, "terms": [{"loss": "kd_kl", "student": "logits", "options": {"temperature": ' + str(HUGE)
         + "}}]}", ["terms.0.options.temperature: expected an integer within"]),
        ('{"version": 2, "version": 2, "terms": []}', ["version: expected each key once"]),
        ('{"version": 2, "terms": [{"loss": "kd_kl", "student": "logits", "options": {"temperature": 1e300}}]}',
         ["terms.0.options.temperature: expected a finite number within float32"]),
        ('{"version": 2, "terms": [{"loss": "kd_kl", "student": "logits", "options": {"temperature": -2}}]}',
         [f"terms.0.options.temperature: expected temperature in {T_RANGE}, got -2"]),
    ]
    for text, fragments in cases:
        path = write(tmp_path, text)
        status, out, lines = run_cli(capsys, "validate", path)
        assert status == 2 and out == "" and len(lines) == 1, lines
        assert lines[0].startswith(f"distilkit validate: {path}: "), lines
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines)


def test_cli_three_problems_give_three_lines(capsys, tmp_path):
    path = write(tmp_path, json.dumps(spec(kd(temperature=-1), {**kd(beta=0.5), "name": "b"},
                                           {"loss": "nope", "student": "logits"})))
    status, out, lines = run_cli(capsys, "validate", path)
    assert status == 2 and out == ""
    assert [line.split(": ")[2] for line in lines] == ["terms.0.options.temperature", "terms.1.options.beta",
                                                       "terms.2.loss"], lines
    assert all(line.startswith(f"distilkit validate: {path}: ") for line in lines)


def test_cli_validate_reads_standard_input(capsys, monkeypatch):
    good = dk.to_config(dk.kd_kl.on("logits", temperature=2.0)).model_dump_json()
    status, out, lines = run_cli(capsys, "validate", "-", stdin=good, monkeypatch=monkeypatch)
    assert status == 0 and lines == [] and dk.from_config(out) == dk.from_config(good)
    bad = json.dumps(spec(kd(temperature=-1), {"loss": "kd_kl", "student": "logits", "mask": 3, "name": "b"}))
    status, out, lines = run_cli(capsys, "validate", "-", stdin=bad, monkeypatch=monkeypatch)
    assert status == 2 and out == ""
    assert lines == [f"distilkit validate: <stdin>: terms.0.options.temperature: expected temperature in {T_RANGE}, "
                     "got -1",
                     "distilkit validate: <stdin>: terms.1.mask: Input should be a valid string"]
    status, _, lines = run_cli(capsys, "validate", "-", stdin="[" * DEEP, monkeypatch=monkeypatch)
    assert status == 2 and len(lines) == 1 and "<stdin>: 0.0.0" in lines[0]


def test_cli_convert_textbrewer_reports_every_problem(capsys, tmp_path, monkeypatch):
    text = ('{"temperature": ' + str(HUGE) + ', "temperature": 2, "kd_loss_type": "kl", "intermediate_matches": '
            + "[" * DEEP + "]" * DEEP + "}")
    status, out, lines = run_cli(capsys, "convert-textbrewer", write(tmp_path, text, "tb.json"))
    assert status == 2 and out == "" and len(lines) == 1 and "at most 64 nested" in lines[0]
    text = '{"temperature": ' + str(HUGE) + ', "temperature": 2, "kd_loss_type": "kl", "kd_loss_weight": 1e300}'
    status, out, lines = run_cli(capsys, "convert-textbrewer", "-", stdin=text, monkeypatch=monkeypatch)
    assert status == 2 and out == ""
    assert [line.split(": ")[2] for line in lines] == ["temperature", "kd_loss_type", "kd_loss_weight"], lines


# ------------------------------------------------------------------------------------------------ what is accepted runs
def _outputs(gen: torch.Generator, grad: bool, stored_temperature: float = 1.0) -> dict:
    def r(*shape, scale=1.0, positive=False):
        x = torch.randn(shape, generator=gen) * scale
        x = x.abs() if positive else x
        return x.requires_grad_() if grad else x

    logits = r(B, L, V, scale=10.0)
    logprobs, indices = torch.log_softmax(logits.detach(), -1).topk(3, -1)
    tail = torch.log1p(-logprobs.exp().sum(-1).clamp_max(1 - 1e-6))
    return {"logits": logits, "hidden": [r(B, L, D), r(B, L, D)], "attention": [r(B, H, L, L).softmax(-1)],
            "lm_head": torch.randn(V, D, generator=gen), "losses": r(positive=True),
            "topk": {"indices": indices, "logprobs": logprobs, "tail": tail, "temperature": stored_temperature}}


SELECTORS = {  # loss → (student, teacher) selectors on _outputs
    "hard_ce": ("logits", None), "precomputed": ("losses", None),
    "hidden_mse": (["hidden", 0], ["hidden", 1]), "cosine": (["hidden", 0], ["hidden", 1]),
    "pkd": (["hidden", 0], ["hidden", 1]), "relation_kl": (["hidden", 0], ["hidden", 1]),
    "nst": (["hidden", 0], ["hidden", 1]), "attention_kl": (["attention", 0], None),
    "attention_mse": (["attention", 0], None), "attention_ce": (["attention", 0], None),
    "fsp": ([["hidden", 0], ["hidden", 1]], None), "mmd": ([["hidden", 0], ["hidden", 1]], None),
    "fused_linear_kd": ([["hidden", 0], "lm_head"], [["hidden", 1], "lm_head"]),
}


def _term(loss: str, options: dict) -> dict:
    student, teacher = SELECTORS.get(loss, ("logits", "topk" if loss.startswith("sparse_") else None))
    if loss == "relation_kl":
        options = {"num_heads": 2, **options}
    if loss.startswith("sparse_"):  # the teacher's data decides (see _runs)
        tail = loss == "sparse_reverse_kl" or options.get("beta") == 1.0
        options = {"policy": "tail" if tail else "renormalize", **options}
    return {"loss": loss, "student": student, "teacher": teacher, "options": options}


def _runs(config: dict) -> None:
    """``config`` is accepted, and a step with it gives a finite loss with finite gradients."""
    built = dk.from_config(config)
    gen = torch.Generator().manual_seed(0)
    # top-k teachers (sparse_*): policy="renormalize" takes any temperature but refuses reverse KL (and jsd's beta = 1)
    # when k < V; policy="tail" takes those, at the temperature the top-k was stored at only
    stored = config["terms"][0]["options"].get("temperature", 1.0)
    stored = stored if isinstance(stored, float) else 1.0
    student, teacher = _outputs(gen, grad=True), _outputs(gen, grad=False, stored_temperature=stored)
    batch = {"labels": torch.randint(0, V, (B, L), generator=gen)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # chunked_* / sparse_*
        out = dk.make_step(built, compile=False)(student, teacher, batch, step=3, params=dk.init_params(built))
        assert torch.isfinite(out.loss), config
        out.loss.backward()
    for x in (student["logits"], *student["hidden"], student["losses"]):
        assert x.grad is None or torch.isfinite(x.grad).all(), config


def _range_options() -> list[tuple[str, str, float]]:
    cases = []
    for name, loss in sorted(O.builtin_losses().items()):
        for option, kind in O.options_of(loss).items():
            if isinstance(kind, O.Range):
                for value in (kind.lo, min(kind.hi, 1e6)):  # ranges bounded by float32 alone: a large value
                    cases.append((name, option, value))
    return cases


@pytest.mark.parametrize(("loss", "option", "value"), _range_options(),
                         ids=[f"{a}-{b}-{c:g}" for a, b, c in _range_options()])
def test_every_option_at_the_ends_of_its_range_runs(loss, option, value):
    _runs(spec(_term(loss, {option: value})))


@pytest.mark.parametrize("loss", sorted(n for n, loss in O.builtin_losses().items() if loss.temperature))
@pytest.mark.parametrize("temperature", [O.T_MIN, O.T_MAX])
def test_temperatures_at_the_bounds_run_on_every_path(loss, temperature):
    impls = [{"impl": "dense"}, {"impl": "chunked", "chunk_size": 2}] if "impl" in dk.algebra.REGISTRY[
        loss].keywords else [{}]
    for impl in impls:
        _runs(spec(_term(loss, {"temperature": temperature, **impl})))
    if _term(loss, {})["options"].get("policy") != "tail":  # (a tail top-k has one temperature)
        _runs(spec(_term(loss, {"temperature": {"kind": "linear", "start": O.T_MIN, "end": O.T_MAX, "steps": 5}})))


@pytest.mark.parametrize("temperature", [
    {"kind": "cwsm", "base": 2.0, "beta": 1e30}, {"kind": "cwsm", "base": O.T_MIN, "beta": -1e30},
    {"kind": "flsw", "base": O.T_MAX, "beta": 1e30, "gamma": O.FLSW_GAMMA_MAX, "eps": O.EPS_MIN},
    {"kind": "flsw", "base": O.T_MIN, "beta": 0.0, "gamma": O.FLSW_GAMMA_MAX},
])
def test_adaptive_temperatures_at_their_limits_run(temperature):
    _runs(spec(_term("kd_kl", {"temperature": temperature}), _term("kd_mse", {"temperature": temperature})))


def test_every_builtin_option_has_a_kind():
    """When a loss gains an option, the config learns its range (distilkit/config/_options.py)."""
    missing = {(name, option) for name, loss in O.builtin_losses().items()
               for option, kind in O.options_of(loss).items() if kind is None}
    assert not missing


SCHEDULE_CASES = [
    S.constant(0.5), S.linear(1.0, 3.0, 10, begin=4), S.cosine(3.0, -1.0, 7, begin=2), S.exponential(2.0, 0.5, 3),
    S.exponential(-1.0, 1.5, 4), S.piecewise_constant([0, 5, 9], [9.0, 1.0, -2.0, 4.0]),
    S.join([S.exponential(4.0, 2.0, 2), S.linear(5.0, 0.0, 3), S.piecewise_constant([2], [7.0, -1.0])], [6, 8]),
    S.linear_growth(6), S.linear_decay(6), S.linear(-2.0, 2.0, 4) * S.cosine(3.0, -3.0, 6) * S.constant(-0.5),
]


@pytest.mark.parametrize("schedule", SCHEDULE_CASES, ids=[type(s).__name__ for s in SCHEDULE_CASES])
def test_schedule_ranges_hold_every_value(schedule):
    model = ADAPTER.validate_python(json.loads(dk.to_config(
        dk.kd_kl.on("logits", temperature=schedule)).model_dump_json()))
    node = model.terms[0].options["temperature"]
    lo, hi = O.value_range(node)
    values = [float(schedule(step)) for step in range(0, 60)]
    assert all(lo - 1e-5 <= v <= hi + 1e-5 for v in values), (lo, hi, values)
    if math.isfinite(lo) and math.isfinite(hi) and node.kind != "product":  # tight: both ends reached (or approached)
        far = float(schedule(10**6))
        assert min([*values, far]) == pytest.approx(lo, abs=1e-4) and max([*values, far]) == pytest.approx(hi, abs=1e-4)


# ------------------------------------------------------------------------------------------------ schema
@pytest.fixture(scope="module")
def validator():
    import jsonschema  # (a dev dependency: missing, these tests fail rather than skip)

    return jsonschema.Draft202012Validator(dk.config.schema())


def _best(validator, instance):
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(instance))
    return None if error is None else (".".join(map(str, error.absolute_path)), error.message)


@pytest.mark.parametrize(("term", "where", "fragment"), [
    ({"loss": "kd_kll", "student": "logits"}, "terms.0.loss", "is not one of"),
    ({"loss": "kd_kl", "student": "logits", "options": {"tempreature": 2}}, "terms.0.options", "'tempreature'"),
    ({"loss": "kd_kl", "student": "logits", "options": {"temperature": -1}}, "terms.0.options.temperature",
     "minimum"),
    ({"loss": "kd_kl", "student": "logits", "options": {"temperature": 1e5}}, "terms.0.options.temperature",
     "maximum"),
    ({"loss": "jsd", "student": "logits", "options": {"beta": 1.5}}, "terms.0.options.beta", "maximum"),
    ({"loss": "kd_kl", "student": "logits", "options": {"impl": "fast"}}, "terms.0.options.impl", "is not one of"),
    ({"loss": "kd_kl", "student": "logits", "options": {"chunk_size": 0}}, "terms.0.options.chunk_size", ""),
    ({"loss": "hard_ce", "student": "logits", "teacher": "logits"}, "terms.0.teacher", "null"),
    ({"loss": "relation_kl", "student": ["hidden", 0]}, "terms.0", "'options' is a required property"),
    ({"loss": "kd_kl", "student": "logits", "options": {"temperature": {"kind": "flsw", "base": 1e5, "beta": 1,
                                                                         "gamma": 1}}}, None, ""),
])
def test_the_schema_catches_typos_and_ranges(validator, term, where, fragment):
    found = _best(validator, spec(term))
    assert found is not None, term
    if where is not None:  # (inside an anyOf of objects, jsonschema's best match is the whole file)
        assert found[0] == where and fragment in found[1], found
    with pytest.raises(dk.ConfigError):  # the loader agrees
        dk.from_config(spec(term))


def test_the_schema_accepts_what_the_loader_accepts(validator):
    for name, loss in sorted(O.builtin_losses().items()):
        for option, kind in O.options_of(loss).items():
            if isinstance(kind, O.Range):
                for value in (kind.lo, kind.hi):
                    config = spec(_term(name, {option: value}))
                    assert _best(validator, config) is None, config
                    dk.from_config(config)
    written = [S.join([S.linear(0.0, 1.0, 4), S.constant(1.0)], [4]) * dk.kd_kl.on("logits", temperature=2.0)
               + dk.jsd.on("logits", beta=S.cosine(0.1, 0.9, 20), temperature=dk.temperature.cwsm(2.0, 0.5))
               + dk.fused_linear_kd.on([("hidden", 0), "lm_head"], divergence="jsd", chunk_size=8)
               + dk.relation_kl.on(("hidden", 0), num_heads=2) + dk.hard_ce.on("logits", ignore_index=-1)]
    for s in written:
        data = json.loads(dk.to_config(s).model_dump_json())
        assert _best(validator, data) is None
        assert dk.from_config(data) == s


def test_the_schema_names_user_losses_registered_before_it(validator):
    def clipped(student, teacher, *, mask=None, clip=1.0):
        return (student - teacher).abs().clamp_max(clip).mean()

    dk.register_loss(clipped, name="test_hardening_clipped", replace=True)
    import jsonschema

    fresh = jsonschema.Draft202012Validator(dk.config.schema())
    term = {"loss": "test_hardening_clipped", "student": ["hidden", 0], "options": {"clip": 0.5}}
    assert _best(fresh, spec(term)) is None
    assert _best(validator, spec(term))[0] == "terms.0.loss"  # not registered when that schema was made
    assert _best(fresh, spec({**term, "options": {"clipp": 0.5}}))[0] == "terms.0.options"


def test_cli_schema_constrains_loss_names_options_and_ranges(capsys):
    status, out, _ = run_cli(capsys, "schema")
    assert status == 0
    printed = json.loads(out)
    term = printed["$defs"]["TermConfig"]
    assert set(O.builtin_losses()) <= set(term["properties"]["loss"]["enum"])
    assert len(term["allOf"]) == len(term["properties"]["loss"]["enum"])
    kd_options = printed["$defs"]["Term_kd_kl"]["properties"]["options"]
    assert kd_options["additionalProperties"] is False
    number = kd_options["properties"]["temperature"]["anyOf"][0]
    assert (number["minimum"], number["maximum"]) == (O.T_MIN, O.T_MAX)
    beta = printed["$defs"]["Term_jsd"]["properties"]["options"]["properties"]["beta"]["anyOf"][0]
    assert (beta["minimum"], beta["maximum"]) == (0.0, 1.0)
    assert printed["$defs"]["FlswConfig"]["properties"]["base"]["maximum"] == O.T_MAX


# ------------------------------------------------------------------------------------------------ fuzz
def _json_text(value, draw) -> str:
    """``value`` as JSON text, some objects with a key written twice."""
    if isinstance(value, dict):
        items = [f"{json.dumps(k)}: {_json_text(v, draw)}" for k, v in value.items()]
        if items and draw(st.booleans()):
            items.append(items[0])
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_json_text(v, draw) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "1e999", -math.inf: "-1e999"}.get(value, "NaN")
    return json.dumps(value)


_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-(2**60), 2**60), st.sampled_from([HUGE, -HUGE, 2**53 + 1]),
                    st.floats(), st.sampled_from(["kd_kl", "logits", "linear", "temperature", "hidden", "tasks"]))
_KEYS = st.sampled_from(["version", "terms", "loss", "student", "options", "temperature", "beta", "weight", "kind",
                         "start", "end", "steps", "specs", "layer_T", "intermediate_matches", "kd_loss_type", "x"])
_VALUES = st.recursive(_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(_KEYS, inner, max_size=4)), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_files_only_raise_config_errors(data):
    value = data.draw(st.dictionaries(_KEYS, _VALUES, max_size=4))
    if data.draw(st.booleans()):
        value = {"version": 2, "terms": [value, *data.draw(st.lists(_VALUES, max_size=2))]}
    depth = data.draw(st.sampled_from([0, 0, 70, 5000]))
    text = _json_text(value, data.draw)
    if depth:
        text = text[:-1] + (", " if len(text) > 2 else "") + '"deep": ' + "[" * depth + "]" * depth + "}"
    for read in (dk.from_config, dk.from_textbrewer):
        try:
            read(text)
        except dk.ConfigError as error:
            assert error.problems and all(isinstance(p, str) and m for p, m in error.problems)
