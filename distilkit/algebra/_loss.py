"""``Loss``: a pure loss function plus what the algebra needs to know about it, and the registry of them.

``dk.kd_ce`` is ``Loss(distilkit.losses.kd_ce, ...)``: calling it calls the pure function unchanged, and
``dk.kd_ce.on(...)`` builds a :class:`~distilkit.algebra.Term`. User losses join only through
:func:`register_loss`, so a spec file can name nothing that was not registered in code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .. import losses as L
from ..losses._fused import fused_linear_kd_term as _fused_linear_kd_term

Inputs = Literal["teacher", "labels", "student"]


@dataclass(frozen=True, eq=False)
class Loss:
    """A loss function with its calling convention.

    Attributes:
        fn: ``fn(student, teacher_or_labels, *, mask=..., **options) -> Tensor`` (``inputs="student"``: no second
            argument). distilkit's own losses also have ``fn.sum_count``; losses without it are never
            globally normalised.
        name: registry name, used in spec files and default term names.
        inputs: what the second argument is — teacher outputs, integer ``labels`` (``labels=`` key), or nothing.
        pair: takes a pair of features per model (fsp, mmd): a selector list, or one layer used twice.
        masked: accepts ``mask=``.
        temperature: accepts ``temperature=`` (so an adaptive temperature can be given, and it is logged).
        keywords: ``{name: default}`` of ``fn``'s keyword-only parameters (read once); ``open_ended``: it takes
            ``**kwargs``.
    """

    fn: Callable
    name: str
    inputs: Inputs = "teacher"
    pair: bool = False
    masked: bool = True
    temperature: bool = False

    def __post_init__(self):
        object.__setattr__(self, "__doc__", self.fn.__doc__)
        object.__setattr__(self, "__wrapped__", self.fn)
        # Read the signature once, here: terms are also built inside traced code (torch.compile, torch.func),
        # where inspect.signature cannot always be traced.
        params = inspect.signature(self.fn).parameters
        object.__setattr__(self, "keywords", {n: p.default for n, p in params.items()
                                              if p.kind is inspect.Parameter.KEYWORD_ONLY})
        object.__setattr__(self, "open_ended", any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()))

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    @property
    def sum_count(self) -> Callable | None:
        return getattr(self.fn, "sum_count", None)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    def __repr__(self) -> str:
        return f"dk.{self.name}" if REGISTRY.get(self.name) is self else f"Loss({self.name!r})"

    def on(self, student, teacher=None, *, mask=None, labels=None, proj=None, probability_shift=None, **options):
        """A :class:`Term` applying this loss to the selected outputs; see :class:`Term` for the arguments."""
        from ._term import Term

        return Term.of(self, student, teacher, mask=mask, labels=labels, proj=proj,
                       probability_shift=probability_shift, options=options)


REGISTRY: dict[str, Loss] = {}


def register_loss(fn: Callable, *, name: str | None = None, inputs: Inputs = "teacher", pair: bool = False,
                  masked: bool = True, temperature: bool = False, replace: bool = False) -> Loss:
    """Make ``fn`` usable in specs and spec files under ``name`` (default ``fn.__name__``); returns the ``Loss``.

    ``fn(student, teacher, *, mask=None, **options)`` returns a 0-d tensor (the loss mean). Spec files can only
    name registered losses: nothing is imported from a name written in a file. Float options are hyperparameters:
    inside a compiled step (and under ``vmap``) they reach ``fn`` as 0-d tensors, so write ``fn`` with tensor math
    for them (no Python ``if`` on their values); int, bool and str options reach it unchanged.
    """
    name = name or getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_loss: expected name to be a Python identifier, got {name!r}.")
    if name in REGISTRY and not replace:
        raise ValueError(f"register_loss: a loss named {name!r} is already registered; pass replace=True to "
                         "replace it.")
    if inputs not in ("teacher", "labels", "student"):
        raise ValueError(f"register_loss: expected inputs to be 'teacher', 'labels' or 'student', got {inputs!r}.")
    if not callable(fn):
        raise TypeError(f"register_loss: expected a callable, got {type(fn).__name__}.")
    loss = fn if isinstance(fn, Loss) and fn.name == name else Loss(fn, name, inputs, pair, masked, temperature)
    REGISTRY[name] = loss
    return loss


def get_loss(name: str, where: str = "loss") -> Loss:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"{where}: unknown loss {name!r}; expected one of: {known} "
                         "(or register your own with dk.register_loss).") from None


def _builtin(fn: Callable, **kwargs) -> Loss:
    return register_loss(fn, **kwargs)


kd_ce = _builtin(L.kd_ce, temperature=True)
kd_kl = _builtin(L.kd_kl, temperature=True)
reverse_kl = _builtin(L.reverse_kl, temperature=True)
jsd = _builtin(L.jsd, temperature=True)
skew_kl = _builtin(L.skew_kl, temperature=True)
tvd = _builtin(L.tvd, temperature=True)
kd_mse = _builtin(L.kd_mse, temperature=True)
prob_mse = _builtin(L.prob_mse, temperature=True)
pseudo_label_ce = _builtin(L.pseudo_label_ce)
sampled_kl = _builtin(L.sampled_kl)
uld = _builtin(L.uld, temperature=True)
hard_ce = _builtin(L.hard_ce, inputs="labels", masked=False)
hidden_mse = _builtin(L.hidden_mse)
cosine = _builtin(L.cosine)
pkd = _builtin(L.pkd)
attention_kl = _builtin(L.attention_kl)
attention_mse = _builtin(L.attention_mse)
attention_ce = _builtin(L.attention_ce)
relation_kl = _builtin(L.relation_kl)
fsp = _builtin(L.fsp, pair=True)
mmd = _builtin(L.mmd, pair=True)
nst = _builtin(L.nst)
precomputed = _builtin(L.precomputed, inputs="student", masked=False)
sparse_kd_ce = _builtin(L.sparse_kd_ce, temperature=True)
sparse_kd_kl = _builtin(L.sparse_kd_kl, temperature=True)
sparse_reverse_kl = _builtin(L.sparse_reverse_kl, temperature=True)
sparse_jsd = _builtin(L.sparse_jsd, temperature=True)
sparse_skew_kl = _builtin(L.sparse_skew_kl, temperature=True)
sparse_tvd = _builtin(L.sparse_tvd, temperature=True)
chunked_jsd = _builtin(L.chunked_jsd, temperature=True)
chunked_kd_ce = _builtin(L.chunked_kd_ce, temperature=True)
chunked_kd_kl = _builtin(L.chunked_kd_kl, temperature=True)
chunked_reverse_kl = _builtin(L.chunked_reverse_kl, temperature=True)
chunked_skew_kl = _builtin(L.chunked_skew_kl, temperature=True)
chunked_tvd = _builtin(L.chunked_tvd, temperature=True)
fused_linear_kd = _builtin(_fused_linear_kd_term, name="fused_linear_kd", pair=True)  # no adaptive temperature
