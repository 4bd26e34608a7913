"""``make_step``: the pure :func:`~distilkit.loss_fn` with eager validation and a compiled core, no hidden state.

```python
step = dk.make_step(spec, compile=True)       # True, False, or a torch.compile backend (name or callable)
out = step(student_out, teacher_out, batch, step=i, params=params)
out.loss.backward()                            # the loop, optimizer, AMP and DDP stay yours
```

A call resolves every selector and key eagerly (errors name the term), validates each new input *signature* — the
spec's structure and each input's rank, dtype and device, not its exact shape — once by evaluating the spec eagerly
under ``no_grad``, then runs ``evaluate`` compiled with ``fullgraph=True``. Compiled code is shared by structure:

* the spec enters the compiled function as an argument whose float hyperparameters (temperatures, β, α, weights) are
  0-d tensors, and ``step`` enters as a tensor, so specs that differ only in option values, and schedules at any
  step, run one graph;
* each distinct structure gets a compiled function of its own (its own code object), so any number of specs in one
  process never meet dynamo's per-function recompile limit;
* shapes are dynamic after the first change (``torch.compile``'s default), so a sequence length that changes every
  batch costs one extra compilation, not one per length.

Inside a ``torch.func`` transform or an enclosing ``torch.compile`` the step runs the pure function directly (it is
then traced by the outer transform). Nothing inside syncs with the host.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .algebra._evaluate import evaluate, loss_fn, prepare, tensors_of
from .algebra._multi import Tasks
from .algebra._term import Spec, as_spec
from .losses import _checks as check


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
    """See :func:`make_step`. Calling it returns a :class:`StepOutput`; ``step.loss_fn`` is the pure function."""

    def __init__(self, spec: Spec | Tasks, compile: bool | str | Callable, check_finite: bool):
        if not (isinstance(compile, (bool, str)) or callable(compile)):
            raise TypeError(f"make_step: expected compile to be True, False or a backend, got {compile!r}.")
        self.spec = spec
        self.compile = compile
        self.check_finite = bool(check_finite)
        self.loss_fn = loss_fn(spec)
        self._validated: set = set()  # signatures: structure, ranks, dtypes, devices (bounded, never exact shapes)
        self._prepared: dict = {}  # (spec id, device, dtype) -> (spec with tensor leaves, compiled core)

    def __call__(self, student_out: Mapping, teacher_out: Mapping, batch: Mapping | None = None, *,
                 step: int | Tensor = 0, params: nn.Module | Mapping[str, Tensor] | None = None,
                 counts: Mapping[str, Any] | None = None) -> StepOutput:
        """Apply the spec; the arguments are those of :func:`~distilkit.loss_fn`."""
        spec, inputs, step_t, counts_t = prepare(self.spec, student_out, teacher_out, batch, step, params, counts,
                                                 "make_step")
        if self.compile is False or _traced():
            loss, metrics = evaluate(spec, inputs, step_t, params, counts_t, name_errors=True)
        else:
            loss, metrics = self._compiled(spec, inputs, step_t, params, counts_t)
        if self.check_finite:
            _check_finite(spec, metrics)
        return StepOutput(loss, metrics)

    def _compiled(self, spec: Spec, inputs, step_t: Tensor, params, counts_t):
        signature = _signature(spec, inputs, params, counts_t)
        if signature not in self._validated:
            _validate(spec, inputs, step_t, params, counts_t)
            self._validated.add(signature)
        lifted, core = self._core(spec, inputs, step_t.device)
        try:
            with check.graph_asserts():  # (value checks asserted in the graph: a bad later batch is named below)
                return core(lifted, inputs, step_t, params, counts_t)
        except Exception:
            # A shape the validation did not see (it is keyed on ranks): the eager evaluation names the problem.
            _validate(spec, inputs, step_t, params, counts_t)
            raise

    def _core(self, spec: Spec, inputs, device: torch.device):
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in tensors_of(inputs)) else torch.float32
        key = (id(spec), device, dtype)
        prepared = self._prepared.get(key)
        if prepared is None:
            lifted = pytree.tree_map(lambda x: _lift(x, device, dtype), spec)
            backend = "inductor" if self.compile is True else self.compile
            prepared = self._prepared[key] = (lifted, _compiled_core(pytree.tree_structure(lifted), backend))
        return prepared


def _traced() -> bool:
    """Inside a torch.func transform or an enclosing torch.compile: run the pure function, traced by the caller."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def _lift(leaf, device: torch.device, dtype: torch.dtype):
    """A hyperparameter as a graph input: floats become 0-d tensors, tensors move to the inputs' device."""
    if isinstance(leaf, float):
        return torch.tensor(leaf, dtype=dtype, device=device)
    if isinstance(leaf, Tensor) and leaf.device != device:
        return leaf.to(device)
    return leaf


_CORES: dict[tuple, Callable] = {}


def _compiled_core(structure: pytree.TreeSpec, backend) -> Callable:
    """The compiled ``evaluate`` for one spec structure, shared by every step whose spec has that structure.

    It is a fresh code object under a name of its own: dynamo keeps its cache and recompile count per code object,
    and its record of which inputs changed between calls (automatic dynamic shapes and floats) per code name, so no
    structure's history spills into another's."""
    key = (structure, backend)
    core = _CORES.get(key)
    if core is None:
        name = f"distilkit_step_{len(_CORES)}"
        code = evaluate.__code__.replace(co_name=name, co_qualname=name)
        fn = types.FunctionType(code, evaluate.__globals__, name, evaluate.__defaults__)
        core = _CORES[key] = torch.compile(fn, fullgraph=True, backend=backend)
    return core


def _validate(spec: Spec, inputs, step: Tensor, params, counts) -> None:
    with torch.no_grad():
        evaluate(spec, inputs, step, params, counts, name_errors=True)


def _describe(x) -> object:
    """``x``'s nesting with each tensor's rank, dtype and device (not its exact shape)."""
    if isinstance(x, Tensor):
        return x.ndim, x.dtype, x.device
    if isinstance(x, (list, tuple)):
        return type(x), tuple(_describe(v) for v in x)
    return type(x)


def _signature(spec: Spec, inputs, params, counts) -> tuple:
    """What validation depends on: the structure and every tensor's rank, dtype and device (not its exact shape)."""
    described = tuple((name, _describe(x)) for name, x in inputs.items())
    counted = None if counts is None else tuple((k, _describe(v)) for k, v in counts.items())
    if isinstance(params, nn.Module):
        params = dict(params.named_parameters())
    param_sig = None if params is None else tuple((k, _describe(v)) for k, v in params.items())
    return id(spec), described, counted, param_sig


def _check_finite(spec: Spec, metrics: Mapping[str, Tensor]) -> None:
    names = [t.name for t in spec.terms]
    if not names:
        return
    values = torch.stack([metrics[f"{n}/loss"].float() for n in names])
    finite = torch.isfinite(values).tolist()  # one host transfer
    for name, ok in zip(names, finite, strict=True):
        if not ok:
            raise NonFiniteError(f"make_step (term '{name}'): the term's value is {metrics[f'{name}/loss'].item()}; "
                                 "check its inputs (inf/NaN logits or features) and hyperparameters.")
