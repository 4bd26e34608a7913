"""The loss algebra: terms, sums, weights, names, layer maps, projections, multi-teacher and multi-task blocks."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch import nn

import distilkit as dk

sched = dk.schedules


def outputs(gen: torch.Generator, *, width: int, layers: int, B: int = 2, L: int = 4, V: int = 5, grad=False):
    def r(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_(grad)

    return {"logits": r(B, L, V), "hidden": [r(B, L, width) for _ in range(layers)],
            "attention": [r(B, 2, L, L) for _ in range(layers)]}


# ------------------------------------------------------------------------------------------------ terms
def test_on_builds_a_term_with_readable_default_names():
    assert dk.kd_ce.on("logits").name == "kd_ce"
    assert dk.hidden_mse.on(("hidden", 1), ("hidden", 3)).name == "hidden_mse/1-3"
    assert dk.fsp.on([("hidden", 0), ("hidden", 1)], [("hidden", 0), ("hidden", 3)]).name == "fsp/0,1-0,3"
    assert dk.hard_ce.on("logits").labels == "labels"
    term = dk.hidden_mse.on(("hidden", 2))
    assert term.teacher == term.student == ("hidden", 2)


def test_calling_a_loss_is_calling_the_pure_function():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(dk.kd_kl(s, t, temperature=2.0), dk.losses.kd_kl(s, t, temperature=2.0))
    assert dk.kd_kl.sum_count is dk.losses.kd_kl.sum_count
    assert dk.kd_kl.__doc__ == dk.losses.kd_kl.__doc__


def test_sums_weights_and_names():
    kd, hid = dk.kd_ce.on("logits"), dk.hidden_mse.on(("hidden", 0))
    spec = kd + 0.5 * hid
    assert [t.name for t in spec] == ["kd_ce", "hidden_mse/0-0"]
    assert spec["hidden_mse/0-0"].weight == (0.5,)
    ramp = sched.linear(0.0, 1.0, 10)
    scaled = ramp * (2 * spec)
    assert scaled["kd_ce"].weight == (2.0, ramp)
    assert (kd / 4).weight == (0.25,)
    assert sum([kd, hid]).terms == (kd, hid)
    assert kd.named("kd").name == "kd"


def test_duplicate_names_are_an_error_with_a_hint():
    with pytest.raises(ValueError, match=r"duplicate term name 'kd_ce'.*\.named"):
        dk.kd_ce.on("logits") + dk.kd_ce.on("logits", temperature=2.0)
    spec = dk.kd_ce.on("logits") + dk.kd_ce.on("logits", temperature=2.0).named("kd_t2")
    assert len(spec) == 2


@pytest.mark.parametrize(("build", "error", "pattern"), [
    (lambda: dk.kd_ce.on("logits", reduction="sum"), ValueError, r"option 'reduction' cannot be given"),
    (lambda: dk.kd_ce.on("logits", temprature=2.0), ValueError, r"kd_ce has no option 'temprature'"),
    (lambda: dk.kd_ce.on(("logits",)), ValueError, r"kd_ce\.on: expected a selector"),
    (lambda: dk.hidden_mse.on([("hidden", 0), ("hidden", 1)]), ValueError, r"not a pair loss"),
    (lambda: dk.hard_ce.on("logits", "logits"), ValueError, r"hard_ce takes no teacher"),
    (lambda: dk.hard_ce.on("logits", mask="m"), ValueError, r"hard_ce takes no mask"),
    (lambda: dk.jsd.on("logits", beta=dk.temperature.cwsm(2.0, 1.0)), ValueError, r"adaptive temperature"),
    (lambda: dk.hidden_mse.on("hidden", proj=nn.Linear(2, 3)), TypeError, r"expected proj to be dk\.proj"),
    (lambda: dk.kd_ce.on("logits", mask=3), TypeError, r"expected mask to be a key name"),
    (lambda: dk.kd_ce.on("logits", temperature=[2.0]), TypeError, r"option temperature"),
    (lambda: dk.kd_ce.on("logits").named("a.b"), ValueError, r"without '\.'"),
    (lambda: dk.kd_ce.on("logits") * "2", TypeError, r"expected a number, a 0-d tensor or a schedule"),
    (lambda: dk.layers(dk.hidden_mse, [(0, (1, 2))], feature="hidden"), ValueError, r"ints or both pairs"),
    (lambda: dk.layers(dk.hidden_mse, [((0, 1), (1, 2))], feature="hidden"), ValueError, r"need a pair loss"),
    (lambda: dk.proj.linear(0, 4), ValueError, r"proj\.linear: expected in_features to be a positive int"),
])
def test_bad_terms_fail_when_built(build, error, pattern):
    with pytest.raises(error, match=pattern):
        build()


def test_layers_maps_a_loss_over_layer_pairs():
    spec = dk.layers(dk.mmd, [(0, 0), (1, 3), ((0, 1), (2, 3))], feature="hidden", mask="attention_mask")
    assert [t.name for t in spec] == ["mmd/0-0", "mmd/1-3", "mmd/0,1-2,3"]
    assert spec["mmd/1-3"].student == ("hidden", 1) and spec["mmd/1-3"].teacher == ("hidden", 3)
    assert spec["mmd/0,1-2,3"].teacher == (("hidden", 2), ("hidden", 3))
    assert all(t.mask == "attention_mask" for t in spec)


def test_a_pair_loss_given_single_layers_uses_the_layer_twice():
    gen = torch.Generator().manual_seed(0)
    so, to = outputs(gen, width=3, layers=2), outputs(gen, width=5, layers=4)
    spec = dk.layers(dk.mmd, [(1, 3)], feature="hidden")
    out = dk.make_step(spec, compile=False)(so, to)
    expected = dk.losses.mmd((so["hidden"][1],) * 2, (to["hidden"][3],) * 2)
    torch.testing.assert_close(out.loss, expected)


# ------------------------------------------------------------------------------------------ projections
def test_init_params_holds_one_projection_per_projected_term():
    spec = (dk.hidden_mse.on(("hidden", 0), proj=dk.proj.linear(3, 8))
            + dk.layers(dk.cosine, [(1, 2)], feature="hidden", proj=dk.proj.tanh(3, 8))
            + dk.layers(dk.fsp, [((0, 1), (0, 1))], feature="hidden", proj=dk.proj.relu(3, 8))
            + dk.kd_ce.on("logits"))
    torch.manual_seed(0)
    params = dk.init_params(spec)
    assert list(params.keys()) == ["hidden_mse/0-0", "cosine/1-2", "fsp/0,1-0,1"]
    linear = params["hidden_mse/0-0"]
    assert isinstance(linear, nn.Linear) and linear.in_features == 3 and linear.out_features == 8
    assert torch.all(linear.bias == 0)
    big = dk.init_params(dk.hidden_mse.on("h", proj=dk.proj.linear(256, 256)))["hidden_mse"]
    assert abs(big.weight.std().item() - 0.02) < 0.001  # N(0, 0.02), as TextBrewer
    assert isinstance(params["cosine/1-2"][1], nn.Tanh) and isinstance(params["fsp/0,1-0,1"][1], nn.ReLU)
    assert len(dk.init_params(dk.kd_ce.on("logits"))) == 0
    # An equal spec (built again) accepts the same parameters.
    again = dk.init_params(dk.hidden_mse.on(("hidden", 0), proj=dk.proj.linear(3, 8))
                           + dk.layers(dk.cosine, [(1, 2)], feature="hidden", proj=dk.proj.tanh(3, 8))
                           + dk.layers(dk.fsp, [((0, 1), (0, 1))], feature="hidden", proj=dk.proj.relu(3, 8)))
    again.load_state_dict(params.state_dict())


def test_projection_is_applied_to_the_student_only():
    gen = torch.Generator().manual_seed(1)
    so, to = outputs(gen, width=3, layers=2), outputs(gen, width=8, layers=2)
    spec = dk.hidden_mse.on(("hidden", 1), proj=dk.proj.relu(3, 8))
    params = dk.init_params(spec)
    out = dk.make_step(spec, compile=False)(so, to, params=params)
    expected = dk.losses.hidden_mse(params["hidden_mse/1-1"](so["hidden"][1]), to["hidden"][1])
    torch.testing.assert_close(out.loss, expected)
    expected.backward()
    assert params["hidden_mse/1-1"][0].weight.grad is not None


# ------------------------------------------------------------------------------------------ evaluation
def test_spec_value_is_the_weighted_sum_of_its_terms():
    gen = torch.Generator().manual_seed(2)
    so, to = outputs(gen, width=4, layers=3), outputs(gen, width=4, layers=3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[0, 1, -100, 2], [4, -100, 1, 1]])
    weight = sched.linear(0.0, 1.0, 10)
    spec = (dk.kd_kl.on("logits", temperature=2.0, mask="attention_mask")
            + 0.5 * dk.hidden_mse.on(("hidden", 1), ("hidden", 2), mask="attention_mask")
            + weight * dk.hard_ce.on("logits")
            + 3 * dk.attention_kl.on(("attention", 0), mask="attention_mask", inputs="logits"))
    batch = {"attention_mask": mask, "labels": labels}
    out = dk.make_step(spec, compile=False)(so, to, batch, step=4)
    parts = {
        "kd_kl": dk.losses.kd_kl(so["logits"], to["logits"], temperature=2.0, mask=mask),
        "hidden_mse/1-2": dk.losses.hidden_mse(so["hidden"][1], to["hidden"][2], mask=mask),
        "hard_ce": dk.losses.hard_ce(so["logits"], labels),
        "attention_kl/0-0": dk.losses.attention_kl(so["attention"][0], to["attention"][0], mask=mask, inputs="logits"),
    }
    weights = {"kd_kl": 1.0, "hidden_mse/1-2": 0.5, "hard_ce": 0.4, "attention_kl/0-0": 3.0}
    torch.testing.assert_close(out.loss, sum(weights[k] * v for k, v in parts.items()))
    for name, value in parts.items():
        torch.testing.assert_close(out.metrics[f"{name}/loss"], value)
        torch.testing.assert_close(out.metrics[f"{name}/weight"], torch.tensor(weights[name]))
    assert out.metrics["kd_kl/temperature"].item() == 2.0
    assert set(out.metrics) == {"loss", "kd_kl/temperature"} | {f"{n}/{k}" for n in parts for k in ("loss", "weight")}


def test_keys_are_looked_up_in_the_batch_then_student_then_teacher():
    gen = torch.Generator().manual_seed(3)
    so, to = outputs(gen, width=4, layers=1), outputs(gen, width=4, layers=1)
    in_batch, in_student = torch.tensor([[1, 1, 0, 0]] * 2), torch.tensor([[1, 1, 1, 0]] * 2)
    spec = dk.hidden_mse.on(("hidden", 0), mask="m")
    step = dk.make_step(spec, compile=False)
    value = step({**so, "m": in_student}, {**to, "m": torch.ones(2, 4)}, {"m": in_batch}).loss
    torch.testing.assert_close(value, dk.losses.hidden_mse(so["hidden"][0], to["hidden"][0], mask=in_batch))
    value = step({**so, "m": in_student}, {**to, "m": torch.ones(2, 4)}, {}).loss
    torch.testing.assert_close(value, dk.losses.hidden_mse(so["hidden"][0], to["hidden"][0], mask=in_student))


def test_optional_mask_keys():
    gen = torch.Generator().manual_seed(4)
    so, to = outputs(gen, width=4, layers=1), outputs(gen, width=4, layers=1)
    step = dk.make_step(dk.kd_ce.on("logits", mask="logits_mask?"), compile=False)
    torch.testing.assert_close(step(so, to).loss, dk.losses.kd_ce(so["logits"], to["logits"]))
    m = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(step(so, to, {"logits_mask": m}).loss,
                               dk.losses.kd_ce(so["logits"], to["logits"], mask=m))


def test_a_selected_list_of_logits_is_summed_with_masks_zipped_or_shared():
    gen = torch.Generator().manual_seed(5)
    zs = [torch.randn(2, 4, 5, generator=gen) for _ in range(2)]
    zt = [torch.randn(2, 4, 5, generator=gen) for _ in range(2)]
    masks = [torch.tensor([[1, 1, 0, 0]] * 2), torch.tensor([[1, 1, 1, 0]] * 2)]
    step = dk.make_step(dk.kd_ce.on("logits", mask="logits_mask", temperature=4.0, t2_scale=False), compile=False)
    zipped = step({"logits": zs}, {"logits": zt}, {"logits_mask": masks}).loss
    torch.testing.assert_close(zipped, sum(dk.losses.kd_ce(s, t, temperature=4.0, t2_scale=False, mask=m)
                                           for s, t, m in zip(zs, zt, masks, strict=True)))
    shared = step({"logits": zs}, {"logits": zt}, {"logits_mask": masks[:1]}).loss
    torch.testing.assert_close(shared, sum(dk.losses.kd_ce(s, t, temperature=4.0, t2_scale=False, mask=masks[0])
                                           for s, t in zip(zs, zt, strict=True)))
    with pytest.raises(ValueError, match=r"kd_ce \(term 'kd_ce'\): expected masks to list 1 or 2 entries"):
        step({"logits": zs}, {"logits": zt}, {"logits_mask": masks * 2})


def test_scheduled_and_adaptive_temperatures():
    gen = torch.Generator().manual_seed(6)
    so, to = outputs(gen, width=4, layers=1), outputs(gen, width=4, layers=1)
    temp = sched.linear(8.0, 2.0, steps=10)
    out = dk.make_step(dk.kd_ce.on("logits", temperature=temp), compile=False)(so, to, step=5)
    torch.testing.assert_close(out.loss, dk.losses.kd_ce(so["logits"], to["logits"], temperature=5.0))
    assert out.metrics["kd_ce/temperature"].item() == pytest.approx(5.0)
    flsw = dk.temperature.flsw(4.0, 1.0, 2.0)
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = dk.make_step(dk.kd_ce.on("logits", temperature=flsw, mask="m"), compile=False)(so, to, {"m": m})
    rows = flsw(so["logits"], to["logits"], mask=m)
    torch.testing.assert_close(out.loss, dk.losses.kd_ce(so["logits"], to["logits"], temperature=rows, mask=m))


def test_probability_shift_puts_the_label_first_and_is_pure():
    z = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 9.0], [7.0, 1.0, 0.0]])
    before = z.clone()
    shifted = dk.probability_shift(z, torch.tensor([0, -100, 0]))
    assert torch.equal(shifted, torch.tensor([[5.0, 1.0, 2.0], [3.0, 0.0, 9.0], [7.0, 1.0, 0.0]]))
    assert torch.equal(z, before)
    seq = torch.randn(2, 3, 6)
    labels = torch.randint(0, 6, (2, 3))
    out = dk.probability_shift(seq, labels)
    assert torch.equal(out.argmax(-1), labels)
    assert torch.equal(out.sort(-1).values, seq.sort(-1).values)  # a permutation of each row

    term = dk.kd_kl.on("logits", probability_shift="labels")
    value = dk.make_step(term, compile=False)({"logits": seq * 0}, {"logits": seq}, {"labels": labels}).loss
    torch.testing.assert_close(value, dk.losses.kd_kl(seq * 0, out))


def test_two_step_distillation_with_piecewise_constant_weights():
    """TextBrewer's two-stage recipe: intermediate layers first, then the prediction layer."""
    boundary = 100
    first = sched.piecewise_constant([boundary], [1.0, 0.0])
    second = sched.piecewise_constant([boundary], [0.0, 1.0])
    spec = (first * dk.layers(dk.hidden_mse, [(0, 0), (1, 2)], feature="hidden")
            + second * dk.kd_ce.on("logits", temperature=4.0))
    gen = torch.Generator().manual_seed(7)
    so, to = outputs(gen, width=4, layers=2), outputs(gen, width=4, layers=3)
    step = dk.make_step(spec, compile=False)
    hidden = (dk.losses.hidden_mse(so["hidden"][0], to["hidden"][0])
              + dk.losses.hidden_mse(so["hidden"][1], to["hidden"][2]))
    kd = dk.losses.kd_ce(so["logits"], to["logits"], temperature=4.0)
    for i in (0, boundary - 1):
        torch.testing.assert_close(step(so, to, step=i).loss, hidden)
    for i in (boundary, 5 * boundary):
        torch.testing.assert_close(step(so, to, step=i).loss, kd)


# ------------------------------------------------------------------------------------- multi-teacher/task
def test_ensemble_of_logits_and_of_probabilities():
    gen = torch.Generator().manual_seed(8)
    teachers = [{"logits": torch.randn(3, 5, generator=gen)} for _ in range(3)]
    mean = dk.ensemble(teachers)["logits"]
    torch.testing.assert_close(mean, sum(t["logits"] for t in teachers) / 3)
    weighted = dk.ensemble(teachers, weights=[1.0, 0.0, 3.0])["logits"]
    torch.testing.assert_close(weighted, (teachers[0]["logits"] + 3 * teachers[2]["logits"]) / 4)
    probs = dk.ensemble(teachers, mode="probs")["logits"]
    torch.testing.assert_close(probs.softmax(-1), sum(t["logits"].softmax(-1) for t in teachers) / 3)
    listed = dk.ensemble([{"logits": [t["logits"], 2 * t["logits"]]} for t in teachers])["logits"]
    torch.testing.assert_close(listed[1], 2 * mean)
    with pytest.raises(ValueError, match=r"ensemble: expected the teachers' 'logits' to have one shape"):
        dk.ensemble([{"logits": torch.zeros(2, 3)}, {"logits": torch.zeros(2, 4)}])


def test_tasks_pick_a_spec_per_batch():
    gen = torch.Generator().manual_seed(9)
    so, to = outputs(gen, width=4, layers=1), outputs(gen, width=4, layers=1)
    spec = dk.tasks({"cls": dk.kd_ce.on("logits", temperature=2.0), "hid": dk.hidden_mse.on(("hidden", 0))})
    step = dk.make_step(spec, compile=False)
    torch.testing.assert_close(step(so, to, {"task": "cls"}).loss,
                               dk.losses.kd_ce(so["logits"], to["logits"], temperature=2.0))
    torch.testing.assert_close(step(so, to, {"task": "hid"}).loss,
                               dk.losses.hidden_mse(so["hidden"][0], to["hidden"][0]))
    with pytest.raises(ValueError, match=r"tasks: unknown task 'x'"):
        step(so, to, {"task": "x"})
    with pytest.raises(KeyError, match=r"task name under 'task'"):
        step(so, to, {})


def test_task_sampler_follows_the_size_power_rule():
    sizes = {"a": 100, "b": 400, "c": 1600}
    for tau in (1.0, 0.5, 0.0):
        sampler = dk.task_sampler(sizes, tau=tau, seed=0)
        counts = collections.Counter(next(sampler) for _ in range(30_000))
        z = sum(v**tau for v in sizes.values())
        for name, size in sizes.items():
            expected = size**tau / z
            assert abs(counts[name] / 30_000 - expected) < 4 * math.sqrt(expected * (1 - expected) / 30_000)
    first, second = dk.task_sampler(sizes, seed=3), dk.task_sampler(sizes, seed=3)
    assert [next(first) for _ in range(20)] == [next(second) for _ in range(20)]
    with pytest.raises(ValueError, match=r"task_sampler: expected a positive int size for task 'a'"):
        dk.task_sampler({"a": 0})


def test_specs_print_as_the_code_that_builds_them():
    spec = (dk.kd_kl.on("logits", mask="attention_mask", temperature=2.0).named("kd")
            + 0.5 * dk.layers(dk.hidden_mse, [(0, 1)], feature="hidden", proj=dk.proj.linear(4, 8))
            + dk.fsp.on([("hidden", 0), ("hidden", 1)]))
    assert repr(spec) == (
        "dk.kd_kl.on('logits', mask='attention_mask', temperature=2.0).named('kd')\n"
        " + 0.5 * dk.hidden_mse.on(('hidden', 0), ('hidden', 1), proj=dk.proj.linear(4, 8))\n"
        " + dk.fsp.on([('hidden', 0), ('hidden', 1)])"
    )
