"""Argument checks shared by the losses.

Everything here looks at Python values, shapes, dtypes and devices, which are static under ``torch.compile``.
The few checks that need tensor *values* (temperature > 0, labels in range) run only in plain eager mode and only for
CPU tensors, where reading a value costs no device synchronisation: on an accelerator, while compiling and inside a
``torch.func`` transform (where a value is a batch of values or a tracer) they are skipped, and their messages are
built only when they fail, so no tensor is ever formatted (an ``.item()``) on a path that succeeds.

Messages follow ``<api>: expected <what>, got <value>.`` so that the algebra layer can prefix the term's name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _shape(x: Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, Tensor) else tuple(x)


def floating(api: str, name: str, x: object) -> Tensor:
    """``x`` as a real floating-point tensor, upcast to float32 when it is fp16/bf16 (float64 stays)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{api}: expected {name} to be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{api}: expected {name} to be a real floating-point tensor, got dtype {x.dtype}."
            + (" Pass logits or features, not class indices." if not x.is_complex() else "")
        )
    return x.float() if x.dtype in _LOW_PRECISION else x


def rank(api: str, name: str, x: Tensor, allowed: Sequence[int], layout: str) -> None:
    if x.ndim not in allowed:
        raise ValueError(f"{api}: expected {name} of shape {layout}, got shape {_shape(x)}.")


def same_shape(api: str, a: Tensor, b: Tensor, names: str = "student and teacher", dims: slice = slice(None)):
    if _shape(a)[dims] != _shape(b)[dims]:
        what = "shape" if dims == slice(None) else "leading shape"
        raise ValueError(
            f"{api}: expected {names} of the same {what}, got {_shape(a)} and {_shape(b)}. "
            "Nothing is broadcast; project or slice one of them first."
        )


def same_device(api: str, **tensors: Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if isinstance(t, Tensor)]
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"{api}: expected all tensors on one device, got {listing}.")


def in_transform() -> bool:
    """Whether eager code runs inside a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def values_readable(x: Tensor) -> bool:
    """Whether reading ``x``'s values costs no device synchronisation and is defined: a CPU tensor, in plain eager
    mode (not compiling, not inside a ``torch.func`` transform)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and not in_transform()


def eager_check(api: str, ok: Tensor, message: str | Callable[[], str]) -> None:
    """Raise ``ValueError(f"{api}: {message}")`` unless ``ok`` — only where :func:`values_readable` (no sync).

    ``message`` may be a function, called only on failure (so that formatting a tensor never costs a sync)."""
    if not values_readable(ok):
        return
    if not bool(ok.all()):
        raise ValueError(f"{api}: {message() if callable(message) else message}")


_GRAPH_ASSERTS = {"on": False}


@contextlib.contextmanager
def graph_asserts():
    """Within the block, :func:`graph_check` also asserts inside compiled code: ``dk.make_step`` wraps its compiled
    core in it (a graph of plain tensors). Outside, compiled code may hold ``torch.func`` transforms (a user's
    ``torch.compile(vmap(grad(...)))``), which ``torch._assert_async`` does not support, so it asserts nothing
    there."""
    before, _GRAPH_ASSERTS["on"] = _GRAPH_ASSERTS["on"], True
    try:
        yield
    finally:
        _GRAPH_ASSERTS["on"] = before


def graph_check(api: str, ok: Tensor, message: str) -> None:
    """:func:`eager_check`, and where values cannot be read without a sync an asynchronous assertion
    (``torch._assert_async``: a ``RuntimeError`` with this message on the CPU, a device-side assertion on
    accelerators): in eager code on accelerators, and inside ``dk.make_step``'s compiled core (see
    :func:`graph_asserts`). For checks whose failure would otherwise surface as a raw indexing error (labels out of
    range) or pass silently (a fractional float mask)."""
    if values_readable(ok):
        eager_check(api, ok, message)
    elif _GRAPH_ASSERTS["on"] or (ok.device.type != "cpu" and not torch.compiler.is_compiling()
                                  and not in_transform()):
        torch._assert_async(ok.all(), f"{api}: {message}")


def integer_labels(api: str, labels: object) -> Tensor:
    """``labels`` as an integer class-label tensor (a ``TypeError`` otherwise)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{api}: expected labels to be a torch.Tensor, got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{api}: expected integer class labels, got dtype {labels.dtype}.")
    return labels


def labels(api: str, value: object, lead_shape: tuple[int, ...], num_classes: int, ignore_index: int, whose: str,
           **like: Tensor) -> Tensor:
    """Integer class labels of exactly ``lead_shape`` (``whose`` leading shape), on the device of ``like`` (one
    named tensor), each in ``[0, num_classes)`` or equal to ``ignore_index`` (checked in the graph too)."""
    value = integer_labels(api, value)
    if tuple(value.shape) != tuple(lead_shape):
        raise ValueError(f"{api}: expected labels of shape {tuple(lead_shape)} ({whose} leading shape), got "
                         f"{tuple(value.shape)}.")
    same_device(api, **like, labels=value)
    graph_check(api, (value == ignore_index) | ((value >= 0) & (value < num_classes)),
                f"expected labels in [0, {num_classes}) or equal to ignore_index={ignore_index}.")
    return value


def mask(api: str, m: object, lead_shape: tuple[int, ...], like: Tensor) -> Tensor | None:
    """A boolean keep-mask of exactly ``lead_shape`` (nonzero = keep), or ``None``."""
    if m is None:
        return None
    if not isinstance(m, Tensor):
        raise TypeError(f"{api}: expected mask to be a torch.Tensor or None, got {type(m).__name__}.")
    if m.is_complex():
        raise TypeError(f"{api}: expected a boolean-like mask (bool, integer or 0/1 float), got dtype {m.dtype}.")
    if _shape(m) != tuple(lead_shape):
        raise ValueError(
            f"{api}: expected mask of shape {tuple(lead_shape)} (the input's leading positions), "
            f"got {_shape(m)}. Masks are never broadcast."
        )
    same_device(api, input=like, mask=m)
    if m.is_floating_point():  # a float mask is 0/1: a soft weight such as 0.5 is not a mask
        graph_check(api, (m == 0) | (m == 1), "expected a 0/1 mask, got a floating mask with values other than 0 "
                                               "and 1; a mask keeps or drops positions (weight the loss instead).")
    return m != 0


def zero_dropped(x: Tensor, keep: Tensor | None, trailing: int = 1) -> Tensor:
    """``x`` with 0 at the positions ``keep`` drops (``keep`` covers ``x``'s leading dimensions; ``trailing`` more
    follow). Selected, not multiplied: NaN or ±inf left in padding then reaches neither the value nor any gradient
    (0 · NaN would), and no gradient flows back to a dropped position."""
    if keep is None:
        return x
    return torch.where(keep.reshape(*keep.shape, *([1] * trailing)), x, 0)


#: the largest temperature the logit losses accept. Divergences between softened distributions shrink like 1/T²
#: while their float32 terms keep an absolute rounding error of about 1e-7 / T, so the relative error grows like
#: 1e-7 · T²: measured on [64, 1000] logits of scale 3, float32 against float64, values and gradients of every
#: divergence are within 1e-4 at T = 100, 1e-3 to 1e-2 at T = 1000 and wrong at T = 1e4. (T² ≤ 1e4 never overflows.)
MAX_TEMPERATURE = 100.0


def temperature(api: str, value: object, lead_shape: tuple[int, ...], like: Tensor,
                name: str = "temperature") -> float | Tensor:
    """A temperature: as :func:`positive`, and at most :data:`MAX_TEMPERATURE`."""
    return positive(api, name, value, lead_shape, like, upper=MAX_TEMPERATURE)


def positive(api: str, name: str, value: object, lead_shape: tuple[int, ...], like: Tensor,
             upper: float = math.inf) -> float | Tensor:
    """A temperature-like value: a float, a 0-d tensor or a per-row tensor of ``lead_shape``; all > 0 (and at most
    ``upper``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(
            f"{api}: expected {name} to be a float, a 0-d tensor or a per-row tensor of shape "
            f"{tuple(lead_shape)}, got {type(value).__name__}."
        )
    bound = "finite" if upper == math.inf else f"at most {upper:g}: float32 divergences lose their accuracy beyond"
    if not isinstance(value, Tensor):
        if not (0 < value < math.inf and value <= upper):  # (comparisons also trace a symbolic float under dynamo)
            raise ValueError(f"{api}: expected {name} > 0 (and {bound}), got {value}.")
        return value
    if not value.is_floating_point():
        raise TypeError(f"{api}: expected {name} to be a floating-point tensor, got dtype {value.dtype}.")
    if value.ndim != 0 and _shape(value) != tuple(lead_shape):
        raise ValueError(
            f"{api}: expected {name} to be 0-d or of shape {tuple(lead_shape)} (one per row), "
            f"got shape {_shape(value)}."
        )
    same_device(api, input=like, **{name: value})
    eager_check(api, (value > 0) & value.isfinite() & (value <= upper),
                f"expected {name} > 0 (and {bound}) everywhere.")
    return value.to(like.dtype)  # not detached: a temperature that requires grad receives its gradient


def unit_interval(api: str, name: str, value: object) -> float | Tensor:
    """A float or 0-d tensor in [0, 1] (jsd's beta, skew_kl's alpha)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{api}: expected {name} to be a float or a 0-d tensor, got {type(value).__name__}.")
    if not isinstance(value, Tensor):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{api}: expected 0 <= {name} <= 1, got {value}.")
        return float(value)
    if value.ndim != 0 or not value.is_floating_point():
        raise ValueError(
            f"{api}: expected {name} to be a 0-d floating-point tensor, got shape {_shape(value)}, "
            f"dtype {value.dtype}."
        )
    eager_check(api, (value >= 0) & (value <= 1), lambda: f"expected 0 <= {name} <= 1, got {value.item()}.")
    return value


def choice(api: str, name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{api}: expected {name} to be one of {tuple(allowed)}, got {value!r}.")



def sequences(api: str, student: object, teacher: object, m: object) -> tuple[Tensor, Tensor, Tensor | None]:
    """Student and teacher hidden states ``[B, L, D_s]``, ``[B, L, D_t]`` (widths may differ), upcast, the teacher
    detached, both 0 at dropped positions; and the keep-mask ``m`` checked as ``[B, L]``."""
    s = floating(api, "student features", student)
    t = floating(api, "teacher features", teacher).detach()
    for name, x in (("student", s), ("teacher", t)):
        rank(api, f"{name} features", x, (3,), "[B, L, D]")
    same_shape(api, s, t, "student and teacher features", dims=slice(0, 2))
    same_device(api, student=s, teacher=t)
    keep = mask(api, m, tuple(s.shape[:2]), s)
    return zero_dropped(s, keep), zero_dropped(t, keep), keep


def needs_autograd(**hyperparameters: object) -> bool:
    """Whether a hand-written gradient (an autograd Function, the CPU kernel) cannot serve this call: inside a
    ``torch.func`` transform, or when a hyperparameter tensor requires grad. Such paths then compute the same value
    with autograd instead."""
    return in_transform() or any(isinstance(v, Tensor) and v.requires_grad for v in hyperparameters.values())
