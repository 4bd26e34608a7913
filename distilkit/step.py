"""``make_step``: apply a spec to one batch — eager validation, then one compiled core, no hidden state.

```python
step = dk.make_step(spec, compile=True)       # True, False, or a torch.compile backend (name or callable)
out = step(student_out, teacher_out, batch, step=i, params=params)
out.loss.backward()                            # the loop, optimizer, AMP and DDP stay yours
```

The wrapper resolves every selector and key eagerly (errors name the term), validates each new input signature
(shapes, dtypes, devices) once by running the spec eagerly under ``no_grad``, then calls the core compiled with
``fullgraph=True``. ``step`` enters as a tensor, so schedules never recompile; nothing inside syncs with the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .algebra._evaluate import TermInputs, evaluate, gather
from .algebra._multi import Tasks
from .algebra._term import Spec, as_spec


class NonFiniteError(ValueError):
    """A term produced a non-finite value (raised by steps made with ``check_finite=True``)."""


@dataclass(frozen=True)
class StepOutput:
    """``loss``: the weighted total (differentiable). ``metrics``: 0-d detached tensors — ``loss`` and, per term,
    ``<name>/loss`` (unweighted), ``<name>/weight`` and ``<name>/temperature`` (logit losses)."""

    loss: Tensor
    metrics: dict[str, Tensor]


def make_step(spec, *, compile: bool | str | Callable = True, check_finite: bool = False) -> Step:
    """A stateless function ``step(student_out, teacher_out, batch=None, *, step=0, params=None, counts=None)``.

    Args:
        spec: a term, a spec (``term + term``) or ``dk.tasks(...)``.
        compile: ``True`` (inductor), ``False`` (eager), or a ``torch.compile`` backend name or callable.
        check_finite: after each call, raise :class:`NonFiniteError` naming the first term whose value is not
            finite (a host synchronisation; meant for debugging).
    """
    return Step(as_spec(spec, "make_step"), compile, check_finite)


class Step:
    """See :func:`make_step`."""

    def __init__(self, spec: Spec | Tasks, compile: bool | str | Callable, check_finite: bool):
        if not (isinstance(compile, (bool, str)) or callable(compile)):
            raise TypeError(f"make_step: expected compile to be True, False or a backend, got {compile!r}.")
        self.spec = spec
        self.compile = compile
        self.check_finite = bool(check_finite)
        self._cores: dict[int, Callable] = {}
        self._validated: set = set()

    def _core(self, spec: Spec) -> Callable:
        core = self._cores.get(id(spec))
        if core is None:
            core = functools.partial(evaluate, spec)
            if self.compile is not False:
                backend = "inductor" if self.compile is True else self.compile
                core = torch.compile(core, fullgraph=True, backend=backend)
            self._cores[id(spec)] = core
        return core

    def __call__(self, student_out: Mapping, teacher_out: Mapping, batch: Mapping | None = None, *,
                 step: int | Tensor = 0, params: nn.Module | None = None,
                 counts: Mapping[str, Any] | None = None) -> StepOutput:
        """Apply the spec.

        Args:
            student_out, teacher_out: output mappings (``{"logits": ..., "hidden": [...], ...}``).
            batch: extra inputs looked up by ``mask=`` / ``labels=`` keys (and the task key of ``dk.tasks``).
            step: the optimizer step (int or 0-d tensor) at which schedules are evaluated.
            params: ``dk.init_params(spec)`` when the spec has projections.
            counts: global normalisation — ``{mask key: kept positions of the whole optimizer step per rank}``, e.g.
                from ``dk.distributed.global_counts``; terms masked by such a key are divided by it instead of by
                their local count, so gradient accumulation and DDP give the full batch's gradient.
        """
        batch = {} if batch is None else batch
        spec = self.spec.spec_for(batch) if isinstance(self.spec, Tasks) else self.spec
        inputs = gather(spec, student_out, teacher_out, batch)
        device = _device(inputs)
        _check_params(spec, params)
        step_t = _step_tensor(step, device)
        counts_t = _counts(counts, device)
        if self.compile is False:
            loss, metrics = evaluate(spec, inputs, step_t, params, counts_t, name_errors=True)
        else:
            signature = _signature(spec, inputs, params, counts_t)
            if signature not in self._validated:
                with torch.no_grad():
                    evaluate(spec, inputs, step_t, params, counts_t, name_errors=True)
                self._validated.add(signature)
            loss, metrics = self._core(spec)(inputs, step_t, params, counts_t)
        if self.check_finite:
            _check_finite(spec, metrics)
        return StepOutput(loss, metrics)


def _device(inputs: Mapping[str, TermInputs]) -> torch.device:
    for leaf in pytree.tree_leaves(dict(inputs)):
        if isinstance(leaf, Tensor):
            return leaf.device
    return torch.device("cpu")


def _step_tensor(step, device: torch.device) -> Tensor:
    if isinstance(step, Tensor):
        if step.ndim != 0:
            raise ValueError(f"make_step: expected step to be an int or a 0-d tensor, got shape {tuple(step.shape)}.")
        return step.to(device)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"make_step: expected step to be an int or a 0-d tensor, got {type(step).__name__}.")
    return torch.tensor(step, device=device)


def _counts(counts, device):
    if counts is None:
        return None
    if not isinstance(counts, Mapping):
        raise TypeError(f"make_step: expected counts to be a mapping {{mask key: count}}, got {type(counts).__name__}.")
    out = {}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
            raise TypeError(f"make_step: expected counts[{key!r}] to be a number or 0-d tensor, got {value!r}.")
        value = torch.as_tensor(value, dtype=torch.float32).to(device)
        if value.ndim != 0:
            raise ValueError(f"make_step: expected counts[{key!r}] to be 0-d, got shape {tuple(value.shape)}.")
        out[key] = value
    return out


def _check_params(spec: Spec, params) -> None:
    projected = [t.name for t in spec.terms if t.proj is not None]
    if not projected:
        return
    if not isinstance(params, nn.Module):
        raise TypeError(f"make_step: terms {projected} have projections; pass params=dk.init_params(spec) "
                        f"(and put its parameters in your optimizer), got params={type(params).__name__}.")
    missing = [n for n in projected if n not in getattr(params, "_modules", {})]
    if missing:
        raise KeyError(f"make_step: params has no projection for terms {missing}; was it made by dk.init_params "
                       "from this spec?")


def _signature(spec: Spec, inputs, params, counts) -> tuple:
    """What validation depends on: the structure and every tensor's shape, dtype and device."""
    leaves, treedef = pytree.tree_flatten((dict(inputs), counts))
    described = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else (type(x), x)
                      for x in leaves)
    param_devices = None if params is None else tuple((p.shape, p.dtype, p.device) for p in params.parameters())
    return id(spec), str(treedef), described, param_devices


def _check_finite(spec: Spec, metrics: Mapping[str, Tensor]) -> None:
    names = [t.name for t in spec.terms]
    values = torch.stack([metrics[f"{n}/loss"].float() for n in names]) if names else None
    if values is None:
        return
    finite = torch.isfinite(values).tolist()  # one host transfer
    for name, ok in zip(names, finite, strict=True):
        if not ok:
            raise NonFiniteError(f"make_step (term '{name}'): the term's value is {metrics[f'{name}/loss'].item()}; "
                                 "check its inputs (inf/NaN logits or features) and hyperparameters.")
