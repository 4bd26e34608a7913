"""Hugging Face model outputs → distilkit's output mapping ``{"logits", "hidden": [...], "attention": [...]}``.

```python
teacher_out = teacher(**inputs, output_hidden_states=True, output_attentions=True)   # under torch.no_grad()
student_out = student(**inputs, output_hidden_states=True, output_attentions=True)
out = step(dk.adapters.hf(student_out), dk.adapters.hf(teacher_out), inputs, step=i, params=params)
```

``transformers`` is never imported: a ``ModelOutput`` is an ``OrderedDict`` subclass, so it is read as any other
mapping (its fields that are ``None`` are not among its keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ._causal import shift_outputs

__all__ = ["hf"]

_API = "adapters.hf"
_LAYERED = ("hidden", "attention")


def hf(model_output: Mapping, *, logits: str | None = "logits", hidden: str | None = "hidden_states",
       attention: str | None = "attentions", causal: bool = False, **extra: Any) -> dict[str, Any]:
    """Map a Hugging Face ``ModelOutput`` (or any mapping) to distilkit's output mapping.

    The result is a new ``dict`` (nothing is copied: the values are the model's tensors):

    * ``"logits"`` ← ``model_output[logits]`` (``[B, C]`` for sequence classification, ``[B, L, V]`` for language
      models);
    * ``"hidden"`` ← ``list(model_output[hidden])``, the ``hidden_states`` of a model run with
      ``output_hidden_states=True``: **``num_hidden_layers + 1`` entries, index 0 is the embedding output and index
      ``k`` the output of transformer layer ``k``** (1-based), each ``[B, L, D]``;
    * ``"attention"`` ← ``list(model_output[attention])``, the ``attentions`` of a model run with
      ``output_attentions=True`` (and an attention implementation that returns them, e.g.
      ``attn_implementation="eager"``): **``num_hidden_layers`` entries, index ``k`` is transformer layer ``k + 1``**,
      each ``[B, H, L, L]`` post-softmax probabilities (use ``dk.attention_kl`` with its default ``inputs="probs"``);
    * ``"loss"`` (when the model computed one, i.e. was given labels) is kept, and also given as ``"losses": [loss]``,
      TextBrewer's adaptor key, which ``dk.precomputed.on("losses")`` and the ``hard_label`` term of
      ``dk.from_textbrewer`` read;
    * every other field that is not ``None`` (``pooler_output``, ``last_hidden_state``, ...) is kept under its own
      name, and ``**extra`` entries are added as given (e.g. ``inputs_mask=batch["attention_mask"]`` for a spec made
      by ``dk.from_textbrewer``).

    The indices of ``dk.layers`` and of ``("hidden", k)`` / ``("attention", k)`` selectors refer to these lists, so
    with HF outputs hidden index and attention index differ by one for the same layer, as in TextBrewer's BERT
    examples (hidden ``layer_T`` 0–12 with the embeddings at 0, attention ``layer_T`` 0–11). A 6-layer student
    matched to every second layer of a 12-layer teacher is
    ``dk.layers(dk.hidden_mse, [(k, 2 * k) for k in range(7)], feature="hidden", ...)`` and
    ``dk.layers(dk.attention_kl, [(k, 2 * k + 1) for k in range(6)], feature="attention", ...)``.
    Negative indices count from the end: ``("hidden", -1)`` and ``("attention", -1)`` are both the last layer's.

    The adapter cannot know which keys a spec needs: fields that are absent or ``None`` (a model run without
    ``output_hidden_states=True`` or ``output_attentions=True``), and empty hidden/attention tuples, are left out;
    the step then raises a ``KeyError`` (``dk.SpecKeyError``) naming the term and the missing key (``'hidden'`` /
    ``'attention'``).

    Args:
        model_output: a ``transformers`` ``ModelOutput`` or any mapping (a model's ``return_dict=False`` tuple is
            refused: its layout depends on the model and on whether labels were given).
        logits, hidden, attention: the fields to read as ``"logits"``, ``"hidden"`` and ``"attention"``; e.g.
            ``hidden="decoder_hidden_states", attention="decoder_attentions"`` for the decoder of an
            encoder-decoder model; ``None`` maps nothing to that key (the field is then kept under its own name).
        causal: a causal LM's outputs: drop the last position of the logits, hidden states and attention maps (it
            predicts past the sequence), so that position i lines up with the next-token labels and mask of
            :func:`~distilkit.adapters.causal` applied to the batch. Pass the output layer for the fused path as
            ``lm_head=model.lm_head.weight`` (an ``extra`` entry).
        **extra: entries added to the result; a name that the result already has is an error.

    Returns:
        ``dict`` with ``"logits"``, ``"hidden"`` and ``"attention"`` where present, ``"loss"`` and ``"losses"`` where
        the model computed a loss, and the remaining fields and ``extra``.
    """
    if isinstance(model_output, (tuple, list)):
        raise TypeError(f"{_API}: expected a ModelOutput or a mapping, got a {type(model_output).__name__}; call the "
                        "model with return_dict=True (the default), since a tuple's layout depends on the model.")
    if not isinstance(model_output, Mapping):
        raise TypeError(f"{_API}: expected a ModelOutput or a mapping, got {type(model_output).__name__}.")
    renames = {"logits": logits, "hidden": hidden, "attention": attention}
    for target, source in renames.items():
        if source is not None and not isinstance(source, str):
            raise TypeError(f"{_API}: expected {target}= to be a field name or None, got {source!r}.")
    renames = {target: source for target, source in renames.items() if source is not None}
    present = {key: value for key, value in model_output.items() if value is not None}
    for target, source in renames.items():
        if source != target and source in present and target in present:
            raise ValueError(f"{_API}: expected one source for {target!r}, got both fields {source!r} and "
                             f"{target!r}; pass {target}=None to keep {target!r} as it is.")

    sources = set(renames.values())
    result: dict[str, Any] = {key: value for key, value in present.items() if key not in sources}
    for target, source in renames.items():
        if source in present:
            value = _convert(target, source, present[source])
            if not (target in _LAYERED and len(value) == 0):  # some models give () for "not recorded"
                result[target] = value
    if "loss" in result and "losses" not in result:
        result["losses"] = [result["loss"]]
    for key, value in extra.items():
        if key in result:
            raise ValueError(f"{_API}: expected extra keys that the outputs do not already have, got {key!r}; "
                             f"the outputs have {sorted(map(str, result))}.")
        result[key] = value
    return shift_outputs(result) if causal else result


def _convert(target: str, source: str, value: Any) -> Any:
    if target in _LAYERED:
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{_API}: expected {source!r} to be a tuple or list of per-layer tensors, got "
                            f"{type(value).__name__}.")
        value = list(value)
        bad = [i for i, layer in enumerate(value) if not isinstance(layer, Tensor)]
        if bad:
            raise TypeError(f"{_API}: expected {source!r} to hold tensors, got {type(value[bad[0]]).__name__} at "
                            f"index {bad[0]}.")
        return value
    if isinstance(value, (tuple, list)):  # a list of logits (summed over by the logit losses)
        return list(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{_API}: expected {source!r} to be a tensor, got {type(value).__name__}.")
    return value
