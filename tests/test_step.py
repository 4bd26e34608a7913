"""make_step: eager validation, one compiled core without recompiles, errors naming the term, global normalisation."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import distilkit as dk

sched = dk.schedules
B, L, V, DS, DT = 2, 5, 7, 4, 6


def model_outputs(gen, width, layers, grad=False):
    def r(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_(grad)

    return {"logits": r(B, L, V), "hidden": [r(B, L, width) for _ in range(layers)],
            "attention": [r(B, 2, L, L).softmax(-1).detach().requires_grad_(grad) for _ in range(layers)]}


def full_spec():
    """A real composition with every kind of schedule and adaptive temperature active."""
    return (
        dk.kd_ce.on("logits", mask="attention_mask", temperature=sched.linear(8.0, 2.0, steps=40)).named("kd")
        + sched.cosine(0.0, 1.0, 30) * dk.kd_kl.on("logits", temperature=dk.temperature.flsw(4.0, 1.0, 2.0),
                                                    mask="attention_mask").named("kl_flsw")
        + sched.exponential(1.0, 0.5, 10) * dk.jsd.on("logits", temperature=dk.temperature.cwsm(2.0, 0.5),
                                                      beta=0.3).named("jsd_cwsm")
        + sched.join([sched.constant(0.1), sched.linear_growth(20)], [25])
        * dk.layers(dk.hidden_mse, [(0, 1), (1, 2)], feature="hidden", mask="attention_mask",
                    proj=dk.proj.linear(DS, DT))
        + sched.piecewise_constant([10, 30], [1.0, 0.5, 0.25]) * sched.linear_decay(60)
        * dk.attention_kl.on(("attention", 1), ("attention", 2), mask="attention_mask")
        + dk.layers(dk.fsp, [((0, 1), (1, 2))], feature="hidden", proj=dk.proj.tanh(DS, DT), mask="attention_mask")
        + 0.5 * dk.hard_ce.on("logits")
    )


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    so, to = model_outputs(gen, DS, 2, grad=True), model_outputs(gen, DT, 3)
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
             "labels": torch.tensor([[1, 2, 3, -100, -100], [0, 6, -100, -100, -100]])}
    return so, to, batch


def grads_of(out, so, params):
    leaves = [so["logits"], *so["hidden"], *so["attention"], *params.parameters()]
    return torch.autograd.grad(out.loss, leaves, allow_unused=True)


def test_compiled_step_equals_eager_values_gradients_and_metrics():
    spec = full_spec()
    torch.manual_seed(0)
    params = dk.init_params(spec)
    so, to, batch = inputs()
    eager = dk.make_step(spec, compile=False)(so, to, batch, step=17, params=params)
    compiled = dk.make_step(spec, compile=True)(so, to, batch, step=17, params=params)
    assert compiled.metrics.keys() == eager.metrics.keys()
    for key in eager.metrics:
        torch.testing.assert_close(compiled.metrics[key], eager.metrics[key], rtol=1e-5, atol=1e-6, msg=key)
        assert not compiled.metrics[key].requires_grad and compiled.metrics[key].ndim == 0
    for g_c, g_e in zip(grads_of(compiled, so, params), grads_of(eager, so, params), strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)


def test_changing_step_and_schedule_values_never_recompiles():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    spec = full_spec()
    params = dk.init_params(spec)
    step = dk.make_step(spec, compile=counter)
    so, to, batch = inputs()
    values = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(60):
            out = step(so, to, batch, step=i if i % 2 else torch.tensor(i), params=params)
            values.add(round(out.metrics["kd/temperature"].item(), 4))
    assert counter.frame_count == 1
    assert len(values) > 30  # the schedules really moved


def test_int_and_tensor_steps_agree():
    spec, (so, to, batch) = full_spec(), inputs()
    params = dk.init_params(spec)
    step = dk.make_step(spec, compile=False)
    a = step(so, to, batch, step=23, params=params)
    b = step(so, to, batch, step=torch.tensor(23), params=params)
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize("compile_", [False, "aot_eager"], ids=["eager", "compiled"])
@pytest.mark.parametrize(("mutate", "error", "pattern"), [
    (lambda so, to, b: so.pop("logits"), KeyError,
     r"kd_ce \(term 'kd'\): expected key 'logits' in the student outputs"),
    (lambda so, to, b: b.pop("attention_mask"), KeyError, r"\(term 'kd'\): expected mask key 'attention_mask'"),
    (lambda so, to, b: to["hidden"].pop(), KeyError, r"\(term 'hidden_mse/1-2'\): layer index 2 is out of range"),
    (lambda so, to, b: to.__setitem__("logits", to["logits"][..., :3]), ValueError,
     r"kd_ce \(term 'kd'\): expected student and teacher logits of the same shape"),
    (lambda so, to, b: b.__setitem__("attention_mask", b["attention_mask"][:, :3]), ValueError,
     r"kd_ce \(term 'kd'\): expected mask of shape \(2, 5\)"),
    (lambda so, to, b: to.__setitem__("logits", to["logits"].long()), TypeError,
     r"kd_ce \(term 'kd'\): expected teacher logits to be a real floating-point tensor"),
    (lambda so, to, b: so.__setitem__("hidden", so["hidden"][0]), TypeError,
     r"\(term 'hidden_mse/0-1'\): expected student outputs\['hidden'\] to be a list or tuple"),
])
def test_bad_inputs_name_the_term(compile_, mutate, error, pattern):
    spec = full_spec()
    params = dk.init_params(spec)
    step = dk.make_step(spec, compile=compile_)
    so, to, batch = inputs()
    step(so, to, batch, step=0, params=params)  # a good call first: later signatures are validated again
    mutate(so, to, batch)
    with pytest.raises(error, match=pattern):
        step(so, to, batch, step=1, params=params)


def test_projections_need_params():
    spec, (so, to, batch) = full_spec(), inputs()
    with pytest.raises(TypeError, match=r"have projections; pass params=dk\.init_params\(spec\)"):
        dk.make_step(spec, compile=False)(so, to, batch)
    with pytest.raises(KeyError, match=r"params has no projection for terms"):
        dk.make_step(spec, compile=False)(so, to, batch, params=nn.ModuleDict())


def test_check_finite_names_the_term():
    spec = dk.kd_ce.on("logits").named("kd") + dk.hidden_mse.on(("hidden", 0)).named("hid")
    gen = torch.Generator().manual_seed(1)
    so, to = model_outputs(gen, DS, 1), model_outputs(gen, DS, 1)
    so["hidden"][0] = so["hidden"][0].clone()
    so["hidden"][0][0, 0, 0] = float("inf")
    assert not torch.isfinite(dk.make_step(spec, compile=False)(so, to).loss)
    with pytest.raises(dk.NonFiniteError, match=r"make_step \(term 'hid'\): the term's value is inf"):
        dk.make_step(spec, compile=False, check_finite=True)(so, to)


def test_empty_and_fully_masked_batches_give_zero():
    spec = full_spec()
    params = dk.init_params(spec)
    so, to, batch = inputs()
    batch = {"attention_mask": torch.zeros(B, L, dtype=torch.bool), "labels": torch.full((B, L), -100)}
    out = dk.make_step(spec, compile=False)(so, to, batch, step=3, params=params)
    for name in ("kd", "kl_flsw", "hidden_mse/0-1", "attention_kl/1-2", "hard_ce", "fsp/0,1-1,2"):
        assert out.metrics[f"{name}/loss"].item() == 0.0, name


# ------------------------------------------------------------------------------------ global normalisation
def _grads(loss, params):
    return torch.autograd.grad(loss, list(params))


def test_global_counts_make_accumulated_micro_batches_equal_the_full_batch():
    """Two micro-batches with different numbers of valid tokens accumulate to the concatenated batch's gradient."""
    torch.manual_seed(0)
    student = nn.ModuleDict({"emb": nn.Linear(3, DS), "head": nn.Linear(DS, V)})
    proj_spec = (dk.kd_kl.on("logits", mask="attention_mask", temperature=2.0)
                 + 0.3 * dk.hidden_mse.on("hidden", mask="attention_mask", proj=dk.proj.linear(DS, DT))
                 + dk.hard_ce.on("logits")
                 + 0.1 * dk.cosine.on("hidden", mask="attention_mask", proj=dk.proj.linear(DS, DT)).named("cos"))
    params = dk.init_params(proj_spec)
    x = torch.randn(4, L, 3)
    teacher = {"logits": torch.randn(4, L, V), "hidden": torch.randn(4, L, DT)}
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    labels = torch.where(mask.bool(), torch.randint(0, V, (4, L)), -100)
    labels[0, 4] = -100

    def forward(rows):
        h = student["emb"](x[rows])
        return {"logits": student["head"](h), "hidden": h}

    every = [*student.parameters(), *params.parameters()]
    step = dk.make_step(proj_spec, compile=False)
    full = step(forward(slice(0, 4)), {k: v[0:4] for k, v in teacher.items()},
                {"attention_mask": mask, "labels": labels}, params=params)
    expected = _grads(full.loss, every)

    micro = [slice(0, 1), slice(1, 4)]  # 5 and 6 valid tokens: per-micro-batch means would be wrong
    batches = [{"attention_mask": mask[r], "labels": labels[r]} for r in micro]
    counts = dk.distributed.global_counts(batches, masks=["attention_mask"], labels=["labels"])
    assert counts["attention_mask"].item() == mask.sum().item()
    accumulated = [torch.zeros_like(p) for p in every]
    naive = [torch.zeros_like(p) for p in every]
    for r, b in zip(micro, batches, strict=True):
        t = {k: v[r] for k, v in teacher.items()}
        for acc, kwargs in ((accumulated, {"counts": counts}), (naive, {})):
            out = step(forward(r), t, b, params=params, **kwargs)
            for a, g in zip(acc, _grads(out.loss, every), strict=True):
                a += g if kwargs else g / len(micro)
    for got, want in zip(accumulated, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(n, w, rtol=1e-3) for n, w in zip(naive, expected, strict=True)), \
        "the per-micro-batch mean should differ here, or the test proves nothing"
