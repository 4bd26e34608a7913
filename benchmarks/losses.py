"""Every loss, forward + backward, at realistic shapes: distilkit eager, compiled, chunked (logit divergences),
TextBrewer where it has the loss, and a naive PyTorch reference (the formula as usually written).

Shapes: LLM logits ``[tokens, vocabulary]`` (2048 × 32,000 on the CPU); BERT-base features ``[32, 128, 768]``
(student 312 wide for mmd/nst as TinyBERT, 384 for relation_kl as MiniLM), attention ``[32, 12, 128, 128]``, with a
padding mask of random lengths in [64, 128] where the loss takes one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import distilkit as dk
from distilkit.losses import _chunked

from .floors import Floors
from .harness import Row, measure, peak_memory

try:  # the peer package, where it has the loss
    import textbrewer.losses as tb
except ImportError:  # pragma: no cover - textbrewer is a dev dependency
    tb = None

T = 8.0  # temperature of the logit rows (TextBrewer's T4-tiny recipe uses 8)
DIVERGENCES = ("kd_ce", "kd_kl", "reverse_kl", "jsd", "skew_kl", "tvd")


@dataclass
class Shapes:
    tokens: int = 2048
    vocab: int = 32000
    batch: int = 32
    length: int = 128
    width: int = 768
    heads: int = 12
    student_width: int = 312  # TinyBERT
    relation_width: int = 384  # MiniLM

    @classmethod
    def tiny(cls) -> Shapes:
        return cls(tokens=16, vocab=50, batch=2, length=8, width=24, heads=2, student_width=12, relation_width=12)


@dataclass
class Case:
    name: str
    shape: str
    make: Callable[[torch.device, torch.Generator], tuple[Any, Any, Any]]  # (student, teacher, mask)
    impls: dict[str, Callable]  # impl name -> fn(student, teacher, mask) -> 0-d loss
    exps: Callable[[Any], float] = lambda s: 0.0  # transcendental evaluations per call (floor)
    flops: Callable[[Any, Any], float] = lambda s, t: 0.0  # unavoidable matrix-product flops (floor)
    notes: dict[str, str] = field(default_factory=dict)
    bytes_moved: Callable[[Any, Any], float] | None = None  # default: inputs read once, student gradient written


def _lengths_mask(b: int, length: int, device, gen) -> torch.Tensor:
    lengths = torch.randint(length // 2, length + 1, (b,), generator=gen)
    return (torch.arange(length)[None, :] < lengths[:, None]).to(device)


def _leaves(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    out: list[torch.Tensor] = []
    for v in x:
        for leaf in _leaves(v):
            if all(leaf is not o for o in out):
                out.append(leaf)
    return out


def _nbytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in _leaves(x))


def _n(x) -> int:
    return _leaves(x)[0].numel()


# ------------------------------------------------------------------------------------------- naive references
def _soft(z, temp=T):
    return F.softmax(z / temp, dim=-1)


def _logsoft(z, temp=T):
    return F.log_softmax(z / temp, dim=-1)


def _naive_kl(s, t, m):
    return F.kl_div(_logsoft(s), _logsoft(t), reduction="batchmean", log_target=True) * T * T


def _naive_reverse_kl(s, t, m):
    return F.kl_div(_logsoft(t), _logsoft(s), reduction="batchmean", log_target=True) * T * T


def _naive_jsd(s, t, m, beta=0.5):
    ps, pt = _soft(s), _soft(t)
    log_m = torch.log(beta * pt + (1 - beta) * ps)
    kl_t = F.kl_div(log_m, pt, reduction="batchmean")
    kl_s = F.kl_div(log_m, ps, reduction="batchmean")
    return (beta * kl_t + (1 - beta) * kl_s) * T * T


def _naive_skew(s, t, m, alpha=0.1):
    pt = _soft(t)
    return F.kl_div(torch.log(alpha * pt + (1 - alpha) * _soft(s)), pt, reduction="batchmean") * T * T


def _masked_mean(values, m):
    m = m.to(values.dtype)
    return (values * m).sum() / m.sum()


def _naive_relation(s, t, m, heads):
    def rel(x):
        b, length, d = x.shape
        x = x.view(b, length, heads, d // heads).transpose(1, 2)
        return torch.log_softmax(x @ x.transpose(-1, -2) / math.sqrt(d // heads), -1)

    ls, lt = rel(s), rel(t)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def _naive_nst(s, t, m):
    def gram(x):
        u = F.normalize(x, dim=1)
        return u @ u.transpose(1, 2) / x.shape[-1]

    return (gram(s) - gram(t)).square().sum((1, 2)).mean()


# --------------------------------------------------------------------------------------------------- the cases
def cases(shapes: Shapes) -> list[Case]:
    n, v = shapes.tokens, shapes.vocab
    b, length, d, h = shapes.batch, shapes.length, shapes.width, shapes.heads
    ds, dr = shapes.student_width, shapes.relation_width
    logits_shape = f"{n}x{v}"

    def logits(device, gen):
        s = torch.randn(n, v, generator=gen).to(device).requires_grad_()
        t = (2 * torch.randn(n, v, generator=gen)).to(device)
        return s, t, None

    def features(ws=d, wt=d):
        def make(device, gen):
            s = torch.randn(b, length, ws, generator=gen).to(device).requires_grad_()
            t = torch.randn(b, length, wt, generator=gen).to(device)
            return s, t, _lengths_mask(b, length, device, gen)

        return make

    def attention(probs: bool):
        def make(device, gen):
            s = torch.randn(b, h, length, length, generator=gen)
            t = torch.randn(b, h, length, length, generator=gen)
            if probs:
                s, t = s.softmax(-1), t.softmax(-1)
            return s.to(device).requires_grad_(), t.to(device), _lengths_mask(b, length, device, gen)

        return make

    def pair(ws=d, wt=d):
        def make(device, gen):
            s = [torch.randn(b, length, ws, generator=gen).to(device).requires_grad_() for _ in range(2)]
            t = [torch.randn(b, length, wt, generator=gen).to(device) for _ in range(2)]
            return tuple(s), tuple(t), _lengths_mask(b, length, device, gen)

        return make

    def divergence(name: str, naive: Callable, opts: dict | None = None) -> Case:
        opts = dict(opts or {})
        loss, chunked = getattr(dk, name), _chunked.CHUNKED[name]
        impls = {
            "distilkit": lambda s, t, m: loss(s, t, temperature=T, **opts),
            "distilkit chunked": lambda s, t, m: chunked(s, t, temperature=T, **opts),
            "naive": naive,
        }
        if name == "kd_ce" and tb is not None:
            impls["textbrewer"] = lambda s, t, m: tb.kd_ce_loss(s, t, T)
        return Case(name, logits_shape, logits, impls, exps=lambda s: 2.0 * _n(s),
                    notes={"distilkit": "t2_scale=False (as TextBrewer)" if opts.get("t2_scale") is False else ""})

    out = [
        divergence("kd_ce", lambda s, t, m: F.cross_entropy(s / T, _soft(t)), {"t2_scale": False}),
        divergence("kd_kl", _naive_kl),
        divergence("reverse_kl", _naive_reverse_kl),
        divergence("jsd", _naive_jsd, {"beta": 0.5}),
        divergence("skew_kl", _naive_skew, {"alpha": 0.1}),
        divergence("tvd", lambda s, t, m: 0.5 * (_soft(t) - _soft(s)).abs().sum(-1).mean() * T * T),
    ]
    kd_mse = {"distilkit": lambda s, t, m: dk.kd_mse(s, t, temperature=T),
              "naive": lambda s, t, m: F.mse_loss(s / T, t / T)}
    if tb is not None:
        kd_mse["textbrewer"] = lambda s, t, m: tb.kd_mse_loss(s, t, T)
    out.append(Case("kd_mse", logits_shape, logits, kd_mse))

    def labelled(device, gen):
        s = torch.randn(n, v, generator=gen).to(device).requires_grad_()
        return s, torch.randint(0, v, (n,), generator=gen).to(device), None

    out.append(Case("hard_ce", logits_shape, labelled,
                    {"distilkit": lambda s, y, m: dk.hard_ce(s, y), "naive": lambda s, y, m: F.cross_entropy(s, y)},
                    exps=lambda s: 1.0 * _n(s)))

    feat = f"{b}x{length}x{d}"
    out += [
        Case("hidden_mse", feat, features(), {
            "distilkit": lambda s, t, m: dk.hidden_mse(s, t, mask=m),
            "naive": lambda s, t, m: _masked_mean((s - t).square().mean(-1), m),
            **({"textbrewer": lambda s, t, m: tb.hid_mse_loss(s, t, mask=m)} if tb else {})}),
        Case("cosine", feat, features(), {
            "distilkit": lambda s, t, m: dk.cosine(s, t, mask=m),
            "naive": lambda s, t, m: _masked_mean(1 - F.cosine_similarity(s, t, dim=-1), m),
            **({"textbrewer": lambda s, t, m: tb.cos_loss(s, t, mask=m)} if tb else {})}),
        Case("pkd", feat, features(), {
            "distilkit": lambda s, t, m: dk.pkd(s, t),
            "naive": lambda s, t, m: (F.normalize(s[:, 0], dim=-1) - F.normalize(t[:, 0], dim=-1)).square().sum(-1)
            .mean(),
            **({"textbrewer": lambda s, t, m: tb.pkd_loss(s, t)} if tb else {})},
            # reads position 0 of each input; its gradient (zeros but there) is written whole
            bytes_moved=lambda s, t: s[:, 0].nbytes + t[:, 0].nbytes + s.nbytes),
    ]
    att = f"{b}x{h}x{length}x{length}"
    att_exps = lambda s: 2.0 * _n(s)  # noqa: E731
    out += [
        Case("attention_kl", att, attention(True), {
            "distilkit": lambda s, t, m: dk.attention_kl(s, t, mask=m),
            "naive": lambda s, t, m: (t * (t.clamp_min(1e-8).log() - s.clamp_min(1e-8).log())).sum(-1).mean()},
            exps=att_exps, notes={"naive": "unmasked"}),
        Case("attention_mse", att, attention(False), {
            "distilkit": lambda s, t, m: dk.attention_mse(s, t, mask=m),
            "naive": lambda s, t, m: F.mse_loss(s, t),
            **({"textbrewer": lambda s, t, m: tb.att_mse_loss(s, t, mask=m)} if tb else {})},
            notes={"naive": "unmasked"}),
        Case("attention_ce", att, attention(False), {
            "distilkit": lambda s, t, m: dk.attention_ce(s, t, mask=m),
            "naive": lambda s, t, m: -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean(),
            **({"textbrewer": lambda s, t, m: tb.att_ce_loss(s, t, mask=m)} if tb else {})},
            exps=att_exps, notes={"naive": "unmasked"}),
    ]
    rel_shape = f"{b}x{length}x{dr}/{d}"
    out.append(Case("relation_kl", rel_shape, features(dr, d), {
        "distilkit": lambda s, t, m: dk.relation_kl(s, t, num_heads=h, mask=m),
        "naive": lambda s, t, m: _naive_relation(s, t, m, h)},
        exps=lambda s: 2.0 * b * h * length * length,
        flops=lambda s, t: 2 * b * length * length * (2 * s.shape[-1] + t.shape[-1]), notes={"naive": "unmasked"}))

    def fsp_naive(s, t, m):
        gs = s[0].transpose(1, 2) @ s[1] / length
        gt = t[0].transpose(1, 2) @ t[1] / length
        return F.mse_loss(gs, gt)

    out.append(Case("fsp", f"2x{feat}", pair(), {
        "distilkit": lambda s, t, m: dk.fsp(s, t, mask=m), "naive": fsp_naive,
        **({"textbrewer": lambda s, t, m: tb.fsp_loss(list(s), list(t), mask=m)} if tb else {})},
        flops=lambda s, t: 4 * 2 * b * length * d * d, notes={"naive": "unmasked"}))

    def mmd_naive(s, t, m):
        gs = s @ s.transpose(1, 2) / s.shape[-1]
        gt = t @ t.transpose(1, 2) / t.shape[-1]
        return F.mse_loss(gs, gt)

    mm_shape = f"{b}x{length}x{ds}/{d}"
    gram_flops = lambda s, t: 2 * b * length * length * (2 * s.shape[-1] + t.shape[-1])  # noqa: E731
    out.append(Case("mmd", mm_shape, features(ds, d), {
        "distilkit": lambda s, t, m: dk.mmd(s, t, mask=m), "naive": mmd_naive,
        **({"textbrewer": lambda s, t, m: tb.mmd_loss([s, s], [t, t], mask=m)} if tb else {})},
        flops=gram_flops, notes={"naive": "unmasked", "textbrewer": "released 0.2.1.post1 (masked grams / L)"}))
    out.append(Case("nst", mm_shape, features(ds, d), {
        "distilkit": lambda s, t, m: dk.nst(s, t, mask=m), "naive": _naive_nst},
        flops=gram_flops, notes={"naive": "unmasked"}))
    return out


# ----------------------------------------------------------------------------------------------------- running
def fwd_bwd(fn: Callable, student, teacher, mask) -> Callable[[], None]:
    leaves = [x for x in _leaves(student) if x.requires_grad]

    def run():
        loss = fn(student, teacher, mask)
        loss.backward()
        for x in leaves:
            x.grad = None

    return run


def floor_of(case: Case, student, teacher, floors: Floors) -> dict:
    if case.bytes_moved is not None:
        bytes_moved = case.bytes_moved(student, teacher)
    else:  # inputs read once, the student's gradient written once
        bytes_moved = 2 * _nbytes(student) + _nbytes(teacher)
    mem = floors.memory_ms(bytes_moved)
    exp = floors.exp_ms(case.exps(student))
    s0 = _leaves(student)[0]
    t0 = _leaves(teacher)[0]
    mm = floors.matmul_ms(case.flops(s0, t0))
    return {"bytes_moved": bytes_moved, "memory_ms": mem, "exp_ms": exp, "matmul_ms": mm,
            "floor_ms": max(mem, exp, mm)}


def run_losses(device: torch.device, floors: Floors, *, shapes: Shapes, compile: bool = True,
               min_run_time: float = 0.5, only: set[str] | None = None, log=print) -> list[Row]:
    rows: list[Row] = []
    for case in cases(shapes):
        if only and case.name not in only:
            continue
        gen = torch.Generator().manual_seed(0)
        student, teacher, mask = case.make(device, gen)
        floor = floor_of(case, student, teacher, floors)
        impls = dict(case.impls)
        if compile:
            eager = impls["distilkit"]
            impls = {"distilkit": eager, "distilkit compiled": torch.compile(eager, fullgraph=True, dynamic=False),
                     **{k: f for k, f in impls.items() if k != "distilkit"}}
        for impl, fn in impls.items():
            row = Row("losses", case.name, impl, case.shape, note=case.notes.get(impl, ""))
            run = fwd_bwd(fn, student, teacher, mask)
            try:
                start = time.perf_counter()
                run()  # first call: compilation for the compiled impl
                if impl.endswith("compiled"):
                    row.extra["compile_s"] = round(time.perf_counter() - start, 2)
                t, iqr, reps = measure(run, device, min_run_time=min_run_time, warmup=0)
                row.peak_mb = peak_memory(run, device)
            except Exception as error:  # a failing implementation is a result, not a crash
                row.status, row.note = "error", f"{type(error).__name__}: {error}"[:300]
                rows.append(row)
                log(f"  {case.name:14s} {impl:20s} ERROR {row.note}")
                continue
            row.time_ms, row.time_iqr_ms, row.repeats = t * 1e3, iqr * 1e3, reps
            row.bytes_moved = floor["bytes_moved"]
            row.gbps = floor["bytes_moved"] / t / 1e9
            row.floor_ms = floor["floor_ms"]
            row.floor_ratio = row.time_ms / floor["floor_ms"] if floor["floor_ms"] > 0 else None
            row.extra.update({k: round(v, 4) for k, v in floor.items() if k.endswith("_ms")})
            rows.append(row)
            log(f"  {case.name:14s} {impl:20s} {row.time_ms:10.2f} ms  x{row.floor_ratio:6.2f} floor  "
                f"{row.gbps:7.2f} GB/s  peak {row.peak_mb if row.peak_mb is not None else float('nan'):8.1f} MB")
        del student, teacher, mask
    return rows
