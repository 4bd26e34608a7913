"""Schedules: ``sched(step) -> 0-d tensor`` for weights and temperatures that change during training.

A schedule is a frozen dataclass whose numbers are 0-d tensor pytree leaves (``torch.utils._pytree``) and whose kind
and nesting are static; ``step`` is an int or a 0-d tensor, and a tensor step never recompiles a compiled caller.
Conventions follow optax: ``piecewise_constant`` gives ``values[i]`` for ``boundaries[i-1] <= step < boundaries[i]``,
``join`` calls schedule ``i`` with ``step - boundaries[i-1]``, ``begin`` delays ``linear`` and ``cosine``.
``schedule * number`` and ``schedule * schedule`` give a :class:`product`.
"""

from ._schedule import Schedule as Schedule
from ._schedule import constant as constant
from ._schedule import cosine as cosine
from ._schedule import exponential as exponential
from ._schedule import join as join
from ._schedule import linear as linear
from ._schedule import linear_decay as linear_decay
from ._schedule import linear_growth as linear_growth
from ._schedule import piecewise_constant as piecewise_constant
from ._schedule import product as product

__all__ = [
    "Schedule",
    "constant",
    "cosine",
    "exponential",
    "join",
    "linear",
    "linear_decay",
    "linear_growth",
    "piecewise_constant",
    "product",
]
