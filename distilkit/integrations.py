"""Training frameworks that own the loop: a ``compute_loss`` for the Hugging Face ``Trainer``.

```python
class KDTrainer(transformers.Trainer):
    compute_loss = dk.integrations.trainer_compute_loss(spec, teacher)

collate = dk.integrations.with_shift_labels(collate)   # causal LMs: the Trainer then counts what distilkit keeps
KDTrainer(model=student, args=args, train_dataset=data, data_collator=collate).train()
```

The Trainer counts the label tokens of a whole optimizer step (every gradient-accumulation micro-batch, and every
process with ``average_tokens_across_devices``) and passes the count as ``num_items_in_batch``: exactly the global
count distilkit's step normalises by, provided it counts the positions distilkit keeps. For a causal LM it counts
``labels[..., 1:]`` only for models whose ``loss_type`` it knows, and all labels otherwise (one too many per
sequence); a batch with ``"shift_labels"`` is counted as given, so :func:`with_shift_labels` adds the next-token
labels of :func:`distilkit.adapters.causal` to every batch, and :func:`trainer_compute_loss` refuses to normalise a
causal batch without them. The Trainer multiplies the loss by the number of processes itself when it averages
tokens across devices, so the count is passed as it comes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .adapters import causal as causal_batch
from .adapters import hf
from .algebra._evaluate import count_key
from .algebra._multi import terms_of
from .step import make_step

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def trainer_compute_loss(spec, teacher: nn.Module, *, compile: bool | str = False, causal: bool = True,
                         output_hidden_states: bool = False, model_inputs: Sequence[str] = MODEL_INPUTS,
                         count_keys: Sequence[str] = ("labels", "mask")) -> Callable:
    """A ``compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None)`` method for
    ``transformers.Trainer`` that distils ``teacher`` into the trained model with ``spec``.

    Each call runs the teacher under ``torch.no_grad()`` and the student on the same ``model_inputs``, maps both
    with :func:`distilkit.adapters.hf` (``causal=True``: the logits' last position dropped, and the batch shifted by
    :func:`distilkit.adapters.causal`, which adds ``"labels"`` and ``"mask"``), and applies ``dk.make_step(spec)``
    with ``step=self.state.global_step``. With ``num_items_in_batch``, every key of ``count_keys`` the spec uses is
    normalised by it (the count of shifted labels over the whole optimizer step): pass ``labels="labels"`` /
    ``mask="mask"`` in the spec's terms. The head weight is given as ``"lm_head"`` for the fused path.

    Args:
        spec: a distilkit spec (or ``dk.tasks``).
        teacher: the teacher model (its device is not changed; put it where the student is).
        compile: as ``dk.make_step``'s ``compile`` (default False: the Trainer's own ``torch_compile`` may apply).
        causal: a causal LM (next-token labels); False for sequence classification or masked LMs.
        output_hidden_states: ask both models for their hidden states (for hidden-state or fused terms).
        model_inputs: the batch keys given to the models.
        count_keys: the spec keys that ``num_items_in_batch`` counts.
    """
    step = make_step(spec, compile=compile)
    used = {count_key(t) for t in terms_of(step.spec) if t.loss.sum_count is not None}  # (what the step normalises)
    counted = [key for key in count_keys if key in used]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        feed = {key: inputs[key] for key in model_inputs if key in inputs}
        extra = {"output_hidden_states": True} if output_hidden_states else {}
        student_out = model(**feed, **extra)
        with torch.no_grad():
            teacher_out = teacher(**feed, **extra)
        batch = causal_batch(inputs) if causal else dict(inputs)
        s = hf(student_out, causal=causal, **_head(model))
        t = hf(teacher_out, causal=causal, **_head(teacher))
        counts = None
        if num_items_in_batch is not None and counted:
            if causal and "shift_labels" not in inputs:
                raise ValueError(
                    "integrations.trainer_compute_loss: expected the batch to carry 'shift_labels' (wrap the data "
                    "collator with dk.integrations.with_shift_labels), got none: without them the Trainer's "
                    "num_items_in_batch may count labels distilkit does not keep, and the loss would be mis-scaled.")
            total = torch.as_tensor(num_items_in_batch, device=s["logits"].device)
            counts = {key: total for key in counted}
        global_step = getattr(getattr(self, "state", None), "global_step", 0)
        out = step(s, t, batch, step=global_step, counts=counts)
        return (out.loss, student_out) if return_outputs else out.loss

    return compute_loss


def with_shift_labels(collate: Callable, **causal_options) -> Callable:
    """``collate`` followed by :func:`distilkit.adapters.causal`'s next-token labels under ``"shift_labels"`` (which
    the ``Trainer`` counts for ``num_items_in_batch`` as given; the models never see them)."""

    def collate_with_shift_labels(items):
        batch = collate(items)
        return {**batch, "shift_labels": causal_batch(batch, **causal_options)["labels"]}

    return collate_with_shift_labels


def _head(model: nn.Module) -> dict:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {"lm_head": head.weight} if isinstance(head, nn.Linear) else {}
