"""dk.integrations.trainer_compute_loss inside a real transformers.Trainer (tiny GPT-2 models from configs): one
optimizer step over two gradient-accumulation micro-batches of uneven lengths equals one SGD step on the whole
batch computed by hand."""

from __future__ import annotations

import lightning  # (a dev dependency: missing, this file fails rather than skips)
import pytest
import torch

import distilkit as dk

transformers = pytest.importorskip("transformers")
VOCAB = 40


def _model(seed):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # (no dropout in train mode)
    return transformers.GPT2LMHeadModel(config)


def _examples():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 3, 6, 8)]


def _collate(items):
    length = max(len(x["ids"]) for x in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for b, x in enumerate(items):
        ids[b, : len(x["ids"])] = x["ids"]
        mask[b, : len(x["ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def _spec():
    return dk.kd_kl.on("logits", mask="mask", temperature=2.0) + 0.5 * dk.hard_ce.on("logits", labels="labels")


def test_a_trainer_step_with_gradient_accumulation_equals_the_full_batch(tmp_path):
    teacher, student = _model(0).eval(), _model(1)
    reference = _model(1)
    data = [{"ids": x} for x in _examples()]

    class KDTrainer(transformers.Trainer):
        compute_loss = dk.integrations.trainer_compute_loss(_spec(), teacher)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_drop_last=False, remove_unused_columns=False, seed=0)
    seen = []

    def collate(items):
        seen.append(len(items))
        return _collate(items)

    trainer = KDTrainer(model=student, args=args, train_dataset=data,
                        data_collator=dk.integrations.with_shift_labels(collate))
    trainer.train()
    assert seen == [2, 2]  # two micro-batches of uneven lengths (padded to 9 and 8, or 9 and 6, ...)
    with pytest.raises(ValueError, match="expected the batch to carry 'shift_labels'"):
        KDTrainer.compute_loss(trainer, student, _collate(data[:2]), num_items_in_batch=torch.tensor(10))

    # by hand: the whole batch at once, one SGD step (the order of the examples does not matter to a sum)
    batch = _collate(data)
    feed = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t = dk.adapters.hf(teacher(**feed), causal=True)
    s = dk.adapters.hf(reference(**feed), causal=True)
    shifted = dk.adapters.causal(batch)
    loss = dk.make_step(_spec(), compile=False)(s, t, shifted).loss
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    changed = 0
    for (name, got), want in zip(student.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
        changed += int(not torch.equal(want.detach(), _model(1).state_dict()[name]))
    assert changed > 0  # (the step moved the parameters: the comparison is not trivially equal)


def test_without_the_global_count_the_step_differs(tmp_path):
    """The check above can fail: averaging each micro-batch's mean (no count) is not the full batch's step."""
    teacher = _model(0).eval()
    results = []
    for keys in (("labels", "mask"), ()):
        student = _model(1)

        class KDTrainer(transformers.Trainer):
            compute_loss = dk.integrations.trainer_compute_loss(_spec(), teacher, count_keys=keys)

        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
            learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, remove_unused_columns=False,
            seed=0)
        KDTrainer(model=student, args=args, train_dataset=[{"ids": x} for x in _examples()],
                  data_collator=dk.integrations.with_shift_labels(_collate)).train()
        results.append(student.transformer.wte.weight.detach().clone())
    assert not torch.allclose(results[0], results[1], rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------------------------------- Lightning


class DistilModule(lightning.LightningModule):
    """The docs' recipe (docs/llm.md, "Lightning"): the teacher in eval mode, the step's loss with the batch's counts
    all-reduced over the processes (exact under DDP)."""

    def __init__(self, student, teacher, spec, lr):
        super().__init__()
        self.student, self.teacher, self.lr = student, teacher.eval().requires_grad_(False), lr
        self.spec, self.step_fn = spec, dk.make_step(spec, compile=False)

    def training_step(self, batch, batch_idx):
        feed = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            t = dk.adapters.hf(self.teacher(**feed), causal=True)
        s = dk.adapters.hf(self.student(**feed), causal=True)
        shifted = dk.adapters.causal(batch)
        counts = dk.distributed.global_counts([shifted], spec=self.spec)
        return self.step_fn(s, t, shifted, step=self.global_step, counts=counts).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=self.lr)


def test_a_lightning_step_equals_the_formula(tmp_path):
    teacher, student, reference = _model(0), _model(1), _model(1)
    data = [{"ids": x} for x in _examples()]
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=_collate)
    trainer = lightning.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(DistilModule(student, teacher, _spec(), lr=0.5), loader)
    batch = _collate(data)
    feed = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t = dk.adapters.hf(teacher(**feed), causal=True)
    loss = dk.make_step(_spec(), compile=False)(dk.adapters.hf(reference(**feed), causal=True), t,
                                                dk.adapters.causal(batch)).loss
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    for (name, got), want in zip(student.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.equal(student.transformer.wte.weight, _model(1).transformer.wte.weight)
