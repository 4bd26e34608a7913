"""``python -m benchmarks.gpu_check [--dry-run] [--out DIR]`` (or ``bash benchmarks/gpu_check.sh``): one prepared
check of distilkit on a CUDA machine, in at most ``--budget`` seconds (480 by default).

Steps, in order; each is timed and its outcome (passed, failed, skipped) recorded, a failing step does not stop the
next ones, and the exit status is 1 when any step failed:

a. ``install``: the packages the machine lacks (distilkit's dependencies, pytest, and TextBrewer, Liger-Kernel and
   transformers for the comparisons), with ``pip install --no-index --find-links wheels/ <missing>`` when a
   ``wheels/`` folder exists; torch stays as found. Then ``import distilkit`` in a fresh interpreter.
b. ``pytest_gpu``: ``pytest -m gpu`` on the test files that use the marker; ``pytest_loss_tester``: the shared loss
   tester (``tests/test_losses.py``) on the device, through the plugin ``benchmarks.pytest_device`` (it sets the
   default device and the tester's generators; nothing in ``tests/`` is edited). Each pytest call has a time limit.
c. ``compiled_step``: ``dk.make_step(spec, compile=True)`` on ``kd_kl`` + a scheduled, projected ``hidden_mse``:
   compiled by a first call, then several steps with a changing ``step`` (a device-resident counter, then plain
   ``int`` steps as the README writes them) and their backward under ``torch.cuda.set_sync_debug_mode("error")``;
   the losses must be finite, follow the schedule and compile no new graph.
d. measurements, with the benchmark suites' own code (``benchmarks.step``, ``benchmarks.large``, ``harness``):
   ``bench_step``: the T4-tiny whole step against TextBrewer's ``compute_loss`` (target: >= 3x faster);
   ``bench_fused``: fused distillation at 8192 tokens x 128,256 classes in bf16, student width 2048, teacher 4096,
   ``dk.fused_linear_kd(divergence="jsd")`` against Liger-Kernel's ``LigerFusedLinearJSDLoss`` (time and peak memory;
   target: faster and smaller); ``bench_kd``: kd forward + backward at 8192 x 128,256 against the bandwidth floor.
e. the results: ``benchmarks/results/gpu-check-<device>.json`` and ``.md`` (or ``--out DIR``): the machine, each
   step's outcome and time, each target met or missed with its numbers. They are rewritten after every step, so a
   run cut short still leaves what it did.

Steps c and d run in child processes (``--child``), each under its own time limit, so that a hang or a broken CUDA
context ends one step, not the run. ``--dry-run`` runs every step's CPU-sized version (install only says what it would
install; ``pytest -m gpu`` is listed, not run, since every test it selects skips without CUDA; the loss tester runs
two tests on the CPU through the same plugin; tiny shapes; ``aot_eager`` instead of inductor; the targets are listed
as "dry run", never judged) into ``runs/gpu-check/`` unless ``--out`` says otherwise: a test of this script, not a
measurement (``tests/test_gpu_check.py``).

Wheels for a machine without network access (the device machine runs Python 3.12, x86-64, and has torch, triton,
numpy, einops, tensorboard, transformers, pytest and pytest-xdist; it lacks pydantic, TextBrewer and Liger-Kernel).
Here, in the repository's root (``wheels/`` must not be committed: ``echo /wheels/ >> .git/info/exclude``)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d wheels pydantic pydantic-core annotated-types typing-inspection typing-extensions liger-kernel
    python3 -m pip wheel --no-deps -w wheels textbrewer==0.2.1.post1    # published as a source archive only

``--no-deps`` keeps torch (and its CUDA libraries) out of the folder; the packages above are what the ones named need
beyond what the machine has (``unzip -p wheels/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`` lists a wheel's
needs). Keep one version of each. The folder is about 4 MB; the device tool takes it along with ``carry: ["wheels"]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "distilkit-gpu-check/1"
OUTCOMES = ("passed", "failed", "skipped")
RESERVE_S = 5.0  # kept back from the budget for writing the results
MIN_STEP_S = 10.0  # a step is not started with less than this left


@dataclass(frozen=True)
class StepDef:
    name: str
    title: str
    limit_s: float  # on a GPU
    limit_dry_s: float


STEPS = [
    StepDef("install", "install what the machine lacks from wheels/ (pip --no-index); import distilkit", 60, 30),
    StepDef("pytest_gpu", "pytest -m gpu (the CUDA-marked tests)", 60, 60),
    StepDef("pytest_loss_tester", "the shared loss tester (tests/test_losses.py) on the device", 120, 60),
    StepDef("compiled_step", "compiled dk.make_step under torch.cuda.set_sync_debug_mode('error')", 90, 60),
    StepDef("bench_step", "T4-tiny whole step vs TextBrewer compute_loss", 100, 60),
    StepDef("bench_fused", "fused distillation vs Liger-Kernel LigerFusedLinearJSDLoss", 90, 60),
    StepDef("bench_kd", "kd fwd+bwd at 8192 x 128,256 vs the bandwidth floor", 150, 60),
]
STEP_NAMES = [s.name for s in STEPS]

#: the GPU targets: id -> (name, goal, the step that measures it)
TARGETS = {
    "step_vs_textbrewer": ("GPU T4-tiny whole step fwd+bwd: TextBrewer compute_loss time / dk.make_step (compiled) "
                           "time", ">= 3", "bench_step"),
    "fused_time_vs_liger": ("GPU fused distillation 8192×128,256 bf16, D 2048/4096, fwd+bwd: dk.fused_linear_kd"
                            "(loss='jsd') time / Liger LigerFusedLinearJSDLoss time", "< 1 (faster)", "bench_fused"),
    "fused_peak_vs_liger": ("GPU fused distillation 8192×128,256 bf16, D 2048/4096: dk.fused_linear_kd peak memory / "
                            "Liger LigerFusedLinearJSDLoss peak memory", "< 1 (smaller)", "bench_fused"),
    "kd_vs_floor": ("GPU kd fwd+bwd 8192×128,256 float32, the plain call dk.kd_kl(s, t, temperature=2.0): time / "
                    "bandwidth floor (max of memory, exp)", "<= 1.5", "bench_kd"),
}

#: pip name -> module; distilkit's dependencies and pytest are required, the rest serve the comparisons
REQUIRED = {"numpy": "numpy", "einops": "einops", "pydantic": "pydantic", "tensorboard": "tensorboard",
            "pytest": "pytest"}
OPTIONAL = {"textbrewer": "textbrewer", "liger-kernel": "liger_kernel", "transformers": "transformers",
            "pytest-xdist": "xdist"}

DRY_NOTE = "dry run: tiny shapes on the CPU, not a measurement"


# ================================================================================================ the parent
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="every step's CPU-sized version (a test of this script; writes runs/gpu-check/ by default)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the results (default: benchmarks/results; with --dry-run runs/gpu-check)")
    p.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="wheels folder for the install step")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 480; 240 with --dry-run)")
    p.add_argument("--steps", default=None,
                   help=f"comma-separated subset of the steps to run, e.g. for a rerun ({','.join(STEP_NAMES)})")
    p.add_argument("--note", action="append", default=[], help="a note to write into the results (repeatable)")
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return _child(args.child, args.result, args.dry_run)
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("benchmarks.gpu_check: expected a CUDA device, but torch.cuda.is_available() is False (--dry-run runs "
              "the CPU-sized check).", file=sys.stderr)
        return 2
    chosen = STEP_NAMES if args.steps is None else [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(STEP_NAMES))
    if unknown:
        print(f"benchmarks.gpu_check: unknown steps {unknown}; expected some of {STEP_NAMES}.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    budget = args.budget if args.budget is not None else (240.0 if dry else 480.0)
    run = _Run(dry=dry, device=device, budget=budget, wheels=args.wheels, notes=list(args.note),
               out=args.out or (Path.cwd() / "runs" / "gpu-check" if dry else RESULTS),
               subset=args.steps is not None)
    if dry:
        run.notes.append(f"--dry-run ({DRY_NOTE}): the install step only says what it would install, pytest -m "
                         "gpu is listed, the loss tester runs two tests, the compiled step uses aot_eager and no sync "
                         "debug mode.")
    print(f"distilkit GPU check{' (dry run)' if dry else ''} on {device}: steps {', '.join(chosen)}; budget "
          f"{budget:.0f} s", flush=True)
    for i, step in enumerate(STEPS):
        if step.name not in chosen:
            continue
        run.run_step(step, i)
        run.write()
    json_path, md_path = run.write(final=True)
    failed = [s["name"] for s in run.steps if s["outcome"] == "failed"]
    for t in run.targets():
        met = {True: "met", False: "NOT met", None: "dry run" if dry else "unmeasured"}[t["met"]]
        print(f"target: {t['name']}: {report_fmt(t['value'], 3)} (goal {t['goal']}) {met}")
    print(f"wrote {json_path} and {md_path} in {time.perf_counter() - run.started:.1f} s; "
          + (f"failed: {', '.join(failed)}" if failed else "no step failed"), flush=True)
    return 1 if failed else 0


def report_fmt(v, digits=2) -> str:
    try:
        from .report import fmt
    except ImportError:  # distilkit not importable (the install step failed)
        return "–" if v is None else str(v)
    return fmt(v, digits)


class _Run:
    def __init__(self, *, dry: bool, device, budget: float, wheels: Path, notes: list[str], out: Path,
                 subset: bool = False):
        self.dry, self.device, self.wheels, self.notes, self.out, self.subset = dry, device, wheels, notes, out, subset
        self.started = time.perf_counter()
        self.deadline = self.started + budget
        self.budget = budget
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.steps: list[dict[str, Any]] = []
        self.rows: list[dict] = []
        self.summaries: dict[str, Any] = {}
        self.floors: dict | None = None
        self.measured: dict[str, dict] = {}  # target id -> target dict, from the children
        self.machine: dict[str, Any] | None = None

    # --------------------------------------------------------------------------------------------- one step
    def run_step(self, step: StepDef, index: int) -> None:
        left = self.deadline - time.perf_counter() - RESERVE_S
        limit = min(step.limit_dry_s if self.dry else step.limit_s, left)
        print(f"[{index + 1}/{len(STEPS)}] {step.name}: {step.title} (limit {max(limit, 0):.0f} s)", flush=True)
        start = time.perf_counter()
        if limit < MIN_STEP_S:
            record = {"outcome": "failed", "note": f"not run: {max(left, 0):.0f} s of the {self.budget:.0f} s budget "
                      "left", "details": {}}
        else:
            method = getattr(self, f"_step_{step.name}", None)
            try:
                record = method(limit) if method else self._child_step(step.name, limit)
            except Exception as e:  # a bug in this script: record it and go on
                record = {"outcome": "failed", "note": f"{type(e).__name__}: {e}",
                          "details": {"traceback": traceback.format_exc()[-4000:]}}
        record = {"name": step.name, "title": step.title, "outcome": record["outcome"],
                  "time_s": round(time.perf_counter() - start, 2), "note": record.get("note", ""),
                  "details": record.get("details", {})}
        assert record["outcome"] in OUTCOMES, record
        self.steps.append(record)
        note = f": {record['note']}" if record["note"] else ""
        print(f"    -> {record['outcome']} in {record['time_s']:.1f} s{note}", flush=True)

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        return env

    # a. install
    def _step_install(self, limit: float) -> dict:
        wanted = {**REQUIRED, **OPTIONAL}
        missing = sorted(pkg for pkg, module in wanted.items() if importlib.util.find_spec(module) is None)
        wheels = _wheel_names(self.wheels)
        installable = [pkg for pkg in missing if _norm(pkg) in wheels]
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(self.wheels),
               "--no-cache-dir", "--disable-pip-version-check", "-q", *installable]
        details: dict[str, Any] = {"missing_before": missing, "wheels_folder": str(self.wheels),
                                   "wheels": sorted(wheels), "command": " ".join(cmd) if installable else None}
        notes = []
        if not missing:
            notes.append("nothing missing")
        elif self.dry:
            no_wheel = [pkg for pkg in missing if pkg not in installable]
            if installable:
                notes.append(f"dry run: would run `pip install --no-index --find-links {self.wheels} "
                             f"{' '.join(installable)}`")
            if no_wheel:
                notes.append(f"dry run: missing {', '.join(no_wheel)}, no wheel for them in {self.wheels}")
            print(f"    would install: {' '.join(installable) or '(nothing: no wheels)'}; missing: {missing}")
        elif installable:
            rc, out, timed_out, _ = _run_process(cmd, limit - 15, env=self._env())
            details["pip_output_tail"] = out[-3000:]
            if rc != 0:
                notes.append(f"pip {'timed out' if timed_out else f'exited {rc}'}")
        if not self.dry:
            importlib.invalidate_caches()
            still = sorted(pkg for pkg, module in wanted.items() if importlib.util.find_spec(module) is None)
            details["missing_after"] = still
            if still:
                notes.append(f"still missing: {', '.join(still)}"
                             + ("" if self.wheels.is_dir() else f" (no {self.wheels} folder)"))
        rc, out, _, _ = _run_process([sys.executable, "-c", "import distilkit; print(distilkit.__file__)"], 20,
                                     env=self._env())
        details["import_distilkit"] = out.strip()[-2000:]
        notes.append("import distilkit: " + ("ok" if rc == 0 else "FAILED"))
        required_missing = [p for p in details.get("missing_after", []) if p in REQUIRED]
        failed = rc != 0 or bool(required_missing) or any(n.startswith("pip ") for n in notes)
        outcome = "failed" if failed else ("skipped" if self.dry and missing else "passed")
        return {"outcome": outcome, "note": "; ".join(notes), "details": details}

    # b. pytest
    def _pytest(self, args: list[str], limit: float, env: dict[str, str]) -> dict:
        cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-ra", "--strict-markers",
               "-q", *args]
        rc, out, timed_out, seconds = _run_process(cmd, limit, env=env)
        summary = _pytest_summary(out)
        details = {"command": " ".join(cmd[1:]), "exit_status": rc, "counts": summary[1], "output_tail": out[-4000:]}
        if timed_out:
            return {"outcome": "failed", "note": f"timed out after {seconds:.0f} s; {summary[0] or 'no summary'}",
                    "details": details}
        outcome = "passed" if rc == 0 else "failed"
        return {"outcome": outcome, "note": f"exit {rc}: {summary[0] or 'no summary line'}", "details": details}

    def _step_pytest_gpu(self, limit: float) -> dict:
        files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text())
        if not files:
            return {"outcome": "skipped", "note": "no test file uses @pytest.mark.gpu", "details": {}}
        args = ["-m", "gpu", *files]
        if self.dry:  # they would all skip (10-20 s of collection for nothing); the next step runs pytest
            return {"outcome": "skipped", "details": {"files": files},
                    "note": f"dry run: the CUDA-marked tests skip without CUDA; would run `pytest {' '.join(args)}`"}
        return self._pytest(args, limit, self._env())

    def _step_pytest_loss_tester(self, limit: float) -> dict:
        args = ["-p", "benchmarks.pytest_device", "tests/test_losses.py"]
        if self.dry:
            args += ["-k", "test_matches_float64_reference and kd_kl"]
        elif importlib.util.find_spec("xdist") is not None:
            args += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
        result = self._pytest(args, limit, self._env(DISTILKIT_TEST_DEVICE=self.device.type))
        if self.dry:
            result["note"] = f"dry run: two tests on the CPU through the same plugin: {result['note']}"
        return result

    # c, d: child processes
    def _child_step(self, name: str, limit: float) -> dict:
        with tempfile.TemporaryDirectory(prefix="distilkit-gpu-check-") as tmp:
            result_path = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", name, "--result", str(result_path)]
            if self.dry:
                cmd.append("--dry-run")
            rc, out, timed_out, seconds = _run_process(cmd, limit, env=self._env())
            result = json.loads(result_path.read_text()) if result_path.exists() else None
        if result is None:
            why = f"timed out after {seconds:.0f} s" if timed_out else f"the child process exited {rc}"
            return {"outcome": "failed", "note": f"{why} without a result", "details": {"output_tail": out[-4000:]}}
        self.rows += result.get("rows", [])
        self.summaries.update(result.get("summaries", {}))
        self.floors = result.get("floors") or self.floors
        for target in result.get("targets", []):
            self.measured[target["id"]] = target
        details = dict(result.get("details", {}))
        if result["outcome"] == "failed":
            details["output_tail"] = out[-4000:]
        return {"outcome": result["outcome"], "note": result.get("note", ""), "details": details}

    # --------------------------------------------------------------------------------------------- e. results
    def targets(self) -> list[dict]:
        out = []
        ran = {s["name"]: s for s in self.steps}
        for tid, (name, goal, step) in TARGETS.items():
            t = self.measured.get(tid)
            if t is None:
                why = (f"step {step} {ran[step]['outcome']}" if step in ran else f"step {step} not run")
                t = {"id": tid, "value": None, "met": None, "note": f"unmeasured: {why}"}
            t = {"id": tid, "name": name, "goal": goal, "step": step, "value": t["value"], "met": t["met"],
                 "note": t["note"]}
            if self.dry:
                t["met"] = None
            out.append(t)
        return out

    def describe(self) -> dict:
        if self.machine is None:
            try:
                from .harness import describe_machine

                self.machine = describe_machine(self.device)
            except Exception as e:  # distilkit not importable: say what we can without it
                import torch

                self.machine = {"date": self.date, "device": str(self.device), "python": platform.python_version(),
                                "platform": platform.platform(), "torch": torch.__version__,
                                "cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                                "describe_machine": f"failed: {type(e).__name__}: {e}"}
                if self.device.type == "cuda":
                    self.machine.update(gpu=torch.cuda.get_device_name(self.device), cuda=torch.version.cuda)
        return self.machine

    def stem(self) -> Path:
        try:
            from .harness import device_slug

            slug = device_slug(self.device)
        except Exception:
            import torch

            name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.machine()
            slug = f"{self.device.type}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        # a rerun of some steps (--steps) does not overwrite the full run's results
        return self.out / (f"gpu-check-{slug}" + ("-dry-run" if self.dry else "") + ("-rerun" if self.subset else ""))

    def write(self, final: bool = False) -> tuple[Path, Path]:
        machine = dict(self.describe())
        machine["wall_time_s"] = round(time.perf_counter() - self.started, 1)
        if final:
            with contextlib.suppress(ImportError):
                from .harness import load_average

                machine["load_average_end"] = load_average()
        counts = {o: sum(s["outcome"] == o for s in self.steps) for o in OUTCOMES}
        data = {"schema": SCHEMA, "machine": machine,
                "settings": {"dry_run": self.dry, "budget_s": self.budget, "complete": final,
                             "steps": [s["name"] for s in self.steps]},
                "steps": self.steps, "step_counts": counts, "targets": self.targets(), "floors": self.floors,
                "rows": self.rows, "summaries": self.summaries, "notes": self.notes}
        data = _finite_tree(data)
        try:
            from .report import write_data
        except ImportError:
            write_data = _write_data_plain
        return write_data(self.stem(), data, markdown)


def _write_data_plain(stem: Path, data: dict, to_markdown) -> tuple[Path, Path]:
    """The results without ``benchmarks.report`` (which needs distilkit): only when the install step failed."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(data))
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def markdown(data: dict) -> str:
    m, dry = data["machine"], data["settings"]["dry_run"]
    fmt = report_fmt
    what = m.get("gpu") or f"{m.get('cpu')}, {m.get('torch_threads', '?')} threads"
    c = data["step_counts"]
    lines = [f"# distilkit GPU check{' — DRY RUN' if dry else ''} — {m.get('device')} ({what})", "",
             f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped in {m.get('wall_time_s')} s"
             + ("" if data["settings"]["complete"] else " (incomplete: the run was cut short)")
             + (f". {DRY_NOTE}." if dry else "."), "",
             "## Steps", "", "| step | what | outcome | time s | note |", "|---|---|---|---|---|"]
    for s in data["steps"]:
        outcome = f"**{s['outcome']}**" if s["outcome"] == "failed" else s["outcome"]
        lines.append(f"| {s['name']} | {s['title']} | {outcome} | {s['time_s']:.1f} | {_cell(s['note'])} |")
    lines += ["", "## Targets", "", "| target | value | goal | met | note |", "|---|---|---|---|---|"]
    for t in data["targets"]:
        met = {True: "yes", False: "**no**", None: "dry run" if dry else "unmeasured"}[t["met"]]
        lines.append(f"| {t['name']} | {fmt(t['value'], 3)} | {t['goal']} | {met} | {_cell(t['note'])} |")
    lines.append("")
    try:  # the machine, the floors and the measured rows, as the benchmark suites write them
        from .report import markdown as bench_markdown

        bench = {**data, "targets": [], "settings": {k: v for k, v in data["settings"].items() if k != "steps"}}
        sections = bench_markdown(bench).split("\n## ")[1:]  # without the title
        lines += ["## " + s.rstrip("\n") + "\n" for s in sections if not s.startswith("Targets")]
    except ImportError:
        lines += ["## Machine", "", *(f"- **{k}**: {v}" for k, v in m.items()), ""]
    failures = [s for s in data["steps"] if s["outcome"] == "failed"]
    if failures:
        lines += ["## Failures", ""]
        for s in failures:
            tail = s["details"].get("output_tail") or s["details"].get("traceback") or ""
            lines += [f"### {s['name']}", "", s["note"], ""]
            if tail:
                lines += ["```text", tail.strip()[-3000:], "```", ""]
    if data["notes"] and not any(line.startswith("## Notes") for line in lines):
        lines += ["## Notes", "", *(f"- {n}" for n in data["notes"]), ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_names(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {_norm(p.name.split("-")[0]) for p in folder.iterdir() if p.suffix == ".whl"}


def _pytest_summary(output: str) -> tuple[str, dict[str, int]]:
    """The closing summary line (``3 passed, 1 skipped in 2.0s``) and its counts."""
    for line in reversed(output.splitlines()):
        counts = dict((kind, int(n)) for n, kind in re.findall(
            r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)", line))
        if counts and re.search(r" in [\d.]+s", line):
            return line.strip("= ").strip(), counts
    return "", {}


def _run_process(cmd: list[str], timeout: float, *, env: dict[str, str]) -> tuple[int | None, str, bool, float]:
    """``(exit status, output, timed out, seconds)`` of ``cmd`` run in the repository's root in a session of its own
    (its output echoed, indented, as it comes), killed with its children after ``timeout`` seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    chunks: list[str] = []

    def pump():
        for line in proc.stdout:
            chunks.append(line)
            print("    | " + line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(5)
    return (None if timed_out else proc.returncode), "".join(chunks), timed_out, time.perf_counter() - start


def _finite_tree(x):
    """``x`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_tree(v) for v in x]
    return x


# ================================================================================================ the children
def _child(name: str, result_path: Path, dry: bool) -> int:
    import torch

    from .harness import frozen_heap, timing

    device = torch.device("cpu" if dry else "cuda")
    try:
        with timing(block_s=0.002 if dry else 0.02), frozen_heap():
            result = CHILDREN[name](device, dry)
        code = 0
    except Exception as e:
        traceback.print_exc()
        result = {"outcome": "failed", "note": f"{type(e).__name__}: {str(e)[:500]}",
                  "details": {"traceback": traceback.format_exc()[-4000:]}}
        code = 1
    result = {"outcome": "passed", "note": "", "details": {}, **result}
    if dry:
        for t in result.get("targets", []):
            t["met"] = None
            t["note"] = f"{DRY_NOTE}; {t['note']}" if t["note"] else DRY_NOTE
    result_path.write_text(json.dumps(_finite_tree(result), default=_json_default))
    return code


def _json_default(x):
    return x.item() if hasattr(x, "item") else str(x)


def _target(tid: str, value: float | None, met: bool | None, note: str) -> dict:
    return {"id": tid, "value": None if value is None else round(float(value), 4), "met": met, "note": note}


# c. the compiled step under the sync debug mode
def check_compiled_step(device, dry: bool) -> dict:
    import torch

    import distilkit as dk

    b, length, vocab, ds, dt = (2, 8, 50, 6, 10) if dry else (8, 512, 32000, 1024, 2048)
    warm_steps = 10
    spec = (dk.kd_kl.on("logits", temperature=2.0, mask="attention_mask")
            + dk.schedules.linear(0.0, 1.0, steps=warm_steps)
            * dk.hidden_mse.on(("hidden", -1), proj=dk.proj.linear(ds, dt), mask="attention_mask"))
    params = dk.init_params(spec).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=gen, device=device).requires_grad_(grad)

    student = {"logits": randn(b, length, vocab, grad=True), "hidden": [randn(b, length, ds, grad=True)]}
    teacher = {"logits": randn(b, length, vocab), "hidden": [randn(b, length, dt)]}
    lengths = torch.randint(length // 2, length + 1, (b, 1), generator=gen, device=device)
    batch = {"attention_mask": torch.arange(length, device=device)[None, :] < lengths}
    leaves = [*student["hidden"], student["logits"], *params.parameters()]
    backend = "aot_eager" if dry else True
    step_fn = dk.make_step(spec, compile=backend)
    cuda = device.type == "cuda"

    def zero():
        for x in leaves:
            x.grad = None

    start = time.perf_counter()
    step_fn(student, teacher, batch, step=0, params=params).loss.backward()  # validation and compilation
    zero()
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    graphs = _unique_graphs()

    checks: dict[str, Any] = {}

    @contextlib.contextmanager
    def sync_errors():
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")

    def run(name: str, steps: list, as_int: bool):
        losses, grads = [], []
        counter = torch.full((), steps[0] - 1, dtype=torch.long, device=device)  # the loop's step, on the device
        try:
            with sync_errors():
                for i in steps:
                    if as_int:
                        out = step_fn(student, teacher, batch, step=i, params=params)
                    else:
                        counter.add_(1)
                        out = step_fn(student, teacher, batch, step=counter, params=params)
                    out.loss.backward()
                    losses.append(out.loss.detach())
                    grads.append(torch.stack([x.grad.detach().float().norm() for x in leaves]))
                    zero()
        except Exception as e:
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            return
        losses_t = torch.stack(losses).cpu()  # after the sync-checked region
        grads_ok = bool(torch.isfinite(torch.stack(grads)).all())
        finite = bool(torch.isfinite(losses_t).all())
        moving = bool((losses_t.diff() > 0).all())  # the hidden_mse weight grows with the step
        checks[name] = {"ok": finite and grads_ok and moving, "steps": steps, "losses": losses_t.tolist(),
                        "finite_loss": finite, "finite_grads": grads_ok, "loss_follows_schedule": moving}

    run("device step counter", [1, 2, 3, 4, 5], as_int=False)
    run("int steps (as the README writes them)", [6, 7, 8], as_int=True)
    new_graphs = None if graphs is None else _unique_graphs() - graphs
    checks["no new graph after the first call"] = {"ok": new_graphs in (0, None), "new_graphs": new_graphs}
    failed = [name for name, c in checks.items() if not c["ok"]]
    mode = ("torch.cuda.set_sync_debug_mode('error')" if cuda else
            "no sync debug mode (CUDA only): the same calls, eager-compiled with aot_eager")
    shape = f"B={b} L={length} V={vocab} D={ds}->{dt}"
    note = (f"{shape}; {mode}; first call (validation + compile) {first_s:.1f} s; "
            + ("all checks passed" if not failed else "FAILED: " + "; ".join(
                f"{n}: {checks[n].get('error') or {k: v for k, v in checks[n].items() if k != 'losses'}}"
                for n in failed)))
    return {"outcome": "failed" if failed else "passed", "note": note,
            "details": {"spec": str(spec), "shape": shape, "backend": str(backend), "first_call_s": round(first_s, 2),
                        "checks": checks}}


def _unique_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["stats"]["unique_graphs"])


# d. measurements
def _compile_fallback(run: Callable[[bool], Any], dry: bool) -> tuple[Any, str]:
    """``run(compile)`` with the torch.compile variants (not in the dry run); if they fail, again without them, with
    the failure in the note (the step then fails, its other numbers still recorded)."""
    if dry:
        return run(False), ""
    try:
        return run(True), ""
    except Exception as e:
        traceback.print_exc()
        return run(False), f"FAILED with torch.compile ({type(e).__name__}: {str(e)[:300]}), measured without it; "


def bench_step(device, dry: bool) -> dict:
    from . import step

    (rows, s), failure = _compile_fallback(lambda compile_: step.run_step(
        device, shapes=step.StepShapes.tiny() if dry else None, compile=compile_, rounds=2 if dry else 3,
        min_block_time=0.01 if dry else 0.2), dry)
    ours_name = "distilkit make_step compiled" if "distilkit make_step compiled" in s else "distilkit make_step eager"
    ours, theirs = s[ours_name], s.get("textbrewer compute_loss")
    if theirs is None:
        target = _target("step_vs_textbrewer", None, None, "TextBrewer not importable")
    else:
        ratio = theirs / ours
        target = _target("step_vs_textbrewer", ratio, ratio >= 3,
                         f"{theirs:.2f} ms / {ours:.2f} ms ({ours_name}); matrix-product floor {s['floor_ms']:.2f} ms"
                         f" (x{ours / s['floor_ms']:.2f})")
    return {"rows": [r.to_json() for r in rows], "summaries": {"step": s}, "targets": [target],
            "note": failure + target["note"], "outcome": "failed" if failure else "passed"}


def bench_fused(device, dry: bool) -> dict:
    import torch

    import distilkit as dk

    from .harness import Row, measure_interleaved, peak_memory
    from .large import _fb

    tokens, vocab, ds, dt = (64, 500, 8, 12) if dry else (8192, 128256, 2048, 4096)
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(4)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    hs = randn(tokens, ds, scale=ds**-0.5).requires_grad_()
    ws = randn(vocab, ds).requires_grad_()
    ht, wt = randn(tokens, dt, scale=dt**-0.5), randn(vocab, dt, scale=2.0)
    labels = torch.zeros(tokens, dtype=torch.long, device=device)
    shape = f"{tokens}x{vocab} bf16 D={ds}/{dt}"
    ours_name = "distilkit fused_linear_kd(divergence='jsd', beta=0.5)"
    fns: dict[str, Callable] = {ours_name: lambda: dk.fused_linear_kd(hs, ws, ht, wt, divergence="jsd", beta=0.5)}
    liger_note = ""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=1.0,
                                        compiled=device.type == "cuda")
        theirs_name = "liger LigerFusedLinearJSDLoss (soft loss only)"
        fns[theirs_name] = lambda: liger(hs, ws, ht, wt, labels)
    except ImportError as e:
        theirs_name = None
        liger_note = f"liger-kernel not importable ({e}): skipped"
    values = {name: float(fn().detach().float()) for name, fn in fns.items()}  # the first calls (Liger compiles)
    runs = {name: _fb(fn, [hs, ws]) for name, fn in fns.items()}
    times = measure_interleaved(runs, device, rounds=2 if dry else 3, min_block_time=0.01 if dry else 0.3)
    flops = 2 * tokens * vocab * (3 * ds + dt)
    rows, summary = [], {"values": values}
    for name, (sec, iqr, n, _) in times.items():
        row = Row("fused", "fused distillation vs Liger", name, shape, time_ms=sec * 1e3, time_iqr_ms=iqr * 1e3,
                  repeats=n, peak_mb=peak_memory(runs[name], device))
        row.extra.update(loss=values[name], gflops_effective=round(flops / sec / 1e9, 1))
        rows.append(row)
        summary[name] = {"time_ms": row.time_ms, "peak_mb": row.peak_mb}
    details = {"shape": shape, "values": values}
    if theirs_name is None:
        targets = [_target("fused_time_vs_liger", None, None, liger_note),
                   _target("fused_peak_vs_liger", None, None, liger_note)]
        note = liger_note
    else:
        ours, theirs = summary[ours_name], summary[theirs_name]
        rel = abs(values[ours_name] - values[theirs_name]) / max(abs(values[theirs_name]), 1e-12)
        details["loss_relative_difference"] = rel
        t_ratio = ours["time_ms"] / theirs["time_ms"]
        targets = [_target("fused_time_vs_liger", t_ratio, t_ratio < 1,
                           f"{ours['time_ms']:.2f} ms / {theirs['time_ms']:.2f} ms; losses {values[ours_name]:.5g} vs "
                           f"{values[theirs_name]:.5g} (relative difference {rel:.1e})")]
        if ours["peak_mb"] is None or theirs["peak_mb"] is None:
            targets.append(_target("fused_peak_vs_liger", None, None, "peak memory unknown on this device"))
        else:
            m_ratio = ours["peak_mb"] / max(theirs["peak_mb"], 1e-9)
            targets.append(_target("fused_peak_vs_liger", m_ratio, m_ratio < 1,
                                   f"{ours['peak_mb']:.1f} MB / {theirs['peak_mb']:.1f} MB above the inputs"))
        note = "; ".join(t["note"] for t in targets)
    return {"rows": [r.to_json() for r in rows], "summaries": {"fused_vs_liger": summary}, "targets": targets,
            "note": note, "details": details}


def bench_kd(device, dry: bool) -> dict:
    from . import floors as floors_mod
    from . import large

    floors = floors_mod.measure_floors(device, size_mb=4.0 if dry else 256.0, min_run_time=0.02 if dry else 0.3)
    tokens, vocab = (16, 50) if dry else (8192, 128256)
    (rows, s), failure = _compile_fallback(lambda compile_: large.run_kd_target(
        device, floors, tokens=tokens, vocab=vocab, rounds=2 if dry else 3, min_block_time=0.01 if dry else 0.2,
        compile=compile_), dry)
    plain = s[large.PLAIN]
    ratio = plain / s["floor_ms"]
    ours = {k: v for k, v in s.items() if k.startswith("distilkit")}
    best = min(ours, key=ours.get)
    theirs = s.get("textbrewer kd_ce_loss")
    note = (f"{plain:.2f} ms / floor {s['floor_ms']:.2f} ms (memory {s['memory_ms']:.2f} ms, exp {s['exp_ms']:.2f} "
            f"ms); fastest distilkit row: {best} {ours[best]:.2f} ms"
            + (f"; TextBrewer kd_ce_loss {theirs:.2f} ms (x{theirs / plain:.2f} the plain call)" if theirs else ""))
    target = _target("kd_vs_floor", ratio, ratio <= 1.5, note)
    return {"rows": [r.to_json() for r in rows], "summaries": {"kd_target": s}, "floors": floors.to_json(),
            "targets": [target], "note": failure + note, "outcome": "failed" if failure else "passed"}


CHILDREN: dict[str, Callable] = {"compiled_step": check_compiled_step, "bench_step": bench_step,
                                 "bench_fused": bench_fused, "bench_kd": bench_kd}


if __name__ == "__main__":
    sys.exit(main())
