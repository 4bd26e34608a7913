"""Building blocks for multi-teacher and multi-task distillation in a user-owned loop.

TextBrewer's ``MultiTeacherDistiller`` averages the teachers' logits; its ``MultiTaskDistiller`` samples a task per
step with probability ∝ |d|^τ and distils that task's student head from that task's teacher. Here those are an
ensemble of teacher outputs, a spec per task chosen by a batch key, and a task sampler.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..schedules._schedule import tree_equal, tree_hash
from ._term import Spec, Term, as_spec


def terms_of(spec: Spec | Tasks) -> tuple[Term, ...]:
    """Every term of ``spec``, or of every task of a ``dk.tasks`` (a term in several tasks once per task)."""
    return tuple(t for _, s in spec.specs for t in s.terms) if isinstance(spec, Tasks) else tuple(spec.terms)

@dataclass(frozen=True, eq=False)
class Tasks:
    """One spec per task; ``batch[key]`` (a str) says which applies. Build with :func:`tasks`. A pytree whose
    children are the specs (task names and the key are static), with structural equality like a spec."""

    specs: tuple[tuple[str, Spec], ...]
    key: str = "task"

    def spec_for(self, batch: Mapping) -> Spec:
        if not isinstance(batch, Mapping) or self.key not in batch:
            raise KeyError(f"tasks: expected the batch to carry the task name under {self.key!r}.")
        name = batch[self.key]
        for task, spec in self.specs:
            if task == name:
                return spec
        raise ValueError(f"tasks: unknown task {name!r}; expected one of {[t for t, _ in self.specs]}.")

    def all_terms(self) -> tuple[Term, ...]:
        """Every term of every task, once per name (a name shared by tasks must have the same projection)."""
        by_name: dict[str, Term] = {}
        for task, spec in self.specs:
            for term in spec.terms:
                seen = by_name.setdefault(term.name, term)
                if seen.proj != term.proj:
                    raise ValueError(f"tasks: term {term.name!r} of task {task!r} has a different projection from "
                                     "the term of that name in another task; give them different names.")
        return tuple(by_name.values())

    def __eq__(self, other: object) -> bool:
        return tree_equal(self, other) if isinstance(other, Tasks) else NotImplemented

    def __hash__(self) -> int:
        return tree_hash(self)


def _unflatten_tasks(children, context: tuple) -> Tasks:
    names, key = context
    node = object.__new__(Tasks)
    object.__setattr__(node, "specs", tuple(zip(names, children, strict=True)))
    object.__setattr__(node, "key", key)
    return node


pytree.register_pytree_node(Tasks, lambda t: ([s for _, s in t.specs], (tuple(n for n, _ in t.specs), t.key)),
                            _unflatten_tasks, serialized_type_name="distilkit.Tasks")


def tasks(specs: Mapping[str, Spec | Term], *, key: str = "task") -> Tasks:
    """A spec per task name, chosen per batch by ``batch[key]`` (multi-task distillation, TextBrewer style)."""
    if not isinstance(specs, Mapping) or not specs:
        raise ValueError("tasks: expected a non-empty mapping {task name: spec}.")
    items = []
    for name, spec in specs.items():
        if not isinstance(name, str):
            raise TypeError(f"tasks: expected task names to be str, got {name!r}.")
        spec = as_spec(spec, f"tasks[{name!r}]")
        if not isinstance(spec, Spec):
            raise TypeError(f"tasks[{name!r}]: expected a spec, not nested tasks.")
        items.append((name, spec))
    result = Tasks(tuple(items), key)
    result.all_terms()  # projection consistency, early
    return result


def ensemble(teacher_outputs: Sequence[Mapping], weights: Sequence[float] | None = None, *, mode: str = "logits",
             key: str = "logits") -> dict[str, Tensor | list[Tensor]]:
    """Combine several teachers' ``outputs[key]`` into one teacher output mapping ``{key: ...}``.

    ``mode="logits"``: the weighted mean of the logits (TextBrewer's ``MultiTeacherDistiller``; equal weights by
    default). ``mode="probs"``: the log of the weighted mean of the probabilities, ``log Σ w_i softmax(z_i)``, which
    acts as logits for the divergences (a temperature then applies to this mixture). Lists of logits (one entry per
    head) are combined entry by entry.
    """
    if mode not in ("logits", "probs"):
        raise ValueError(f"ensemble: expected mode to be 'logits' or 'probs', got {mode!r}.")
    if not teacher_outputs:
        raise ValueError("ensemble: expected at least one teacher's outputs.")
    n = len(teacher_outputs)
    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights):
        raise ValueError(f"ensemble: expected {n} non-negative weights, got {weights!r}.")
    if sum(weights) <= 0:
        raise ValueError("ensemble: expected the weights to have a positive sum.")
    values = []
    for i, out in enumerate(teacher_outputs):
        if not isinstance(out, Mapping) or key not in out:
            raise KeyError(f"ensemble: expected teacher {i}'s outputs to be a mapping with key {key!r}.")
        values.append(out[key])

    def combine(zs: Sequence[Tensor]) -> Tensor:
        shapes = {tuple(z.shape) for z in zs}
        if len(shapes) != 1:
            raise ValueError(f"ensemble: expected the teachers' {key!r} to have one shape, got {sorted(shapes)}.")
        w = torch.tensor(weights, dtype=torch.float32, device=zs[0].device) / sum(weights)
        stacked = torch.stack([z.detach().float() for z in zs])
        w = w.view(-1, *([1] * (stacked.ndim - 1)))
        if mode == "logits":
            return (w * stacked).sum(0)
        return torch.logsumexp(stacked.log_softmax(-1) + w.log(), dim=0)

    if isinstance(values[0], (list, tuple)):
        lengths = {len(v) for v in values}
        if len(lengths) != 1:
            raise ValueError(f"ensemble: expected every teacher to list the same number of {key!r}, got {lengths}.")
        return {key: [combine(list(group)) for group in zip(*values, strict=True)]}
    return {key: combine(values)}


def task_sampler(sizes: Mapping[str, int], *, tau: float = 1.0, seed: int | None = None) -> Iterator[str]:
    """An endless stream of task names, task ``d`` drawn with probability ``|d|^τ / Σ_e |e|^τ`` (TextBrewer's rule).

    ``tau=1`` samples proportionally to data set size, ``tau=0`` uniformly. ``seed`` makes the stream repeatable.
    """
    if not isinstance(sizes, Mapping) or not sizes:
        raise ValueError("task_sampler: expected a non-empty mapping {task name: data set size}.")
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"task_sampler: expected a positive int size for task {name!r}, got {size!r}.")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 0:
        raise ValueError(f"task_sampler: expected tau >= 0, got {tau!r}.")
    names = list(sizes)
    return _draws(names, [sizes[n] ** tau for n in names], random.Random(seed))


def _draws(names: list[str], weights: list[float], rng: random.Random) -> Iterator[str]:
    while True:
        yield rng.choices(names, weights=weights)[0]
