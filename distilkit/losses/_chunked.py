"""Chunked logit divergences for large vocabularies: closed-form gradients, one chunk of temporaries at a time.

``chunked_kd_kl(student, teacher, ...)`` equals :func:`distilkit.losses.kd_kl` (same options, same (sum, count),
same reductions) but never holds more than one chunk of rows of full-vocabulary float32 temporaries: the rows of
``[..., V]`` logits are processed ``chunk_size`` at a time, and for each chunk the forward pass computes both the
per-row divergence and its gradient with respect to the student logits in closed form,

* kd_ce / kd_kl:  ∂/∂x_S = p_S − p_T  (x = z / T),
* reverse_kl:     ∂/∂x_S = p_S ⊙ (log p_S − log p_T − KL(p_S‖p_T)),
* jsd / skew_kl / tvd: ∂/∂x_S = p_S ⊙ (a − ⟨p_S, a⟩) with a = ∂row/∂p_S
  (jsd: (1−β)(log p_S − log m); skew_kl: −(1−α) p_T / m; tvd: ½ sign(p_S − p_T)),

times ``T² / T`` per row (the T² factor of Hinton et al., 2015, and ∂x/∂z = 1/T). The gradient is written once into
a buffer of the student's shape and dtype; the backward pass only scales it by the incoming gradient (and on the
CPU, outside ``torch.compile``, skips even that when the incoming gradient is exactly 1, as after
``loss.backward()``). This is what Liger-Kernel's chunked losses do with ``torch.func.grad_and_value``
(``src/liger_kernel/chunked_loss/fused_linear_distillation.py``); the closed forms avoid a second softmax pass.

On the CPU, float32 logits skip the chunk loop: :mod:`distilkit.losses._cpu_kernel` computes every row in one C sweep
(the same formulas; its temporaries are one row per thread, so ``chunk_size`` does not apply there).

Costs per element: two to three ``exp`` (the floor is two), the logits read once, the gradient written once. The
functions compile with ``torch.compile(fullgraph=True)`` (the chunk loop unrolls; by default at most
``_MAX_CHUNKS_COMPILED`` chunks when compiling) and never synchronise with the host. Double backward is not
supported, and each graph may be backpropagated once (the gradient buffer is scaled in place).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as check
from . import _cpu_kernel
from ._logits import _log_mixture
from ._reduce import REDUCTIONS

KINDS = _cpu_kernel.KINDS  # the kernel numbers the kinds in this order

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


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a, b)


def _softmax_chain(ps: Tensor, a: Tensor) -> Tensor:
    """``∂row/∂x = p ⊙ (a − ⟨p, a⟩)`` for ``a = ∂row/∂p`` (the softmax Jacobian-vector product)."""
    return ps * (a - _dot(ps, a).unsqueeze(-1))


def _log_softmax_(x: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` (a workspace) becomes ``log_softmax(x)`` and ``probs`` (a workspace) ``softmax(x)``, with one ``exp``
    per element and no allocation of full-vocabulary temporaries."""
    x.sub_(x.amax(-1, keepdim=True))
    torch.exp(x, out=probs)
    total = probs.sum(-1, keepdim=True)
    probs.mul_(total.reciprocal())
    return x.sub_(total.log()), probs


def _where_mass(p: Tensor, x: Tensor) -> Tensor:
    """``x`` (in place) with 0 where ``p`` = 0, so that ``p · x`` is 0 there (0·log 0 = 0, also at −inf logits)."""
    return x.masked_fill_(p == 0, 0.0)


def _forward_kl(ls: Tensor, lt: Tensor, ps: Tensor, pt: Tensor) -> tuple[Tensor, Tensor]:
    return _where_mass(pt, lt.sub_(ls)).mul_(pt).sum(-1), ps.sub_(pt)


def _reverse_kl(ls: Tensor, lt: Tensor, ps: Tensor, pt: Tensor) -> tuple[Tensor, Tensor]:
    diff = _where_mass(ps, ls.sub_(lt))
    rows = torch.mul(ps, diff, out=lt).sum(-1)
    return rows, ps.mul_(diff.sub_(rows.unsqueeze(-1)))


_IN_PLACE = ("kd_ce", "kd_kl", "reverse_kl")  # their gradient is returned in work[0]


def _row_view(x):
    return x.squeeze(-1) if isinstance(x, Tensor) and x.ndim == 2 else x


def kd_ce_rows_and_grad(zs: Tensor, zt: Tensor, temp, factor, xs: Tensor, xt: Tensor, pt: Tensor | None,
                        out: Tensor) -> tuple[Tensor, Tensor]:
    """kd_ce's fast path: rows ``−Σ p_T log p_S`` and ``factor · (p_S − p_T)`` written into ``out``.

    ``zs``, ``zt``: ``[c, V]`` logits (any dtype); ``temp`` / ``factor``: float, 0-d or ``[c, 1]``; ``xs``, ``xt``,
    ``out``: ``[c, V]`` compute-dtype workspaces (``zs`` / ``zt`` may be ``xs`` / ``xt`` themselves); ``pt`` a fourth
    one, or None to reuse ``xt``. Two ``exp`` per element and 14 passes over the (cached)
    chunk, using ``Σ p_T = 1``: ``−Σ p_T log p_S = logsumexp(x_S) − Σ p_T x_S``.
    """
    pt = scaled_(xt if pt is None else pt, zt, temp)
    pt.sub_(pt.amax(-1, keepdim=True)).exp_()
    pt.mul_(factor / pt.sum(-1, keepdim=True))  # factor · p_T
    xs = scaled_(xs, zs, temp)
    dot = _where_mass(pt, torch.mul(pt, xs, out=out)).sum(-1) / _row_view(factor)  # Σ p_T x_S (``out``: scratch)
    ms = xs.amax(-1, keepdim=True)
    torch.exp(xs.sub_(ms), out=out)
    ss = out.sum(-1, keepdim=True)
    rows = (ms + ss.log()).squeeze(-1) - dot
    return rows, out.mul_(factor / ss).sub_(pt)


def rows_and_grad(kind: str, xs: Tensor, xt: Tensor, param: float | Tensor | None = None,
                  work: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per-row divergence of ``softmax(xs)`` from ``softmax(xt)`` and its gradient with respect to ``xs``, without
    the T² factor. ``xs``, ``xt`` (``[c, V]`` temperature-scaled logits in the compute dtype) are overwritten: they
    and ``work`` (two more ``[c, V]`` buffers; allocated when None) are the only full-vocabulary temporaries.
    ``param`` is jsd's β or skew_kl's α. Returns ``(rows [c], grad [c, V])``; ``grad`` is one of the workspaces."""
    ps, pt = work if work is not None else (torch.empty_like(xs), torch.empty_like(xt))
    ls, ps = _log_softmax_(xs, ps)
    lt, pt = _log_softmax_(xt, pt)
    if kind == "kd_ce":
        return _where_mass(pt, ls).mul_(pt).sum(-1).neg_(), ps.sub_(pt)
    if kind == "kd_kl":
        return _forward_kl(ls, lt, ps, pt)
    if kind == "reverse_kl":
        return _reverse_kl(ls, lt, ps, pt)
    if kind == "tvd":
        diff = ps - pt
        rows = 0.5 * diff.abs().sum(-1)
        return rows, _softmax_chain(ps, 0.5 * diff.sign_())
    if kind == "skew_kl":
        a = param
        lt_m = _where_mass(pt, lt - _log_mixture(lt, ls, a))
        rows = _dot(pt, lt_m)
        return rows, _softmax_chain(ps, _where_mass(pt, -(1 - a) * lt_m.exp_()))
    if kind == "jsd":
        b = param
        if isinstance(b, float) and b in (0.0, 1.0):
            return _forward_kl(ls, lt, ps, pt) if b == 0.0 else _reverse_kl(ls, lt, ps, pt)
        lm = _log_mixture(lt, ls, b)
        ls_m = _where_mass(ps, ls - lm)
        rows = b * _dot(pt, _where_mass(pt, lt - lm)) + (1 - b) * _dot(ps, ls_m)
        grad = _softmax_chain(ps, (1 - b) * ls_m)
        if isinstance(b, float):
            return rows, grad
        (fr, fg), (rr, rg) = _forward_kl(ls.clone(), lt.clone(), ps.clone(), pt), _reverse_kl(ls, lt, ps, pt)
        rows = torch.where(b == 0, fr, torch.where(b == 1, rr, rows))
        return rows, torch.where(b == 0, fg, torch.where(b == 1, rg, grad))
    raise ValueError(f"rows_and_grad: expected kind in {KINDS}, got {kind!r}.")


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


def scaled_(out: Tensor, z: Tensor, temp) -> Tensor:
    """``out = z / temp`` in ``out``'s dtype (``z`` is upcast, never multiplied in a lower precision)."""
    if isinstance(temp, float) and temp == 1.0:
        return out if out is z else out.copy_(z)
    if z.dtype == out.dtype:
        return torch.mul(z, 1.0 / temp, out=out) if not isinstance(temp, Tensor) else torch.div(z, temp, out=out)
    return out.copy_(z).div_(temp)


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
        n, _ = student.shape
        dtype = compute_dtype(student)
        if _cpu_kernel.usable(student, teacher):
            grad, reused = _cpu_kernel.gradient_buffer(student)
            scale = None if divisor is None else divisor.reciprocal()
            rows_out = kernel_rows(student, teacher, grad, temp, keep, scale, kind, param, t2_scale, reused)
            ctx.save_for_backward(grad)
            return finish_rows(rows_out, per_row, divisor)
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        rows_out = torch.empty(n, dtype=dtype, device=student.device)
        rows_c = min(chunk, n)
        direct = grad.dtype == dtype
        xs, xt, wt = (torch.empty(rows_c, student.shape[1], dtype=dtype, device=student.device) for _ in range(3))
        ws = None if direct else torch.empty_like(xs)
        in_place = kind in _IN_PLACE or (kind == "jsd" and isinstance(param, float) and param in (0.0, 1.0))
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            c = j - i
            t_c = temp[i:j].to(dtype).unsqueeze(-1) if isinstance(temp, Tensor) and temp.ndim else temp
            # The student's probabilities (then the gradient) go straight into the gradient buffer when it has the
            # compute dtype: one pass fewer.
            work = (grad[i:j] if direct else ws[:c], wt[:c])
            factor = t_c if t2_scale else 1.0 / t_c  # T²/T or 1/T
            if divisor is not None:
                factor = factor / divisor
            if kind == "kd_ce":
                rows, dx = kd_ce_rows_and_grad(student[i:j], teacher[i:j], t_c, factor, xs[:c], xt[:c], None,
                                               work[0])
            else:
                rows, dx = rows_and_grad(kind, scaled_(xs[:c], student[i:j], t_c),
                                         scaled_(xt[:c], teacher[i:j], t_c), param, work)
                dx = dx.mul_(factor)
            if t2_scale:
                rows = rows * (t_c.squeeze(-1) if isinstance(t_c, Tensor) and t_c.ndim else t_c) ** 2
            if keep is not None:  # masked_fill, not a product: garbage (inf, NaN) in masked rows never leaks
                drop = ~keep[i:j]
                rows = rows.masked_fill(drop, 0)
                dx = dx.masked_fill_(drop.unsqueeze(-1), 0)
            if not (direct and in_place):
                grad[i:j] = dx
            rows_out[i:j] = rows
        ctx.save_for_backward(grad)
        ctx.per_row = per_row
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
    temp = check.positive(api, "temperature", temperature, lead, like)
    if isinstance(temp, Tensor):
        temp = temp.to(compute_dtype(like))
        if temp.ndim:
            temp = temp.reshape(-1)
    return temp, (None if keep is None else keep.reshape(-1))


_PARAM_NAMES = {"jsd": "beta", "skew_kl": "alpha"}


def _divergence(api: str, kind: str, student, teacher, temperature, mask, t2_scale, chunk_size, param,
                mode: str):
    """``mode``: "none" (rows of the leading shape), "sum", "mean", or "sum_count"."""
    dense = f"use dk.{kind}(..., impl='dense') there"
    check.outside_transforms(api, dense)
    check.no_grad_hyperparameters(api, dense, temperature=temperature, **{_PARAM_NAMES.get(kind, "param"): param})
    s, t = check_logits(api, student, teacher)
    check_chunk_size(api, chunk_size)
    lead, vocab = tuple(s.shape[:-1]), s.shape[-1]
    temp, keep = prepare_rows(api, lead, s, temperature, mask)
    s2, t2 = s.reshape(-1, vocab), t.reshape(-1, vocab)
    n = s2.shape[0]
    chunk = chunk_rows(chunk_size, n, vocab, s.device)
    dtype = compute_dtype(s)
    count = (torch.tensor(float(n), dtype=dtype, device=s.device) if keep is None
             else keep.sum().to(dtype))
    if mode == "none":
        rows = _ChunkedDivergence.apply(s2, t2, temp, keep, None, kind, param, bool(t2_scale), chunk, True)
        return rows.reshape(lead)
    divisor = count.clamp_min(1) if mode == "mean" else None
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
