"""Projections of student features to the teacher's width, and the module that holds their parameters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"linear": None, "relu": nn.ReLU, "tanh": nn.Tanh}


class _Affine(torch.autograd.Function):
    r"""``y = x Wᵀ + b`` over the last dimension, with the backward ``dx = dy W``, ``dW = dyᵀ x`` and ``db = 1ᵀ dy``
    (leading dimensions flattened into rows).

    The bias gradient (the column sums of ``dy``) is a matrix-vector product, which reads ``dy`` row by row where a
    compiled column reduction on the CPU strides through it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x @ weight.mT + bias

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = rows.mT @ x.reshape(-1, x.shape[-1])
        grad_bias = (rows.new_ones(1, rows.shape[0]) @ rows).reshape(-1)
        return grad @ weight, grad_weight, grad_bias


class Linear(nn.Linear):
    r"""``nn.Linear`` (same parameters, ``state_dict`` and result ``y = x Wᵀ + b``) that, compiled on the CPU,
    runs the product ``x Wᵀ`` and the bias add as separate steps (see :class:`_Affine`).

    ``addmm`` on the CPU first copies the broadcast bias into its output; compiled, the separate ``+ b`` is fused
    into whatever reads ``y`` (a loss, an activation) instead. Eagerly, on other devices and under autocast (whose
    casts ``F.linear`` defines) it is ``F.linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.compiler.is_compiling() and self.bias is not None and x.device.type == "cpu"
                and x.dtype == self.weight.dtype
                and not torch.is_autocast_enabled("cpu")):
            return _Affine.apply(x, self.weight, self.bias)
        return super().forward(x)


@dataclass(frozen=True)
class Projection:
    """``activation(x W + b)`` from ``in_features`` (student) to ``out_features`` (teacher), as TextBrewer's
    ``linear`` / ``relu`` / ``tanh`` projections: an ``nn.Linear`` with weights ~ N(0, 0.02) and zero bias."""

    kind: str
    in_features: int
    out_features: int

    def __post_init__(self):
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"proj: expected kind to be one of {tuple(ACTIVATIONS)}, got {self.kind!r}.")
        for name in ("in_features", "out_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"proj.{self.kind}: expected {name} to be a positive int, got {value!r}.")

    def module(self) -> nn.Module:
        linear = Linear(self.in_features, self.out_features)
        with torch.no_grad():
            linear.weight.normal_(0.0, 0.02)
            linear.bias.zero_()
        activation = ACTIVATIONS[self.kind]
        return linear if activation is None else nn.Sequential(linear, activation())

    def parameter_prefix(self, name: str) -> str:
        """Where term ``name``'s weight and bias sit in ``dict(init_params(spec).named_parameters())``: the linear
        layer is the module itself, or item 0 of ``Sequential(linear, activation)``."""
        return f"{name}." if self.kind == "linear" else f"{name}.0."

    def apply(self, params: nn.Module | Mapping[str, Tensor], name: str, x: Tensor) -> Tensor:
        """Project ``x`` with term ``name``'s parameters: ``params[name]`` of the module from :func:`init_params`,
        or the tensors ``{name}.weight`` / ``{name}.bias`` (``{name}.0.…`` for relu/tanh) of a mapping such as
        ``dict(params.named_parameters())`` or what ``torch.func.functional_call`` is given."""
        if isinstance(params, nn.Module):
            return params[name](x)
        prefix = self.parameter_prefix(name)
        y = F.linear(x, params[prefix + "weight"], params[prefix + "bias"])
        if self.kind == "relu":
            return F.relu(y)
        return torch.tanh(y) if self.kind == "tanh" else y


def linear(in_features: int, out_features: int) -> Projection:
    """``x W + b``: student width ``in_features`` → teacher width ``out_features``."""
    return Projection("linear", in_features, out_features)


def relu(in_features: int, out_features: int) -> Projection:
    """``relu(x W + b)``."""
    return Projection("relu", in_features, out_features)


def tanh(in_features: int, out_features: int) -> Projection:
    """``tanh(x W + b)``."""
    return Projection("tanh", in_features, out_features)


def check_params(where: str, terms, params) -> None:
    """Eager check that ``params`` holds a projection for every projected term (a module or a tensor mapping)."""
    projected = [t for t in terms if t.proj is not None]
    if not projected:
        return
    names = [t.name for t in projected]
    if isinstance(params, nn.Module):
        missing = [n for n in names if n not in getattr(params, "_modules", {})]
    elif isinstance(params, Mapping):
        missing = [t.name for t in projected
                   if not all(t.proj.parameter_prefix(t.name) + p in params for p in ("weight", "bias"))]
    else:
        raise TypeError(f"{where}: terms {names} have projections; pass params=dk.init_params(spec) (and put its "
                        "parameters in your optimizer), or a mapping of its tensors such as "
                        f"dict(params.named_parameters()), got params={type(params).__name__}.")
    if missing:
        raise KeyError(f"{where}: params has no projection for terms {missing}; was it made by dk.init_params "
                       "from this spec?")


def init_params(spec) -> nn.ModuleDict:
    """A fresh ``nn.ModuleDict`` with one projection module per projected term, keyed by term name.

    Put its parameters in your optimizer and its ``state_dict`` in your checkpoint; an equal spec (for example one
    rebuilt from its config) accepts the same params. A spec without projections gives an empty module.
    """
    from ._term import as_spec

    return nn.ModuleDict({t.name: t.proj.module() for t in as_spec(spec, "init_params").all_terms() if t.proj})
