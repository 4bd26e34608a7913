"""Causal language models: the logits at position i predict token i + 1.

A causal LM's ``logits[:, i]`` is its distribution of the *next* token, while Hugging Face batches carry
``labels`` aligned with ``input_ids`` (the model shifts them inside when it computes its own loss). Comparing
``logits[:, i]`` with ``labels[:, i]`` trains a model to predict the token it is looking at: the training loss drops
quickly and the held-out loss gets worse. :func:`causal` makes the shift once, for the whole batch, and derives the
keep-mask; :func:`~distilkit.adapters.hf` with ``causal=True`` drops the last position of the outputs to match::

    batch = dk.adapters.causal(inputs)        # labels[:, 1:], "mask": positions with a next token to predict
    s = dk.adapters.hf(student(**inputs, output_hidden_states=True), causal=True, lm_head=student.lm_head.weight)
    t = dk.adapters.hf(teacher(**inputs, output_hidden_states=True), causal=True, lm_head=teacher.lm_head.weight)
    spec = dk.kd_kl.on("logits", mask="mask", temperature=2.0) + dk.hard_ce.on("logits", labels="labels")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

_API = "adapters.causal"


def causal(batch: Mapping, *, input_ids: str = "input_ids", labels: str = "labels",
           attention_mask: str = "attention_mask", position_ids: str = "position_ids",
           ignore_index: int = -100) -> dict[str, Any]:
    """The batch for losses on a causal LM's outputs shifted by :func:`~distilkit.adapters.hf` (``causal=True``).

    Returns a new ``dict`` with every entry of ``batch`` and:

    * ``"labels"`` ``[B, L − 1]``: the next token of each position — ``batch[labels][:, 1:]`` when the batch has
      labels (Hugging Face's convention: aligned with ``input_ids``, ``ignore_index`` where no loss is wanted), else
      ``batch[input_ids][:, 1:]`` — set to ``ignore_index`` where that next token is padding
      (``attention_mask[:, 1:] == 0``, left or right padding alike) or starts a new document of a packed sequence
      (``position_ids[:, 1:] == 0``: the previous document does not predict it);
    * ``"mask"`` ``[B, L − 1]`` bool: ``labels != ignore_index``, the keep-mask of the distillation terms (the
      teacher's prediction of the next token is compared exactly where the student has one to learn).

    The original ``labels`` and ``input_ids`` are replaced / kept as given; ``attention_mask`` (still ``[B, L]``) is
    kept under its own name for losses on unshifted outputs.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"{_API}: expected the batch to be a mapping, got {type(batch).__name__}.")
    source = labels if labels in batch and batch[labels] is not None else input_ids
    if source not in batch:
        raise KeyError(f"{_API}: expected the batch to have {labels!r} or {input_ids!r} (the tokens to predict), "
                       f"got keys {sorted(map(str, batch))}.")
    tokens = batch[source]
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.ndim != 2:
        raise TypeError(f"{_API}: expected batch[{source!r}] to be an integer tensor [B, L], got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)} of shape "
                        f"{tuple(getattr(tokens, 'shape', ()))}.")
    if tokens.shape[1] < 2:
        raise ValueError(f"{_API}: expected sequences of at least 2 tokens (one to read, one to predict), got "
                         f"length {tokens.shape[1]}.")
    nxt = tokens[:, 1:]
    drop = torch.zeros_like(nxt, dtype=torch.bool)
    for key in (attention_mask, position_ids):  # padding (0 in the mask); a document's first token (position 0)
        value = batch.get(key)
        if value is None:
            continue
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(tokens.shape):
            raise ValueError(f"{_API}: expected batch[{key!r}] of shape {tuple(tokens.shape)} (as {source!r}), got "
                             f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}.")
        drop |= value[:, 1:] == 0
    shifted = torch.where(drop, torch.full_like(nxt, ignore_index), nxt)
    return {**batch, "labels": shifted, "mask": shifted != ignore_index}


def shift_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """Drop the last position (it predicts past the sequence) of the logits ``[B, L, ...]``, each hidden state
    ``[B, L, D]`` and each attention map ``[B, H, L, L]`` (queries and keys), so they line up with :func:`causal`."""
    out = dict(outputs)
    if "logits" in out:
        out["logits"] = _drop_last(out["logits"], (1,))
    if "hidden" in out:
        out["hidden"] = [_drop_last(h, (1,)) for h in out["hidden"]]
    if "attention" in out:
        out["attention"] = [_drop_last(a, (2, 3)) for a in out["attention"]]
    return out


def _drop_last(x: Any, dims: tuple[int, ...]) -> Any:
    if isinstance(x, list):
        return [_drop_last(v, dims) for v in x]
    if not isinstance(x, Tensor) or x.ndim <= max(dims):
        raise ValueError(f"adapters.hf(causal=True): expected sequence outputs with a position dimension {dims}, got "
                         f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}.")
    index = [slice(None)] * x.ndim
    for d in dims:
        index[d] = slice(0, x.shape[d] - 1)
    return x[tuple(index)]
