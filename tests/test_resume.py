"""Determinism and resume: the step is a pure function of (spec, outputs, batch, step, params). Saving the spec's
config, the projection state_dict and the step number, then resuming, reproduces an unbroken run exactly."""

from __future__ import annotations

import io

import torch
from torch import nn

import distilkit as dk

S = dk.schedules
B, L, V, DS, DT = 4, 6, 11, 8, 12


class Model(nn.Module):
    def __init__(self, width: int, depth: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head = nn.Embedding(50, width), nn.Linear(width, V)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, ids):
        h, hidden = self.emb(ids), []
        for layer in self.layers:
            h = torch.tanh(layer(h))
            hidden.append(h)
        return {"logits": self.head(h), "hidden": hidden}


def make_spec():
    return (dk.kd_kl.on("logits", mask="attention_mask", temperature=S.linear(6.0, 2.0, steps=8)).named("kd")
            + S.cosine(1.0, 0.1, 10) * dk.layers(dk.hidden_mse, [(0, 1), (1, 3)], feature="hidden",
                                                  mask="attention_mask", proj=dk.proj.linear(DS, DT))
            + S.piecewise_constant([4], [0.0, 0.5]) * dk.hard_ce.on("logits")
            + dk.mmd.on(("hidden", 1), ("hidden", 3), mask="attention_mask"))


def batch_for(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 50, (B, L), generator=gen)
    mask = torch.arange(L) < torch.randint(2, L + 1, (B, 1), generator=gen)
    return ids, {"attention_mask": mask, "labels": torch.where(mask, ids % V, -100)}


def train(state, steps, teacher):
    _, params, student, opt, step_fn = state
    history = []
    for i in steps:
        ids, batch = batch_for(i)
        with torch.no_grad():
            teacher_out = teacher(ids)
        out = step_fn(student(ids), teacher_out, batch, step=i, params=params)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append({k: v.clone() for k, v in out.metrics.items()})
    return history


def fresh(spec):
    params = dk.init_params(spec)
    student = Model(DS, 2, seed=1)
    opt = torch.optim.AdamW([*student.parameters(), *params.parameters()], lr=1e-2)
    return spec, params, student, opt, dk.make_step(spec, compile=False)


def test_resume_reproduces_the_unbroken_run_exactly():
    teacher = Model(DT, 4, seed=0).eval()
    torch.manual_seed(7)
    unbroken = train(fresh(make_spec()), range(10), teacher)

    torch.manual_seed(7)
    spec, params, student, opt, step_fn = fresh(make_spec())
    first = train((spec, params, student, opt, step_fn), range(5), teacher)
    buffer = io.BytesIO()
    torch.save({"spec": dk.to_config(spec).model_dump_json(), "params": params.state_dict(),
                "student": student.state_dict(), "optimizer": opt.state_dict(), "step": 5}, buffer)
    del spec, params, student, opt, step_fn

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    spec = dk.from_config(checkpoint["spec"])
    assert spec == make_spec()
    state = fresh(spec)
    state[1].load_state_dict(checkpoint["params"])
    state[2].load_state_dict(checkpoint["student"])
    state[3].load_state_dict(checkpoint["optimizer"])
    resumed = first + train(state, range(checkpoint["step"], 10), teacher)

    assert len(resumed) == len(unbroken) == 10
    for i, (a, b) in enumerate(zip(unbroken, resumed, strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"step {i}, {key}: {a[key]} != {b[key]}"
    assert len({round(m["hidden_mse/0-1/loss"].item(), 6) for m in unbroken}) == 10  # the run really trained


def test_the_step_is_a_pure_function():
    spec = make_spec()
    torch.manual_seed(3)
    params = dk.init_params(spec)
    student, teacher = Model(DS, 2, seed=1), Model(DT, 4, seed=0)
    ids, batch = batch_for(3)
    step = dk.make_step(spec, compile=False)
    with torch.no_grad():
        first = step(student(ids), teacher(ids), batch, step=3, params=params).metrics
        step(student(ids), teacher(ids), batch_for(9)[1], step=9, params=params)  # another call in between
        again = dk.make_step(spec, compile=False)(student(ids), teacher(ids), batch, step=3, params=params).metrics
        repeat = step(student(ids), teacher(ids), batch, step=3, params=params).metrics
    for key in first:
        assert torch.equal(first[key], again[key]) and torch.equal(first[key], repeat[key]), key
