"""Global normalisation across gradient-accumulation micro-batches and data-parallel ranks.

Why: a per-micro-batch, per-rank mean weights each token by 1 / (tokens in its micro-batch). With padding or
variable-length sequences, micro-batches hold different numbers of kept tokens, so accumulating (or DDP-averaging)
their means is *not* the mean over the full batch: tokens in short micro-batches count for more. The full batch's
gradient needs every micro-batch's *sum* divided by one global count.

How: count the units of the whole optimizer step once (:func:`global_counts`), then pass the counts to every
micro-batch's step call::

    counts = dk.distributed.global_counts(micro_batches, spec=spec)
    for mb in micro_batches:
        out = step(student(mb), teacher(mb), mb, step=i, params=params, counts=counts)
        out.loss.backward()      # accumulate; DDP averages over ranks
    optimizer.step()

What a loss's mean divides by decides what is counted (its *count kind*), always from the masks alone:

=========================== ================================================== ===================================
counts key                  counts, over all micro-batches of all ranks        losses
=========================== ================================================== ===================================
``"<mask>"``                kept positions                                     logit losses, hidden_mse, cosine,
                                                                               attention_kl / _ce, relation_kl
``"<mask>@samples"``        samples with at least one kept position            nst
``"<mask>@pairs"``          kept position pairs within a sample, Σ_b n_b²      attention_mse, mmd
``"<mask>@first"``          samples whose first position ([CLS]) is kept       pkd
``"<mask>@rows"``           samples, kept or not                               fsp
``"<labels>"``              positions whose label is not ``ignore_index``      hard_ce, label terms without a mask
=========================== ================================================== ===================================

Each term then contributes ``sum / (count per unit × global units)``, where the count per unit (1, the width ``D``,
the number of heads, ``D0·D1``) is the same in every micro-batch; the counts are divided by the world size because
DDP averages gradients. The accumulated gradient is then **exactly** the full batch's, for every built-in loss.
Not covered, by design: a term without a ``mask=`` or ``labels=`` key (or whose optional mask is absent) is averaged
over its own micro-batch, exact only when every micro-batch has the same shape; a registered user loss is counted in
kept positions unless its function sets ``count_kind``; a term with both ``mask=`` and ``labels=`` (fused KD + CE)
is refused with a ``ValueError`` (its count needs both; give it labels only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .algebra._evaluate import count_key as _count_key
from .algebra._evaluate import count_kind as _count_kind
from .algebra._multi import Tasks as _Tasks
from .algebra._multi import terms_of as _terms_of
from .algebra._term import as_spec as _as_spec
from .losses._reduce import COUNT_KINDS as _KINDS
from .losses._reduce import count_units as _count_units

_API = "global_counts"


class _Request:
    """One counts key: the batch key it reads; how (a mask counting ``kind``, or labels with ``ignore_index``);
    whether a micro-batch may lack it (an optional ``"key?"`` of every term reading it); and whether it comes from
    ``spec=`` (then with ``dk.tasks`` only the micro-batches of a task using it count it)."""

    def __init__(self, name: str, kind: str | None, ignore_index: int | None, optional: bool = False,
                 from_spec: bool = False):
        self.name, self.kind, self.ignore_index = name, kind, ignore_index
        self.optional, self.from_spec = optional, from_spec

    def same(self, other: _Request) -> bool:
        return (self.name, self.kind, self.ignore_index) == (other.name, other.kind, other.ignore_index)

    def describe(self) -> str:
        return f"labels (ignore_index={self.ignore_index})" if self.kind is None else f"a mask counting {self.kind}"


def _parse_mask_key(key: object) -> tuple[str, str]:
    if not isinstance(key, str) or not key:
        raise TypeError(f"{_API}: expected mask keys to be non-empty strings, got {key!r}.")
    name, sep, kind = key.partition("@")
    if not sep:
        return name, "tokens"
    if kind == "tokens":
        raise ValueError(f"{_API}: expected {name!r} for kept positions (they carry no suffix), got {key!r}.")
    kinds = [k for k in _KINDS if k != "tokens"]
    if kind not in kinds or not name:
        raise ValueError(f"{_API}: expected a mask key 'name' or 'name@kind' with kind one of {kinds}, got {key!r}.")
    return name, kind


def _spec_requests(spec, ignore_index: int) -> dict[str, _Request]:
    """The counts keys every term of ``spec`` (of every task) is normalised by."""
    spec = spec if isinstance(spec, _Tasks) else _as_spec(spec, _API)
    terms = _terms_of(spec)
    requests: dict[str, _Request] = {}
    for term in terms:
        key = _count_key(term)
        if key is None or term.loss.sum_count is None:
            continue
        if term.mask is not None:
            request = _Request(term.mask.rstrip("?"), _count_kind(term.loss), None, term.mask.endswith("?"), True)
        else:
            options = dict(term.options)
            index = options.get("ignore_index", term.loss.keywords.get("ignore_index", ignore_index))
            request = _Request(term.labels.rstrip("?"), None, int(index), term.labels.endswith("?"), True)
        if key in requests:
            if not requests[key].same(request):
                raise ValueError(f"{_API}: the terms of spec read {key!r} in two ways ({requests[key].describe()} "
                                 f"and {request.describe()}); one counts key cannot serve both.")
            request.optional = request.optional and requests[key].optional
        requests[key] = request
    return requests


def _terms_keys(spec, mb: Mapping) -> set[str] | None:
    """The counts keys of the terms that apply to micro-batch ``mb`` (``None``: every key of a plain spec)."""
    if not isinstance(spec, _Tasks):
        return None
    return {_count_key(t) for t in spec.spec_for(mb).terms if t.loss.sum_count is not None}


def global_counts(micro_batches: Sequence[Mapping], *, spec=None, masks: Iterable[str] = (),
                  labels: Iterable[str] = (), ignore_index: int = -100, group=None) -> dict[str, Tensor]:
    """The units every term is normalised by, over all ``micro_batches`` of this rank, summed over ranks and divided
    by the world size: pass the result as ``counts=`` to every step call of the optimizer step.

    Args:
        micro_batches: this rank's micro-batches of one optimizer step (mappings holding the mask and label keys).
        spec: the spec (or ``dk.tasks``) the step applies: counts every key its terms need (the recommended way;
            with ``dk.tasks`` a micro-batch counts only the keys of its own task). Optional masks (``"key?"``)
            absent from every micro-batch of every rank are left out (their terms are averaged per micro-batch).
        masks: mask keys to count (nonzero = kept), each ``"key"`` (kept positions) or ``"key@kind"`` with kind
            ``samples`` (samples with a kept position), ``pairs`` (Σ_b n_b², kept position pairs within a sample),
            ``first`` (samples whose first position is kept) or ``rows`` (samples, kept or not). See the module
            docstring for which loss needs which.
        labels: integer label keys, kept where ``!= ignore_index`` (as ``hard_ce`` counts). With ``spec=`` a label
            term's own ``ignore_index`` option is used.
        group: the process group (default: the world).

    Returns ``{key: 0-d float32 tensor}``. Uses one ``all_reduce`` when ``torch.distributed`` is initialised (call it
    on every rank, with the same keys). Explicit keys must be in every micro-batch.
    """
    masks, labels = list(masks), list(labels)
    if spec is None and not masks and not labels:
        raise ValueError(f"{_API}: expected spec= or at least one key in masks= or labels=.")
    if not micro_batches:
        raise ValueError(f"{_API}: expected at least one micro-batch.")
    requests: dict[str, _Request] = {}

    def add(key: str, request: _Request, where: str) -> None:
        if key in requests and not requests[key].same(request):
            raise ValueError(f"{_API}: key {key!r} is asked for as {requests[key].describe()} and as "
                             f"{request.describe()} ({where}).")
        requests.setdefault(key, request)

    for key in masks:
        name, kind = _parse_mask_key(key)
        add(key, _Request(name, kind, None), "masks=")
    for key in labels:
        if not isinstance(key, str) or not key or "@" in key:
            raise ValueError(f"{_API}: expected label keys to be plain key names (no '@kind'), got {key!r}.")
        add(key, _Request(key, None, ignore_index), "labels=")
    if spec is not None:
        for key, request in sorted(_spec_requests(spec, ignore_index).items()):
            add(key, request, "spec=")

    keys = list(requests)
    totals = [torch.zeros((), dtype=torch.int64) for _ in keys]
    present = [0] * len(keys)  # micro-batches that held the key (optional spec keys may be absent)
    device = None
    for i, mb in enumerate(micro_batches):
        if not isinstance(mb, Mapping):
            raise TypeError(f"{_API}: expected micro-batch {i} to be a mapping, got {type(mb).__name__}.")
        applies = _terms_keys(spec, mb) if spec is not None else None
        for j, key in enumerate(keys):
            request = requests[key]
            if request.from_spec and applies is not None and key not in applies:
                continue  # a key of another task
            if request.name not in mb:
                if request.optional:
                    continue  # an optional mask absent from this micro-batch (the step refuses a partial count)
                raise KeyError(f"{_API}: expected key {request.name!r} in micro-batch {i}.")
            value = mb[request.name]
            if not isinstance(value, Tensor):
                raise TypeError(f"{_API}: expected micro-batch {i}[{request.name!r}] to be a tensor, got "
                                f"{type(value).__name__}.")
            if request.kind is None:
                units = (value != request.ignore_index).sum()
            else:
                if value.ndim == 0:
                    raise ValueError(f"{_API}: expected micro-batch {i}[{request.name!r}] to be a mask [B, ...], "
                                     "got a 0-d tensor.")
                units = _count_units(request.kind, value)
            device = device or units.device
            totals[j] = totals[j].to(units.device) + units.to(torch.int64)
            present[j] += 1
    device = device or torch.device("cpu")
    stacked = torch.stack([t.to(device) for t in totals] + [torch.tensor(p, device=device) for p in present])
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked, group=group)
        world = dist.get_world_size(group)
    counts, seen = stacked[:len(keys)], stacked[len(keys):].tolist()
    values = (counts.double() / world).float().unbind(0) if keys else ()
    return {key: value for key, value, n in zip(keys, values, seen, strict=True) if n > 0 or not requests[key].optional}

