"""N students trained by one compiled ``vmap(grad(...))`` call per step equal N ordinary training runs.

The vmapped step is ``benchmarks.sweep.make_sweep_step`` (students stacked by ``torch.func.stack_module_state``, one
temperature and one ``hard_ce`` weight per student as ``[N]`` tensors, the update ``p - lr · g``); the reference is
written here independently: one ``nn.Module`` per student, the loss from ``torch.nn.functional`` with a Python float
temperature and weight, ``loss.backward()`` and ``torch.optim.SGD``. The steps are compiled with
``backend="aot_eager"`` (dynamo's tracing of vmap and grad and AOT autograd, without inductor's code generation: a
cold inductor compile of this step takes ~20 s on two cores); ``DISTILKIT_SWEEP_BACKEND=inductor`` tests inductor.
The benchmark's full run compares its inductor-compiled steps with the eager loop too. No timing is asserted.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import stack_module_state

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives in the source checkout, next to distilkit/
    sys.path.insert(0, str(ROOT))

import distilkit as dk  # noqa: E402
from benchmarks import sweep  # noqa: E402
from benchmarks.harness import SCHEMA  # noqa: E402

N, STEPS, LR, BATCH = 4, 5, 0.1, 32
TEMPERATURES = [1.0, 2.0, 4.0, 8.0]
WEIGHTS = [0.0, 0.25, 1.0, 4.0]
TOL = dict(rtol=1e-5, atol=1e-6)
BACKEND = os.environ.get("DISTILKIT_SWEEP_BACKEND", "aot_eager")


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return {"logits": self.head(torch.relu(self.hidden(x)))}


def _students() -> list[Student]:
    out = []
    for i in range(N):
        torch.manual_seed(i)
        out.append(Student())
    return out


def _batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        labels = torch.randint(0, 10, (BATCH,), generator=gen)
        labels[:3] = -100  # ignored rows
        out.append((torch.randn(BATCH, 64, generator=gen), 3 * torch.randn(BATCH, 10, generator=gen), labels))
    return out


def _reference(student: Student, temperature: float, weight: float, batches) -> dict[str, torch.Tensor]:
    """One ordinary run: T² · KL(softmax(t/T) ‖ softmax(s/T)) (batch mean) + weight · cross-entropy, SGD."""
    model = copy.deepcopy(student)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, teacher_logits, labels in batches:
        logits = model(x)["logits"]
        kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                      log_target=True, reduction="batchmean") * temperature**2
        loss = kd + weight * F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def _vmapped(step, temperatures: list[float], weights: list[float], batches) -> dict[str, torch.Tensor]:
    """All N students, one ``step`` call per training step."""
    params, buffers = stack_module_state(_students())
    params = {k: v.detach() for k, v in params.items()}
    temps, ws = torch.tensor(temperatures), torch.tensor(weights)
    for x, teacher_logits, labels in batches:
        params = step(params, buffers, x, teacher_logits, labels, temps, ws)
    return params


def _assert_equal_runs(got: dict[str, torch.Tensor], temperatures, weights, batches) -> None:
    students = _students()
    for i, (t, w) in enumerate(zip(temperatures, weights, strict=True)):
        want = _reference(students[i], t, w, batches)
        assert set(got) == set(want)
        for name, value in want.items():
            torch.testing.assert_close(got[name][i], value, **TOL, msg=lambda m, i=i, n=name: f"student {i} {n}: {m}")
    start = {k: v.detach() for k, v in stack_module_state(students)[0].items()}
    assert all(not torch.allclose(got[k], start[k]) for k in got), "the students did not move"


@pytest.fixture(scope="module")
def compiled_step():
    """One compiled step for both sweeps: temperatures and weights are tensors, so new values reuse the graph."""
    return sweep.make_sweep_step(Student(), lr=LR, backend=BACKEND)


def test_temperature_sweep_equals_separate_runs(compiled_step):
    batches = _batches()
    weights = [0.5] * N
    _assert_equal_runs(_vmapped(compiled_step, TEMPERATURES, weights, batches), TEMPERATURES, weights, batches)


def test_weight_sweep_equals_separate_runs(compiled_step):
    batches = _batches()
    temperatures = [2.0] * N
    _assert_equal_runs(_vmapped(compiled_step, temperatures, WEIGHTS, batches), temperatures, WEIGHTS, batches)


def test_eager_vmap_equals_separate_runs():
    batches = _batches()
    step = sweep.make_sweep_step(Student(), lr=LR, compile=False)
    _assert_equal_runs(_vmapped(step, TEMPERATURES, WEIGHTS, batches), TEMPERATURES, WEIGHTS, batches)


@pytest.mark.skipif(not hasattr(dk, "loss_fn"), reason="dk.loss_fn is not there yet")
def test_loss_fn_sweep_equals_separate_runs():
    """The same through ``dk.loss_fn(spec)``, the spec built inside the vmapped function with the batched
    temperature and weight."""
    batches = _batches()
    step = sweep.make_sweep_step(Student(), lr=LR, loss="spec", backend=BACKEND)
    _assert_equal_runs(_vmapped(step, TEMPERATURES, WEIGHTS, batches), TEMPERATURES, WEIGHTS, batches)


def test_benchmark_smoke(tmp_path):
    """``python -m benchmarks.sweep --quick`` runs every implementation and writes the result files (no timing)."""
    stem = tmp_path / "sweep"
    assert sweep.main(["--quick", "--backend", BACKEND, "--rounds", "1", "--out", str(stem), "--note", "smoke"]) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["schema"] == SCHEMA and data["settings"]["quick"] is True and data["notes"] == ["smoke"]
    rows = data["rows"]
    assert [r["impl"] for r in rows] == list(sweep.IMPLS)
    assert all(r["suite"] == "sweep" and r["status"] == "ok" and r["time_ms"] > 0 for r in rows), rows
    assert all(r["extra"]["max_abs_diff"] < 1e-5 for r in rows)  # equal computations are timed
    (summary,) = data["summaries"].values()
    assert summary["loop_eager_over_compiled_vmap"] > 0
    text = stem.with_suffix(".md").read_text()
    assert text.startswith("# distilkit sweep benchmark") and "| compiled vmap(grad), pure losses |" in text


def test_benchmark_bad_arguments():
    with pytest.raises(SystemExit):
        sweep.main(["--size", "nope"])
