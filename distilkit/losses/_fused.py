"""``fused_linear_kd``: a logit divergence straight from hidden states and output-layer weights, without logits.

For LLM distillation the logits ``h Wᵀ`` of 8192 tokens × 128k classes take 4 GiB per model in float32, and an
unfused loss holds several such tensors. ``fused_linear_kd`` projects ``chunk_size`` rows at a time, computes the
divergence and its closed-form gradient for those rows (see :mod:`distilkit.losses._chunked`), and folds the gradient
into the gradients of the student's hidden states, weight and bias right away:

    z_S = h_S W_Sᵀ + b_S,  z_T = h_T W_Tᵀ + b_T   (the first ``vocab_size`` classes of each),
    ∂L/∂h_S = G W_S,  ∂L/∂W_S = Gᵀ h_S,  ∂L/∂b_S = Σ_rows G,   G = ∂L/∂z_S for the chunk.

Peak memory is the inputs, their gradients and one chunk of at most four ``[chunk_size, V]`` float32 buffers. This
is Liger-Kernel's design (``src/liger_kernel/chunked_loss/fused_linear_distillation.py``: gradients computed in the
forward, the backward only scales them), with closed-form gradients instead of ``torch.func.grad_and_value``.
``recompute=True`` instead checkpoints the chunks: the forward computes only the loss and the backward projects each
chunk again (two more matrix products per chunk, but nothing gradient-sized is held between the passes, and any
incoming gradient works — ``reduction="none"`` always uses it).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from . import _checks as check
from . import _cpu_kernel
from . import _logits as dense
from ._chunked import (
    KINDS,
    SUM_COUNT,
    _scale_saved,
    check_chunk_size,
    check_reduction,
    chunk_body,
    compute_dtype,
    finish_rows,
    kernel_rows,
    prepare_rows,
)

LOSSES = {"kl": "kd_kl", "ce": "kd_ce", "reverse_kl": "reverse_kl", "jsd": "jsd", "skew_kl": "skew_kl", "tvd": "tvd"}

#: default bytes of one ``[rows, V]`` float32 chunk buffer (CPU: a matrix product wants a few hundred rows).
CPU_CHUNK_BYTES = 1 << 25
DEVICE_CHUNK_BYTES = 1 << 28


def fused_chunk_rows(chunk_size: int | None, rows: int, vocab: int, device: torch.device) -> int:
    if chunk_size is None:
        budget = CPU_CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES
        chunk_size = max(1, budget // (4 * max(vocab, 1)))
    return max(1, min(chunk_size, rows))


def _project(h: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None) -> Tensor:
    """``h wᵀ + b`` (written into ``out`` when given and of the same dtype)."""
    if b is None:
        return torch.mm(h, w.t(), out=out) if out is not None else h @ w.t()
    if out is not None:
        return torch.addmm(b, h, w.t(), out=out)
    return torch.addmm(b, h, w.t())


class _Chunks:
    """The per-chunk work shared by both strategies: project, divergence rows, scaled gradient of the logits."""

    def __init__(self, hs, ws, bs, ht, wt, bt, temp, keep, kind, param, t2_scale, vocab, chunk, labels=None,
                 ce_weight=1.0, want_grad=True):
        self.labels, self.ce_weight, self.want_grad = labels, ce_weight, want_grad
        self.hs, self.ht = hs, ht
        self.ws, self.wt = ws[:vocab], wt[:vocab]
        self.bs = None if bs is None else bs[:vocab]
        self.bt = None if bt is None else bt[:vocab]
        self.temp, self.keep, self.kind, self.param, self.t2 = temp, keep, kind, param, t2_scale
        self.vocab, self.chunk = vocab, chunk
        self.n = hs.shape[0]
        self.dtype = compute_dtype(hs)
        c = min(chunk, self.n)
        new = lambda: torch.empty(c, vocab, dtype=self.dtype, device=hs.device)  # noqa: E731
        self.xs, self.xt, self.out = new(), new(), new()
        # matrix products in the inputs' dtype (bf16 on accelerators), written straight into the float32 buffers
        # when the dtypes agree
        self.direct_s = hs.dtype == self.dtype and ws.dtype == self.dtype
        self.direct_t = ht.dtype == self.dtype and wt.dtype == self.dtype

    def ranges(self):
        for i in range(0, self.n, self.chunk):
            yield i, min(i + self.chunk, self.n)

    def logits_grad(self, i: int, j: int, scale):
        """``(rows [c], G [c, V], hard)`` for rows ``i:j``: the divergence rows, plus ``ce_weight`` × the hard-label
        cross-entropy rows with labels; ``G`` = ∂(Σ scale_r · rows_r)/∂z_S; ``hard`` = ``(kd rows, ce rows, label
        log-probabilities)`` with labels, else None."""
        kd, grad, zs = self._divergence(i, j, scale)
        if self.labels is None:
            return kd, grad, None
        ce, logp = self._hard_labels(i, j, zs, scale, grad)
        return kd + self.ce_weight * ce, grad, (kd, ce, logp)

    def _hard_labels(self, i: int, j: int, zs: Tensor, scale, grad: Tensor):
        """Cross-entropy rows ``log Σ exp z_S − z_S[y]`` at temperature 1 (0 where dropped) and the label
        log-probabilities; adds ``ce_weight · scale · (softmax(z_S) − onehot(y))`` to ``grad`` (in place)."""
        z = zs.to(self.dtype)
        keep = self.keep[i:j]  # (with labels the keep-mask includes labels != ignore_index)
        label = torch.where(keep, self.labels[i:j], 0).unsqueeze(-1)
        lse = z.logsumexp(-1, keepdim=True)
        logp = torch.where(keep, (z.gather(-1, label) - lse).squeeze(-1), 0.0)
        if grad is not None:
            factor = self.ce_weight if scale is None else self.ce_weight * (
                scale[i:j].unsqueeze(-1) if isinstance(scale, Tensor) and scale.ndim else scale)
            g = (z - lse).exp_().scatter_add_(-1, label, torch.full_like(label, -1, dtype=z.dtype))
            grad.add_(g.mul_(factor).masked_fill_(~keep.unsqueeze(-1), 0))
        return -logp, logp.detach()

    def _divergence(self, i: int, j: int, scale):
        c = j - i
        xs, xt, out = self.xs[:c], self.xt[:c], self.out[:c]
        zs = _project(self.hs[i:j], self.ws, self.bs, xs if self.direct_s else None)
        zt = _project(self.ht[i:j], self.wt, self.bt, xt if self.direct_t else None)
        temp = self.temp
        if self.want_grad and not torch.compiler.is_compiling() and _cpu_kernel.usable(zs, zt):
            scale_c = scale[i:j] if isinstance(scale, Tensor) and scale.ndim else scale
            rows = kernel_rows(zs, zt, out, temp[i:j] if isinstance(temp, Tensor) and temp.ndim else temp,
                               None if self.keep is None else self.keep[i:j], scale_c, self.kind, self.param, self.t2,
                               i > 0)  # ``out`` is reused from chunk to chunk
            return rows, out, zs
        t_c = temp[i:j].unsqueeze(-1) if isinstance(temp, Tensor) and temp.ndim else temp
        factor = t_c if self.t2 else 1.0 / t_c
        if isinstance(scale, Tensor) and scale.ndim:
            factor = factor * scale[i:j].unsqueeze(-1)
        elif scale is not None:
            factor = factor * scale
        rows, grad = chunk_body(self.kind, zs, zt, t_c, factor if self.want_grad else None, self.param, self.t2,
                                None if self.keep is None else self.keep[i:j])
        return rows, grad, zs

    def rows_and_parts(self, scale, grads: tuple | None = None) -> tuple[Tensor, Tensor]:
        """Every chunk: the rows ``[N]`` and, with labels, the parts ``[3, N]`` (divergence, cross-entropy, label
        log-probabilities; ``[0, N]`` without); each chunk's gradient folded into ``grads`` = ``(g_hs, g_ws, g_bs)``
        when given."""
        rows_out = torch.empty(self.n, dtype=self.dtype, device=self.hs.device)
        parts = torch.zeros(3 if self.labels is not None else 0, self.n, dtype=self.dtype, device=self.hs.device)
        for i, j in self.ranges():
            rows, grad, hard = self.logits_grad(i, j, scale)
            rows_out[i:j] = rows
            if hard is not None:
                parts[:, i:j] = torch.stack(hard)
            if grads is not None:
                self.accumulate(i, j, grad, *grads)
        return rows_out, parts

    def accumulate(self, i, j, grad, g_hs, g_ws, g_bs):
        """Fold the logits' gradient of rows ``i:j`` into the parameter and hidden-state gradients."""
        if g_hs is None and g_ws is None and g_bs is None:
            return
        gz = grad.to(self.hs.dtype)
        if g_hs is not None:
            g_hs[i:j] = gz @ self.ws
        if g_ws is not None:
            h = self.hs[i:j] if self.keep is None else self.hs[i:j].masked_fill(~self.keep[i:j].unsqueeze(-1), 0)
            g_ws[: self.vocab].addmm_(grad.t().to(g_ws.dtype), h.to(g_ws.dtype))  # (dropped rows' values: 0, not 0·inf)
        if g_bs is not None:
            g_bs[: self.vocab] += grad.sum(0).to(g_bs.dtype)


def _reduced(rows: Tensor, parts: Tensor, per_row: bool, divisor: Tensor | None):
    """``(loss, kd, ce, token log-probabilities)`` from :meth:`_Chunks.rows_and_parts`, reduced as asked (kd and ce
    empty without labels)."""
    if not len(parts):
        return finish_rows(rows, per_row, divisor), rows[:0].clone(), rows[:0].clone(), parts
    kd, ce = (finish_rows(parts[k], per_row, divisor) for k in (0, 1))
    return finish_rows(rows, per_row, divisor), kd, ce, parts[2]


def _grad_buffers(needs, hs, ws, bs):
    acc = torch.float64 if ws.dtype == torch.float64 else torch.float32  # accumulate in float32 at least
    g_hs = torch.empty_like(hs) if needs[0] else None
    g_ws = torch.zeros(ws.shape, dtype=acc, device=ws.device) if needs[1] else None
    g_bs = torch.zeros(bs.shape, dtype=acc, device=bs.device) if (bs is not None and needs[2]) else None
    return g_hs, g_ws, g_bs


class _FusedLinearKD(torch.autograd.Function):
    """Outputs: the loss (sum, sum / divisor, or per row), then, not differentiable, the divergence and
    cross-entropy parts reduced the same way and the label log-probabilities ``[N]`` (empty without labels)."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, temp, keep, divisor, labels, ce_weight, kind, param, t2_scale, vocab,
                chunk, per_row, recompute):
        ctx.args = (kind, param, t2_scale, vocab, chunk, ce_weight)
        ctx.per_row, ctx.recompute = per_row, recompute
        work = _Chunks(hs, ws, bs, ht, wt, bt, temp, keep, kind, param, t2_scale, vocab, chunk, labels, ce_weight)
        scale = None if divisor is None else 1.0 / divisor
        g_hs = g_ws = g_bs = None
        if not recompute:
            g_hs, g_ws, g_bs = _grad_buffers(ctx.needs_input_grad[:3], hs, ws, bs)
        rows_out, parts = work.rows_and_parts(scale, None if recompute else (g_hs, g_ws, g_bs))
        if recompute:
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, temp if isinstance(temp, Tensor) else None, keep, divisor,
                                  labels)
            ctx.float_temp = None if isinstance(temp, Tensor) else temp
        else:
            g_ws = None if g_ws is None else g_ws.to(ws.dtype)
            g_bs = None if g_bs is None else g_bs.to(bs.dtype)
            ctx.save_for_backward(g_hs, g_ws, g_bs)
        del work
        total, *extra = _reduced(rows_out, parts, per_row, divisor)
        ctx.mark_non_differentiable(*extra)
        return (total, *extra)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, *_):
        none = (None,) * 15
        if not ctx.recompute:
            grads = tuple(None if x is None else _scale_saved(x, g, _Once(ctx, k)) for k, x in
                          enumerate(ctx.saved_tensors))
            return (*grads, *none)
        hs, ws, bs, ht, wt, bt, temp, keep, divisor, labels = ctx.saved_tensors
        temp = ctx.float_temp if temp is None else temp
        kind, param, t2_scale, vocab, chunk, ce_weight = ctx.args
        work = _Chunks(hs, ws, bs, ht, wt, bt, temp, keep, kind, param, t2_scale, vocab, chunk, labels, ce_weight)
        scale = g if ctx.per_row else (g if divisor is None else g / divisor)
        g_hs, g_ws, g_bs = _grad_buffers(ctx.needs_input_grad[:3], hs, ws, bs)
        for i, j in work.ranges():
            work.accumulate(i, j, work.logits_grad(i, j, scale)[1], g_hs, g_ws, g_bs)
        g_ws = None if g_ws is None else g_ws.to(ws.dtype)
        g_bs = None if g_bs is None else g_bs.to(bs.dtype)
        return (g_hs, g_ws, g_bs, *none)


class _Once:
    """A per-saved-tensor stand-in for ``ctx`` in :func:`_scale_saved` (each buffer may be scaled once)."""

    def __init__(self, ctx, k: int):
        self._ctx, self._k = ctx, k

    @property
    def _consumed(self) -> bool:
        return getattr(self._ctx, f"_consumed_{self._k}", False)

    @_consumed.setter
    def _consumed(self, value: bool) -> None:
        setattr(self._ctx, f"_consumed_{self._k}", value)


def _tensor(api: str, name: str, x: object, ndim: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{api}: expected {name} to be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"{api}: expected {name} to be a real floating-point tensor, got dtype {x.dtype}.")
    if ndim is not None and x.ndim != ndim:
        layout = {1: "[V]", 2: "[V, D]"}[ndim]
        raise ValueError(f"{api}: expected {name} of shape {layout}, got shape {tuple(x.shape)}.")
    return x


class FusedLoss(NamedTuple):
    """What :func:`fused_linear_kd` returns with ``labels`` (or ``token_logprobs=True``): ``loss`` = ``kd +
    ce_weight · ce`` (the one to backpropagate), and, detached, for logging: ``kd`` and ``ce`` reduced as ``loss``
    (``ce`` None without labels) and ``token_logprobs`` ``[...]``, ``log softmax(z_S)[label]`` at temperature 1
    (0 where dropped; None unless asked)."""

    loss: Tensor
    kd: Tensor
    ce: Tensor | None
    token_logprobs: Tensor | None


def fused_linear_kd(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                    *, divergence: str = "kd_kl", temperature=1.0, mask=None, t2_scale: bool = True, beta=0.5,
                    alpha=0.1, labels: Tensor | None = None, ignore_index: int = -100, ce_weight=1.0,
                    token_logprobs: bool = False, student_bias: Tensor | None = None,
                    teacher_bias: Tensor | None = None, vocab_size: int | None = None, chunk_size: int | None = None,
                    recompute: bool = False, loss: str | None = None, reduction="mean"):
    r"""A logit divergence between ``h_S W_Sᵀ + b_S`` and ``h_T W_Tᵀ + b_T`` that never materialises the logits,
    optionally with the hard-label cross-entropy from the same chunks (the usual LLM recipe, KD + CE).

    Equals ``dk.<divergence>(student_hidden @ student_weight[:V].T + b_S[:V], teacher_hidden @
    teacher_weight[:V].T + b_T[:V], ...)`` (same options, (sum, count) and reductions) with ``V = vocab_size``,
    computed ``chunk_size`` rows at a time (see the module docstring; Liger-Kernel's fused linear distillation).
    With ``labels`` the result is :class:`FusedLoss`, whose ``loss`` is that divergence plus ``ce_weight ×
    dk.hard_ce(student logits, labels)``, both over the positions kept by ``mask`` **and** ``labels !=
    ignore_index`` (as Liger-Kernel does: distillation where there is a next token), so one count normalises both.

    Args:
        student_hidden, teacher_hidden: ``[..., D_S]`` and ``[..., D_T]`` with the same leading shape (widths may
            differ).
        student_weight, teacher_weight: output layers ``[V_S, D_S]`` and ``[V_T, D_T]`` (``nn.Linear.weight``,
            e.g. ``model.lm_head.weight``); padded vocabularies are allowed, see ``vocab_size``.
        divergence: the name of one of the divergences, ``"kd_kl"`` (default), ``"kd_ce"``, ``"reverse_kl"``,
            ``"jsd"`` (with ``beta``), ``"skew_kl"`` (with ``alpha``) or ``"tvd"``.
        temperature: float, 0-d tensor or per-row tensor of the leading shape; > 0. ``t2_scale`` as :func:`kd_ce`.
        mask: boolean-like keep-mask of the leading shape.
        labels: optional integer labels of the leading shape (the next tokens of a causal LM, already shifted);
            ``ignore_index`` marks positions without one. ``ce_weight``: float or 0-d tensor (no grad).
        token_logprobs: also return the student's label log-probabilities (needs ``labels``).
        student_bias, teacher_bias: optional ``[V_S]`` / ``[V_T]`` biases.
        vocab_size: the classes compared, the first ``vocab_size`` of both; default ``V_S``. The teacher's may be
            larger (a padded or extended vocabulary): its extra classes are ignored, the convention users of padded
            vocabularies expect (padding rows are not classes). Liger-Kernel instead pads the student's logits with
            zeros up to the teacher's vocabulary, which gives the student mass on classes it does not have; to
            reproduce that, pad the student's weight with zero rows and pass ``vocab_size=V_T`` (tested).
        chunk_size: rows per chunk; default: about 32 MiB of float32 per ``[rows, V]`` buffer on the CPU, 256 MiB
            on accelerators.
        recompute: checkpoint the chunks (project again in the backward) instead of computing the gradients in the
            forward; always on for ``reduction="none"``.
        loss: deprecated spelling of ``divergence`` (``"kl"``, ``"ce"``, ...), kept for one release.
        reduction: ``"mean"`` over kept rows, ``"sum"``, or ``"none"`` (per row of the leading shape).

    The student's hidden states, weight and bias receive gradients; the teacher's never do. Gradients are computed
    once per forward: backpropagate through the result once (no ``retain_graph`` reuse, no double backward). Inside
    a ``torch.func`` transform, or with a hyperparameter that requires grad, the same value is computed from the
    materialised logits with autograd (the dense path's memory).
    """
    api = "fused_linear_kd"
    mode = "sum_count" if reduction is SUM_COUNT else reduction
    if mode != "sum_count":
        check_reduction(api, reduction)
    kind = _divergence_name(api, divergence, loss)
    hs = _tensor(api, "student_hidden", student_hidden)
    ht = _tensor(api, "teacher_hidden", teacher_hidden).detach()
    ws = _tensor(api, "student_weight", student_weight, 2)
    wt = _tensor(api, "teacher_weight", teacher_weight, 2).detach()
    bs = None if student_bias is None else _tensor(api, "student_bias", student_bias, 1)
    bt = None if teacher_bias is None else _tensor(api, "teacher_bias", teacher_bias, 1).detach()
    check_chunk_size(api, chunk_size)
    if hs.ndim < 1 or ht.ndim != hs.ndim:
        raise ValueError(f"{api}: expected student_hidden [..., D_S] and teacher_hidden [..., D_T] of the same rank, "
                         f"got shapes {tuple(hs.shape)} and {tuple(ht.shape)}.")
    check.same_shape(api, hs, ht, "student_hidden and teacher_hidden", dims=slice(0, -1))
    for name, h, w in (("student", hs, ws), ("teacher", ht, wt)):
        if w.shape[1] != h.shape[-1]:
            raise ValueError(f"{api}: expected {name}_weight of shape [V, {h.shape[-1]}] (the {name} width), got "
                             f"{tuple(w.shape)}.")
    for name, b, w in (("student", bs, ws), ("teacher", bt, wt)):
        if b is not None and b.shape[0] != w.shape[0]:
            raise ValueError(f"{api}: expected {name}_bias of shape [{w.shape[0]}], got {tuple(b.shape)}.")
    vocab = ws.shape[0] if vocab_size is None else vocab_size
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 0 < vocab <= min(ws.shape[0], wt.shape[0]):
        raise ValueError(f"{api}: expected vocab_size to be an int in [1, {min(ws.shape[0], wt.shape[0])}] (at most "
                         f"both weights' rows), got {vocab_size!r}; student weight has {ws.shape[0]} rows, teacher "
                         f"weight {wt.shape[0]}.")
    check.same_device(api, student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt,
                      student_bias=bs, teacher_bias=bt)
    param = None
    if kind == "jsd":
        param = check.unit_interval(api, "beta", beta)
    elif kind == "skew_kl":
        param = check.unit_interval(api, "alpha", alpha)
    lead = tuple(hs.shape[:-1])
    if token_logprobs and labels is None:
        raise ValueError(f"{api}: token_logprobs=True needs labels (the tokens whose log-probabilities to return).")
    if labels is not None:
        labels = check.labels(api, labels, lead, vocab, ignore_index, "the hidden states'", student_hidden=hs)
    if isinstance(ce_weight, Tensor) and ce_weight.requires_grad:
        raise TypeError(f"{api}: expected ce_weight not to require grad (it gets none), got a tensor that does.")
    if labels is not None:
        keep = labels != ignore_index
        mask = keep if mask is None else check.mask(api, mask, lead, hs) & keep
    named = {"beta": param} if kind == "jsd" else {"alpha": param} if kind == "skew_kl" else {}
    if check.needs_autograd(temperature=temperature, **named):
        return _unfused(kind, hs, ws, bs, ht, wt, bt, vocab, labels, ignore_index, ce_weight, token_logprobs, mode,
                        {"temperature": temperature, "mask": mask, "t2_scale": t2_scale, **named})
    temp, keep = prepare_rows(api, lead, hs, temperature, mask)
    hs2, ht2 = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    n = hs2.shape[0]
    chunk = fused_chunk_rows(chunk_size, n, vocab, hs.device)
    dtype = compute_dtype(hs)
    count = torch.tensor(float(n), dtype=dtype, device=hs.device) if keep is None else keep.sum().to(dtype)
    flat = None if labels is None else labels.reshape(-1).long()
    per_row = mode == "none"
    divisor = count.clamp_min(1) if mode == "mean" else None
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hs, ws, bs))):
        # no gradient wanted: the rows (and parts) only, nothing computed or kept for a backward
        work = _Chunks(hs2, ws, bs, ht2, wt, bt, temp, keep, kind, param, bool(t2_scale), vocab, chunk, flat,
                       ce_weight, want_grad=False)
        total, kd, ce, logp = _reduced(*work.rows_and_parts(None), per_row, divisor)
    else:
        total, kd, ce, logp = _FusedLinearKD.apply(hs2, ws, bs, ht2, wt, bt, temp, keep, divisor, flat, ce_weight,
                                                   kind, param, bool(t2_scale), vocab, chunk, per_row,
                                                   per_row or bool(recompute))
    if per_row:
        total, kd, ce = (x.reshape(lead) if x.numel() else x for x in (total, kd, ce))
    return _result(total, count, mode, labels, kd, ce, logp.reshape(lead) if token_logprobs else None)


def _result(total, count, mode, labels, kd, ce, logp):
    """A tensor (a pair for sum_count) without labels and token log-probabilities, else a :class:`FusedLoss`."""
    if labels is None and logp is None:
        return (total, count) if mode == "sum_count" else total
    out = FusedLoss(total, kd, ce, logp)
    return (out, count) if mode == "sum_count" else out


def _divergence_name(api: str, divergence: str, loss: str | None) -> str:
    if loss is not None:
        if loss not in LOSSES:
            raise ValueError(f"{api}: expected loss (deprecated; use divergence=) to be one of {tuple(LOSSES)}, "
                             f"got {loss!r}.")
        if not torch.compiler.is_compiling():
            warnings.warn(f"{api}: loss={loss!r} is deprecated and will be removed in the next release; use "
                          f"divergence={LOSSES[loss]!r}.", DeprecationWarning, stacklevel=3)
        return LOSSES[loss]
    if divergence not in KINDS:
        raise ValueError(f"{api}: expected divergence to be one of {KINDS}, got {divergence!r}.")
    return divergence


def _unfused(kind, hs, ws, bs, ht, wt, bt, vocab, labels, ignore_index, ce_weight, token_logprobs, mode, options):
    """The same result from materialised logits and autograd (inside ``torch.func`` transforms)."""
    zs = hs @ ws[:vocab].T + (0 if bs is None else bs[:vocab])
    zt = ht @ wt[:vocab].T + (0 if bt is None else bt[:vocab])
    fn, hard = getattr(dense, kind), dense.hard_ce
    if mode == "sum_count":
        (kd, count), ce = fn.sum_count(zs, zt, **options), None
    else:
        kd, count = fn(zs, zt, reduction=mode, **options), None
    if labels is None:
        return (kd, count) if mode == "sum_count" else kd
    kept = torch.where(options["mask"], labels, ignore_index)
    ce = hard.sum_count(zs, kept, ignore_index=ignore_index)[0] if mode == "sum_count" else hard(
        zs, kept, ignore_index=ignore_index, reduction=mode)
    logp = None
    if token_logprobs:
        picked = torch.log_softmax(zs.float(), -1).gather(-1, torch.where(options["mask"], labels, 0).unsqueeze(-1))
        logp = torch.where(options["mask"], picked.squeeze(-1), 0.0).detach()
    return _result(kd + ce_weight * ce, count, mode, labels, kd.detach(), ce.detach(), logp)


def _sum_count(*args, **kwargs):
    return fused_linear_kd(*args, reduction=SUM_COUNT, **kwargs)


_sum_count.__doc__ = "``(sum, count)`` of :func:`fused_linear_kd` (same arguments, no ``reduction``)."
fused_linear_kd.sum_count = _sum_count  # type: ignore[attr-defined]


def _unpack(api: str, name: str, x) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(hidden, weight)`` or ``(hidden, [weight, bias])`` — what a pair selector gives."""
    if isinstance(x, (tuple, list)) and len(x) == 2:
        hidden, head = x
        if isinstance(head, (tuple, list)) and len(head) == 2:
            return hidden, head[0], head[1]
        if isinstance(head, Tensor):
            return hidden, head, None
    raise TypeError(f"{api}: expected {name} to be a pair (hidden, weight) or (hidden, [weight, bias]), e.g. the "
                    f"selector [('hidden', -1), 'lm_head'], got {type(x).__name__}.")


def fused_linear_kd_term(student, teacher, *tensors, divergence: str = "kd_kl", temperature=1.0, mask=None,
                         t2_scale: bool = True, beta=0.5, alpha=0.1, labels: Tensor | None = None,
                         ignore_index: int = -100, ce_weight=1.0, student_bias: Tensor | None = None,
                         teacher_bias: Tensor | None = None, vocab_size: int | None = None,
                         chunk_size: int | None = None, recompute: bool = False, loss: str | None = None,
                         reduction="mean"):
    r""":func:`fused_linear_kd` called as a loss of the algebra: on ``student = (hidden, weight)`` and
    ``teacher = (hidden, weight)`` pairs (``(hidden, [weight, bias])`` with a bias), or on the four tensors.

    A pair loss: with the output mappings ``{"hidden": [...], "lm_head": W}`` (or ``"lm_head": [W, b]``),
    ``dk.fused_linear_kd.on([("hidden", -1), "lm_head"], mask="attention_mask", temperature=2.0)`` selects both
    tensors of each model; ``labels="labels"`` adds ``ce_weight ×`` the hard-label cross-entropy from the same
    chunks (the result is then a :class:`FusedLoss`, and a term's value its ``loss``, normalised by the positions
    with a label). Options as
    :func:`fused_linear_kd`; in a spec, biases come with the weights (put ``[W, b]`` in the output mapping: a tensor
    given to ``.on()`` would be a constant of the spec).
    """
    api = "fused_linear_kd"
    if tensors:
        if len(tensors) != 2:
            raise TypeError(f"{api}: expected (student_hidden, student_weight, teacher_hidden, teacher_weight) or "
                            f"two (hidden, weight) pairs, got {2 + len(tensors)} positional arguments.")
        (hs, ws, bs), (ht, wt, bt) = (student, teacher, None), (*tensors, None)
    else:
        hs, ws, bs = _unpack(api, "student", student)
        ht, wt, bt = _unpack(api, "teacher", teacher)
    for name, given, paired in (("student_bias", student_bias, bs), ("teacher_bias", teacher_bias, bt)):
        if given is not None and paired is not None:
            raise ValueError(f"{api}: expected {name} once, got it both in the (hidden, [weight, bias]) pair and as "
                             f"{name}=.")
    bs = bs if student_bias is None else student_bias
    bt = bt if teacher_bias is None else teacher_bias
    out = fused_linear_kd(hs, ws, ht, wt, divergence=divergence, temperature=temperature, mask=mask,
                          t2_scale=t2_scale, beta=beta, alpha=alpha, labels=labels, ignore_index=ignore_index,
                          ce_weight=ce_weight, student_bias=bs, teacher_bias=bt, vocab_size=vocab_size,
                          chunk_size=chunk_size, recompute=recompute, loss=loss, reduction=reduction)
    return out  # (a FusedLoss with labels: a spec term's value is its ``loss``)


def _term_sum_count(*args, **kwargs):
    return fused_linear_kd_term(*args, reduction=SUM_COUNT, **kwargs)


_term_sum_count.__doc__ = "``(sum, count)`` of :func:`fused_linear_kd_term` (same arguments, no ``reduction``)."
fused_linear_kd_term.sum_count = _term_sum_count  # type: ignore[attr-defined]
