"""``python -m benchmarks.sweep``: N students at N temperatures trained in one call per step, against a loop.

Every student minimises ``kd_kl`` at its own temperature + a weight × ``hard_ce`` on the digits (scikit-learn's
bundled 8×8 images) with plain SGD. One training step of all N students is done, and timed, six ways:

* ``loop: eager + torch.optim.SGD``: the ordinary loop, N forward / backward / ``optimizer.step()`` calls;
* ``loop: eager, torch.nn.functional loss``: the same with the loss written with ``torch.nn.functional`` (without
  distilkit's eager argument checks);
* ``loop: compiled single-student step``: N calls of one ``torch.compile``d ``grad`` + update of one student;
* ``vmap(grad), eager``: the N students stacked by ``torch.func.stack_module_state``, one ``vmap(grad(...))`` call
  over the students, the temperatures and the weights, then the update ``p - lr · g``;
* ``compiled vmap(grad), pure losses``: the same under ``torch.compile(fullgraph=True)``;
* ``compiled vmap(grad), dk.loss_fn``: the same through ``dk.loss_fn(spec)``, the spec built inside the vmapped
  function from the batched temperature and weight.

Before timing, every variant runs a few steps from the same initial students, and its parameters are compared with
the eager loop's (``max_abs_diff``): the times are of equal computations. The first call's time (tracing and
compilation included) is reported too; a full run compiles into a fresh inductor cache directory (``--warm-cache``
keeps the default one), so that the first compilation of a run is cold (later ones in the run reuse identical
kernels and inductor's start-up). The teacher is an untrained MLP of the demo's teacher size:
its logits are cached, and the time of a step does not depend on their values. Times are medians of interleaved
blocks (:func:`benchmarks.harness.measure_interleaved`). Results: ``benchmarks/results/sweep-<device>.json`` (schema
``distilkit-bench/1``, suite ``sweep``) and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

import distilkit as dk
from distilkit.demo import MLP, load_digits_split

from .harness import (
    SCHEMA,
    Row,
    describe_machine,
    device_from_args,
    device_slug,
    load_average,
    measure_interleaved,
    synchronize,
)
from .report import fmt, notes_lines, write_data

RESULTS = Path(__file__).resolve().parent / "results"
LOOP_EAGER = "loop: eager + torch.optim.SGD"
LOOP_NAIVE = "loop: eager, torch.nn.functional loss"
LOOP_COMPILED = "loop: compiled single-student step"
VMAP_EAGER = "vmap(grad), eager"
VMAP_COMPILED = "compiled vmap(grad), pure losses"
VMAP_SPEC = "compiled vmap(grad), dk.loss_fn"
IMPLS = (LOOP_EAGER, LOOP_NAIVE, LOOP_COMPILED, VMAP_EAGER, VMAP_COMPILED, VMAP_SPEC)


# ------------------------------------------------------------------------------------------------ the losses
def pure_loss(logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature, weight) -> Tensor:
    """``kd_kl`` at ``temperature`` + ``weight`` · ``hard_ce`` (each a float or a 0-d tensor, batched under vmap)."""
    return dk.kd_kl(logits, teacher_logits, temperature=temperature) + weight * dk.hard_ce(logits, labels)


def naive_loss(logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, weight: float) -> Tensor:
    """:func:`pure_loss` as usually written with ``torch.nn.functional`` (no argument checks)."""
    kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                  log_target=True, reduction="batchmean")
    return temperature**2 * kd + weight * F.cross_entropy(logits, labels)


def spec(temperature, weight) -> dk.Spec:
    """The spec of :func:`pure_loss`. A tensor weight goes through ``dk.schedules.constant`` (``Term * factor`` takes
    numbers and schedules)."""
    return (dk.kd_kl.on("logits", temperature=temperature)
            + dk.schedules.constant(weight) * dk.hard_ce.on("logits", labels="labels"))


def _bind(kind: str, temperature, weight) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``f(logits, teacher_logits, labels)``: the loss of kind ``"pure"`` (:func:`pure_loss`) or ``"spec"``
    (``dk.loss_fn`` of :func:`spec`, the spec built here, with the given, possibly batched, hyperparameters)."""
    if kind == "pure":
        return lambda logits, teacher_logits, labels: pure_loss(logits, teacher_logits, labels, temperature, weight)
    f = dk.loss_fn(spec(temperature, weight))
    return lambda logits, teacher_logits, labels: f({"logits": logits}, {"logits": teacher_logits},
                                                    {"labels": labels})[0]


# ------------------------------------------------------------------------------------------------ the steps
def _student_loss(model: nn.Module, kind: str) -> Callable[..., Tensor]:
    """``f(params, buffers, x, teacher_logits, labels, temperature, weight)``: one student's loss, with the
    parameters as arguments (``functional_call`` on a copy of ``model`` on the meta device)."""
    if kind not in ("pure", "spec"):
        raise ValueError(f"expected loss 'pure' or 'spec', got {kind!r}")
    base = copy.deepcopy(model).to("meta")

    def student_loss(params, buffers, x, teacher_logits, labels, temperature, weight):
        # the loss (and the spec) first: in torch 2.13, dynamo cannot trace a term's construction (``.on``, which
        # reads the loss's signature) after functional_call has swapped the module's parameter dicts
        loss = _bind(kind, temperature, weight)
        logits = functional_call(base, (params, buffers), (x,))["logits"]
        return loss(logits, teacher_logits, labels)

    return student_loss


def make_sweep_step(model: nn.Module, *, lr: float, loss: str = "pure", compile: bool = True,
                    backend: str = "inductor") -> Callable[..., dict[str, Tensor]]:
    """One SGD step of N students in one ``vmap(grad(...))`` call.

    Returns ``step(params, buffers, x, teacher_logits, labels, temperatures, weights) -> params``: ``params`` and
    ``buffers`` as ``stack_module_state`` gives them (``[N, ...]`` each, ``model`` being any one of the students,
    whose forward returns ``{"logits": ...}``), ``temperatures`` and ``weights`` ``[N]`` tensors, the batch
    (``x``, ``teacher_logits``, ``labels``) shared by every student. The new parameters are ``p - lr · g``.
    ``loss``: ``"pure"`` (:func:`pure_loss`) or ``"spec"`` (``dk.loss_fn`` of :func:`spec`). ``compile``: under
    ``torch.compile(fullgraph=True, backend=backend)``.
    """
    grads = vmap(grad(_student_loss(model, loss)), in_dims=(0, 0, None, None, None, 0, 0))

    def step(params, buffers, x, teacher_logits, labels, temperatures, weights):
        g = grads(params, buffers, x, teacher_logits, labels, temperatures, weights)
        return {name: p - lr * g[name] for name, p in params.items()}

    return torch.compile(step, fullgraph=True, backend=backend) if compile else step


def make_single_step(model: nn.Module, *, lr: float, loss: str = "pure", backend: str = "inductor"):
    """The compiled SGD step of one student: ``step(params, buffers, x, teacher_logits, labels, temperature,
    weight) -> params`` (temperature and weight 0-d tensors, so that one compiled graph serves every student)."""
    grads = grad(_student_loss(model, loss))

    def step(params, buffers, x, teacher_logits, labels, temperature, weight):
        g = grads(params, buffers, x, teacher_logits, labels, temperature, weight)
        return {name: p - lr * g[name] for name, p in params.items()}

    return torch.compile(step, fullgraph=True, backend=backend)


# ------------------------------------------------------------------------------------------------ the benchmark
@dataclass(frozen=True)
class Size:
    """One benchmarked configuration: N students of ``widths`` on a batch of ``batch`` digits."""

    name: str
    n: int = 8
    widths: tuple[int, ...] = (16,)  # the demo's student: 64 → 16 → 10
    batch: int = 128  # the demo's teacher-labelled rows per step
    teacher_widths: tuple[int, ...] = (256, 256)  # the demo's teacher
    lr: float = 0.1

    def describe(self) -> str:
        arch = " → ".join(str(w) for w in (64, *self.widths, 10))
        return f"N={self.n}, {arch}, batch {self.batch}"


SIZES = (Size("demo"), Size("wide", widths=(256, 256), batch=512))
QUICK = (Size("quick", n=3, widths=(8,), batch=16, teacher_widths=(8,)),)


def _temperatures(n: int) -> list[float]:
    """``n`` temperatures from 1 to 16, evenly spaced in log T."""
    return [round(float(t), 4) for t in torch.logspace(0, 4, n, base=2.0)]


def _students(size: Size, device: torch.device) -> list[nn.Module]:
    out = []
    for i in range(size.n):
        torch.manual_seed(1_000 + i)
        out.append(MLP(size.widths).to(device))
    return out


def _batch(size: Size, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    x, y, _, _ = load_digits_split()
    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: size.batch]
    torch.manual_seed(0)
    teacher = MLP(size.teacher_widths)
    with torch.no_grad():
        teacher_logits = teacher(x[rows])["logits"]
    return x[rows].to(device), teacher_logits.to(device), y[rows].to(device)


def _max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run_size(size: Size, device: torch.device, *, backend: str, check_steps: int, rounds: int,
             min_block_time: float, log: Callable[[str], Any] = print) -> tuple[list[Row], dict[str, Any]]:
    """Rows of the six implementations at ``size`` and a summary (times in ms, ratios to the compiled vmap)."""
    x, teacher_logits, labels = _batch(size, device)
    temps = _temperatures(size.n)
    weights = [1.0] * size.n
    temps_t = torch.tensor(temps, device=device)
    weights_t = torch.tensor(weights, device=device)
    temps_0d, weights_0d = list(temps_t.unbind()), list(weights_t.unbind())
    students = _students(size, device)
    lr = size.lr

    def stacked() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params, buffers = stack_module_state(students)
        return {k: v.detach().clone() for k, v in params.items()}, buffers

    class Loop:
        def __init__(self, loss=pure_loss):
            self.loss = loss
            self.models = [copy.deepcopy(m) for m in students]
            self.opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in self.models]

        def __call__(self):
            for model, opt, t, w in zip(self.models, self.opts, temps, weights, strict=True):
                opt.zero_grad()
                self.loss(model(x)["logits"], teacher_logits, labels, t, w).backward()
                opt.step()

        def params(self) -> dict[str, Tensor]:
            return {k: v.detach() for k, v in stack_module_state(self.models)[0].items()}

    single = make_single_step(students[0], lr=lr, backend=backend)

    class LoopCompiled:
        def __init__(self):
            self.state = [({k: p.detach().clone() for k, p in m.named_parameters()}, dict(m.named_buffers()))
                          for m in students]

        def __call__(self):
            self.state = [(single(p, b, x, teacher_logits, labels, t, w), b)
                          for (p, b), t, w in zip(self.state, temps_0d, weights_0d, strict=True)]

        def params(self) -> dict[str, Tensor]:
            return {k: torch.stack([p[k] for p, _ in self.state]) for k in self.state[0][0]}

    class Vmapped:
        def __init__(self, step):
            self.step = step
            self.state, self.buffers = stacked()

        def __call__(self):
            self.state = self.step(self.state, self.buffers, x, teacher_logits, labels, temps_t, weights_t)

        def params(self) -> dict[str, Tensor]:
            return self.state

    makers: dict[str, Callable[[], Any]] = {
        LOOP_EAGER: Loop,
        LOOP_NAIVE: lambda: Loop(naive_loss),
        LOOP_COMPILED: LoopCompiled,
        VMAP_EAGER: lambda: Vmapped(make_sweep_step(students[0], lr=lr, compile=False)),
        VMAP_COMPILED: lambda: Vmapped(make_sweep_step(students[0], lr=lr, backend=backend)),
        VMAP_SPEC: lambda: Vmapped(make_sweep_step(students[0], lr=lr, loss="spec", backend=backend)),
    }
    shape = size.describe()
    fns, first_call, diffs, errors = {}, {}, {}, {}
    reference = None
    for impl, make in makers.items():
        log(f"  {impl}: {check_steps} steps from the common start")
        try:
            run = make()
            start = time.perf_counter()
            run()
            synchronize(device)
            first_call[impl] = time.perf_counter() - start
            for _ in range(check_steps - 1):
                run()
            params = run.params()
            if reference is None:
                reference = params
            diffs[impl] = _max_abs_diff(params, reference)
            fns[impl] = run
        except Exception as e:  # a failing variant is reported as a row, the others are still measured
            errors[impl] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log(f"    failed: {errors[impl]}")
    log(f"  timing {len(fns)} implementations, interleaved")
    timed = measure_interleaved(fns, device, rounds=rounds, min_block_time=min_block_time)
    base = timed.get(VMAP_COMPILED, (None,))[0]
    rows, summary = [], {"shape": shape, "temperatures": temps, "ms": {}}
    for impl in IMPLS:
        if impl in errors or impl not in timed:
            rows.append(Row("sweep", size.name, impl, shape, status="error", note=errors.get(impl, "not run")))
            continue
        median, iqr, repeats, _ = timed[impl]
        ratio = median / base if base else None
        extra = {"n": size.n, "per_student_ms": median * 1e3 / size.n, "vs_compiled_vmap": ratio,
                 "first_call_s": first_call[impl], "check_steps": check_steps, "max_abs_diff": diffs[impl]}
        rows.append(Row("sweep", size.name, impl, shape, time_ms=median * 1e3, time_iqr_ms=iqr * 1e3,
                        repeats=repeats, note=f"{check_steps} steps: max |Δ| vs eager loop {diffs[impl]:.1e}",
                        extra=extra))
        summary["ms"][impl] = median * 1e3
        log(f"    {impl:<40} {median * 1e3:9.3f} ms/step  ({median * 1e3 / size.n:.3f} ms per student)"
            + (f"  x{ratio:.2f} of compiled vmap" if ratio else ""))
    if base:
        for key, impl in (("loop_eager_over_compiled_vmap", LOOP_EAGER),
                          ("loop_naive_over_compiled_vmap", LOOP_NAIVE),
                          ("loop_compiled_over_compiled_vmap", LOOP_COMPILED),
                          ("eager_vmap_over_compiled_vmap", VMAP_EAGER),
                          ("spec_over_pure_compiled_vmap", VMAP_SPEC)):
            if impl in summary["ms"]:
                summary[key] = summary["ms"][impl] / (base * 1e3)
    return rows, summary


# ------------------------------------------------------------------------------------------------ results
def _fmt(v: Any, digits: int = 3) -> str:
    return fmt(v, digits)


def markdown(data: dict[str, Any]) -> str:
    """The results as Markdown: the machine, then one table per size."""
    m = data["machine"]
    what = m.get("gpu") or f"{m.get('cpu')}, {m.get('torch_threads')} threads"
    lines = [f"# distilkit sweep benchmark — {m.get('device')} ({what})", "",
             "N students distilled at N temperatures (`kd_kl` + `hard_ce`, SGD), one training step of all N. "
             "Times are medians of interleaved blocks; `× vmap` is the time over the compiled vmap's; "
             "`first call` includes tracing and compilation (the first compiled variant of a run also pays "
             "inductor's one-time start-up, and later ones reuse identical kernels compiled earlier in the run); "
             "`max |Δ|` compares the parameters after the check steps with the eager loop's.", "", "## Machine", ""]
    for key in ("date", "cpu", "logical_cpus", "cpus_usable", "torch_threads", "cpu_capability", "memory_gb", "gpu",
                "cuda", "torch", "python", "platform", "load_average_start", "load_average_end", "wall_time_s"):
        if key in m:
            lines.append(f"- **{key}**: {m[key]}")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in data["settings"].items()), ""]
    by_size: dict[str, list[dict]] = {}
    for r in data["rows"]:
        by_size.setdefault(r["name"], []).append(r)
    for name, rows in by_size.items():
        summary = data["summaries"].get(name, {})
        lines += [f"## {name}: {rows[0]['shape']}", "",
                  f"Temperatures: {', '.join(_fmt(t, 2) for t in summary.get('temperatures', []))}.", "",
                  "| implementation | ms per step (all N) | IQR ms | blocks | ms per student | × vmap | first call s "
                  "| max \\|Δ\\| |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['impl']} | {r['status']}: {r['note']} | | | | | | |")
                continue
            e = r["extra"]
            lines.append(f"| {r['impl']} | {_fmt(r['time_ms'])} | {_fmt(r['time_iqr_ms'])} | {r['repeats']} | "
                         f"{_fmt(e['per_student_ms'])} | {_fmt(e['vs_compiled_vmap'], 2)} | "
                         f"{_fmt(e['first_call_s'], 2)} | {e['max_abs_diff']:.1e} |")
        lines.append("")
    return "\n".join(lines + notes_lines(data))


def write(stem: Path, data: dict[str, Any]) -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.md``."""
    return write_data(stem, data, markdown)


# ------------------------------------------------------------------------------------------------ the command
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="students (default 8)")
    p.add_argument("--size", action="append", choices=[s.name for s in SIZES], help="only these sizes (repeatable)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timings: a smoke test")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--check-steps", type=lambda v: max(1, int(v)), default=3,
                   help="steps compared with the eager loop (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of the interleaved timing (default 5)")
    p.add_argument("--min-block-time", type=float, default=None, help="seconds per block (default 0.5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--warm-cache", action="store_true", help="compile into the default inductor cache")
    p.add_argument("--out", type=Path, default=None, help="results file stem (default results/sweep-<device>)")
    p.add_argument("--note", action="append", default=[], help="a note to write into the results (repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = device_from_args(args, "benchmarks.sweep")
    if device is None:
        return 2
    quick = args.quick
    sizes = QUICK if quick else tuple(s for s in SIZES if not args.size or s.name in args.size)
    if args.n:
        sizes = tuple(dataclasses.replace(s, n=args.n) for s in sizes)
    rounds = args.rounds or (2 if quick else 5)
    block = args.min_block_time if args.min_block_time is not None else (0.01 if quick else 0.5)
    cold = not (quick or args.warm_cache or "TORCHINDUCTOR_CACHE_DIR" in os.environ)
    cache = tempfile.mkdtemp(prefix="distilkit-sweep-inductor-") if cold else None
    if cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read at the first compilation: first calls are cold
    log = print
    machine = describe_machine(device)
    started = time.perf_counter()
    log(f"sweep benchmark on {machine['cpu'] if device.type == 'cpu' else machine.get('gpu')} "
        f"({machine['torch_threads']} threads, torch {machine['torch']}, load {machine['load_average_start']})")
    rows, summaries = [], {}
    try:
        for size in sizes:
            log(f"{size.name}: {size.describe()}")
            r, s = run_size(size, device, backend=args.backend, check_steps=args.check_steps, rounds=rounds,
                            min_block_time=block, log=log)
            rows += r
            summaries[size.name] = s
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    machine["load_average_end"] = load_average()
    machine["wall_time_s"] = round(time.perf_counter() - started, 1)
    settings = {"suites": ["sweep"], "quick": quick, "backend": args.backend, "check_steps": args.check_steps,
                "rounds": rounds, "min_block_time": block, "cold_compile": cold}
    data = {"schema": SCHEMA, "machine": machine, "settings": settings, "floors": None,
            "rows": [r.to_json() for r in rows], "summaries": summaries, "targets": [], "notes": args.note}
    stem = args.out or RESULTS / ("sweep-" + device_slug(device) + ("-quick" if quick else ""))
    json_path, md_path = write(stem, data)
    for name, s in summaries.items():
        if "loop_eager_over_compiled_vmap" in s:
            others = [f"{what} x{s[key]:.2f}" for what, key in (
                ("with torch.nn.functional losses", "loop_naive_over_compiled_vmap"),
                ("compiled", "loop_compiled_over_compiled_vmap")) if key in s]
            log(f"{name}: the eager loop takes x{s['loop_eager_over_compiled_vmap']:.2f} the compiled vmap's time"
                + (f" ({', '.join(others)})" if others else ""))
    log(f"wrote {json_path} and {md_path} in {machine['wall_time_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
