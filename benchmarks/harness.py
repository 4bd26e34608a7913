"""Timing, peak memory and machine description shared by every benchmark.

Times come from ``torch.utils.benchmark.Timer`` (which synchronises CUDA and other accelerators around each timed
block), after warm-up calls, as the median of several blocks; on the CPU the timer runs with the process's thread
count (``Timer`` would otherwise pin one thread). Peak memory is ``torch.cuda.max_memory_allocated`` above what was
allocated before the call on CUDA; on the CPU it is the peak of the tensor storage created during the call, from the
PyTorch profiler's memory timeline (a separate, profiled call), or, where that is unavailable, the rise of the
process's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) after ``malloc_trim``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.benchmark import Timer

from distilkit.losses import _cpu_kernel

SCHEMA = "distilkit-bench/1"
_settings = {"block_s": 0.02}  # the target duration of one timed block (see :func:`timing`)


@contextlib.contextmanager
def timing(*, block_s: float = 0.02):
    """Within the block, :func:`measure` and :func:`measure_interleaved` time blocks of about ``block_s`` seconds
    (``--quick`` uses short blocks: a smoke test, not a measurement)."""
    if not block_s > 0:
        raise ValueError(f"harness.timing: expected block_s > 0, got {block_s!r}")
    previous = _settings["block_s"]
    _settings["block_s"] = block_s
    try:
        yield
    finally:
        _settings["block_s"] = previous


@contextlib.contextmanager
def frozen_heap():
    """Within the block, the objects that exist at its start (torch's, the imported packages') are left out of
    garbage collections (``gc.freeze``): :func:`peak_memory`'s ``gc.collect()`` then takes milliseconds instead of
    about 0.2 s with torch, TextBrewer and transformers loaded. Reference counting frees objects as usual."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class Row:
    """One measured (or unmeasured) implementation of one benchmark at one shape."""

    suite: str  # "losses", "large", "fused", "step", "floors"
    name: str  # e.g. "kd_ce"
    impl: str  # "distilkit eager", "distilkit compiled", "distilkit chunked", "textbrewer", "naive", ...
    shape: str
    time_ms: float | None = None
    time_iqr_ms: float | None = None
    repeats: int = 0
    bytes_moved: float | None = None  # minimal bytes: inputs read once, gradients written once
    gbps: float | None = None  # bytes_moved / time
    floor_ms: float | None = None
    floor_ratio: float | None = None  # time / floor
    peak_mb: float | None = None  # memory above what was allocated before the call
    status: str = "ok"  # "ok", "unmeasured", "error"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, *, min_run_time: float = 1.0, min_repeats: int = 3,
            max_repeats: int = 50, warmup: int = 1, best: bool = False) -> tuple[float, float, int]:
    """``(median seconds, interquartile range, repeats)`` of ``fn()`` after ``warmup`` calls (with ``best``, the
    fastest block instead of the median: what floors use, the best the machine did in this run).

    Repeats ``Timer.timeit(number)`` blocks, with ``number`` chosen so that a block takes about 20 ms (see
    :func:`timing`), until
    ``min_run_time`` has passed and at least ``min_repeats`` blocks ran.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    once = timer.timeit(1).median
    number = max(1, int(_settings["block_s"] / max(once, 1e-9)))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < min_run_time):
        times.append(timer.timeit(number).median)
    times.sort()
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return (times[0] if best else statistics.median(times)), q[2] - q[0], len(times)


# ------------------------------------------------------------------------------------------------ peak memory
def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the OS (glibc), so that the resident set is the live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _profiled_peak(fn: Callable[[], Any]) -> float | None:
    """Peak bytes of tensor storage created (and not yet destroyed) during ``fn()``, from the PyTorch profiler's
    memory timeline: every CPU allocation and free, exact, whatever the C heap does with the pages."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action, MemoryProfile
    except ImportError:
        return None
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
            result = fn()
            del result
        timeline = MemoryProfile(prof.profiler.kineto_results).timeline
    except Exception:  # a private API: fall back to the resident set
        return None
    live = peak = 0
    for _, action, (key, _), size in timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Megabytes allocated at the peak of ``fn()`` above what was allocated just before (None if unknown). The CPU
    kernel's kept gradient memory is dropped first, so that it counts as the fresh gradient it stands for."""
    _cpu_kernel.release_buffer()
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return (peak - before) / 2**20
    if device.type != "cpu":
        return None
    peak = _profiled_peak(fn)
    if peak is not None:
        return peak / 2**20
    _malloc_trim()
    if not _reset_hwm():
        return None
    before = _status_kb("VmRSS")
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024


# ----------------------------------------------------------------------------------------------- the machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_sizes() -> dict[str, str]:
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            try:
                with open(f"{base}/{index}/level") as f:
                    level = f.read().strip()
                with open(f"{base}/{index}/type") as f:
                    kind = f.read().strip()
                with open(f"{base}/{index}/size") as f:
                    size = f.read().strip()
            except OSError:
                continue
            out[f"L{level} {kind}"] = size
    except OSError:
        pass
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: CPU/GPU model, cores, threads, memory, torch, load, allocator settings."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "caches": _cache_sizes(),
        "memory_gb": _memory_gb(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": load_average(),
        "transparent_hugepages": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "distilkit_cpu_kernel": _cpu_kernel.status(),
    }
    try:
        import textbrewer

        info["textbrewer"] = getattr(textbrewer, "__version__", "installed")
    except ImportError:
        info["textbrewer"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def _memory_gb() -> float | None:
    total = _read("/proc/meminfo")
    if total is None:
        return None
    for line in total.splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def device_slug(device: torch.device) -> str:
    """``cpu-<model>-<n>c`` or ``cuda-<gpu>``: the results file name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_model()}-{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}c"
    slug = "".join(ch.lower() if ch.isalnum() else "-" for ch in name)
    while "--" in slug:
        slug = slug.replace("--", "-")
    for noise in ("-r-", "-tm-", "-processor", "-cpu"):
        slug = slug.replace(noise, "-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{device.type}-{slug.strip('-')}"


def measure_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, *, rounds: int = 5,
                        min_block_time: float = 0.3, warmup: int = 1) -> dict[str, tuple[float, float, int, float]]:
    """Like :func:`measure` for several functions, alternating between them in ``rounds`` so that a drifting
    machine load (a shared box) affects each about equally: ``{name: (median s, IQR, samples, fastest s)}``."""
    timers, numbers = {}, {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        timers[name] = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        once = timers[name].timeit(1).median
        numbers[name] = max(1, int(_settings["block_s"] / max(once, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            start = time.perf_counter()
            while True:
                samples[name].append(timer.timeit(numbers[name]).median)
                if time.perf_counter() - start >= min_block_time:
                    break
    out = {}
    for name, times in samples.items():
        times.sort()
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        out[name] = (statistics.median(times), q[2] - q[0], len(times), times[0])
    return out


def device_from_args(args, api: str) -> torch.device | None:
    """Apply the common ``--device`` / ``--threads`` options: the device, or None (with the reason printed) when CUDA
    was asked for and is not available."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{api}: expected a CUDA device, but torch.cuda.is_available() is False.", file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    return device
