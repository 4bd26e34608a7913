"""The Hugging Face adapter: ModelOutput / mapping → {"logits", "hidden", "attention"}, and distilling a small BERT
teacher into a smaller BERT student through it (eager and inductor-compiled)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import distilkit as dk
from distilkit.adapters import hf

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402
from transformers.modeling_outputs import (  # noqa: E402
    BaseModelOutputWithPoolingAndCrossAttentions,
    Seq2SeqLMOutput,
    SequenceClassifierOutput,
)

V, C, B, L = 100, 3, 8, 12


def r(*shape):
    return torch.randn(*shape)


# ------------------------------------------------------------------------------------------------ the adapter
def test_model_output_maps_to_lists_and_keeps_loss_and_other_fields():
    hidden, attention, logits, loss = (r(2, 5, 4), r(2, 5, 4)), (r(2, 2, 5, 5),), r(2, 3), r(())
    out = hf(SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden, attentions=attention))
    assert type(out) is dict
    assert set(out) == {"logits", "hidden", "attention", "loss", "losses"}
    assert out["logits"] is logits and out["loss"] is loss
    assert isinstance(out["hidden"], list) and isinstance(out["attention"], list) and isinstance(out["losses"], list)
    assert all(a is b for a, b in zip(out["hidden"], hidden, strict=True))  # the model's tensors, not copies
    assert len(out["attention"]) == 1 and out["attention"][0] is attention[0]
    assert len(out["losses"]) == 1 and out["losses"][0] is loss


def test_fields_that_are_none_or_absent_are_left_out():
    logits = r(2, 3)
    assert hf(SequenceClassifierOutput(logits=logits)) == {"logits": logits}  # run without output_*=True
    pooled, hidden = r(2, 4), (r(2, 5, 4),)
    out = hf({"logits": logits, "hidden_states": hidden, "attentions": None, "pooler_output": pooled, "loss": None})
    assert set(out) == {"logits", "hidden", "pooler_output"}
    assert out["pooler_output"] is pooled
    assert hf({}) == {}
    assert hf({"hidden_states": (), "attentions": []}) == {}  # "not recorded"


def test_a_missing_key_is_named_by_the_step():
    step = dk.make_step(dk.attention_kl.on(("attention", 0)), compile=False)
    out = hf(SequenceClassifierOutput(logits=r(2, 3), hidden_states=(r(2, 5, 4),)))
    with pytest.raises(dk.SpecKeyError, match=r"attention_kl \(term 'attention_kl/0-0'\): expected key 'attention'"):
        step(out, out)


def test_tuple_outputs_are_refused_and_tuple_fields_become_lists():
    with pytest.raises(TypeError, match=r"adapters.hf: expected a ModelOutput or a mapping, got a tuple.*return_dict"):
        hf((r(2, 3), (r(2, 5, 4),)))
    with pytest.raises(TypeError, match=r"adapters.hf: expected a ModelOutput or a mapping, got Tensor"):
        hf(r(2, 3))
    logits_list = (r(2, 3), r(2, 3))
    out = hf({"logits": logits_list, "hidden_states": [r(2, 5, 4)]})
    assert isinstance(out["logits"], list) and len(out["logits"]) == 2
    assert isinstance(out["hidden"], list)


def test_bad_fields_raise_errors_naming_them():
    with pytest.raises(TypeError, match=r"adapters.hf: expected 'hidden_states' to be a tuple or list of per-layer"):
        hf({"hidden_states": r(2, 5, 4)})
    with pytest.raises(TypeError, match=r"expected 'attentions' to hold tensors, got NoneType at index 1"):
        hf({"attentions": (r(2, 2, 5, 5), None)})
    with pytest.raises(TypeError, match=r"expected 'logits' to be a tensor, got str"):
        hf({"logits": "x"})
    with pytest.raises(TypeError, match=r"expected hidden= to be a field name or None, got 3"):
        hf({}, hidden=3)
    with pytest.raises(ValueError, match=r"expected one source for 'hidden', got both fields 'hidden_states' and"):
        hf({"hidden_states": (r(2, 5, 4),), "hidden": [r(2, 5, 4)]})


def test_other_field_names_for_encoder_decoder_models_and_none():
    dec, enc, logits = (r(2, 5, 4),) * 3, (r(2, 7, 4),) * 3, r(2, 5, 9)
    out = hf(Seq2SeqLMOutput(logits=logits, decoder_hidden_states=dec, decoder_attentions=(r(2, 2, 5, 5),) * 2,
                             encoder_hidden_states=enc),
             hidden="decoder_hidden_states", attention="decoder_attentions")
    assert set(out) == {"logits", "hidden", "attention", "encoder_hidden_states"}
    assert len(out["hidden"]) == 3 and out["hidden"][0] is dec[0] and len(out["attention"]) == 2
    assert out["encoder_hidden_states"] is enc  # kept as the model gave it
    last = r(2, 5, 4)
    base = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=last, hidden_states=(r(2, 5, 4),))
    assert hf(base, logits="last_hidden_state", hidden=None) == {"logits": last, "hidden_states": base.hidden_states}


def test_extra_entries_are_added_and_may_not_collide():
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = hf(SequenceClassifierOutput(logits=r(2, 3)), inputs_mask=mask, labels=torch.tensor([0, 2]))
    assert set(out) == {"logits", "inputs_mask", "labels"} and out["inputs_mask"] is mask
    with pytest.raises(ValueError, match=r"adapters.hf: expected extra keys that the outputs do not already have, "
                                         r"got 'losses'"):
        hf(SequenceClassifierOutput(loss=r(()), logits=r(2, 3)), losses=[r(())])


def test_the_adapter_is_idempotent():
    full = SequenceClassifierOutput(loss=r(()), logits=r(2, 3), hidden_states=(r(2, 5, 4),) * 2,
                                    attentions=(r(2, 2, 5, 5),))
    once = hf(full)
    twice = hf(once)
    assert twice.keys() == once.keys()
    assert all(twice[k] is once[k] if not isinstance(once[k], list) else twice[k] == once[k] for k in once)


def test_importing_distilkit_does_not_import_transformers():
    code = "import sys, distilkit, distilkit.adapters; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ real BERT models
def bert_config(hidden: int, layers: int, heads: int, *, init: float = 0.02) -> BertConfig:
    # Dropout off: attention_kl on probabilities needs the student's attention without dropout's exact zeros
    # (DESIGN.md), and the decrease below should not depend on dropout noise. "eager" returns the attentions.
    return BertConfig(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=2 * hidden, max_position_embeddings=2 * L, num_labels=C,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=init,
                      attn_implementation="eager")


def token_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n fixed batches of padded token ids (pad id 0) with an attention mask; every batch has padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([12, 11, 9, 7, 6, 5, 4, 12])
    batches = []
    for i in range(n):
        mask = (torch.arange(L) < lengths.roll(i)[:, None]).long()
        ids = torch.randint(1, V, (B, L), generator=gen) * mask
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_indexing_convention_on_a_real_bert():
    torch.manual_seed(0)
    model = BertModel(bert_config(16, 3, 2)).eval()
    batch = token_batches(1)[0]
    with torch.no_grad():
        raw = model(**batch, output_hidden_states=True, output_attentions=True)
        embeddings = model.embeddings(input_ids=batch["input_ids"])
    out = hf(raw, logits="last_hidden_state")
    assert len(out["hidden"]) == 3 + 1 and len(out["attention"]) == 3
    torch.testing.assert_close(out["hidden"][0], embeddings)  # index 0: the embedding output
    torch.testing.assert_close(out["hidden"][-1], raw.last_hidden_state)  # index k: after transformer layer k
    assert all(a.shape == (B, 2, L, L) for a in out["attention"])  # index k: transformer layer k + 1
    keys = batch["attention_mask"][:, None, None, :].expand(B, 2, L, L).bool()
    for att in out["attention"]:  # probabilities over the kept keys
        torch.testing.assert_close(att.sum(-1), torch.ones(B, 2, L))
        assert att.masked_select(~keys).abs().max() < 1e-6
    assert set(out) == {"logits", "hidden", "attention", "pooler_output", "cross_attentions"}  # () kept as given


def test_hf_loss_joins_a_spec_as_losses():
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(16, 1, 2)).eval()
    batch = token_batches(1)[0]
    raw = model(**batch, labels=torch.arange(B) % C)
    out = dk.make_step(dk.precomputed.on("losses"), compile=False)(hf(raw), hf(raw))
    torch.testing.assert_close(out.loss, raw.loss)


def distillation():
    # The teacher's larger init makes its attention peaked and its logits confident, so kd_kl and attention_kl
    # start well above 0; both students have 4 heads as attention_kl compares head by head.
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(bert_config(64, 4, 4, init=0.3)).eval()
    student = BertForSequenceClassification(bert_config(32, 2, 4))
    spec = (dk.kd_kl.on("logits", temperature=2.0)
            + dk.layers(dk.hidden_mse, [(0, 0), (1, 2), (2, 4)], feature="hidden", mask="attention_mask",
                        proj=dk.proj.linear(32, 64))
            + dk.attention_kl.on(("attention", 1), ("attention", 3), mask="attention_mask"))
    return teacher, student, spec, dk.init_params(spec)


def run(model, batch):
    return hf(model(**batch, output_hidden_states=True, output_attentions=True))


def train(step, teacher, student, params, batches, steps):
    opt = torch.optim.AdamW([*student.parameters(), *params.parameters()], lr=1e-2)
    history = []
    for i in range(steps):
        batch = batches[i % len(batches)]
        with torch.no_grad():
            teacher_out = run(teacher, batch)
        out = step(run(student, batch), teacher_out, batch, step=i, params=params)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append(out.metrics)
    return history


def mean_metrics(spec, teacher, student, params, batches):
    step = dk.make_step(spec, compile=False)
    with torch.no_grad():
        metrics = [step(run(student, b), run(teacher, b), b, params=params).metrics for b in batches]
    return {k: torch.stack([m[k] for m in metrics]).mean() for k in metrics[0] if k.endswith("loss")}


def test_distilling_bert_into_a_smaller_bert_lowers_every_term():
    teacher, student, spec, params = distillation()
    batches = token_batches(4)
    before = mean_metrics(spec, teacher, student, params, batches)
    assert set(before) == {"loss", "kd_kl/loss", "hidden_mse/0-0/loss", "hidden_mse/1-2/loss", "hidden_mse/2-4/loss",
                           "attention_kl/1-3/loss"}
    assert all(v > 0.05 for v in before.values()), before  # every term starts with something to learn

    history = train(dk.make_step(spec, compile=False), teacher, student, params, batches, steps=24)
    assert all(torch.isfinite(v).all() for m in history for v in m.values())
    assert all(p.grad is None for p in teacher.parameters())
    after = mean_metrics(spec, teacher, student, params, batches)
    # Over seeds 0-5 (models and batches): after/before of the total 0.25-0.37; kd_kl ≤ 0.83, attention_kl ≤ 0.65.
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert all(after[k] < before[k] for k in before), (before, after)


@pytest.mark.slow
def test_the_inductor_compiled_step_trains_on_hf_outputs_as_eager_does():
    teacher, student, spec, params = distillation()
    batches = token_batches(3, seed=1)
    student_c, params_c = copy.deepcopy(student), copy.deepcopy(params)
    eager = train(dk.make_step(spec, compile=False), teacher, student, params, batches, steps=3)
    compiled = train(dk.make_step(spec, compile=True), teacher, student_c, params_c, batches, steps=3)
    for e, c in zip(eager, compiled, strict=True):
        assert e.keys() == c.keys()
        for key in e:
            torch.testing.assert_close(c[key], e[key], rtol=1e-4, atol=1e-5, msg=key)
    for (name, p), q in zip([*student.named_parameters(), *params.named_parameters()],
                            [*student_c.parameters(), *params_c.parameters()], strict=True):
        if not name.endswith("attention.self.key.bias"):  # softmax ignores it: its gradient is rounding noise,
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)  # which AdamW scales up to lr
