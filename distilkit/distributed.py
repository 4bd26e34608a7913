"""Global token normalisation across gradient-accumulation micro-batches and data-parallel ranks.

Why: a per-micro-batch, per-rank mean weights each token by 1 / (tokens in its micro-batch). With padding or
variable-length sequences, micro-batches hold different numbers of kept tokens, so accumulating (or DDP-averaging)
their means is *not* the mean over the full batch: tokens in short micro-batches count for more. The full batch's
gradient needs every micro-batch's *sum* divided by one global count.

How: count the kept positions of the whole optimizer step once (:func:`global_counts`), then pass the counts to
every micro-batch's step call::

    counts = dk.distributed.global_counts(micro_batches, masks=["attention_mask"], labels=["labels"])
    for mb in micro_batches:
        out = step(student(mb), teacher(mb), mb, step=i, params=params, counts=counts)
        out.loss.backward()      # accumulate; DDP averages over ranks
    optimizer.step()

Each term masked by a counted key then contributes ``sum / (count per kept position × global count)``. The counts
are divided by the world size because DDP averages gradients over ranks. This is exact for every loss whose count
is proportional to the kept positions (all logit, hidden-state and row-wise attention losses); for the losses over
pairs of positions (``attention_mse``, ``mmd``) the per-position factor is taken from the micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def global_counts(micro_batches: Sequence[Mapping], *, masks: Iterable[str] = (), labels: Iterable[str] = (),
                  ignore_index: int = -100, group=None) -> dict[str, Tensor]:
    """Kept positions per key over all ``micro_batches`` of this rank, summed over ranks, divided by world size.

    ``masks`` are boolean-like mask keys (nonzero = kept); ``labels`` are integer label keys (kept where
    ``!= ignore_index``, as ``hard_ce`` counts). Uses one ``all_reduce`` when ``torch.distributed`` is initialised.
    """
    masks, labels = list(masks), list(labels)
    if not masks and not labels:
        raise ValueError("global_counts: expected at least one key in masks= or labels=.")
    if not micro_batches:
        raise ValueError("global_counts: expected at least one micro-batch.")
    totals = []
    for key in [*masks, *labels]:
        total = None
        for i, mb in enumerate(micro_batches):
            if not isinstance(mb, Mapping) or key not in mb:
                raise KeyError(f"global_counts: expected key {key!r} in micro-batch {i}.")
            value = mb[key]
            if not isinstance(value, Tensor):
                raise TypeError(f"global_counts: expected micro-batch {i}[{key!r}] to be a tensor, got "
                                f"{type(value).__name__}.")
            kept = (value != ignore_index) if key in labels else (value != 0)
            total = kept.sum() if total is None else total + kept.sum().to(total.device)
        totals.append(total.float())
    stacked = torch.stack(totals)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked, group=group)
        world = dist.get_world_size(group)
    stacked = stacked / world
    return dict(zip([*masks, *labels], stacked.unbind(0), strict=True))
