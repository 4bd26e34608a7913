"""Chunked logit divergences for large vocabularies: closed-form gradients, one chunk of temporaries at a time.

``chunked_kd_kl(student, teacher, ...)`` equals :func:`distilkit.losses.kd_kl` (same options, same (sum, count),
same reductions) but never holds more than one chunk of rows of full-vocabulary float32 temporaries: the rows of
``[..., V]`` logits are processed ``chunk_size`` at a time, and for each chunk the forward pass computes both the
per-row divergence and its gradient with respect to the student logits ``x = z / T`` in closed form, both from the
divergence table (:mod:`distilkit.losses._table`), times ``T² / T`` per row (the T² factor of Hinton et al., 2015,
and ∂x/∂z = 1/T). The gradient is written once into a buffer of the student's shape and dtype; the backward pass
only scales it by the incoming gradient (and on the CPU, outside ``torch.compile``, skips even that when the
incoming gradient is exactly 1, as after ``loss.backward()``). This is what Liger-Kernel's chunked losses do with
``torch.func.grad_and_value`` (``src/liger_kernel/chunked_loss/fused_linear_distillation.py``); the closed forms
avoid a second softmax pass. On accelerators the chunk body is compiled (:func:`chunk_body`).

On the CPU, float32 logits skip the chunk loop: :mod:`distilkit.losses._cpu_kernel` computes every row in one C sweep
(the same formulas; its temporaries are one row per thread, so ``chunk_size`` does not apply there).

The C kernel costs two ``exp`` per element (the floor), reads the logits once and writes the gradient once. The
functions compile with ``torch.compile(fullgraph=True)`` (the chunk loop unrolls; by default at most
``_MAX_CHUNKS_COMPILED`` chunks when compiling) and never synchronise with the host. Double backward is not
supported, and each graph may be backpropagated once (the gradient buffer is scaled in place).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import _checks as check
from . import _cpu_kernel
from . import _logits as dense
from . import _table as table
from ._reduce import REDUCTIONS

KINDS = table.KINDS

#: default bytes of one ``[rows, V]`` float32 temporary: L2-sized on the CPU, large on accelerators.
CPU_CHUNK_BYTES = 1 << 20
DEVICE_CHUNK_BYTES = 1 << 28
_MAX_CHUNKS_COMPILED = 8


def chunk_rows(chunk_size: int | None, rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: ``chunk_size``, or a default from the device's chunk budget (fewer chunks when compiling)."""
    if chunk_size is None:
        budget = CPU_CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES
        size = max(1, budget // (4 * max(vocab, 1)))
        if torch.compiler.is_compiling():  # the loop unrolls: bound the graph size
            size = max(size, -(-rows // _MAX_CHUNKS_COMPILED))
    else:
        size = chunk_size
    return max(1, min(size, rows))


def check_chunk_size(api: str, chunk_size: object) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{api}: expected chunk_size to be a positive int or None, got {chunk_size!r}.")


def finish_rows(rows: Tensor, per_row: bool, divisor: Tensor | None) -> Tensor:
    """What a chunked forward returns: the per-row values, or their sum (divided by ``divisor`` when given)."""
    if per_row:
        return rows
    total = rows.sum()
    return total if divisor is None else total / divisor


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _body(kind: str, zs: Tensor, zt: Tensor, temp, factor, param, t2_scale: bool,
          keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One chunk: rows of the divergence table's ``kind`` (times T² with ``t2_scale``) and ``factor · ∂row/∂x_S``
    (None when ``factor`` is None: no gradient wanted), 0 in dropped rows (selected, so garbage there never leaks).
    ``zs``, ``zt``: ``[c, V]`` logits of any dtype; ``temp``, ``factor``: floats, 0-d or ``[c, 1]`` tensors."""
    dtype = compute_dtype(zs)
    xs, xt = zs.to(dtype) / temp, zt.to(dtype) / temp
    if factor is None:
        rows, grad = table.value(kind, torch.log_softmax(xs, -1), torch.log_softmax(xt, -1), param), None
    else:
        rows, grad = table.rows_and_grad(kind, xs, xt, param)
        grad = grad * factor
    if t2_scale:
        rows = rows * (temp.squeeze(-1) if isinstance(temp, Tensor) and temp.ndim else temp) ** 2
    if keep is not None:
        rows = rows.masked_fill(~keep, 0)
        grad = None if grad is None else grad.masked_fill(~keep.unsqueeze(-1), 0)
    return rows, grad


def chunk_loop(kind: str, student: Tensor, teacher: Tensor, temp, keep, param, t2_scale: bool, chunk: int,
               grad: Tensor | None = None, divisor: Tensor | None = None) -> Tensor:
    """The rows ``[N]`` of ``kind``, chunk by chunk; with ``grad`` (an ``[N, V]`` buffer) also ``T²/T · ∂row/∂x_S``
    (divided by ``divisor``) written into it. Without, no gradient is computed at all."""
    n = student.shape[0]
    rows = torch.empty(n, dtype=compute_dtype(student), device=student.device)
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        t_c = temp[i:j].unsqueeze(-1) if isinstance(temp, Tensor) and temp.ndim else temp
        factor = None
        if grad is not None:
            factor = t_c if t2_scale else 1.0 / t_c  # T²/T or 1/T
            factor = factor if divisor is None else factor / divisor
        rows[i:j], g = chunk_body(kind, student[i:j], teacher[i:j], t_c, factor, param, t2_scale,
                                  None if keep is None else keep[i:j])
        if grad is not None:
            grad[i:j] = g
    return rows


_compiled_body = None
_compile_body: bool | None = None  # None: on accelerators only


def chunk_body(kind: str, zs: Tensor, zt: Tensor, temp, factor, param, t2_scale: bool, keep: Tensor | None):
    """:func:`_body`, compiled with ``torch.compile`` on accelerators (one fused kernel per chunk instead of about
    twenty elementwise passes; Liger-Kernel compiles its chunk body the same way) and where
    :func:`compiled_chunk_body` asks for it; eager otherwise (inside an outer ``torch.compile``, which traces it)."""
    global _compiled_body
    use = _compile_body if _compile_body is not None else zs.device.type != "cpu"
    if not use or torch.compiler.is_compiling():
        return _body(kind, zs, zt, temp, factor, param, t2_scale, keep)
    if _compiled_body is None:
        _compiled_body = torch.compile(_body, dynamic=True, fullgraph=True)

    def lift(x):  # floats as 0-d tensors: one graph for every temperature
        return torch.tensor(x, dtype=compute_dtype(zs), device=zs.device) if isinstance(x, float) else x

    return _compiled_body(kind, zs, zt, lift(temp), lift(factor), lift(param), t2_scale, keep)


@contextlib.contextmanager
def compiled_chunk_body(enabled: bool = True):
    """Within the block, the torch chunk loop of the chunked and fused paths compiles its chunk body
    (``enabled=True``) or runs it eagerly (``False``); outside, it is compiled on accelerators and eager on the
    CPU (where float32 takes the C kernel instead)."""
    global _compile_body
    before, _compile_body = _compile_body, bool(enabled)
    try:
        yield
    finally:
        _compile_body = before


def _scale_saved(grad: Tensor, g: Tensor, ctx) -> Tensor:
    """``grad × g`` (``g`` 0-d or per row ``[N]``), in place where that is safe; skipped when ``g`` is exactly 1."""
    g = g.to(grad.dtype)
    if torch.compiler.is_compiling():
        return grad * (g.unsqueeze(-1) if g.ndim else g)
    if getattr(ctx, "_consumed", False):
        raise RuntimeError("chunked loss: its gradient buffer was already used by a backward pass; backpropagate "
                           "through a chunked / fused loss once per forward (no retain_graph reuse).")
    ctx._consumed = True
    if g.ndim == 0 and g.device.type == "cpu" and bool(g == 1):  # CPU: reading the value costs no sync
        return grad
    return grad.mul_(g.unsqueeze(-1) if g.ndim else g)


def kernel_rows(student: Tensor, teacher: Tensor, grad: Tensor, temp, keep, scale, kind: str, param,
                t2_scale: bool, paged_in: bool = False) -> Tensor:
    """All rows at once through the CPU kernel (float32): returns the per-row values (times T² with ``t2_scale``)
    and writes ``scale · T²/T · ∂row/∂x_S`` into ``grad``. ``temp`` and ``scale``: float, 0-d or per row ``[N]``
    (``scale`` may be None); ``paged_in``: ``grad``'s memory was written before."""
    t = (temp if isinstance(temp, Tensor) else torch.tensor(float(temp))).to(torch.float32).reshape(-1)
    inv = t.reciprocal()
    gscale = t if t2_scale else inv
    if scale is not None:
        gscale = gscale * (scale.to(torch.float32).reshape(-1) if isinstance(scale, Tensor) else scale)
    rscale = t * t if t2_scale else torch.ones(1)
    p = param if isinstance(param, Tensor) else torch.tensor(0.0 if param is None else float(param))
    return _cpu_kernel.rows_grad(student, teacher, grad, inv, gscale, rscale, keep, KINDS.index(kind),
                                 p.to(torch.float32), paged_in)


class _ChunkedDivergence(torch.autograd.Function):
    """rows (or their sum / divisor) and the closed-form gradient, chunk by chunk (see the module docstring)."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temp, keep, divisor, kind: str, param, t2_scale: bool,
                chunk: int, per_row: bool):
        if _cpu_kernel.usable(student, teacher):
            grad, reused = _cpu_kernel.gradient_buffer(student)
            scale = None if divisor is None else divisor.reciprocal()
            rows_out = kernel_rows(student, teacher, grad, temp, keep, scale, kind, param, t2_scale, reused)
            ctx.save_for_backward(grad)
            return finish_rows(rows_out, per_row, divisor)
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        rows_out = chunk_loop(kind, student, teacher, temp, keep, param, t2_scale, chunk, grad, divisor)
        ctx.save_for_backward(grad)
        return finish_rows(rows_out, per_row, divisor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return _scale_saved(grad, g, ctx), None, None, None, None, None, None, None, None, None


def check_logits(api: str, student: object, teacher: object) -> tuple[Tensor, Tensor]:
    """Floating ``[..., V]`` logits of one shape and device; kept in their dtype (upcast happens per chunk)."""
    for name, x in (("student logits", student), ("teacher logits", teacher)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{api}: expected {name} to be a torch.Tensor, got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(f"{api}: expected {name} to be a real floating-point tensor, got dtype {x.dtype}.")
    check.rank(api, "student logits", student, range(1, 64), "[..., V]")
    check.same_shape(api, student, teacher, "student and teacher logits")
    check.same_device(api, student=student, teacher=teacher)
    if student.shape[-1] == 0:
        raise ValueError(f"{api}: expected at least one class in the last dimension, got shape {tuple(student.shape)}.")
    return student, teacher.detach()


def check_reduction(api: str, reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{api}: expected reduction to be one of {REDUCTIONS}, got {reduction!r}.")


def prepare_rows(api: str, lead: tuple[int, ...], like: Tensor, temperature, mask):
    """Flattened per-row temperature (float, 0-d or ``[N]``) and keep-mask (``[N]`` bool or None)."""
    keep = check.mask(api, mask, lead, like)
    temp = check.temperature(api, temperature, lead, like)
    if isinstance(temp, Tensor):
        temp = temp.to(compute_dtype(like))
        if temp.ndim:
            temp = temp.reshape(-1)
    return temp, (None if keep is None else keep.reshape(-1))


_PARAM_NAMES = {"jsd": "beta", "skew_kl": "alpha"}


def _divergence(api: str, kind: str, student, teacher, temperature, mask, t2_scale, chunk_size, param,
                mode: str):
    """``mode``: "none" (rows of the leading shape), "sum", "mean", or "sum_count"."""
    s, t = check_logits(api, student, teacher)
    named = {} if kind not in _PARAM_NAMES else {_PARAM_NAMES[kind]: param}
    if check.needs_autograd(temperature=temperature, **named):  # the same value, by the dense formula and autograd
        fn = getattr(dense, kind)
        options = {"temperature": temperature, "mask": mask, "t2_scale": t2_scale, **named}
        return fn.sum_count(s, t, **options) if mode == "sum_count" else fn(s, t, reduction=mode, **options)
    check_chunk_size(api, chunk_size)
    lead, vocab = tuple(s.shape[:-1]), s.shape[-1]
    temp, keep = prepare_rows(api, lead, s, temperature, mask)
    s2, t2 = s.reshape(-1, vocab), t.reshape(-1, vocab)
    n = s2.shape[0]
    chunk = chunk_rows(chunk_size, n, vocab, s.device)
    dtype = compute_dtype(s)
    count = (torch.tensor(float(n), dtype=dtype, device=s.device) if keep is None
             else keep.sum().to(dtype))
    divisor = count.clamp_min(1) if mode == "mean" else None
    if not (torch.is_grad_enabled() and s.requires_grad):  # no gradient wanted: none computed, none kept
        rows = chunk_loop(kind, s2, t2, temp, keep, param, bool(t2_scale), chunk)
        total = rows.reshape(lead) if mode == "none" else finish_rows(rows, False, divisor)
    elif mode == "none":
        return _ChunkedDivergence.apply(s2, t2, temp, keep, None, kind, param, bool(t2_scale), chunk,
                                        True).reshape(lead)
    else:
        total = _ChunkedDivergence.apply(s2, t2, temp, keep, divisor, kind, param, bool(t2_scale), chunk, False)
    return (total, count) if mode == "sum_count" else total


class _SumCount:
    """The private ``reduction`` that makes a public function return ``(sum, count)``."""

    def __repr__(self) -> str:
        return "sum_count"


SUM_COUNT = _SumCount()


def _public(kind: str):
    def decorate(fn):
        def sum_count(*args, **kwargs):
            return fn(*args, reduction=SUM_COUNT, **kwargs)

        sum_count.__doc__ = f"``(sum, count)`` of :func:`{fn.__name__}` (same arguments, no ``reduction``)."
        fn.sum_count = sum_count
        fn.kind = kind
        return fn

    return decorate


def _run(api, kind, student, teacher, temperature, mask, t2_scale, chunk_size, reduction, param=None):
    if reduction is SUM_COUNT:
        mode = "sum_count"
    else:
        check_reduction(api, reduction)
        mode = reduction
    return _divergence(api, kind, student, teacher, temperature, mask, t2_scale, chunk_size, param, mode)


@_public("kd_ce")
def chunked_kd_ce(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None, t2_scale: bool = True,
                  chunk_size: int | None = None, reduction="mean") -> Tensor:
    r""":func:`~distilkit.losses.kd_ce` (``T² · −Σ p_T log p_S`` per kept row), computed ``chunk_size`` rows at a
    time with the closed-form gradient ``T (p_S − p_T)``; never more than one chunk of float32 temporaries.

    Args:
        student, teacher: logits ``[..., V]`` (any floating dtype; upcast to float32 per chunk).
        temperature, mask, t2_scale, reduction: as :func:`~distilkit.losses.kd_ce`.
        chunk_size: rows per chunk; default: about 1 MiB of float32 per temporary on the CPU (cache-sized),
            256 MiB on accelerators, and at most 8 chunks under ``torch.compile``.
    """
    return _run("chunked_kd_ce", "kd_ce", student, teacher, temperature, mask, t2_scale, chunk_size, reduction)


@_public("kd_kl")
def chunked_kd_kl(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None, t2_scale: bool = True,
                  chunk_size: int | None = None, reduction="mean") -> Tensor:
    r""":func:`~distilkit.losses.kd_kl` (forward KL ``T² · Σ p_T (log p_T − log p_S)``), chunked as
    :func:`chunked_kd_ce` (gradient ``T (p_S − p_T)``)."""
    return _run("chunked_kd_kl", "kd_kl", student, teacher, temperature, mask, t2_scale, chunk_size, reduction)


@_public("reverse_kl")
def chunked_reverse_kl(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None, t2_scale: bool = True,
                       chunk_size: int | None = None, reduction="mean") -> Tensor:
    r""":func:`~distilkit.losses.reverse_kl` (``T² · Σ p_S (log p_S − log p_T)``), chunked as
    :func:`chunked_kd_ce`."""
    return _run("chunked_reverse_kl", "reverse_kl", student, teacher, temperature, mask, t2_scale, chunk_size,
                reduction)


@_public("jsd")
def chunked_jsd(student: Tensor, teacher: Tensor, *, beta=0.5, temperature=1.0, mask=None, t2_scale: bool = True,
                chunk_size: int | None = None, reduction="mean") -> Tensor:
    r""":func:`~distilkit.losses.jsd` (generalised JSD, β = 0 forward KL, β = 1 reverse KL), chunked as
    :func:`chunked_kd_ce`."""
    b = check.unit_interval("chunked_jsd", "beta", beta)
    return _run("chunked_jsd", "jsd", student, teacher, temperature, mask, t2_scale, chunk_size, reduction, b)


@_public("skew_kl")
def chunked_skew_kl(student: Tensor, teacher: Tensor, *, alpha=0.1, temperature=1.0, mask=None,
                    t2_scale: bool = True, chunk_size: int | None = None, reduction="mean") -> Tensor:
    r""":func:`~distilkit.losses.skew_kl` (``KL(p_T ‖ α p_T + (1−α) p_S)``), chunked as :func:`chunked_kd_ce`."""
    a = check.unit_interval("chunked_skew_kl", "alpha", alpha)
    return _run("chunked_skew_kl", "skew_kl", student, teacher, temperature, mask, t2_scale, chunk_size, reduction,
                a)


@_public("tvd")
def chunked_tvd(student: Tensor, teacher: Tensor, *, temperature=1.0, mask=None, t2_scale: bool = True,
                chunk_size: int | None = None, reduction="mean") -> Tensor:
    r""":func:`~distilkit.losses.tvd` (``½ Σ |p_T − p_S|``), chunked as :func:`chunked_kd_ce`."""
    return _run("chunked_tvd", "tvd", student, teacher, temperature, mask, t2_scale, chunk_size, reduction)


CHUNKED = {f.kind: f for f in (chunked_kd_ce, chunked_kd_kl, chunked_reverse_kl, chunked_jsd, chunked_skew_kl,
                               chunked_tvd)}
