"""The keyed top-k teacher cache (dk.cache.write_topk / read_topk): examples stored by id without padding, read back
in any order, batch size and padding, aligned to the student's positions; coverage and size reported; compressed
log-probabilities within their error bounds; a versioned, validated format with an upgrader from batch caches; and a
student trained from the cache equal to one trained with the live teacher (a real Hugging Face causal LM)."""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

import distilkit as dk
from distilkit import cache as dkc

transformers = pytest.importorskip("transformers")

V, K, N = 97, 8, 11  # vocabulary, kept classes, examples


# --------------------------------------------------------------------------------------------- helpers
def gpt2(seed: int, layers: int):
    """A tiny GPT-2 from a config (no download), dropout off; initializer_range 0.3 gives peaked distributions."""
    config = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=layers, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


TEACHER = gpt2(0, 2)
GEN = torch.Generator().manual_seed(3)
SEQS = [torch.randint(1, V, (int(n),), generator=GEN) for n in torch.randint(3, 17, (N,), generator=GEN)]


def collate(ids, *, left: bool = False):
    """Pad ``SEQS[ids]`` (right, or left with HF position ids); ``ids`` as given (the example ids)."""
    length = max(len(SEQS[i]) for i in ids)
    x = torch.zeros(len(ids), length, dtype=torch.long)
    m = torch.zeros(len(ids), length, dtype=torch.long)
    for b, i in enumerate(ids):
        n = len(SEQS[i])
        cols = slice(length - n, length) if left else slice(0, n)
        x[b, cols], m[b, cols] = SEQS[i], 1
    batch = {"ids": torch.tensor(ids), "input_ids": x, "attention_mask": m}
    if left:
        batch["position_ids"] = (m.cumsum(-1) - 1).clamp_min(0)
    return batch


def batches(order, size: int, **kwargs):
    return [collate(order[i:i + size], **kwargs) for i in range(0, len(order), size)]


def permutation(seed: int) -> list[int]:
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed)).tolist()


def run_teacher(batch):
    with torch.no_grad():
        return TEACHER(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch.get("position_ids")).logits


def live_topk(logits, k: int = K, policy=None):
    """The live teacher's top-k, computed here from the dense logits (float64 log-softmax, leftover mass 1 − Σ_K p)."""
    lp = torch.log_softmax(logits.double(), -1)
    values, indices = lp.topk(k, -1)
    tail = torch.log1p(-values.exp().sum(-1))
    return dk.TopK(indices, values.float(), tail.float(), temperature=1.0, policy=policy)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A float32 cache of all examples, written from a shuffled loader of batch size 3 through teacher_fn."""
    path = tmp_path_factory.mktemp("keyed") / "c"
    info = dkc.write_topk(path, batches(permutation(5), 3), k=K, teacher_fn=run_teacher)
    return path, info


# --------------------------------------------------------------------------- the student, cache vs live
def train(teacher_for, order, size: int, loss, steps_lr: float = 1.0):
    """One epoch of SGD of a fresh 1-layer GPT-2 student on next-token KD (positions 0..L-2, whose next token is
    real); ``teacher_for(batch, L)`` gives ``(TopK [B, L, k], held [B, L])``."""
    student = gpt2(1, 1).train()
    opt = torch.optim.SGD(student.parameters(), lr=steps_lr)
    for batch in batches(order, size):
        length = batch["input_ids"].shape[1] - 1
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        topk, held = teacher_for(batch, length)
        mask = batch["attention_mask"][:, 1:].bool()
        assert held[mask].all()  # the cache holds every position the loss reads
        value = loss(logits, topk, mask=mask & held)
        opt.zero_grad()
        value.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in student.parameters()])


def from_cache(cache, policy, shift: int = 0):
    def teacher_for(batch, length):
        out = cache.teacher(batch["ids"], length, shift=shift, policy=policy)
        return out.topk, out.mask
    return teacher_for


def from_live(policy):
    def teacher_for(batch, length):
        logits = run_teacher(batch)[:, :length]
        return live_topk(logits, policy=policy), torch.ones(logits.shape[:2], dtype=torch.bool)
    return teacher_for


LOSSES = {"kd_kl/tail": (dk.kd_kl, "tail"), "jsd/renormalize": (dk.jsd, "renormalize")}


@pytest.mark.parametrize("case", LOSSES)
def test_a_student_trained_from_the_cache_equals_one_trained_with_the_live_teacher(written, case):
    loss, policy = LOSSES[case]
    cache = dkc.read_topk(written[0])
    order = permutation(9)  # another order than the write's, batch size 2 instead of 3: other padding
    assert order != permutation(5)
    live = train(from_live(policy), order, 2, loss)
    cached = train(from_cache(cache, policy), order, 2, loss)
    start = torch.cat([p.detach().flatten() for p in gpt2(1, 1).parameters()])
    assert (live - start).abs().max() > 1e-2  # the student did learn
    torch.testing.assert_close(cached, live, rtol=0, atol=1e-5)
    # the same with the teacher misaligned by one position is far off: the comparison can tell
    shifted = train(from_cache(cache, policy, shift=1), order, 2, loss)
    assert (shifted - live).abs().max() > 1e-3


@pytest.mark.parametrize(("dtype", "atol"), [("float16", 2e-3), ("int8", 1e-2)])
def test_a_student_trained_from_a_compressed_cache_stays_near_the_live_one(tmp_path, dtype, atol):
    dkc.write_topk(tmp_path, batches(permutation(5), 3), k=K, teacher_fn=run_teacher, dtype=dtype)
    order = permutation(9)
    live = train(from_live("tail"), order, 2, dk.kd_kl)
    cached = train(from_cache(dkc.read_topk(tmp_path), "tail"), order, 2, dk.kd_kl)
    assert 0 < (cached - live).abs().max() < atol  # rounded (not exact), and close


# ------------------------------------------------------------------------------------- alignment, keys
def test_rows_are_the_teacher_as_it_emits_them_for_any_order_padding_and_shift(written):
    cache = dkc.read_topk(written[0])
    ids = [7, 2, 10, 0]
    right = collate(ids)
    live = run_teacher(right)  # [B, L, V], row i predicts token i + 1
    length = live.shape[1]
    out = cache.teacher(ids, length)
    real = right["attention_mask"].bool()
    assert torch.equal(out.mask, real)  # exactly the real positions are held: padding was not stored
    want = live_topk(live)
    assert torch.equal(out.topk.indices[real], want.indices[real])
    torch.testing.assert_close(out.topk.logprobs[real], want.logprobs[real], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(out.topk.tail[real], want.tail[real], rtol=2e-6, atol=2e-6)
    assert out.topk.temperature == 1.0 and out.topk.indices.dtype == torch.int64

    # the causal shift: the student's logits[:, :-1] take length L - 1; shift=+1 reads the row one further
    assert torch.equal(cache.teacher(ids, length - 1).topk.indices, out.topk.indices[:, :-1])
    ahead = cache.teacher(ids, length - 1, shift=1)
    assert torch.equal(ahead.mask, real[:, 1:])
    assert torch.equal(ahead.topk.indices[ahead.mask], want.indices[:, 1:][real[:, 1:]])
    behind = cache.teacher(ids, positions=torch.arange(1, length + 1).expand(len(ids), -1), shift=-1)
    assert torch.equal(behind.mask, real) and torch.equal(behind.topk.indices, out.topk.indices)

    # left padding: positions from the attention mask; the same rows as the left-padded live teacher's
    left = collate(ids, left=True)
    held = left["attention_mask"].bool()
    positions = torch.where(held, left["position_ids"], -1)
    got = cache.teacher(ids, positions=positions)
    assert torch.equal(got.mask, held)
    assert torch.equal(got.topk.indices[held], out.topk.indices[real])
    want_left = live_topk(run_teacher(left))
    assert torch.equal(got.topk.indices[held], want_left.indices[held])
    torch.testing.assert_close(got.topk.logprobs[held], want_left.logprobs[held], rtol=0, atol=1e-5)

    # a longer window than the examples: the positions past their ends are not held
    wide = cache.teacher(ids, length + 3)
    assert torch.equal(wide.mask[:, :length], real) and not wide.mask[:, length:].any()
    # unheld positions hold a valid placeholder, so that the loss stays finite where they are masked out
    assert torch.equal(wide.topk.indices[~wide.mask], torch.arange(K).expand(int((~wide.mask).sum()), K))
    student = torch.randn(len(ids), length + 3, V)
    assert torch.isfinite(dk.kd_kl(student, wide.topk, mask=wide.mask))


def test_ids_in_any_order_and_single_examples(written):
    cache = dkc.read_topk(written[0])
    assert len(cache) == N and cache.keys() == list(range(N)) and 4 in cache and N not in cache
    positions, top = cache.get(4)
    assert torch.equal(positions, torch.arange(len(SEQS[4])))
    live = live_topk(run_teacher(collate([4])))
    assert torch.equal(top.indices, live.indices[0])
    one = cache.teacher(torch.tensor([4]), len(SEQS[4]))
    assert torch.equal(one.topk.indices[0], top.indices) and torch.equal(one.topk.logprobs[0], top.logprobs)
    both = cache.teacher([4, 4], 3)  # an id may repeat in a batch (oversampling)
    assert torch.equal(both.topk.indices[0], both.topk.indices[1])
    with pytest.raises(KeyError, match=r"example ids not in the cache at .*: \[11, 12\] \(2 of 3\)"):
        cache.teacher([4, 11, 12], 3)
    with pytest.raises(TypeError, match="expected int example ids"):
        cache.teacher(["4"], 3)
    with pytest.raises(ValueError, match=r"expected either length .* or positions"):
        cache.teacher([4], 3, positions=torch.zeros(1, 3, dtype=torch.long))


def test_string_keys_and_given_tuples(tmp_path):
    names = [f"doc-é-{i}" for i in range(N)]
    order = permutation(5)
    items = []
    for b in batches(order, 4):
        items.append(([names[i] for i in b["ids"].tolist()], run_teacher(b), b["attention_mask"]))
    info = dkc.write_topk(tmp_path, items, k=K)
    assert info["keys"] == "str" and info["examples"] == N
    cache = dkc.read_topk(tmp_path)
    assert cache.keys() == sorted(names, key=lambda s: s.encode()) and "doc-é-3" in cache and "doc-3" not in cache
    ids = [3, 9]
    got = cache.teacher([names[i] for i in ids], 16)
    assert torch.equal(got.mask, torch.stack([torch.arange(16) < len(SEQS[i]) for i in ids]))
    live = live_topk(run_teacher(collate(ids)))
    real = collate(ids)["attention_mask"].bool()
    assert torch.equal(got.topk.indices[:, :real.shape[1]][real], live.indices[real])
    with pytest.raises(KeyError, match="'doc-é-99'"):
        cache.teacher(["doc-é-99"], 2)


# ------------------------------------------------------------------------------------ size and coverage
def test_only_kept_positions_are_stored_and_bytes_are_their_arithmetic(written):
    path, info = written
    real = sum(len(s) for s in SEQS)
    padded = sum(b["input_ids"].numel() for b in batches(permutation(5), 3))  # what the teacher saw
    assert info["positions"] == real and info["positions_given"] == padded > real
    # per position: int32 position + k uint16 indices (V <= 65536) + k float32 log-probs + float32 tail
    assert info["per_position"] == {"positions": 4, "indices": 2 * K, "logprobs": 4 * K, "tail": 4}
    assert info["bytes_per_position"] == 4 + 6 * K + 4 and info["nbytes"] == real * (8 + 6 * K)
    on_disk = table = 0
    for name in os.listdir(path):
        if name.endswith(".npy"):
            array = np.load(path / name, mmap_mode="r")
            assert os.path.getsize(path / name) - array.offset == array.nbytes
            if name.startswith("table-"):
                table += array.nbytes
            else:
                on_disk += array.nbytes
    assert on_disk == info["nbytes"] and table == info["table_bytes"] == N * 8 + N * 3 * 8
    for dtype, extra in (("float16", 2 * K), ("int8", K + 8)):
        small = dkc.write_topk(path.parent / dtype, batches(permutation(5), 3), k=K, teacher_fn=run_teacher,
                               dtype=dtype)
        assert small["bytes_per_position"] == 4 + 2 * K + extra + 4


def test_coverage_is_the_kept_mass_of_the_stored_positions(written):
    _, info = written
    mass = []
    for i in range(N):
        p = torch.softmax(run_teacher(collate([i]))[0].double(), -1)
        mass.append(p.topk(K, -1).values.sum(-1))
    mass = torch.cat(mass).numpy()
    assert mass.size == info["positions"]
    c = info["coverage"]
    assert math.isclose(c["mean"], mass.mean(), abs_tol=1e-6)
    assert math.isclose(c["min"], mass.min(), abs_tol=1e-6) and math.isclose(c["max"], mass.max(), abs_tol=1e-6)
    for p in (5, 25, 50, 75, 95):
        assert abs(c[f"p{p}"] - np.quantile(mass, p / 100, method="inverted_cdf")) <= 1e-4, p
    assert 0.2 < c["mean"] < 0.9  # a top-8 of 97 that neither keeps everything nor nothing: the policies differ
    assert json.loads(json.dumps(dkc.info(written[0]))) == info  # JSON-ready, and what the writer returned
    text = dkc.format_info(dkc.info(written[0]))
    assert f"mean {100 * mass.mean():.2f} %" in text and f"p50 {100 * c['p50']:.2f} %" in text
    assert f"{info['positions']} stored; " in text and f"bytes/position  {4 + 6 * K + 4:.1f}" in text


def test_info_of_a_batch_cache(tmp_path):
    loader = batches(list(range(N)), 4)
    written = dkc.write(lambda b: {"logits": run_teacher(b)}, loader, tmp_path, logits=("topk", K))
    got = dkc.info(tmp_path)
    assert got["kind"] == "batches" and got["version"] == 2 and got["batches"] == 3 and got["k"] == K
    assert got["tokens"] == written.tokens == sum(b["input_ids"].numel() for b in loader)
    assert got["bytes_per_token"] == K * (4 + 2) + 4
    json.dumps(got)
    text = dkc.format_info(got)
    assert "batch-position cache" in text and f"top-k, k = {K}" in text and f"{got['tokens']} (padding" in text


# ---------------------------------------------------------------------------------------- compression
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_compressed_logprobs_are_within_their_error_bound_of_the_dense_teacher(tmp_path, dtype):
    info = dkc.write_topk(tmp_path, batches(permutation(5), 3), k=K, teacher_fn=run_teacher, dtype=dtype)
    assert info["logprobs"] == dtype
    cache = dkc.read_topk(tmp_path)
    ids = list(range(N))
    b = collate(ids)
    real = b["attention_mask"].bool()
    dense = torch.log_softmax(run_teacher(b).double(), -1)[real]  # [n, V] the dense teacher
    got = cache.teacher(ids, real.shape[1], policy="tail")
    indices, logprobs = got.topk.indices[real], got.topk.logprobs[real].double()
    assert torch.equal(indices.sort(-1).values, dense.topk(K, -1).indices.sort(-1).values)
    exact = dense.gather(-1, indices)
    error = (logprobs - exact).abs()
    if dtype == "float16":  # rounding to 11 significant bits: |δ| <= 2⁻¹¹ |x| (+ float32 slack)
        assert (error <= 2.0**-11 * exact.abs() + 1e-6).all()
        assert (error > 1e-7).any()  # rounded indeed
    else:  # 255 levels between the row's max and min: |δ| <= (max − min) / 508; the max exact
        span = exact.max(-1).values - exact.min(-1).values
        assert (error <= span[:, None] / 508 + 1e-5).all()
        assert (error[torch.arange(len(exact)), exact.argmax(-1)] <= 2e-6).all()
        assert (error > 1e-3).any()
    # the loss against the compressed teacher: a perturbation of every log p by at most ε moves the bucketed
    # KL(p‖q) per row by at most (e^{2ε} − 1) Σ_b p_b |log p_b − log q_b| + 2ε (renormalisation doubles ε)
    student = torch.randn(real.shape[0], real.shape[1], V, generator=torch.Generator().manual_seed(4)).double()
    live = live_topk(run_teacher(b), policy="tail")
    rows_cached = dk.kd_kl(student.float(), got.topk, mask=real, reduction="none")[real].double()
    rows_live = dk.kd_kl(student.float(), live, mask=real, reduction="none")[real].double()
    ls = torch.log_softmax(student[real], -1)
    q = torch.cat([ls.gather(-1, indices), ls.scatter(-1, indices, -math.inf).logsumexp(-1, keepdim=True)], -1)
    lp = torch.cat([exact, live.tail[real].double()[:, None]], -1)
    eps = error.max(-1).values
    bound = (torch.expm1(2 * eps) * (lp.exp() * (lp - q).abs()).sum(-1) + 2 * eps)
    assert ((rows_cached - rows_live).abs() <= bound + 1e-5).all()


def test_a_top_k_teacher_as_input_with_more_classes_keeps_the_best_k(tmp_path):
    loader = batches(permutation(5), 3)
    from_logits = dkc.write_topk(tmp_path / "a", [(b["ids"], run_teacher(b), b["attention_mask"]) for b in loader],
                                 k=4)
    wider = [(b["ids"], live_topk(run_teacher(b), k=12), b["attention_mask"]) for b in loader]  # unsorted is fine too
    from_topk = dkc.write_topk(tmp_path / "b", wider, k=4, vocab=V)
    assert from_topk["positions"] == from_logits["positions"]
    a, c = dkc.read_topk(tmp_path / "a"), dkc.read_topk(tmp_path / "b")
    ids = permutation(2)
    x, y = a.teacher(ids, 16), c.teacher(ids, 16)
    assert torch.equal(x.mask, y.mask) and torch.equal(x.topk.indices, y.topk.indices)
    torch.testing.assert_close(y.topk.logprobs, x.topk.logprobs, rtol=0, atol=2e-6)
    torch.testing.assert_close(y.topk.tail, x.topk.tail, rtol=0, atol=2e-6)  # the other 8 moved into the tail
    with pytest.raises(ValueError, match="does not tell the vocabulary size: pass vocab=V"):
        dkc.write_topk(tmp_path / "c", wider, k=4)
    with pytest.raises(ValueError, match="expected at least k = 16 classes per row in the top-k teacher, got 12"):
        dkc.write_topk(tmp_path / "c", wider, k=16, vocab=V)


# ------------------------------------------------------------------------------- versions and upgrades
def test_a_batch_cache_is_upgraded_to_a_keyed_one(tmp_path):
    order = permutation(5)
    loader = batches(order, 3)
    dkc.write(lambda b: {"logits": run_teacher(b)}, loader, tmp_path / "v2", logits=("topk", K), dtype="float32")
    with pytest.raises(dkc.CacheError, match=r"is the index of a batch-position cache \(dk.cache.write, format "
                                             r"version 2\).*dk.cache.upgrade\(path, new_path, keys\)"):
        dkc.read_topk(tmp_path / "v2")
    keys = [(b["ids"], b["attention_mask"]) for b in loader]
    dkc.upgrade(tmp_path / "v2", tmp_path / "keyed", keys)
    direct = dkc.write_topk(tmp_path / "direct", loader, k=K, teacher_fn=run_teacher)
    upgraded, written = dkc.read_topk(tmp_path / "keyed"), dkc.read_topk(tmp_path / "direct")
    assert upgraded.info["positions"] == direct["positions"] and upgraded.info["coverage"] == direct["coverage"]
    ids = permutation(1)
    x, y = upgraded.teacher(ids, 16), written.teacher(ids, 16)
    for name in ("indices", "logprobs", "tail"):
        assert torch.equal(getattr(x.topk, name), getattr(y.topk, name)), name
    # in place, atomically, to a smaller k: the classes beyond it join the tail
    dkc.upgrade(tmp_path / "v2", tmp_path / "v2", keys, k=3, overwrite=True)
    small = dkc.read_topk(tmp_path / "v2").teacher(ids, 16)
    assert torch.equal(small.topk.indices, x.topk.indices[..., :3])
    mass = x.topk.logprobs[..., 3:].exp().sum(-1) + x.topk.tail.exp()
    torch.testing.assert_close(small.topk.tail[x.mask], mass[x.mask].log(), rtol=0, atol=1e-6)
    assert not [n for n in os.listdir(tmp_path / "v2") if n.startswith("shard-") and "logits" in n]
    # a dense batch cache needs k; a wrong number of key entries is refused
    dkc.write(lambda b: {"logits": run_teacher(b)}, loader, tmp_path / "dense", dtype="float32")
    with pytest.raises(ValueError, match="expected k for a dense cache"):
        dkc.upgrade(tmp_path / "dense", tmp_path / "d2", keys)
    dkc.upgrade(tmp_path / "dense", tmp_path / "d2", keys, k=K)
    assert torch.equal(dkc.read_topk(tmp_path / "d2").teacher(ids, 16).topk.logprobs, y.topk.logprobs)
    with pytest.raises(ValueError, match="expected an entry of keys for each of the 4 batches of the cache, got 3"):
        dkc.upgrade(tmp_path / "dense", tmp_path / "d3", keys[:3], k=K)
    with pytest.raises(ValueError, match="expected an entry of keys for each of the 4 batches of the cache, got more"):
        dkc.upgrade(tmp_path / "dense", tmp_path / "d3", [*keys, keys[0]], k=K)


def test_a_keyed_cache_is_not_read_as_a_batch_cache_and_versions_are_checked(written, tmp_path):
    with pytest.raises(dkc.CacheError, match=r"is the index of a keyed top-k cache .*open it with "
                                             r"dk.cache.read_topk"):
        dkc.read(written[0])
    index = json.loads((written[0] / "index.json").read_text())
    for version, message in ((2, r"got version 2 .*: it was written by a newer distilkit; upgrade distilkit to read "
                                 r"it\. Or rewrite the cache with dk.cache.write_topk\(path, items, k=\.\.\., "
                                 r"overwrite=True\)"),
                             ("1", r"got version '1' in .*\. Or rewrite the cache with dk.cache.write_topk")):
        (tmp_path / "index.json").write_text(json.dumps({**index, "version": version}))
        with pytest.raises(dkc.CacheError, match=message):
            dkc.read_topk(tmp_path)


# ------------------------------------------------------------------------------------ index and tables
def _set(obj, keys, value):
    for key in keys[:-1]:
        obj = obj[key]
    obj[keys[-1]] = value


EDITS = {
    "k beyond the vocabulary": (["k"], V + 1, rf"k: expected the kept classes, an int in \[1, {V}\] \(vocab is {V}\)"),
    "indices dtype": (["indices"], "int32", r"indices: expected 'uint16' \(the indices' dtype for a vocabulary of "
                                            r"97\)"),
    "encoding": (["logprobs"], "bfloat16", r"logprobs: expected 'float32' or 'float16' or 'int8', got 'bfloat16'"),
    "file name": (["shards", 0, "files", "tail", "file"], "../x.npy",
                  r"shards\[0\]\.files\.tail\.file: expected 'shard-00000-[0-9a-f]{16}-tail\.npy'"),
    "rows": (["shards", 0, "rows"], 3, r"shards\[0\]\.files\.positions\.size: expected \d+ \(3 rows\)"),
    "coverage order": (["coverage", "p5"], 0.999, r"coverage: expected min <= p5 <= \.\.\. <= p95 <= max"),
    "coverage range": (["coverage", "mean"], 1.5, r"coverage\.mean: expected a number in \[0, 1\], got 1\.5"),
    "positions given": (["positions_given"], 1, r"positions_given: expected an int >= \d+ \(the positions stored\)"),
    "table size": (["table", "keys", "size"], N + 1, rf"table\.keys\.size: expected {N} \(the examples\)"),
    "table sha": (["table", "rows", "sha256"], "x", r"table\.rows\.sha256: expected a SHA-256 in hexadecimal"),
    "unknown field": (["extra"], 1, r"the top level: expected only the fields format, .*, got the unknown field"),
    "edited value": (["coverage", "mean"], 0.5, r"digest: expected the SHA-256 of the other fields, got another one"),
}


def _copy(written, path):
    """Copy the cache files (arrays and index) from ``written`` into the new folder ``path``; return its index."""
    path.mkdir()
    for name in os.listdir(written):
        if name.endswith((".npy", ".json")):
            (path / name).write_bytes((written / name).read_bytes())
    return json.loads((path / "index.json").read_text())


@pytest.mark.parametrize("edit", EDITS)
def test_every_keyed_index_field_is_checked(written, tmp_path, edit):
    keys, value, message = EDITS[edit]
    path = tmp_path / "c"
    index = _copy(written[0], path)
    _set(index, keys, value)
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(dkc.CacheError, match=message):
        dkc.read_topk(path)


def _copy_with_table(written, path, edit):
    """A copy of the cache whose table ``rows`` (or ``keys``) array was edited, its SHA-256 and digest updated."""
    index = _copy(written, path)
    name, change = edit
    entry = index["table"][name]
    array = np.load(path / entry["file"])
    change(array)
    np.save(path / entry["file"], array)
    entry["sha256"] = __import__("hashlib").sha256(array.data).hexdigest()
    index["digest"] = dkc._digest(index)
    (path / "index.json").write_text(json.dumps(index))


def _swap(a, i, j):
    a[[i, j]] = a[[j, i]]


@pytest.mark.parametrize(("edit", "message"), [
    (("keys", lambda a: _swap(a, 0, 1)), "expected example ids sorted and unique"),
    (("keys", lambda a: a.__setitem__(1, a[0])), "expected example ids sorted and unique"),
    (("rows", lambda a: a.__setitem__(2, a[2] + 1)), "consecutive runs"),  # example 0 one row longer
    (("rows", lambda a: a.__setitem__(0, 5)), "shard numbers in range"),
])
def test_the_example_table_is_checked(written, tmp_path, edit, message):
    _copy_with_table(written[0], tmp_path / "c", edit)
    with pytest.raises(dkc.CacheError, match=message):
        dkc.read_topk(tmp_path / "c")


def test_damaged_table_or_shard_data_is_caught(written, tmp_path):
    path = tmp_path / "c"
    index = _copy(written[0], path)
    table = path / index["table"]["keys"]["file"]
    data = bytearray(table.read_bytes())
    data[-1] ^= 1
    table.write_bytes(bytes(data))
    with pytest.raises(dkc.CacheError, match=r"corrupt table file .*does not have the SHA-256 the index records"):
        dkc.read_topk(path)
    table.write_bytes((written[0] / table.name).read_bytes())
    shard = path / index["shards"][0]["files"]["positions"]["file"]
    positions = np.load(shard)
    positions[:] = 0  # no longer increasing within an example
    np.save(shard, positions)
    cache = dkc.read_topk(path)
    with pytest.raises(dkc.CacheError, match="the positions of an example do not increase"):
        cache.teacher([0], 3)


# --------------------------------------------------------------------------------- writing: the errors
def test_write_errors(tmp_path):
    b = collate([0, 1])
    logits = run_teacher(b)
    with pytest.raises(ValueError, match=r"expected each example id once, got 1 in batch 0 and again in batch 1"):
        dkc.write_topk(tmp_path, [([0, 1], logits), ([1, 2], logits)], k=K)
    with pytest.raises(ValueError, match="expected one example id per sequence, 2 for batch 0, got 3"):
        dkc.write_topk(tmp_path, [([0, 1, 2], logits)], k=K)
    with pytest.raises(TypeError, match=r"expected every example id to be an int like the first ones, got 'a'"):
        dkc.write_topk(tmp_path, [([0, "a"], logits)], k=K)
    with pytest.raises(TypeError, match=r"expected each example id to be an int .* or a str, got float"):
        dkc.write_topk(tmp_path, [([0.0, 1.0], logits)], k=K)
    with pytest.raises(ValueError, match=r"expected the teacher logits of batch 0 to be a floating-point tensor "
                                         r"\[B, L, V\]"):
        dkc.write_topk(tmp_path, [([0, 1], logits[:, 0])], k=K)
    with pytest.raises(ValueError, match=r"expected the keep mask of batch 0 to have the shape \[2, \d+\]"):
        dkc.write_topk(tmp_path, [([0, 1], logits, b["attention_mask"][:, 1:])], k=K)
    backwards = torch.arange(logits.shape[1]).flip(0).expand(2, -1)
    with pytest.raises(ValueError, match="expected the kept positions of each sequence of batch 0 to increase"):
        dkc.write_topk(tmp_path, [([0, 1], logits, None, backwards)], k=K)
    with pytest.raises(ValueError, match=f"expected at least k = {V + 1} classes"):
        dkc.write_topk(tmp_path, [([0, 1], logits)], k=V + 1)
    with pytest.raises(ValueError, match="expected at least one example, got no batch"):
        dkc.write_topk(tmp_path, iter([]), k=K)
    with pytest.raises(ValueError, match="hold NaN"):
        dkc.write_topk(tmp_path, [([0, 1], torch.full_like(logits, math.nan))], k=K)
    with pytest.raises(ValueError, match="expected dtype 'float32', 'float16' or 'int8'"):
        dkc.write_topk(tmp_path, [([0, 1], logits)], k=K, dtype="int4")
    with pytest.raises(KeyError, match="expected key 'ids' in batch 0"):
        dkc.write_topk(tmp_path, [{"input_ids": b["input_ids"]}], k=K, teacher_fn=run_teacher)
    assert not (tmp_path / "index.json").exists()  # nothing was written by any of them
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".npy")]
    # not padding but a chosen subset of positions (e.g. the completion only) is stored and read back as such
    keep = b["attention_mask"].clone()
    keep[:, :2] = 0
    dkc.write_topk(tmp_path, [([0, 1], logits, keep)], k=K)
    got = dkc.read_topk(tmp_path).teacher([1, 0], logits.shape[1])
    assert torch.equal(got.mask, keep.bool().flip(0))


# ------------------------------------------------------------------------------ one writer, overwrites
def test_readers_notice_an_overwrite_and_writers_lock(written, tmp_path):
    loader = batches(permutation(5), 3)
    dkc.write_topk(tmp_path, loader, k=K, teacher_fn=run_teacher)
    cache = dkc.read_topk(tmp_path)
    clone = pickle.loads(pickle.dumps(cache))  # into a loader worker: reopened, the same cache
    assert torch.equal(clone.teacher([1, 2], 4).topk.indices, cache.teacher([1, 2], 4).topk.indices)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        dkc.write_topk(tmp_path, loader, k=K, teacher_fn=run_teacher)
    refused = []

    def nested(batch):
        if not refused:
            with pytest.raises(dkc.CacheLockedError) as error:
                dkc.write_topk(tmp_path, loader, k=K, teacher_fn=run_teacher, overwrite=True)
            refused.append(error.value)
        return run_teacher(batch)

    dkc.write_topk(tmp_path, loader, k=4, teacher_fn=nested, overwrite=True)
    assert refused and "holds its lock" in str(refused[0])
    for reader in (cache, clone):
        with pytest.raises(dkc.CacheChangedError, match=r"Reopen it with dk\.cache\.read_topk"):
            reader.teacher([1], 4)
    with pytest.raises(dkc.CacheChangedError, match="to be the one pickled"):
        pickle.loads(pickle.dumps(clone))
    assert dkc.read_topk(tmp_path).k == 4
    files = [n for n in os.listdir(tmp_path) if n.endswith(".npy")]
    generation = dkc.read_topk(tmp_path).info["generation"]
    assert files and all(generation in n for n in files)  # the replaced cache's files were removed


def test_the_formats_replace_each_other_whole(tmp_path):
    loader = batches(permutation(5), 3)
    dkc.write_topk(tmp_path, loader, k=K, teacher_fn=run_teacher)
    stale = tmp_path / "table-0123456789abcdef-keys.npy"  # an interrupted write's table
    np.save(stale, np.arange(3))
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    dkc.write(lambda b: {"logits": run_teacher(b)}, loader, tmp_path, logits=("topk", K), overwrite=True)
    assert not stale.exists() and other.read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("table-")]  # the keyed cache's files are gone
    assert len(dkc.read(tmp_path)) == len(loader)
    with pytest.raises(dkc.CacheError, match="batch-position cache"):
        dkc.read_topk(tmp_path)
    dkc.write_topk(tmp_path, loader, k=K, teacher_fn=run_teacher, overwrite=True)
    assert not [n for n in os.listdir(tmp_path) if "logits" in n]
    assert dkc.info(tmp_path)["kind"] == "keyed-topk"


def test_examples_spread_over_many_shards_read_the_same(written, tmp_path):
    info = dkc.write_topk(tmp_path, batches(permutation(5), 3), k=K, teacher_fn=run_teacher, shard_bytes=1)
    assert info["shards"] == 4  # one per batch: a batch is never split
    one, many = dkc.read_topk(written[0]), dkc.read_topk(tmp_path, open_shards=1)
    assert "4" not in one and 4 in one
    for ids in (permutation(1), [10, 0, 10], [3]):
        x, y = one.teacher(ids, 17), many.teacher(ids, 17)
        assert torch.equal(x.mask, y.mask)
        for name in ("indices", "logprobs", "tail"):
            assert torch.equal(getattr(x.topk, name), getattr(y.topk, name)), name
