"""Whole-step benchmark: TextBrewer's T4-tiny recipe, forward + backward.

kd at T = 8 on classification logits + ``L4t_hidden_mse`` (five student layers 312 wide projected to 768 and
matched to teacher layers 0, 3, 6, 9, 12) + ``L4_hidden_smmd`` (token-similarity grams of the same layers), with
``B = 32``, ``L = 128`` and a padding mask. distilkit runs the spec from ``dk.from_textbrewer`` through a compiled
``dk.make_step``; TextBrewer runs ``GeneralDistiller.compute_loss`` on the same tensors; the floor is the matrix
products the step cannot avoid, run alone: the five projections forward and backward (``x W + b``, ``dY Wᵀ``,
``xᵀ dY``), the five student grams forward and backward (one product each way: the gram of a tensor with itself has
a symmetric gradient) and the five teacher grams.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import nn

import distilkit as dk

from .harness import Row, measure_interleaved, peak_memory

LAYERS = [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]


@dataclass
class StepShapes:
    batch: int = 32
    length: int = 128
    student_width: int = 312
    teacher_width: int = 768
    classes: int = 2

    @classmethod
    def tiny(cls) -> StepShapes:
        return cls(batch=2, length=8, student_width=6, teacher_width=10, classes=2)


def t4_tiny_config(shapes: StepShapes) -> dict:
    proj = ["linear", shapes.student_width, shapes.teacher_width]
    return {
        "temperature": 8,
        "kd_loss_type": "ce",
        "intermediate_matches": [
            *({"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": proj}
              for s, t in LAYERS),
            *({"layer_T": [t, t], "layer_S": [s, s], "feature": "hidden", "loss": "mmd", "weight": 1}
              for s, t in LAYERS),
        ],
    }


def _outputs(shapes: StepShapes, device, gen):
    b, length = shapes.batch, shapes.length
    lengths = torch.randint(length // 2, length + 1, (b,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long().to(device)
    student = {
        "hidden": [torch.randn(b, length, shapes.student_width, generator=gen).to(device).requires_grad_()
                   for _ in range(5)],
        "logits": torch.randn(b, shapes.classes, generator=gen).to(device).requires_grad_(),
        "inputs_mask": mask,
    }
    teacher = {
        "hidden": [torch.randn(b, length, shapes.teacher_width, generator=gen).to(device) for _ in range(13)],
        "logits": torch.randn(b, shapes.classes, generator=gen).to(device),
        "inputs_mask": mask,
    }
    return student, teacher


def matmul_floor(shapes: StepShapes, device, gen):
    """The unavoidable products of the step, alone, on preallocated operands."""
    b, length, ds, dt = shapes.batch, shapes.length, shapes.student_width, shapes.teacher_width
    xs = [torch.randn(b * length, ds, generator=gen).to(device) for _ in range(5)]
    w = [torch.randn(ds, dt, generator=gen).to(device) for _ in range(5)]
    bias = torch.zeros(dt, device=device)
    dy = torch.randn(b * length, dt, generator=gen).to(device)
    hs = [x.view(b, length, ds) for x in xs]
    ht = [torch.randn(b, length, dt, generator=gen).to(device) for _ in range(5)]
    dg = torch.randn(b, length, length, generator=gen).to(device)

    def run():
        for x, wi, h, t in zip(xs, w, hs, ht, strict=True):
            torch.addmm(bias, x, wi)  # projection forward
            dy @ wi.t()  # ... backward to the input
            x.t() @ dy  # ... backward to the weight
            h @ h.transpose(1, 2)  # student gram forward
            dg @ h  # ... backward (symmetric gradient: one product)
            t @ t.transpose(1, 2)  # teacher gram forward

    flops = 5 * (3 * 2 * b * length * ds * dt + 2 * 2 * b * length * length * ds + 2 * b * length * length * dt)
    return run, flops


def _textbrewer(config: dict, params: nn.Module, spec, device):
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

    train_config = TrainingConfig(output_dir=tempfile.mkdtemp(prefix="distilkit-bench-"), device=str(device))
    model = nn.Linear(1, 1)
    distiller = GeneralDistiller(train_config, DistillationConfig.from_dict(copy.deepcopy(config)), model, model,
                                 None, None)
    matches = [t for t in spec.terms if t.proj is not None]
    projected = [p for p in distiller.projs if p is not None]
    for term, proj in zip(matches, projected, strict=True):  # same projection weights on both sides
        proj.load_state_dict(params[term.name].state_dict())
        proj.to(device)
    return distiller, [p for proj in projected for p in proj.parameters()]


def run_step(device: torch.device, *, shapes: StepShapes | None = None, compile: bool = True, rounds: int = 5,
             min_block_time: float = 0.5, log=print) -> tuple[list[Row], dict]:
    shapes = shapes or StepShapes()
    gen = torch.Generator().manual_seed(0)
    config = t4_tiny_config(shapes)
    spec = dk.from_textbrewer(config)
    params = dk.init_params(spec).to(device)
    student, teacher = _outputs(shapes, device, gen)
    leaves = [*student["hidden"], student["logits"], *params.parameters()]
    shape = f"B={shapes.batch} L={shapes.length} {shapes.student_width}->{shapes.teacher_width}"

    def zero(ps):
        for p in ps:
            p.grad = None

    fns = {}
    compile_s = None
    if compile:
        step = dk.make_step(spec, compile=True)

        def ours():
            step(student, teacher, step=0, params=params).loss.backward()
            zero(leaves)

        start = time.perf_counter()
        ours()
        compile_s = time.perf_counter() - start
        fns["distilkit make_step compiled"] = ours
    eager = dk.make_step(spec, compile=False)

    def ours_eager():
        eager(student, teacher, step=0, params=params).loss.backward()
        zero(leaves)

    fns["distilkit make_step eager"] = ours_eager
    try:
        from textbrewer.distiller_utils import post_adaptor

        distiller, tb_params = _textbrewer(config, params, spec, device)
        tb_student, tb_teacher = post_adaptor(dict(student)), post_adaptor(dict(teacher))
        tb_leaves = [*student["hidden"], student["logits"], *tb_params]

        def theirs():
            distiller.compute_loss(tb_student, tb_teacher)[0].backward()
            zero(tb_leaves)

        fns["textbrewer compute_loss"] = theirs
    except ImportError:
        pass
    floor_fn, flops = matmul_floor(shapes, device, gen)
    fns["floor: matrix products"] = floor_fn

    times = measure_interleaved(fns, device, rounds=rounds, min_block_time=min_block_time)
    floor_ms = times["floor: matrix products"][3] * 1e3  # a floor: the fastest block
    rows = []
    for name, (t, iqr, n, fastest) in times.items():
        t = fastest if name.startswith("floor") else t
        row = Row("step", "t4_tiny", name, shape, time_ms=t * 1e3, time_iqr_ms=iqr * 1e3, repeats=n,
                  floor_ms=floor_ms, floor_ratio=t * 1e3 / floor_ms)
        if name == "distilkit make_step compiled" and compile_s is not None:
            row.extra["compile_s"] = round(compile_s, 2)
        if name.startswith("floor"):
            row.extra["gflop"] = round(flops / 1e9, 3)
            row.extra["gflops"] = round(flops / t / 1e9, 1)
        row.peak_mb = peak_memory(fns[name], device)
        rows.append(row)
        log(f"  t4_tiny {name:30s} {row.time_ms:9.2f} ms (IQR {row.time_iqr_ms:6.2f}, n={n})  x{row.floor_ratio:5.3f}"
            " floor")
    summary = {"floor_ms": floor_ms, **{name: t * 1e3 for name, (t, *_) in times.items()}}
    return rows, summary
