"""One name per logit divergence; the implementation is an argument, as in ``F.scaled_dot_product_attention``.

:func:`kd_ce`, :func:`kd_kl`, :func:`reverse_kl`, :func:`jsd`, :func:`skew_kl` and :func:`tvd` take
``impl="auto" | "dense" | "chunked"`` and ``chunk_size``:

* ``"dense"``: a log-softmax over the whole ``[..., V]`` logits and autograd (``_logits.py``). Works everywhere:
  ``torch.func`` transforms, double backward, a temperature (or β, α) that requires grad.
* ``"chunked"``: ``chunk_size`` rows at a time with the closed-form gradient (``_chunked.py``): the CPU kernel for
  float32 CPU tensors, the torch chunk loop elsewhere. One chunk of temporaries, the logits read once and the
  gradient written once; no ``torch.func`` transforms, no double backward, no gradient for a hyperparameter.
* ``"auto"`` (default): ``"chunked"`` for a call the CPU kernel takes (float32 CPU logits whose student requires
  grad, grad mode on, at least :data:`KERNEL_MIN_ELEMENTS` logits), eager or inside ``torch.compile`` (the kernel is
  a custom op there), that needs nothing only the dense path gives (no ``torch.func`` transform, no hyperparameter
  requiring grad); ``"chunked"`` too whenever ``chunk_size`` is given; ``"dense"`` otherwise.
  ``impl="chunked"`` inside a transform, or with a hyperparameter that requires grad, computes the same value by the
  dense formula with autograd (so every ``impl`` works everywhere; only the memory differs).

The paths agree to float rounding, −inf logits included (tested). A :class:`~distilkit.losses._sparse.TopK`
teacher (``dk.TopK``) takes the top-k implementation (``_sparse.py``) under the same names.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks as check
from . import _chunked, _cpu_kernel, _sparse
from . import _logits as dense
from ._sparse import TopK

IMPLS = ("auto", "dense", "chunked")
#: below this many logits ``"auto"`` stays dense: the kernel's fixed cost per call (a custom op, its threads; about
#: 0.4 ms) is then larger than the dense path's whole time. kd_kl forward + backward on a 2-core AMD EPYC: 16,384
#: logits dense 0.30 / kernel 0.40 ms, 65,536 dense 0.54 / kernel 0.41 ms, 262,144 dense 1.19 / kernel 0.46 ms.
KERNEL_MIN_ELEMENTS = 1 << 15
_HYPERPARAMETERS = ("temperature", "beta", "alpha")


def _path(api: str, impl: object, chunk_size: object, student: object, teacher: object, options: dict) -> str:
    check.choice(api, "impl", impl, IMPLS)
    if impl == "dense" and chunk_size is not None:
        raise ValueError(f"{api}: chunk_size applies to impl='chunked' (or 'auto'), not impl='dense'; got "
                         f"chunk_size={chunk_size!r}.")
    if impl != "auto":
        return impl
    if chunk_size is not None:
        return "chunked"
    if (not (isinstance(student, Tensor) and isinstance(teacher, Tensor)) or student.ndim == 0
            or student.shape != teacher.shape or student.numel() == 0):
        return "dense"  # (the dense path reports bad input; nothing to gain on an empty one)
    if (check.in_transform() or not torch.is_grad_enabled()
            or not student.requires_grad or student.numel() < KERNEL_MIN_ELEMENTS
            or any(isinstance(options.get(n), Tensor) and options[n].requires_grad for n in _HYPERPARAMETERS)):
        return "dense"
    rows = (-1, student.shape[-1])  # the kernel's [N, V] view
    return "chunked" if _cpu_kernel.usable(student.reshape(rows), teacher.reshape(rows)) else "dense"


@contextlib.contextmanager
def _as(kind: str):
    """Errors of the chunked implementation under the public name: ``kd_kl: ...``, not ``chunked_kd_kl: ...`` (other
    errors pass unchanged)."""
    try:
        yield
    except (TypeError, ValueError) as error:
        message = str(error)
        prefix = f"chunked_{kind}:"
        if not message.startswith(prefix):
            raise
        raise type(error)(f"{kind}:{message[len(prefix):]}") from None


def _divergence(kind: str) -> Callable:
    """The public function of ``kind``: the dense one's signature and docstring, plus ``impl`` and ``chunk_size``."""
    dense_fn, chunked_fn, sparse_fn = getattr(dense, kind), _chunked.CHUNKED[kind], getattr(_sparse, f"sparse_{kind}")

    def route(student, teacher, impl, chunk_size, options) -> tuple[Callable, tuple, dict]:
        """The implementation for these inputs, with its positional and extra keyword arguments."""
        if isinstance(teacher, TopK):
            if impl != "auto" or chunk_size is not None:
                raise ValueError(f"{kind}: a dk.TopK teacher has one implementation; impl and chunk_size do not "
                                 f"apply (got impl={impl!r}, chunk_size={chunk_size!r}).")
            return sparse_fn, (student, teacher.as_mapping()), {"policy": teacher.resolved_policy()}
        if _path(kind, impl, chunk_size, student, teacher, options) == "dense":
            return dense_fn, (student, teacher), {}
        return chunked_fn, (student, teacher), {"chunk_size": chunk_size}

    @functools.wraps(dense_fn)
    def fn(student, teacher, *, impl: str = "auto", chunk_size: int | None = None, reduction: str = "mean",
           **options):
        chosen, args, extra = route(student, teacher, impl, chunk_size, options)
        with _as(kind):
            return chosen(*args, reduction=reduction, **extra, **options)

    def sum_count(student, teacher, *, impl: str = "auto", chunk_size: int | None = None, **options):
        chosen, args, extra = route(student, teacher, impl, chunk_size, options)
        with _as(kind):
            return chosen.sum_count(*args, **extra, **options)

    signature = inspect.signature(dense_fn)
    extra = [inspect.Parameter("impl", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation="str"),
             inspect.Parameter("chunk_size", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None")]
    params = list(signature.parameters.values())
    fn.__signature__ = signature.replace(parameters=[*params[:-1], *extra, params[-1]])  # reduction stays last
    del fn.__wrapped__  # (the signature above is the whole truth)
    fn.__doc__ = (dense_fn.__doc__ or "") + (
        '\n    ``impl``: ``"auto"`` (default), ``"dense"`` or ``"chunked"``; ``chunk_size``: rows per chunk of the '
        'chunked path.\n    See :mod:`distilkit.losses._divergences` for the path ``"auto"`` takes.\n')
    sum_count.__doc__ = f"``(sum, count)`` of :func:`{kind}` (same arguments, no ``reduction``)."
    fn.sum_count = sum_count
    fn.kind = kind
    return fn


kd_ce = _divergence("kd_ce")
kd_kl = _divergence("kd_kl")
reverse_kl = _divergence("reverse_kl")
jsd = _divergence("jsd")
skew_kl = _divergence("skew_kl")
tvd = _divergence("tvd")


def _deprecated(kind: str, sparse: bool = False) -> Callable:
    """``chunked_<kind>`` / ``sparse_<kind>``: kept for one release; ``<kind>(..., impl="chunked")`` /
    ``<kind>(student, dk.TopK(...))`` is the same call."""
    target = getattr(_sparse, f"sparse_{kind}") if sparse else _chunked.CHUNKED[kind]
    prefix = "sparse" if sparse else "chunked"
    instead = (f"dk.{kind}(student, dk.TopK(indices, logprobs, tail=None, temperature=1.0, policy=None))" if sparse
               else f"dk.{kind}(..., impl='chunked') (or the default impl='auto')")
    message = f"dk.{prefix}_{kind} is deprecated and will be removed in the next release; use {instead}."

    def warn():
        if not torch.compiler.is_compiling():  # (dynamo cannot trace warnings.warn; the eager call warned already)
            warnings.warn(message, DeprecationWarning, stacklevel=3)

    @functools.wraps(target)
    def fn(*args, **kwargs):
        warn()
        return target(*args, **kwargs)

    def sum_count(*args, **kwargs):
        warn()
        return target.sum_count(*args, **kwargs)

    fn.sum_count = sum_count
    fn.kind = kind
    fn.__name__ = fn.__qualname__ = f"{prefix}_{kind}"
    return fn


chunked_kd_ce = _deprecated("kd_ce")
chunked_kd_kl = _deprecated("kd_kl")
chunked_reverse_kl = _deprecated("reverse_kl")
chunked_jsd = _deprecated("jsd")
chunked_skew_kl = _deprecated("skew_kl")
chunked_tvd = _deprecated("tvd")

sparse_kd_ce = _deprecated("kd_ce", sparse=True)
sparse_kd_kl = _deprecated("kd_kl", sparse=True)
sparse_reverse_kl = _deprecated("reverse_kl", sparse=True)
sparse_jsd = _deprecated("jsd", sparse=True)
sparse_skew_kl = _deprecated("skew_kl", sparse=True)
sparse_tvd = _deprecated("tvd", sparse=True)
