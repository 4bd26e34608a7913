"""dk.adapters.causal and hf(causal=True) on real transformers causal LMs built from configs (no downloads): the
shifted next-token loss equals the model's own loss; unshifted it does not; left padding and packed sequences."""

from __future__ import annotations

import pytest
import torch

import distilkit as dk

transformers = pytest.importorskip("transformers")
VOCAB = 50


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def _batch(left: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    attention = torch.ones_like(ids)
    lengths = [9, 6, 4]
    for b, n in enumerate(lengths):
        if left:
            attention[b, : 9 - n] = 0
        else:
            attention[b, n:] = 0
    labels = torch.where(attention.bool(), ids, -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_the_shifted_loss_is_the_models_own(make, left):
    model = make()
    inputs = _batch(left)
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0) if left else None
    with torch.no_grad():
        out = model(**inputs, position_ids=position_ids, output_hidden_states=True)
    batch = dk.adapters.causal(inputs)
    s = dk.adapters.hf(out, causal=True, lm_head=model.get_output_embeddings().weight)
    assert s["logits"].shape == (3, 8, VOCAB) and batch["labels"].shape == (3, 8) and batch["mask"].shape == (3, 8)
    ours = dk.make_step(dk.hard_ce.on("logits", labels="labels"), compile=False)(s, {}, batch).loss
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)  # HF shifts inside; the same mean
    # unshifted (the silent mistake: each position learns the token it reads) gives another number
    unshifted = dk.hard_ce(dk.adapters.hf(out)["logits"], inputs["labels"])
    assert not torch.allclose(unshifted, out.loss, rtol=1e-4, atol=0)
    # the fused path reads the same call's hidden states and head: its cross-entropy part is the model's loss
    fused = dk.fused_linear_kd(s["hidden"][-1], s["lm_head"], s["hidden"][-1], s["lm_head"], labels=batch["labels"])
    torch.testing.assert_close(fused.ce, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.kd, torch.zeros(()), atol=1e-6, rtol=0)  # (the teacher is the student here)


def test_a_distillation_term_compares_exactly_the_positions_with_a_next_token():
    teacher, student = _gpt2(0), _gpt2(1)
    inputs = _batch(left=False)
    with torch.no_grad():
        t = dk.adapters.hf(teacher(**inputs), causal=True)
    s = dk.adapters.hf(student(**inputs), causal=True)
    batch = dk.adapters.causal(inputs)
    got = dk.make_step(dk.kd_kl.on("logits", mask="mask", temperature=2.0), compile=False)(s, t, batch).loss
    rows = []  # the formula: each sequence's positions 0 .. n-2 (each predicts a real next token)
    for b, n in enumerate([9, 6, 4]):
        ls = torch.log_softmax(s["logits"][b, : n - 1] / 2, -1)
        lt = torch.log_softmax(t["logits"][b, : n - 1] / 2, -1)
        rows.append(4 * (lt.exp() * (lt - ls)).sum(-1))
    torch.testing.assert_close(got, torch.cat(rows).mean(), rtol=1e-5, atol=1e-6)


def test_packed_sequences_drop_the_boundary():
    ids = torch.arange(10).view(1, 10)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])  # three documents packed in one row
    batch = dk.adapters.causal({"input_ids": ids, "position_ids": position_ids})
    # position i predicts token i + 1 unless token i + 1 starts a document (positions 3 and 6 here)
    assert batch["labels"].tolist() == [[1, 2, 3, -100, 5, 6, -100, 8, 9]]
    assert batch["mask"].tolist() == [[True, True, True, False, True, True, False, True, True]]


def test_errors():
    with pytest.raises(KeyError, match=r"adapters.causal: expected the batch to have 'labels' or 'input_ids'"):
        dk.adapters.causal({"attention_mask": torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"adapters\.causal: expected sequences of at least 2 tokens"):
        dk.adapters.causal({"input_ids": torch.zeros(2, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"adapters.causal: expected batch\['attention_mask'\] of shape \(2, 3\)"):
        dk.adapters.causal({"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)})
    with pytest.raises(ValueError, match=r"adapters.hf\(causal=True\): expected sequence outputs"):
        dk.adapters.hf({"logits": torch.zeros(3)}, causal=True)
