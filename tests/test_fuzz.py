"""Fuzzing: random mutations of valid spec configs only ever raise the documented errors, and random shapes
through the step either work or raise them. (Random shapes and masks through every loss, with the mask and
(sum, count) contracts, are fuzzed in test_properties.py.)"""

from __future__ import annotations

import copy
import json
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distilkit as dk

S = dk.schedules
DOCUMENTED = (dk.ConfigError, ValueError, TypeError, KeyError)


def rich_config() -> dict:
    spec = (
        dk.kd_kl.on("logits", mask="attention_mask?", temperature=S.join([S.constant(4.0), S.linear(4.0, 1.0, 50)],
                                                                          [10])).named("kd")
        + S.cosine(0.0, 1.0, 20) * dk.jsd.on("logits", beta=0.3, temperature=dk.temperature.cwsm(2.0, 0.5))
        + 0.5 * dk.layers(dk.hidden_mse, [(0, 1), (1, 3)], feature="hidden", mask="attention_mask",
                          proj=dk.proj.relu(4, 8))
        + dk.layers(dk.mmd, [((0, 1), (2, 3))], feature="hidden")
        + S.piecewise_constant([5], [0.0, 1.0]) * S.linear_decay(100) * dk.hard_ce.on("logits")
        + dk.attention_kl.on(("attention", 0), ("attention", 1), mask="attention_mask", inputs="logits")
    )
    return json.loads(dk.to_config(spec).model_dump_json())


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 1000), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=8), st.sampled_from(["kd_ce", "linear", "spec", "tasks", "logits", "hidden"]),
                 st.lists(st.integers(-2, 5), max_size=3), st.builds(dict), st.builds(lambda: {"kind": "linear"}))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate(config: dict, data) -> dict:
    config = copy.deepcopy(config)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(config) if p]
        path = data.draw(st.sampled_from(paths))
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "extra", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = data.draw(JUNK)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "extra" and isinstance(parent, dict):
            parent[data.draw(st.text(min_size=1, max_size=6))] = data.draw(JUNK)
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
    return config


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_configs_only_raise_documented_errors(data):
    config = _mutate(rich_config(), data)
    try:
        spec = dk.from_config(config)
    except DOCUMENTED as error:
        assert str(error), "errors carry a message"
        return
    # What loads must round-trip.
    assert dk.from_config(dk.to_config(spec)) == spec


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_mutated_json_text_only_raises_documented_errors(data):
    text = json.dumps(rich_config())
    cut = data.draw(st.integers(0, len(text)))
    garbage = data.draw(st.text(max_size=3))
    try:
        spec = dk.from_config(text[:cut] + garbage + text[cut + len(garbage):])
    except DOCUMENTED as error:
        assert str(error)
    else:
        assert isinstance(spec, (dk.Spec, dk.Tasks))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_shapes_through_the_step_work_or_raise_documented_errors(data):
    b, l = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 5))
    v_s, v_t = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    d_s, d_t = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    mask_len = data.draw(st.sampled_from([l, l + 1]))
    gen = torch.Generator().manual_seed(0)

    def outs(v, d):
        return {"logits": torch.randn(b, l, v, generator=gen), "hidden": [torch.randn(b, l, d, generator=gen)] * 2}

    spec = (dk.kd_kl.on("logits", mask="attention_mask", temperature=2.0)
            + dk.hidden_mse.on(("hidden", 1), mask="attention_mask")
            + dk.mmd.on(("hidden", 0), mask="attention_mask") + dk.nst.on(("hidden", 1), mask="attention_mask"))
    batch = {"attention_mask": torch.rand(b, mask_len, generator=gen) < 0.5}
    try:
        out = dk.make_step(spec, compile=False)(outs(v_s, d_s), outs(v_t, d_t), batch)
    except DOCUMENTED as error:
        assert "(term '" in str(error)
        assert mask_len != l or v_s != v_t or d_s != d_t
        return
    assert mask_len == l and v_s == v_t and d_s == d_t
    assert math.isfinite(out.loss.item())
