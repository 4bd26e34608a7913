"""Large vocabularies: the kd target measurement, chunk sizes, chunked logit losses and ``fused_linear_kd``.

* ``kd_target``: kd forward + backward at 2048 tokens × 32k classes — TextBrewer's ``kd_ce_loss``, distilkit's
  dense ``kd_ce``, its chunked path (the CPU kernel, and the torch chunk loop), and the floor's two parts (a memory
  copy of the logits and ``exp`` on cache-sized blocks), all measured alternately in one run.
* ``chunk sizes``: the torch chunk loop of the chunked kd at several ``chunk_size`` values.
* ``fused``: ``fused_linear_kd`` with gradients computed in the forward vs checkpointed chunks vs the unfused
  ``h Wᵀ`` + loss, forward + backward (student and teacher widths differ).
* ``fused peak``: peak memory of ``fused_linear_kd`` at 8192 tokens × 128,256 classes (a teacher vocabulary padded
  to 128,320), against its inputs, their gradients and one chunk; and of the chunked logit loss at that size when the
  machine has the memory for the logits themselves.
"""

from __future__ import annotations

import time

import torch

import distilkit as dk
from distilkit.losses import _chunked, _cpu_kernel, _fused

from .floors import Floors, kd_floor
from .harness import Row, measure, measure_interleaved, peak_memory

try:
    import textbrewer.losses as tb
except ImportError:  # pragma: no cover
    tb = None

T = 8.0
#: the target's row: the call a user writes first, forward + backward with the gradient set to None each time
PLAIN = "distilkit kd_kl plain call (T=2, default impl)"
PLAIN_COMPILED = "distilkit kd_kl plain call compiled (T=2, default impl)"


def _fb(loss_fn, leaves):
    def run():
        loss_fn().backward()
        for x in leaves:
            x.grad = None

    return run


def _torch_loop(fn):
    def run():
        with _cpu_kernel.disabled():
            return fn()

    return run


def run_kd_target(device: torch.device, floors: Floors, *, tokens: int = 2048, vocab: int = 32000, rounds: int = 5,
                  min_block_time: float = 0.5, compile: bool = True, log=print) -> tuple[list[Row], dict]:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(tokens, vocab, generator=gen).to(device).requires_grad_()
    t = (2 * torch.randn(tokens, vocab, generator=gen)).to(device)
    def reusing(fn):
        def run():
            with dk.backends.reuse_gradient_memory():
                return fn()

        return run

    plain = _fb(lambda: dk.kd_kl(s, t, temperature=2.0), [s])  # impl="auto": the kernel, a fresh gradient
    fns = {
        PLAIN: plain,
        PLAIN + " reusing gradient memory": reusing(plain),
        "distilkit chunked kd_ce": _fb(lambda: _chunked.chunked_kd_ce(s, t, temperature=T, t2_scale=False), [s]),
        "distilkit chunked kd_ce (torch chunk loop)": _fb(_torch_loop(
            lambda: _chunked.chunked_kd_ce(s, t, temperature=T, t2_scale=False)), [s]),
        "distilkit kd_ce (dense eager)": _fb(lambda: dk.kd_ce(s, t, temperature=T, t2_scale=False, impl="dense"),
                                             [s]),
    }
    if compile:
        compiled = torch.compile(lambda: dk.kd_kl(s, t, temperature=2.0), fullgraph=True)  # the kernel: a custom op
        fns[PLAIN_COMPILED] = _fb(compiled, [s])
    if tb is not None:
        fns["textbrewer kd_ce_loss"] = _fb(lambda: tb.kd_ce_loss(s, t, T), [s])
    dst = torch.empty_like(t)
    dst.fill_(0)
    fns["floor part: copy logits"] = lambda: dst.copy_(t)
    rows_per_block = 8 if device.type == "cpu" else tokens
    block = torch.randn(rows_per_block, vocab, generator=gen).to(device)
    out = torch.empty_like(block)
    fns["floor part: exp block"] = lambda: torch.exp(block, out=out)
    fns["floor part: write fresh memory"] = lambda: torch.empty_like(t).fill_(0.0)  # a new gradient's pages
    times = measure_interleaved(fns, device, rounds=rounds, min_block_time=min_block_time)

    elements = tokens * vocab
    copy_s = times.pop("floor part: copy logits")[3]  # floors: the fastest block
    exp_s = times.pop("floor part: exp block")[3]
    fresh_s = times.pop("floor part: write fresh memory")[3]
    memory_ms = 1.5 * copy_s * 1e3  # 3 tensors moved once vs a copy's 2 (read + write)
    exp_ms = 2 * elements / block.numel() * exp_s * 1e3  # two exp per element
    # With a fresh gradient (what a loop that sets .grad to None gets): read both logits (a copy's traffic) and
    # write freshly allocated memory (page faults and zeroing included), measured here in the same run.
    memory_fresh_ms = (copy_s + fresh_s) * 1e3
    fresh = kd_floor(floors, tokens, vocab)
    floor = {"memory_ms": memory_ms, "exp_ms": exp_ms, "floor_ms": max(memory_ms, exp_ms),
             "memory_fresh_ms": memory_fresh_ms, "floor_fresh_ms": max(memory_fresh_ms, exp_ms),
             "sum_ms": memory_ms + exp_ms, "memory_fresh_grad_ms_suite_floors": fresh["memory_fresh_grad_ms"],
             "copy_gbps_here": 2 * elements * 4 / copy_s / 1e9, "exp_per_s_here": block.numel() / exp_s}
    rows = []
    shape = f"{tokens}x{vocab}"
    for name, (sec, iqr, n, _) in times.items():
        row = Row("large", "kd_target", name, shape, time_ms=sec * 1e3, time_iqr_ms=iqr * 1e3, repeats=n,
                  bytes_moved=3 * elements * 4, gbps=3 * elements * 4 / sec / 1e9, floor_ms=floor["floor_ms"],
                  floor_ratio=sec * 1e3 / floor["floor_ms"])
        row.extra["ratio_to_sum_floor"] = round(sec * 1e3 / floor["sum_ms"], 3)
        row.peak_mb = peak_memory(fns[name], device)
        rows.append(row)
        log(f"  kd_target {name:32s} {row.time_ms:9.2f} ms  x{row.floor_ratio:5.2f} floor")
    summary = {name: sec * 1e3 for name, (sec, *_) in times.items()}
    summary.update(floor)
    return rows, summary


def run_chunk_sizes(device: torch.device, *, tokens: int = 2048, vocab: int = 32000,
                    sizes=(2, 4, 8, 16, 32, 64, None), min_run_time: float = 0.5, log=print) -> list[Row]:
    """The torch chunk loop (the path for GPUs, float64, bfloat16 and machines without a C compiler) at several
    chunk sizes; the CPU kernel ignores ``chunk_size`` (its temporaries are one row per thread)."""
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(tokens, vocab, generator=gen).to(device).requires_grad_()
    t = (2 * torch.randn(tokens, vocab, generator=gen)).to(device)
    rows = []
    for size in sizes:
        for name in ("kd_ce", "kd_kl"):
            fn = _chunked.CHUNKED[name]
            run = _fb(_torch_loop(lambda fn=fn, size=size: fn(s, t, temperature=T, chunk_size=size)), [s])
            sec, iqr, n = measure(run, device, min_run_time=min_run_time)
            rows_used = _chunked.chunk_rows(size, tokens, vocab, device)
            row = Row("large", f"chunked {name}", f"torch loop, chunk_size={size} ({rows_used} rows)",
                      f"{tokens}x{vocab}",
                      time_ms=sec * 1e3, time_iqr_ms=iqr * 1e3, repeats=n)
            rows.append(row)
            log(f"  chunked {name} chunk_size={size!s:5s} ({rows_used:4d} rows) {row.time_ms:9.2f} ms")
    return rows


def _fused_inputs(device, gen, tokens, vocab, ds, dt, teacher_vocab=None):
    hs = (torch.randn(tokens, ds, generator=gen) / ds**0.5).to(device).requires_grad_()
    ws = torch.randn(vocab, ds, generator=gen).to(device).requires_grad_()
    ht = (torch.randn(tokens, dt, generator=gen) / dt**0.5).to(device)
    wt = (2 * torch.randn(teacher_vocab or vocab, dt, generator=gen)).to(device)
    return hs, ws, ht, wt


def run_fused(device: torch.device, *, tokens: int = 2048, vocab: int = 32000, ds: int = 256, dt: int = 384,
              min_run_time: float = 1.0, log=print) -> tuple[list[Row], dict]:
    """``fused_linear_kd`` (forward KL): gradients in the forward vs checkpointed chunks vs unfused."""
    gen = torch.Generator().manual_seed(2)
    hs, ws, ht, wt = _fused_inputs(device, gen, tokens, vocab, ds, dt)
    leaves = [hs, ws]
    fns = {
        "fused (gradients in the forward)": lambda: _fused.fused_linear_kd(hs, ws, ht, wt, temperature=2.0),
        "fused (checkpointed chunks)": lambda: _fused.fused_linear_kd(hs, ws, ht, wt, temperature=2.0,
                                                                      recompute=True),
        "unfused: logits + dk.kd_kl": lambda: dk.kd_kl(hs @ ws.t(), ht @ wt.t(), temperature=2.0),
        "unfused: logits + chunked_kd_kl": lambda: _chunked.chunked_kd_kl(hs @ ws.t(), ht @ wt.t(), temperature=2.0),
    }
    shape = f"{tokens}x{vocab} D={ds}/{dt}"
    flops = 2 * tokens * vocab * (3 * ds + dt)  # z_S, z_T, ∂h_S, ∂W_S
    rows, summary = [], {}
    for name, fn in fns.items():
        run = _fb(fn, leaves)
        sec, iqr, n = measure(run, device, min_run_time=min_run_time)
        row = Row("fused", "fused_linear_kd", name, shape, time_ms=sec * 1e3, time_iqr_ms=iqr * 1e3, repeats=n)
        row.extra["gflops_effective"] = round(flops / sec / 1e9, 1)
        row.peak_mb = peak_memory(run, device)
        rows.append(row)
        summary[name] = sec * 1e3
        peak = float("nan") if row.peak_mb is None else row.peak_mb
        log(f"  fused {name:36s} {row.time_ms:9.2f} ms  peak {peak:9.1f} MB")
    return rows, summary


def _mem_available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def run_fused_peak(device: torch.device, *, tokens: int = 8192, vocab: int = 128256, teacher_vocab: int = 128320,
                   ds: int | None = None, dt: int | None = None, chunk_size: int | None = None,
                   chunked_logits: bool = False, log=print) -> tuple[list[Row], dict]:
    """Peak memory at an LLM vocabulary. On the CPU the widths are small (64/96) to keep the products short;
    memory is about the ``[tokens, V]`` temporaries, which do not depend on the width."""
    ds = ds or (64 if device.type == "cpu" else 4096)
    dt = dt or (96 if device.type == "cpu" else 5120)
    gen = torch.Generator().manual_seed(3)
    hs, ws, ht, wt = _fused_inputs(device, gen, tokens, vocab, ds, dt, teacher_vocab)
    inputs_mb = sum(x.numel() * x.element_size() for x in (hs, ws, ht, wt)) / 2**20
    grads_mb = sum(x.numel() * x.element_size() for x in (hs, ws)) / 2**20
    rows_per_chunk = _fused.fused_chunk_rows(chunk_size, tokens, vocab, device)
    buffers = 4  # xs, xt, pt, out for "kl" (3 for "ce")
    chunk_mb = buffers * rows_per_chunk * vocab * 4 / 2**20
    shape = f"{tokens}x{vocab} (teacher {teacher_vocab}) D={ds}/{dt}"
    rows, summary = [], {"inputs_mb": inputs_mb, "grads_mb": grads_mb, "chunk_mb": chunk_mb,
                         "rows_per_chunk": rows_per_chunk, "buffers_per_chunk": buffers,
                         "dense_logits_mb_each": tokens * vocab * 4 / 2**20}

    def run():
        loss = _fused.fused_linear_kd(hs, ws, ht, wt, temperature=2.0, vocab_size=vocab, chunk_size=chunk_size)
        loss.backward()
        return loss.detach()

    start = time.perf_counter()
    peak = peak_memory(run, device)
    sec = time.perf_counter() - start
    hs.grad = ws.grad = None
    row = Row("fused", "fused_linear_kd peak", "fused (gradients in the forward)", shape, time_ms=sec * 1e3, repeats=1,
              peak_mb=peak)
    row.extra.update({k: round(v, 1) if isinstance(v, float) else v for k, v in summary.items()})
    row.note = (f"peak above the inputs ({inputs_mb:.0f} MB): {peak:.0f} MB; bound = gradients {grads_mb:.0f} MB + "
                f"one chunk {chunk_mb:.0f} MB ({buffers} × {rows_per_chunk} rows × V float32)" if peak is not None
                else "peak unknown")
    rows.append(row)
    summary["peak_mb"] = peak
    summary["time_s"] = sec
    log(f"  fused peak {shape}: {row.note}; {sec:.1f} s")
    hs = ws = ht = wt = None  # free them

    dense_mb = 2 * tokens * vocab * 4 / 2**20
    avail = _mem_available_gb()
    if chunked_logits and avail is not None and avail * 1024 > 1.6 * dense_mb + 2048:
        s = torch.randn(tokens, vocab, generator=gen).to(device).requires_grad_()
        t = torch.randn(tokens, vocab, generator=gen).to(device)

        def run_chunked():
            loss = _chunked.chunked_kd_kl(s, t, temperature=2.0)
            loss.backward()
            return loss.detach()

        start = time.perf_counter()
        peak_c = peak_memory(run_chunked, device)
        sec = time.perf_counter() - start
        per_chunk = _chunked.chunk_rows(None, tokens, vocab, device)
        row = Row("large", "chunked_kd_kl peak", "distilkit chunked", f"{tokens}x{vocab}", time_ms=sec * 1e3,
                  repeats=1, peak_mb=peak_c)
        grad_mb = tokens * vocab * 4 / 2**20
        row.note = (f"peak above the logits ({dense_mb:.0f} MB): {peak_c:.0f} MB = the gradient ({grad_mb:.0f} MB) + "
                    f"{peak_c - grad_mb:.0f} MB; one chunk = 3 × {per_chunk} rows × V float32 = "
                    f"{3 * per_chunk * vocab * 4 / 2**20:.1f} MB" if peak_c is not None else "peak unknown")
        rows.append(row)
        summary["chunked_peak_mb"] = peak_c
        log(f"  chunked kd_kl peak {tokens}x{vocab}: {row.note}; {sec:.1f} s")
        s = t = None
    else:
        rows.append(Row("large", "chunked_kd_kl peak", "distilkit chunked", f"{tokens}x{vocab}", status="unmeasured",
                        note=f"not run (needs ~{1.6 * dense_mb / 1024 + 2:.0f} GB free for the logits and their "
                             "gradient; see the kd_target rows for the chunked path's peak at 2048 x 32k)"))
    rows.append(Row("large", "kd_kl peak", "distilkit dense", f"{tokens}x{vocab}", status="unmeasured",
                    note=f"the dense loss holds several {tokens}x{vocab} float32 tensors "
                         f"({tokens * vocab * 4 / 2**30:.1f} GiB each); not run on this machine"))
    return rows, summary
