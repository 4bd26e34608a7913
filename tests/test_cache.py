"""Teacher caching: a cached run gives the live teacher's losses; bytes per token; order; features; errors."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import distilkit as dk
from distilkit import cache as dkc
from distilkit.algebra import SpecKeyError
from distilkit.algebra._loss import Loss
from distilkit.losses._sparse import sparse_jsd, sparse_kd_kl

DIN, D, V, LAYERS = 5, 6, 11, 4


class Teacher:
    """A small deterministic model: 4 tanh layers and a vocabulary head (logits up to about ±10)."""

    def __init__(self, seed: int = 0, vocab: int = V):
        gen = torch.Generator().manual_seed(seed)
        self.layers = [torch.randn(DIN if i == 0 else D, D, generator=gen) for i in range(LAYERS)]
        self.head = torch.randn(D, vocab, generator=gen) * 2
        self.pool = torch.randn(D, 3, generator=gen)

    def __call__(self, batch):
        h, hidden = batch["x"], []
        for w in self.layers:
            h = torch.tanh(h @ w)
            hidden.append(h)
        return {"logits": h @ self.head, "hidden": hidden, "pooled": h[:, 0] @ self.pool}


def loader(lengths=(4, 4, 6, 6), sizes=(2, 2, 2, 1), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for n, b in zip(lengths, sizes, strict=True):
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[0, n - 1:] = False  # some padding
        batches.append({"x": torch.randn(b, n, DIN, generator=gen), "attention_mask": mask})
    return batches


def student_logits(batch, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*batch["x"].shape[:2], V, generator=gen) * 2


# ---------------------------------------------------------------------------------------------- dense
def test_dense_float32_cache_is_exact_and_in_loader_order(tmp_path):
    teacher, batches = Teacher(), loader()
    info = dkc.write(teacher, batches, tmp_path / "c", dtype="float32", features={"hidden": [1, 3]})
    cache = dkc.read(tmp_path / "c")
    assert len(cache) == info.batches == len(batches)
    assert (info.logits, info.k, info.vocab, info.dtype) == ("dense", None, V, "float32")
    for i, (batch, cached) in enumerate(zip(batches, cache, strict=True)):
        live = teacher(batch)
        assert torch.equal(cached["logits"], live["logits"]), i  # the right batch, bit for bit
        assert torch.equal(cached["hidden"][3], live["hidden"][3])
        s, m = student_logits(batch), batch["attention_mask"]
        assert torch.equal(dk.losses.kd_kl(s, cached["logits"], temperature=2.0, mask=m),
                           dk.losses.kd_kl(s, live["logits"], temperature=2.0, mask=m))
    assert torch.equal(cache[-1]["logits"], teacher(batches[-1])["logits"])
    pairs = zip(cache[1:3], batches[1:3], strict=True)
    assert [torch.equal(c["logits"], teacher(b)["logits"]) for c, b in pairs] == [True, True]
    with pytest.raises(IndexError):
        cache[len(batches)]


def test_dense_float16_cache_is_within_its_rounding_bound(tmp_path):
    """fp16 rounds each logit by |δ| ≤ 2⁻¹¹|z| =: ε, so teacher probabilities move by a factor in [e^{−2ε}, e^{2ε}]
    and kd_ce (T = 1) by at most (e^{2ε} − 1) · max |log q| per row."""
    teacher, batches = Teacher(), loader()
    dkc.write(teacher, batches, tmp_path, dtype="float16")
    cache = dkc.read(tmp_path)
    differs = False
    for batch, cached in zip(batches, cache, strict=True):
        assert cached["logits"].dtype == torch.float16
        z = teacher(batch)["logits"]
        s = student_logits(batch)
        eps = 2.0**-11 * z.abs().amax(-1)
        bound = (torch.exp(2 * eps) - 1) * (-s.log_softmax(-1)).amax(-1)
        got = dk.losses.kd_ce(s, cached["logits"], reduction="none")
        want = dk.losses.kd_ce(s, z, reduction="none")
        assert ((got - want).abs() <= bound + 1e-6).all()
        differs |= not torch.equal(got, want)
    assert differs  # the cache really is float16


# ---------------------------------------------------------------------------------------------- top-k
def test_topk_with_k_equal_to_v_gives_the_dense_losses(tmp_path):
    teacher, batches = Teacher(), loader()
    dkc.write(teacher, batches, tmp_path, logits=("topk", V), dtype="float32", temperature=2.0)
    cache = dkc.read(tmp_path)
    for batch, cached in zip(batches, cache, strict=True):
        assert cached["logits"]["temperature"] == 2.0
        s, z, m = student_logits(batch), teacher(batch)["logits"], batch["attention_mask"]
        for policy in ("renormalize", "tail"):
            torch.testing.assert_close(sparse_kd_kl(s, cached["logits"], temperature=2.0, mask=m, policy=policy),
                                       dk.losses.kd_kl(s, z, temperature=2.0, mask=m), rtol=1e-5, atol=1e-6)
        # renormalize re-tempers: any temperature
        torch.testing.assert_close(sparse_jsd(s, cached["logits"], temperature=0.7, mask=m),
                                   dk.losses.jsd(s, z, temperature=0.7, mask=m), rtol=1e-5, atol=1e-6)


def test_topk_stores_indices_logprobs_and_the_leftover_mass(tmp_path):
    teacher, batches, k, stored = Teacher(), loader(), 4, 1.5
    dkc.write(teacher, batches, tmp_path, logits=("topk", k), temperature=stored)  # float16 log-probs
    for batch, cached in zip(batches, dkc.read(tmp_path), strict=True):
        top = cached["logits"]
        assert (top["indices"].dtype, top["logprobs"].dtype, top["tail"].dtype) == (
            torch.int32, torch.float16, torch.float32)
        z = teacher(batch)["logits"].double() / stored
        p = z.softmax(-1)
        assert torch.equal(top["indices"].long().sort(-1).values, z.topk(k, -1).indices.sort(-1).values)
        want = z.log_softmax(-1).gather(-1, top["indices"].long())
        torch.testing.assert_close(top["logprobs"].double(), want, rtol=2.0**-10, atol=1e-4)
        leftover = 1 - p.gather(-1, top["indices"].long()).sum(-1)  # float64 from the formula
        torch.testing.assert_close(top["tail"].double(), leftover.log(), rtol=1e-5, atol=1e-5)


def test_bytes_per_token_is_the_arithmetic_of_the_stored_dtypes(tmp_path):
    vocab, k = 32000, 64
    gen = torch.Generator().manual_seed(3)
    batches = [{"x": torch.randn(2, 4, 8, generator=gen)}, {"x": torch.randn(1, 4, 8, generator=gen)}]
    head = torch.randn(8, vocab, generator=gen)

    def teacher(batch):
        return {"logits": batch["x"] @ head, "hidden": [batch["x"], 2 * batch["x"]]}

    tokens = 2 * 4 + 1 * 4
    topk = dkc.write(teacher, batches, tmp_path / "topk", logits=("topk", k))
    assert topk.tokens == tokens
    assert topk.bytes_per_token == k * (4 + 2) + 4 == 388
    assert topk.per_token == {"logits.indices": 256, "logits.logprobs": 128, "logits.tail": 4}
    dense16 = dkc.write(teacher, batches, tmp_path / "d16", features={"hidden": [1]})
    assert dense16.bytes_per_token == vocab * 2 + 8 * 2 == 64016
    assert dense16.per_token == {"logits": 64000, "hidden.1": 16}
    dense32 = dkc.write(teacher, batches, tmp_path / "d32", dtype=torch.float32)
    assert dense32.bytes_per_token == vocab * 4
    for info in (topk, dense16, dense32):
        cache = dkc.read(info.path)
        assert cache.info == info and cache.bytes_per_token == info.bytes_per_token
        # nbytes is the data on disk: file sizes minus the .npy headers
        on_disk = 0
        for name in os.listdir(info.path):
            if name.endswith(".npy"):
                array = np.load(os.path.join(info.path, name), mmap_mode="r")
                assert os.path.getsize(os.path.join(info.path, name)) - array.offset == array.nbytes
                on_disk += array.nbytes
        assert on_disk == info.nbytes


def test_shards_hold_batches_of_any_shapes_up_to_shard_bytes(tmp_path):
    teacher = Teacher()
    batches = loader(lengths=(4, 4, 4, 6, 2, 3), sizes=(2, 2, 2, 2, 2, 1))
    sizes = [b["x"].shape[0] * b["x"].shape[1] * V for b in batches]  # float16 logits: 2 bytes each
    dkc.write(teacher, batches, tmp_path, shard_bytes=2 * sizes[0] * 2)
    index = json.loads((tmp_path / "index.json").read_text())
    # [2,4] + [2,4] fill a shard; [2,4] alone (+[2,6] would exceed); [2,6] + [2,2]; [1,3]
    assert [b["shard"] for b in index["batches"]] == [0, 0, 1, 2, 2, 3]
    assert [s["files"]["logits"]["size"] for s in index["shards"]] == [
        sizes[0] + sizes[1], sizes[2], sizes[3] + sizes[4], sizes[5]]
    cache = dkc.read(tmp_path, open_shards=1)
    for i in (5, 0, 3, 1, 4, 2):  # random access across shards, one open at a time
        torch.testing.assert_close(cache[i]["logits"], teacher(batches[i])["logits"].half())


# ------------------------------------------------------------------------------------------- features
def test_features_are_cached_and_selected(tmp_path):
    teacher, batches = Teacher(), loader()
    info = dkc.write(teacher, batches, tmp_path, logits=None, dtype="float32",
                     features={"hidden": [3, 1, -1], "pooled": None})
    assert info.logits is None and info.features == {"hidden": [1, 3], "pooled": None}
    assert info.tokens == sum(b["x"].shape[0] * b["x"].shape[1] for b in batches)
    for batch, cached in zip(batches, dkc.read(tmp_path), strict=True):
        live = teacher(batch)
        assert set(cached) == {"hidden", "pooled"} and len(cached["hidden"]) == LAYERS
        assert torch.equal(cached["hidden"][1], live["hidden"][1])
        assert torch.equal(cached["hidden"][3], live["hidden"][3])
        assert torch.equal(cached["pooled"], live["pooled"])
        with pytest.raises(SpecKeyError, match=r"layer 0 of teacher output 'hidden' was not cached; cached "
                                               r"layers: \[1, 3\]"):
            cached["hidden"][0]


def test_features_from_a_spec(tmp_path):
    spec = (dk.kd_kl.on("logits") + dk.hidden_mse.on(("hidden", 0), ("hidden", 3))
            + dk.layers(dk.mmd, [((0, 1), (1, 2))], feature="hidden") + dk.hard_ce.on("logits"))
    assert dkc.teacher_selectors(spec) == (("logits",), ("hidden", 3), ("hidden", 1), ("hidden", 2))
    assert dkc.features_of(spec) == {"hidden": [1, 2, 3]}
    assert dkc.features_of(dk.pkd.on("pooled") + dk.cosine.on(("hidden", 1))) == {"pooled": None, "hidden": [1]}
    teacher, batches = Teacher(), loader()
    dkc.write(teacher, batches, tmp_path, features=spec, dtype="float32")
    cached = dkc.read(tmp_path)[0]
    assert [layer is not None for layer in list(cached["hidden"])] == [False, True, True, True]
    with pytest.raises(TypeError, match="expected a dk term, spec or tasks"):
        dkc.teacher_selectors({"hidden": [1]})


# ------------------------------------------------------------------------------------------------ step
def test_a_cached_step_equals_the_live_step(tmp_path):
    teacher, batches = Teacher(), loader()
    dense = (dk.kd_kl.on("logits", mask="attention_mask", temperature=2.0)
             + 0.5 * dk.hidden_mse.on(("hidden", 1), ("hidden", 3), mask="attention_mask"))
    sparse = Loss(sparse_kd_kl, "sparse_kd_kl", temperature=True).on("logits", mask="attention_mask",
                                                                      temperature=2.0, policy="tail")
    dense_cache = dkc.read(dkc.write(teacher, batches, tmp_path / "d", dtype="float32", features=dense).path)
    topk_cache = dkc.read(dkc.write(teacher, batches, tmp_path / "k", logits=("topk", V), dtype="float32",
                                    temperature=2.0).path)
    live_step, cached_step = dk.make_step(dense, compile=False), dk.make_step(dense, compile=False)
    sparse_step = dk.make_step(sparse.named("kd"), compile=False)
    kd_step = dk.make_step(dk.kd_kl.on("logits", mask="attention_mask", temperature=2.0).named("kd"), compile=False)
    for i, batch in enumerate(batches):
        student = {"logits": student_logits(batch), "hidden": [torch.randn(*batch["x"].shape[:2], D)] * LAYERS}
        live = live_step(student, teacher(batch), batch, step=i)
        cached = cached_step(student, dense_cache[i], batch, step=i)
        assert torch.equal(cached.loss, live.loss)
        torch.testing.assert_close(sparse_step(student, topk_cache[i], batch, step=i).loss,
                                   kd_step(student, teacher(batch), batch, step=i).loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- errors
def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^dk.cache.read: expected a cache directory .*\(no such directory\)"):
        dkc.read(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"expected index.json in"):
        dkc.read(tmp_path)
    path = tmp_path / "c"
    dkc.write(Teacher(), loader(), path, logits=("topk", 3), features={"hidden": [2]})
    index_file = path / "index.json"
    good = index_file.read_text()

    index_file.write_text(good[:-20])
    with pytest.raises(ValueError, match=r"corrupt cache index .*: not JSON"):
        dkc.read(path)
    index_file.write_text(json.dumps({**json.loads(good), "format": "other"}))
    with pytest.raises(ValueError, match=r"corrupt cache index .*: expected format 'distilkit.cache'"):
        dkc.read(path)
    index_file.write_text(json.dumps({**json.loads(good), "version": 99}))
    with pytest.raises(ValueError, match="expected a cache of format version 1 or 2, got version 99"):
        dkc.read(path)
    broken = json.loads(good)
    broken["batches"][0]["shapes"]["logits-tail"][1] += 1
    index_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"corrupt cache index .*: batches\[0\]\.shapes\['logits-tail'\]: "
                                         r"expected \[2, 4\] \(the shape of logits-indices without its last"):
        dkc.read(path)
    broken = json.loads(good)
    del broken["shards"]
    index_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"corrupt cache index .*: shards: expected a list of shards, got nothing "
                                         r"\(the field is missing\)"):
        dkc.read(path)
    broken = json.loads(good)
    broken["shards"][0]["files"]["logits-tail"]["file"] = "../elsewhere.npy"
    index_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"corrupt cache index .*: shards\[0\]\.files\['logits-tail'\]\.file: "
                                         r"expected 'shard-00000-[0-9a-f]{16}-logits-tail\.npy'.*got '\.\./elsewhere"):
        dkc.read(path)
    broken = json.loads(good)
    broken["shards"][0]["files"]["logits-tail"]["dtype"] = "float16"
    index_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"corrupt cache index .*: shards\[0\]\.files\['logits-tail'\]\.dtype: "
                                         r"expected 'float32' \(the dtype of logits-tail\), got 'float16'"):
        dkc.read(path)
    index_file.write_text(good)

    [tail] = path.glob("shard-00000-*-logits-tail.npy")
    data = tail.read_bytes()
    np.save(tail, np.zeros(np.load(tail).size, np.float16))  # the header disagrees with the index
    with pytest.raises(ValueError, match=r"corrupt shard file .*logits-tail.npy.*: expected a 1-D float32 array"):
        dkc.read(path)
    tail.write_bytes(data)

    [shard] = path.glob("shard-00000-*-feature-0.npy")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"corrupt shard file .*shard-00000-[0-9a-f]{16}-feature-0.npy.*truncated"):
        dkc.read(path)
    shard.write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match=r"corrupt shard file .*shard-00000-[0-9a-f]{16}-feature-0.npy"):
        dkc.read(path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"expected shard file .*shard-00000-[0-9a-f]{16}-feature-0.npy"):
        dkc.read(path)


def test_write_errors(tmp_path):
    teacher, batches = Teacher(), loader()
    dkc.write(teacher, batches[:1], tmp_path)
    with pytest.raises(FileExistsError, match="already holds a cache; pass overwrite=True"):
        dkc.write(teacher, batches, tmp_path)
    info = dkc.write(teacher, batches, tmp_path, overwrite=True, logits=("topk", 2))
    assert dkc.read(tmp_path).info == info and info.batches == len(batches)
    assert not any(name.startswith("shard-") and "logits.npy" in name for name in os.listdir(tmp_path))
    (tmp_path / "file").write_text("")
    cases = [
        (dict(path=tmp_path / "file"), FileExistsError, "expected a directory path"),
        (dict(logits="sparse"), ValueError, r"expected logits to be 'dense', \('topk', k\)"),
        (dict(logits=("topk", 0)), ValueError, "expected logits to be"),
        (dict(logits=("topk", V + 1)), ValueError, "expected at least k = 12 classes"),
        (dict(dtype="bfloat16"), ValueError, "expected dtype 'float16' or 'float32'"),
        (dict(temperature=2.0), ValueError, "temperature applies to the top-k format only"),
        (dict(temperature=0.0, logits=("topk", 2)), ValueError, "expected temperature to be a float > 0"),
        (dict(logits=None), ValueError, "nothing to cache"),
        (dict(features={"attention": [0]}), KeyError, "expected feature key 'attention' in the teacher outputs"),
        (dict(features={"hidden": [LAYERS]}), ValueError, "layer index 4 is out of range"),
        (dict(features={"hidden": "all"}), ValueError, "expected features\\['hidden'\\] to be a non-empty list"),
        (dict(features={"logits": None}), ValueError, "expected feature keys to be output names other than"),
        (dict(features=["hidden"]), TypeError, "expected features to be a mapping"),
        (dict(shard_bytes=0), ValueError, "expected shard_bytes to be a positive int"),
        (dict(teacher_fn=lambda b: b["x"]), TypeError, "expected teacher_fn\\(batch\\) to return an output mapping"),
        (dict(teacher_fn=lambda b: {"logits": b["x"].long()}), TypeError, "to be a floating-point tensor"),
        (dict(teacher_fn=lambda b: {"logits": b["x"] * 1e5}), ValueError, "overflows float16"),
    ]
    for kwargs, error, message in cases:
        args = {"teacher_fn": teacher, "loader": batches, "path": tmp_path / "new", "overwrite": True, **kwargs}
        with pytest.raises(error, match=message):
            dkc.write(**args)
    loader_lengths = loader(lengths=(4, 6), sizes=(2, 2))
    with pytest.raises(ValueError, match="expected every batch to give the same outputs"):
        dkc.write(lambda b: {"hidden": [b["x"]] * b["x"].shape[1]}, loader_lengths, tmp_path / "x", logits=None,
                  features={"hidden": None})
    assert not (tmp_path / "x" / "index.json").exists()  # an interrupted write never reads as a cache
    assert math.isfinite(info.bytes_per_token)
