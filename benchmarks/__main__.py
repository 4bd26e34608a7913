"""``python -m benchmarks [options]`` / ``distilkit bench [options]``: run the benchmarks, write the results.

Suites: ``floors`` (always), ``losses`` (every loss, forward + backward), ``large`` (the kd target measurement and
chunk sizes), ``fused`` (``fused_linear_kd`` strategies and its peak memory at 8192 × 128,256), ``step`` (the
T4-tiny whole step). ``--quick`` runs every suite at tiny shapes with short timing blocks and without the
torch.compile variants (``--compile`` adds them back): a smoke test of the harness and the result files, under a minute
on two CPU cores, written to ``runs/bench/<device>-quick`` under the current directory unless ``--out`` says otherwise.
Full runs write ``benchmarks/results/<device>`` (the published results) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import floors as floors_mod
from . import large, losses, report, step
from .harness import describe_machine, device_from_args, device_slug, frozen_heap, load_average, timing

SUITES = ("losses", "large", "fused", "step")
RESULTS = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distilkit bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="append", choices=SUITES, help="run only these suites (repeatable)")
    p.add_argument("--loss", action="append", help="in the losses suite, only these losses (repeatable)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, short timings, no torch.compile variants: a smoke test, not a measurement "
                   "(writes runs/bench/<device>-quick.{json,md} under the current directory by default)")
    compiled = p.add_mutually_exclusive_group()
    compiled.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    compiled.add_argument("--compile", action="store_true",
                          help="with --quick, run the torch.compile variants too (minutes on a small CPU)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement (default 0.5)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of the interleaved measurements (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None,
                   help="results file stem (default: benchmarks/results/<device>; with --quick, "
                   "runs/bench/<device>-quick in the current directory)")
    p.add_argument("--note", action="append", default=[], help="a note to write into the results (repeatable)")
    return p


def default_stem(device: torch.device, quick: bool) -> Path:
    """Where results go without ``--out``: the published results, or for ``--quick`` ``./runs/bench/``."""
    if quick:
        return Path.cwd() / "runs" / "bench" / f"{device_slug(device)}-quick"
    return RESULTS / device_slug(device)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = device_from_args(args, "distilkit bench")
    if device is None:
        return 2
    with timing(block_s=0.002 if args.quick else 0.02), frozen_heap():
        return _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    suites = tuple(args.suite or SUITES)
    quick = args.quick
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.02 if quick else 0.5)
    rounds = args.rounds or (2 if quick else 5)
    block = 0.01 if quick else 0.5
    compile_ = not args.no_compile and (args.compile or not quick)
    log = print

    machine = describe_machine(device)
    started = time.perf_counter()
    log(f"distilkit bench on {machine['cpu'] if device.type == 'cpu' else machine.get('gpu')} "
        f"({machine['torch_threads']} threads, torch {machine['torch']}, load {machine['load_average_start']})")
    if quick:
        log("--quick: tiny shapes and short timings, a smoke test whose numbers mean nothing"
            + ("" if compile_ else "; the torch.compile variants are skipped (--compile adds them)"))
    floors = floors_mod.measure_floors(device, size_mb=4.0 if quick else 256.0,
                                       min_run_time=min_run_time if quick else 1.0)
    log(f"floors: copy {floors.copy_gbps:.2f} GB/s, fresh write {floors.fresh_write_gbps:.2f} GB/s, "
        f"exp {floors.exp_per_s / 1e9:.2f} G/s, matmul {floors.matmul_gflops:.1f} GFLOP/s")
    rows, summaries = [], {}
    if "large" in suites:
        log("large vocabularies: kd target (interleaved)")
        tokens, vocab = (16, 50) if quick else (2048, 32000) if device.type == "cpu" else (8192, 128256)
        r, s = large.run_kd_target(device, floors, tokens=tokens, vocab=vocab, rounds=rounds, min_block_time=block,
                                   compile=compile_, log=log)
        rows += r
        summaries["kd_target"] = s
        log("large vocabularies: chunk sizes")
        rows += large.run_chunk_sizes(device, tokens=tokens, vocab=vocab, min_run_time=min_run_time,
                                      sizes=(4, None) if quick else (4, 8, 16, None), log=log)
    if "step" in suites:
        log("whole step: T4-tiny (interleaved)")
        r, s = step.run_step(device, shapes=step.StepShapes.tiny() if quick else None, compile=compile_,
                             rounds=rounds, min_block_time=block, log=log)
        rows += r
        summaries["step"] = s
    if "fused" in suites:
        log("fused_linear_kd")
        kw = dict(tokens=16, vocab=50, ds=8, dt=12) if quick else {}
        r, s = large.run_fused(device, min_run_time=min_run_time, log=log, **kw)
        rows += r
        summaries["fused"] = s
        kw = dict(tokens=64, vocab=500, teacher_vocab=512, ds=8, dt=12, chunked_logits=True) if quick else {}
        r, s = large.run_fused_peak(device, log=log, **kw)
        rows += r
        summaries["fused_peak"] = s
    if "losses" in suites:
        log("every loss")
        shapes = (losses.Shapes.tiny() if quick else losses.Shapes() if device.type == "cpu"
                  else losses.Shapes(tokens=8192, vocab=128256))
        rows += losses.run_losses(device, floors, shapes=shapes, compile=compile_, min_run_time=min_run_time,
                                  only=set(args.loss) if args.loss else None, log=log)
    machine["load_average_end"] = load_average()
    machine["wall_time_s"] = round(time.perf_counter() - started, 1)
    targets = report.evaluate_targets(device.type, summaries)
    if quick:
        targets = [dict(t, met=None, note="--quick: tiny shapes, not a measurement") for t in targets]
    settings = {"suites": list(suites), "quick": quick, "compile": compile_, "min_run_time": min_run_time,
                "rounds": rounds}
    stem = args.out or default_stem(device, quick)
    json_path, md_path = report.write(stem, machine, settings, floors.to_json(), rows, summaries, targets,
                                      notes=args.note)
    for t in targets:
        met = {True: "met", False: "NOT met", None: "unmeasured"}[t["met"]]
        log(f"target: {t['name']}: {t['value']} (goal {t['goal']}) {met}")
    log(f"wrote {json_path} and {md_path} in {machine['wall_time_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
