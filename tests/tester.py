"""The one loss tester every distilkit loss goes through (in the spirit of torchmetrics' ``MetricTester``).

A :class:`Case` says how to make float64 inputs for one loss with one set of options, and where its mask sits
in those inputs. ``test_losses.py`` runs every case through the same checks: the independent float64 oracle in
``references.py``, gradcheck, mask invariance, kept-positions-only equivalence, fully masked input, compiled vs
eager, half precision, huge logits, reductions, and that the teacher never receives gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from references import REFERENCES

import distilkit as dk

B, L, V, D, H = 3, 5, 6, 4, 2
F64 = torch.float64

Inputs = Any  # a tensor, or a pair (tuple) of tensors


@dataclass(frozen=True)
class Case:
    """One loss under one set of options.

    ``make(gen)`` returns float64 ``(student, teacher)``; each may be a tensor or a pair of tensors (for hard_ce
    the teacher slot holds integer labels, masked through ``ignore_index``). ``mask_shape`` is the mask's shape;
    ``mask_axes`` lists, for each way the mask applies, which axes of every input tensor its dimensions sit on
    (attention: queries on axis 2 and keys on axis 3).
    """

    id: str
    name: str
    make: Callable[[torch.Generator], tuple[Inputs, Inputs]]
    mask_shape: tuple[int, ...] = (B, L)
    mask_axes: tuple[tuple[int, ...], ...] = ((0, 1),)
    options: dict = field(default_factory=dict)
    logits: bool = False  # inputs are logits / scores: the ±1e4 check applies
    masked_keys_enter: bool = False  # attention_ce: values at masked keys enter the softmax normalisers
    labels: bool = False  # hard_ce
    compactable: bool = True  # "kept positions only" is defined position-wise (not pkd on [B, L, D])
    path: str = "dense"  # the divergences: also "chunked", "topk" (a dk.TopK teacher with k = V), "fused"

    @property
    def loss(self) -> Callable:
        fn = getattr(dk, self.name)
        return fn if self.path == "dense" else on_path(self.name, self.path)

    @property
    def api(self) -> str:
        """The name errors start with."""
        return "fused_linear_kd" if self.path == "fused" else self.name

    @property
    def reference(self) -> Callable:
        return REFERENCES[self.name]

    def call(self, student, teacher, mask=None, fn=None, **kwargs):
        """Call the loss (or ``fn``, e.g. a compiled loss) with this case's options and ``mask``."""
        fn = fn or self.loss
        if self.labels:
            return fn(student, _ignore_dropped(teacher, mask), **self.options, **kwargs)
        if mask is not None:
            kwargs["mask"] = mask
        return fn(student, teacher, **self.options, **kwargs)

    def call_reference(self, student, teacher, mask=None):
        if self.labels:
            return self.reference(student, _ignore_dropped(teacher, mask), **self.options)
        extra = {} if mask is None else {"mask": mask}
        return self.reference(student, teacher, **self.options, **extra)


def on_path(name: str, path: str) -> Callable:
    """The divergence ``name`` computed by another implementation on the same ``(student logits, teacher logits)``:
    ``impl="chunked"``; a :class:`dk.TopK` teacher keeping every class (k = V, ``policy="renormalize"``: exactly the
    dense divergence at any temperature); or ``dk.fused_linear_kd`` on hidden states = the logits and identity output
    layers (z = h I, exact in every dtype)."""

    fn = getattr(dk.losses, name)

    def inputs(student, teacher):
        if path == "chunked":
            return fn, (student, teacher), {"impl": "chunked"}
        if path == "topk":
            v = teacher.shape[-1]
            logprobs = torch.log_softmax(teacher.detach().to(torch.promote_types(teacher.dtype, torch.float32)), -1)
            return fn, (student, dk.TopK(torch.arange(v).expand(teacher.shape), logprobs)), {}
        eye = torch.eye(student.shape[-1], dtype=student.dtype)
        return dk.fused_linear_kd, (student, eye, teacher, eye.to(teacher.dtype)), {"divergence": name}

    def call(student, teacher, **options):
        f, args, extra = inputs(student, teacher)
        return f(*args, **extra, **options)

    def sum_count(student, teacher, **options):
        f, args, extra = inputs(student, teacher)
        return f.sum_count(*args, **extra, **options)

    call.sum_count = sum_count
    call.__name__ = f"{name}_via_{path}"
    return call


def _ignore_dropped(labels, mask):
    return labels if mask is None else torch.where(mask.bool(), labels, -100)


# ----------------------------------------------------------------------------------------------- tensor helpers
def leaves(x: Inputs) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def tmap(f: Callable[[torch.Tensor], torch.Tensor], x: Inputs) -> Inputs:
    return tuple(f(xi) for xi in x) if isinstance(x, (tuple, list)) else f(x)


def floating_leaves(x: Inputs) -> list[torch.Tensor]:
    return [xi for xi in leaves(x) if xi.is_floating_point()]


def requiring_grad(x: Inputs) -> Inputs:
    return tmap(lambda xi: xi.detach().clone().requires_grad_(xi.is_floating_point()), x)


def _placed(mask: torch.Tensor, axes: tuple[int, ...], ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    for dim, axis in enumerate(axes):
        shape[axis] = mask.shape[dim]
    return mask.reshape(shape)


def dropped_entries(case: Case, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Boolean tensor like ``x``: True for entries at masked positions (that must not matter)."""
    axes_list = case.mask_axes[:1] if case.masked_keys_enter else case.mask_axes
    out = torch.zeros(x.shape, dtype=torch.bool)
    for axes in axes_list:
        out = out | ~_placed(mask.bool(), axes, x.ndim)
    return out


def kept_only(case: Case, x: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """Sample ``b`` of ``x`` with only its kept positions (along every masked axis but the batch one)."""
    x = x[b : b + 1]
    idx = mask[b].bool().nonzero()  # [n, mask.ndim - 1]
    for axes in case.mask_axes:
        for k, axis in enumerate(axes[1:]):
            x = x.index_select(axis, idx[:, k])
    return x


def random_mask(gen: torch.Generator, shape: tuple[int, ...], dtype=torch.bool) -> torch.Tensor:
    """Random keep-mask with every sample keeping ≥ 1 position and ≥ 1 position dropped overall."""
    m = torch.rand(shape, generator=gen, dtype=F64) < 0.6
    if len(shape) > 1:
        m[:, 0] = True  # every sample keeps something (position 0 also keeps pkd's [CLS])
        m[0, -1] = False
    else:
        m[0], m[-1] = True, False
    return m.to(dtype)


def prefix_mask(shape: tuple[int, ...], lengths: list[int]) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for b, n in enumerate(lengths):
        m[b, :n] = True
    return m


# --------------------------------------------------------------------------------------------- input makers
def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64) * scale


def logits_pair(*shape: int) -> Callable:
    return lambda g: (_randn(g, *shape, scale=2.0), _randn(g, *shape, scale=2.0))


def features_pair(shape_s: tuple[int, ...], shape_t: tuple[int, ...] | None = None) -> Callable:
    return lambda g: (_randn(g, *shape_s), _randn(g, *(shape_t or shape_s)))


def probs_pair(*shape: int) -> Callable:
    return lambda g: (_randn(g, *shape).softmax(-1), _randn(g, *shape).softmax(-1))


def hidden_pairs(d0: int, d1: int, d0_t: int | None = None, d1_t: int | None = None) -> Callable:
    return lambda g: (
        (_randn(g, B, L, d0), _randn(g, B, L, d1)),
        (_randn(g, B, L, d0_t or d0), _randn(g, B, L, d1_t or d1)),
    )


def logits_two_vocabularies(*lead: int, v_s: int, v_t: int) -> Callable:
    """Student and teacher logits over vocabularies of different sizes (cross-tokenizer losses)."""
    return lambda g: (_randn(g, *lead, v_s, scale=2.0), _randn(g, *lead, v_t, scale=2.0))


def logprobs_pair(*shape: int) -> Callable:
    """Per-token log-probabilities of sampled tokens (≤ 0), student and teacher."""
    return lambda g: (-_randn(g, *shape).exp(), -_randn(g, *shape).exp())


def logits_and_labels(g: torch.Generator):
    return _randn(g, B, L, V, scale=2.0), torch.randint(0, V, (B, L), generator=g)


ATTN = ((0, 2), (0, 3))
ROW = ((0,),)

CASES: list[Case] = [
    Case("kd_ce", "kd_ce", logits_pair(B, L, V), options={"temperature": 2.0}, logits=True),
    Case("kd_ce-2d-rowT", "kd_ce", logits_pair(B, V), (B,), ROW,
         {"temperature": torch.tensor([1.0, 2.5, 4.0], dtype=F64)}, logits=True),
    Case("kd_ce-noT2", "kd_ce", logits_pair(B, L, V), options={"temperature": 3.0, "t2_scale": False}, logits=True),
    Case("kd_kl", "kd_kl", logits_pair(B, L, V), options={"temperature": torch.tensor(2.0, dtype=F64)}, logits=True),
    Case("reverse_kl", "reverse_kl", logits_pair(B, L, V), options={"temperature": 1.5}, logits=True),
    Case("jsd", "jsd", logits_pair(B, L, V), options={"beta": 0.3, "temperature": 2.0}, logits=True),
    Case("jsd-beta0", "jsd", logits_pair(B, V), (B,), ROW, {"beta": 0.0}, logits=True),
    Case("jsd-beta1", "jsd", logits_pair(B, V), (B,), ROW, {"beta": 1.0}, logits=True),
    Case("jsd-tensor-beta", "jsd", logits_pair(B, L, V), options={"beta": torch.tensor(0.7, dtype=F64)}, logits=True),
    Case("skew_kl", "skew_kl", logits_pair(B, L, V), options={"alpha": 0.1, "temperature": 2.0}, logits=True),
    Case("tvd", "tvd", logits_pair(B, L, V), logits=True),
    Case("kd_mse", "kd_mse", logits_pair(B, L, V), options={"temperature": 2.0}, logits=True),
    Case("prob_mse", "prob_mse", logits_pair(B, L, V), options={"temperature": 2.0}, logits=True),
    Case("prob_mse-2d", "prob_mse", logits_pair(B, V), (B,), ROW, logits=True),
    Case("pseudo_label_ce", "pseudo_label_ce", logits_pair(B, L, V), logits=True),
    Case("hard_ce", "hard_ce", logits_and_labels, logits=True, labels=True),
    Case("uld", "uld", logits_two_vocabularies(B, L, v_s=V, v_t=V + 3), options={"temperature": 2.0}, logits=True),
    Case("uld-2d-smaller-teacher", "uld", logits_two_vocabularies(B, v_s=V, v_t=V - 2), (B,), ROW, logits=True),
    Case("sampled_kl-k1", "sampled_kl", logprobs_pair(B, L), options={"estimator": "k1"}),
    Case("sampled_kl-k2", "sampled_kl", logprobs_pair(B, L)),
    Case("sampled_kl-k3", "sampled_kl", logprobs_pair(B, L), options={"estimator": "k3"}),
    Case("hidden_mse", "hidden_mse", features_pair((B, L, D))),
    Case("cosine", "cosine", features_pair((B, L, D))),
    Case("pkd", "pkd", features_pair((B, L, D)), compactable=False),
    Case("pkd-2d", "pkd", features_pair((B, D)), (B,), ROW),
    Case("attention_kl-probs", "attention_kl", probs_pair(B, H, L, L), mask_axes=ATTN),
    Case("attention_kl-logits", "attention_kl", logits_pair(B, H, L, L), mask_axes=ATTN, options={"inputs": "logits"},
         logits=True),
    Case("attention_mse", "attention_mse", features_pair((B, H, L, L)), mask_axes=ATTN),
    Case("attention_mse-sum", "attention_mse", features_pair((B, H, L, L)), mask_axes=ATTN,
         options={"head_reduce": "sum"}),
    Case("attention_ce", "attention_ce", logits_pair(B, H, L, L), mask_axes=ATTN, logits=True, masked_keys_enter=True),
    Case("attention_ce-mean", "attention_ce", logits_pair(B, H, L, L), mask_axes=ATTN, options={"head_reduce": "mean"},
         logits=True, masked_keys_enter=True),
    Case("relation_kl", "relation_kl", features_pair((B, L, 4), (B, L, 6)), options={"num_heads": 2}),
    Case("fsp", "fsp", hidden_pairs(3, 4)),
    Case("mmd", "mmd", hidden_pairs(3, 3, 5, 5)),
    Case("mmd-single", "mmd", features_pair((B, L, 3), (B, L, 5))),
    Case("nst", "nst", features_pair((B, L, 3), (B, L, 5))),
]

DIVERGENCES = ("kd_ce", "kd_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
#: every divergence case again through each other implementation: the same checks hold for every path
CASES += [replace(c, id=f"{c.id}-via-{path}", path=path) for path in ("chunked", "topk", "fused") for c in list(CASES)
          if c.name in DIVERGENCES]

LOSS_NAMES = sorted(REFERENCES)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
