"""``distilkit demo lm`` and ``distilkit.demo_lm``: the real-text LLM recipe.

The recipe's claims are checked against references written here from the formulas: the five variants' losses
(dense and fused are one objective; the top-k cache with k = V is the dense teacher), the shift (position i predicts
token i + 1), the on-policy batch (the KD mask on the generated tokens only, no labels), perplexity, the data split
and the batch order. The quick run exercises every path end to end through the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import distilkit as dk
from distilkit import cli, demo_lm

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

R = dataclasses.replace(demo_lm.Recipe().quick(), vocab_size=40, seq_len=12, prompt_len=4)


def _models(seed=0):
    torch.manual_seed(seed)
    teacher = demo_lm.gpt2(R.vocab_size, 2, 16, 2, R.seq_len).eval()
    student = demo_lm.gpt2(R.vocab_size, 1, 8, 2, R.seq_len).eval()  # eval: no dropout, so calls are comparable
    return teacher, student


def _reference(student_logits, teacher_logits, tokens, w, temperature=1.0):
    """w · T² · KL(p_T ‖ p_S) + (1 − w) · CE over every next-token position, from the definitions."""
    s = student_logits[:, :-1].double().flatten(0, 1)
    t = teacher_logits[:, :-1].double().flatten(0, 1)
    p_t = torch.softmax(t / temperature, -1)
    kl = (p_t * (torch.log_softmax(t / temperature, -1) - torch.log_softmax(s / temperature, -1))).sum(-1).mean()
    ce = F.cross_entropy(s, tokens[:, 1:].flatten())
    return w * temperature**2 * kl + (1 - w) * ce


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_and_fused_are_the_documented_objective(temperature):
    r = dataclasses.replace(R, temperature=temperature, kd_weight=0.3)
    teacher, student = _models()
    tokens = torch.randint(0, R.vocab_size, (3, R.seq_len))
    batch = dk.adapters.causal({"input_ids": tokens})
    losses = {}
    for variant in ("kd", "fused"):
        dense = variant == "kd"  # the fused term gets the models run without their heads: no logits at all
        with torch.no_grad():
            t = demo_lm.outputs(teacher, tokens, logits=dense)
        student.zero_grad()
        s = demo_lm.outputs(student, tokens, logits=dense)
        assert ("logits" in s) == dense and s["hidden"][-1].shape == (3, R.seq_len - 1, 8)
        loss = dk.make_step(demo_lm.specs(r)[variant], compile=False)(s, t, batch).loss
        loss.backward()
        losses[variant] = (loss.detach(), student.transformer.h[0].mlp.c_fc.weight.grad.clone())
    with torch.no_grad():
        expected = _reference(student(input_ids=tokens).logits, teacher(input_ids=tokens).logits, tokens, 0.3,
                              temperature)
    for variant, (loss, _) in losses.items():
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6, msg=variant)
    torch.testing.assert_close(losses["fused"][1], losses["kd"][1], rtol=1e-4, atol=1e-7)

    labels_only = dk.make_step(demo_lm.specs(r)["labels"], compile=False)(demo_lm.outputs(student, tokens), {}, batch)
    with torch.no_grad():
        unshifted = F.cross_entropy(student(input_ids=tokens).logits.flatten(0, 1).double(), tokens.flatten())
    torch.testing.assert_close(labels_only.loss.double(), _reference(
        student(input_ids=tokens).logits, teacher(input_ids=tokens).logits, tokens, 0.0).detach())
    assert not torch.isclose(labels_only.loss.double(), unshifted, rtol=1e-3)  # the shift matters


def test_topk_cache_with_every_class_is_the_dense_teacher(tmp_path):
    teacher, student = _models()
    train = torch.randint(0, R.vocab_size, (10, R.seq_len))
    r = dataclasses.replace(R, top_k=R.vocab_size)
    info = demo_lm.write_cache(r, teacher, train, tmp_path / "c")
    assert info["positions"] == train.numel()
    cache = dk.cache.read_topk(tmp_path / "c")
    ids = torch.tensor([7, 2, 5])
    tokens = train[ids]
    c = cache.teacher(ids, R.seq_len - 1)
    assert bool(c.mask.all())
    batch = dk.adapters.causal({"input_ids": tokens})
    s = demo_lm.outputs(student, tokens)
    loss = dk.make_step(demo_lm.specs(r)["topk"], compile=False)(s, {"logits": c.topk}, batch).loss
    with torch.no_grad():
        expected = _reference(student(input_ids=tokens).logits, teacher(input_ids=tokens).logits, tokens,
                              r.kd_weight)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-3, atol=1e-4)  # float16 log-probabilities


def test_generated_batch_distils_the_continuation_only():
    _, student = _models()
    tokens = torch.randint(0, R.vocab_size, (3, R.seq_len))
    ids, batch = demo_lm._generated(R, student, tokens)
    assert ids.shape == tokens.shape
    assert torch.equal(ids[:, : R.prompt_len], tokens[:, : R.prompt_len])
    assert bool((batch["labels"] == -100).all())  # no cross-entropy on the student's own samples
    mask = batch["mask"]
    assert mask.shape == (3, R.seq_len - 1)
    # logits at i predict token i + 1: positions prompt_len - 1 .. L - 2 predict the generated tokens
    assert not mask[:, : R.prompt_len - 1].any() and bool(mask[:, R.prompt_len - 1:].all())
    assert student.training  # generation switches to eval and back

    step = dk.make_step(demo_lm.specs(R)["on_policy"], compile=False)
    teacher, _ = _models(1)
    with torch.no_grad():
        t = demo_lm.outputs(teacher, ids)
    out = step(demo_lm.outputs(student.eval(), ids), t, batch)
    with torch.no_grad():
        s_l, t_l = student(input_ids=ids).logits[:, :-1].double(), teacher(input_ids=ids).logits[:, :-1].double()
        kl = (torch.softmax(t_l, -1) * (torch.log_softmax(t_l, -1) - torch.log_softmax(s_l, -1))).sum(-1)
        expected = R.kd_weight * kl[:, R.prompt_len - 1:].mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    _, student = _models()
    with torch.no_grad():
        for p in student.parameters():
            p.zero_()  # zero embeddings and head: every logit 0
    data = torch.randint(0, R.vocab_size, (5, R.seq_len))
    assert math.isclose(demo_lm.perplexity(student, data, batch=2), R.vocab_size, rel_tol=1e-5)


def test_data_split_tokenizer_and_windows():
    docs = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 1) for i in range(25)]
    train, held = demo_lm.split(docs, 10)
    assert held == [docs[0], docs[10], docs[20]] and len(train) == 22 and not set(train) & set(held)
    assert demo_lm.split(docs, 10, chars=200)[0] == docs[1:3]  # the first documents until ~200 chars are in
    tok = demo_lm.train_tokenizer(train, 300)
    assert tok.get_vocab_size() <= 300 and tok.token_to_id(demo_lm.EOS) == 0
    text = "The lazy fox: ünïcode too."
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: every text round-trips
    w = demo_lm.windows(tok, train[:3], 8)
    stream = [t for d in train[:3] for t in (*tok.encode(d).ids, 0)]
    assert w.shape == (len(stream) // 8, 8) and w.flatten().tolist() == stream[: w.numel()]
    real = demo_lm.documents()
    assert len(real) > 1000 and sum(map(len, real)) > 500_000  # Python's help topics and stdlib docstrings


def test_batches_are_a_fresh_permutation_each_epoch():
    ids = demo_lm._batches(10, 4, seed=3)
    seen = torch.cat([ids(i) for i in range(5)])  # 20 ids: two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(demo_lm._batches(10, 4, seed=3)(2), ids(2))  # reproducible; any step in any order
    assert not torch.equal(demo_lm._batches(10, 4, seed=4)(0), ids(0))


def test_run_refuses_bad_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match=r"demo_lm\.run: expected out to be a new or empty directory"):
        demo_lm.run(tmp_path / "full", quick=True)
    with pytest.raises(ValueError, match=r"demo_lm\.run: expected seeds to be an int >= 1"):
        demo_lm.run(tmp_path / "a", seeds=0)
    with pytest.raises(ValueError, match=r"demo_lm\.run: expected variants from"):
        demo_lm.run(tmp_path / "b", variants=["kd", "dense"])
    with pytest.raises(ValueError, match=r"demo_lm\.specs: expected kd_weight in \(0, 1\], got 0\.0"):
        demo_lm.specs(dataclasses.replace(R, kd_weight=0.0))
    with pytest.raises(ValueError, match=r"demo_lm\.train_student: expected variant in"):
        demo_lm.train_student(R, "ce", torch.zeros(2, R.seq_len, dtype=torch.long), torch.zeros(1, R.seq_len,
                              dtype=torch.long))


@pytest.mark.slow
def test_demo_lm_quick_from_the_command_line(capsys, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    status = cli.main(["demo", "lm", "--quick", "--seeds", "2", "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert status == 0, out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("-quick")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["students"]) == set(demo_lm.VARIANTS) and summary["quick"] and summary["seeds"] == [0, 1]
    for variant, entry in summary["students"].items():
        assert len(entry["perplexity"]) == 2 and all(math.isfinite(p) and p > 1 for p in entry["perplexity"])
        assert all(v > 0 for v in entry["tokens_per_s"]), variant
        assert summary["curves"][variant]["steps"][-1] == summary["recipe"]["steps"]
    # dense and fused KD are one objective: the same students, to float error
    for a, b in zip(summary["students"]["kd"]["perplexity"], summary["students"]["fused"]["perplexity"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-3)
    assert summary["cache"]["positions"] == summary["tokens"]["train"]
    assert all(n > 0 for n in summary["students"]["on_policy"]["generated_batches"])  # the on-policy path ran
    assert not any(n for v, e in summary["students"].items() if v != "on_policy" for n in e["generated_batches"])
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert (run_dir / "teacher").is_dir() and (run_dir / "seed1" / "on_policy").is_dir()
    assert "WARNING: --quick" in out and "KD, fused head" in out and "on-policy KD (GKD)" in out
    assert "2 seeds (mean ± std)." in out
    assert "; 1 seed." in demo_lm.table({**summary, "seeds": [0]})
