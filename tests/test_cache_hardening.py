"""Teacher cache hardening: every index field checked, one writer at a time, atomic overwrites, readers that notice
an overwrite, nothing read outside the directory. The concurrency tests use real (spawned) processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re
import signal
import socket
import time

import pytest
import torch

from distilkit import cache as dkc

V, D, LAYERS = 11, 6, 4


# --------------------------------------------------------------------------------------------- helpers
def teacher(seed: int):
    """A deterministic teacher: logits [B, L, V] and 4 hidden layers [B, L, D], different for each seed."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, V, generator=gen) * 2
    scales = torch.rand(LAYERS, generator=gen) + 0.5

    def run(batch):
        x = batch["x"]
        return {"logits": x @ w, "hidden": [torch.tanh(s * x) for s in scales]}

    return run


def batches(lengths=(4, 6, 3), size: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(size, n, D, generator=gen)} for n in lengths]


# Two data sets of different shapes: a reader that mixed them would cut one's data at the other's offsets.
SETS = {0: dict(seed=0, lengths=(4, 6, 3)), 1: dict(seed=1, lengths=(5, 2, 7, 8))}


def write_set(path, which: int, **kwargs):
    s = SETS[which]
    return dkc.write(teacher(s["seed"]), batches(s["lengths"]), path, dtype="float32", features={"hidden": [1, 3]},
                     **kwargs)


def assert_is_set(cache, which: int, indices=None):
    """``cache`` holds exactly data set ``which``: compared with the live teacher, bit for bit."""
    s = SETS[which]
    live_batches = batches(s["lengths"])
    assert len(cache) == len(live_batches)
    for i in range(len(live_batches)) if indices is None else indices:
        live, cached = teacher(s["seed"])(live_batches[i]), cache[i]
        assert torch.equal(cached["logits"], live["logits"]), i
        assert torch.equal(cached["hidden"][3], live["hidden"][3]), i


def data_files(path) -> set[str]:
    return {name for name in os.listdir(path) if name.endswith(".npy")}


def spawn():
    return multiprocessing.get_context("spawn")


# ------------------------------------------------------------------------------------ index validation
def _set(obj, keys, value):
    for key in keys[:-1]:
        obj = obj[key]
    obj[keys[-1]] = value


def _del(obj, keys):
    for key in keys[:-1]:
        obj = obj[key]
    del obj[keys[-1]]


def _swap_batches(index):
    index["batches"][0], index["batches"][1] = index["batches"][1], index["batches"][0]


def _same_file(index):
    files = index["shards"][0]["files"]
    files["logits-logprobs"]["file"] = files["logits-indices"]["file"]


# (edit of the parsed index, regex of the field and expectation); a top-k cache of data set 0 in one shard:
# batches [2, 4], [2, 6], [2, 3]; k = 3; hidden layers 1 and 3 of 4.
EDITS = {
    "layer out of range": (lambda ix: _set(ix, ["arrays", "feature-1", "layer"], 7),
                           r"arrays\['feature-1'\]\.layer: expected a layer index in \[0, 4\) \(the output has 4 "
                           r"layers\), got 7"),
    "string for a number": (lambda ix: _set(ix, ["batches", 1, "shapes", "logits-indices", 1], "6"),
                            r"batches\[1\]\.shapes\['logits-indices'\]\[1\]: expected an int >= 0, got '6'"),
    "bool for a number": (lambda ix: _set(ix, ["shards", 0, "files", "logits-tail", "size"], True),
                          r"shards\[0\]\.files\['logits-tail'\]\.size: expected an int >= 0, got True"),
    "shape against k": (lambda ix: _set(ix, ["batches", 0, "shapes", "logits-indices", 2], 4),
                        r"batches\[0\]\.shapes\['logits-indices'\]: expected a shape \[B, \.\.\., 3\] \(k is 3\), "
                        r"got \[2, 4, 4\]"),
    "k beyond the vocabulary": (lambda ix: _set(ix, ["logits", "k"], V + 1),
                                rf"logits\.k: expected the kept classes, an int in \[1, {V}\] \(vocab is {V}\), "
                                rf"got {V + 1}"),
    "two arrays, one file": (_same_file,
                             r"shards\[0\]\.files\['logits-logprobs'\]\.file: expected "
                             r"'shard-00000-[0-9a-f]{16}-logits-logprobs\.npy' \(the file of this shard and array\), "
                             r"got 'shard-00000-[0-9a-f]{16}-logits-indices\.npy'"),
    "a file outside": (lambda ix: _set(ix, ["shards", 0, "files", "feature-0", "file"], "/etc/passwd"),
                       r"shards\[0\]\.files\['feature-0'\]\.file: expected 'shard-00000-.*got '/etc/passwd'"),
    "zero temperature": (lambda ix: _set(ix, ["logits", "temperature"], 0),
                         r"logits\.temperature: expected a finite number > 0, got 0"),
    "negative temperature": (lambda ix: _set(ix, ["logits", "temperature"], -1.5),
                             r"logits\.temperature: expected a finite number > 0, got -1\.5"),
    "missing top-level field": (lambda ix: _del(ix, ["tokens"]),
                                r"tokens: expected an int >= 0, got nothing \(the field is missing\)"),
    "missing nested field": (lambda ix: _del(ix, ["batches", 2, "shard"]),
                             r"batches\[2\]\.shard: expected a shard number \(an int\), got nothing \(the field is "
                             r"missing\)"),
    "missing generation": (lambda ix: _del(ix, ["generation"]),
                           r"generation: expected the write's generation id, got nothing"),
    "unknown field": (lambda ix: _set(ix, ["shards", 0, "extra"], 1),
                      r"shards\[0\]: expected only the fields files, got the unknown field 'extra'"),
    "shard out of range": (lambda ix: _set(ix, ["batches", 2, "shard"], 1),
                           r"batches\[2\]\.shard: expected a shard number in \[0, 1\)"),
    "tokens": (lambda ix: _set(ix, ["tokens"], 2 * 4 + 2 * 6 + 2 * 3 + 1),  # rows of [2, 4], [2, 6], [2, 3], + 1
               r"tokens: expected 26 \(the token positions of the batches' shapes\), got 27"),
    "features disagree": (lambda ix: _set(ix, ["features", "hidden"], [1, 2]),
                          r"features\.hidden: expected the layers cached in arrays, \[1, 3\] of 4, got \[1, 2\]"),
    "dtype": (lambda ix: _set(ix, ["dtype"], "bfloat16"), r"dtype: expected 'float16' or 'float32', got 'bfloat16'"),
    "not an object": (lambda ix: _set(ix, ["shards", 0], [1, 2]),
                      r"shards\[0\]: expected an object with the fields files, got \[1, 2\]"),
    "reordered batches": (_swap_batches,
                          r"digest: expected the SHA-256 of the other fields, got another one: the index was edited "
                          r"or damaged"),
}


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("topk") / "c"
    dkc.write(teacher(0), batches(), path, logits=("topk", 3), features={"hidden": [1, 3]})
    return path, (path / "index.json").read_text()


@pytest.mark.parametrize("edit", EDITS)
def test_every_index_field_is_checked(topk_cache, edit, tmp_path):
    path, good = topk_cache
    change, message = EDITS[edit]
    copy_path = tmp_path / "c"
    copy_path.mkdir()
    for name in data_files(path):
        (copy_path / name).write_bytes((path / name).read_bytes())
    index = json.loads(good)
    change(index)
    (copy_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(dkc.CacheError) as error:
        dkc.read(copy_path)
    text = str(error.value)
    assert text.startswith(f"dk.cache.read: corrupt cache index {str(copy_path / 'index.json')!r}: "), text
    assert re.search(message, text), text
    assert isinstance(error.value, ValueError)


def test_a_shape_that_disagrees_with_the_vocabulary(tmp_path):
    write_set(tmp_path, 0)
    index = json.loads((tmp_path / "index.json").read_text())
    index["logits"]["vocab"] = V + 1  # every batch's logits have V classes
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(dkc.CacheError, match=rf"batches\[0\]\.shapes\.logits: expected a shape \[B, \.\.\., {V + 1}\] "
                                             rf"\(vocab is {V + 1}\), got \[2, 4, {V}\]"):
        dkc.read(tmp_path)


@pytest.mark.parametrize("text, message", [
    ('{"format": "distilkit.cache", "format": "distilkit.cache"}', r"got the key 'format' twice"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", r"expected JSON nested at most 16 levels deep .*got 100001"),
    ('{"a": "' + "[" * 50 + '", "b": ' + "{" * 17 + "}" * 17 + "}", r"nested at most 16 levels deep.*got 18 levels"),
    ('{"temperature": NaN}', r"not JSON \(NaN is not a JSON number\)"),
    ("[]", r"format: expected format 'distilkit.cache' .*got \[\]"),
    ('"\udcff"'.encode("utf-8", "surrogateescape"), r"not JSON \(not UTF-8"),
])
def test_malformed_json_is_a_cache_error(tmp_path, text, message):
    (tmp_path / "index.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(dkc.CacheError, match=message):  # never a RecursionError
        dkc.read(tmp_path)


def test_a_version_1_cache_is_still_read_and_replaced_whole(tmp_path):
    write_set(tmp_path, 0)
    index = json.loads((tmp_path / "index.json").read_text())
    generation = index.pop("generation")
    del index["digest"]
    index["version"] = 1
    for shard in index["shards"]:  # the names version 1 gave its files
        for f in shard["files"].values():
            old = f["file"].replace(f"-{generation}-", "-")
            os.rename(tmp_path / f["file"], tmp_path / old)
            f["file"] = old
    (tmp_path / "index.json").write_text(json.dumps(index))
    cache = dkc.read(tmp_path)
    assert cache.info.generation is None
    assert_is_set(cache, 0)
    info = write_set(tmp_path, 1, overwrite=True)
    assert all(f"-{info.generation}-" in name for name in data_files(tmp_path))  # the version-1 files are gone
    assert_is_set(dkc.read(tmp_path), 1)


def test_the_order_of_keys_in_the_index_does_not_matter(tmp_path):
    write_set(tmp_path, 0)
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps(index, sort_keys=True, indent=4))  # as `jq -S` would
    assert list(json.loads((tmp_path / "index.json").read_text())["arrays"]) == ["feature-0", "feature-1", "logits"]
    assert_is_set(dkc.read(tmp_path), 0)


# -------------------------------------------------------------------------------------- inside the dir
def test_nothing_is_read_through_a_link_or_from_a_fifo(tmp_path):
    path = tmp_path / "c"
    write_set(path, 0)
    name = sorted(data_files(path))[0]
    outside = tmp_path / "outside.npy"
    os.rename(path / name, outside)
    os.symlink(outside, path / name)  # the very same data, but outside the directory
    with pytest.raises(dkc.CacheError, match=rf"expected the shard file '.*{name}' to be a regular file in the cache "
                                             r"directory, got a symbolic link"):
        dkc.read(path)
    os.unlink(path / name)
    os.rename(outside, path / name)
    assert_is_set(dkc.read(path), 0, [0])
    index = path / "index.json"
    os.rename(index, tmp_path / "index.json")
    os.mkfifo(index)  # opening it for reading would block forever
    with pytest.raises(dkc.CacheError, match=r"expected the cache index '.*index.json' to be a regular file, got a "
                                             r"special file"):
        dkc.read(path)


# ----------------------------------------------------------------------------------- writes in-process
def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    outer = teacher(0)
    refused = []

    def nested(batch):
        if not refused:
            with pytest.raises(dkc.CacheLockedError) as error:
                write_set(tmp_path, 1, overwrite=True)
            refused.append(error.value)
        return outer(batch)

    dkc.write(nested, batches(SETS[0]["lengths"]), tmp_path, dtype="float32", features={"hidden": [1, 3]})
    [error] = refused
    assert isinstance(error, BlockingIOError) and isinstance(error, dkc.CacheError)
    assert str(error) == (f"dk.cache.write: expected no other writer on the cache directory {str(tmp_path)!r}, got "
                          f"one: process {os.getpid()} on host {socket.gethostname()} holds its lock "
                          f"{str(tmp_path / 'index.json.lock')!r}. Wait for that write to finish (or stop it), or "
                          "write elsewhere.")
    assert_is_set(dkc.read(tmp_path), 0)


def test_a_failed_overwrite_leaves_the_old_cache_untouched(tmp_path):
    info = write_set(tmp_path, 0)
    before = {name: (tmp_path / name).read_bytes() for name in [*data_files(tmp_path), "index.json"]}
    live = teacher(1)
    calls = []

    def failing(batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("teacher out of memory")
        return live(batch)

    def files():
        return {name: (tmp_path / name).read_bytes() for name in [*data_files(tmp_path), "index.json"]}

    with pytest.raises(RuntimeError, match="teacher out of memory"):
        dkc.write(failing, batches(SETS[1]["lengths"]), tmp_path, dtype="float32", features={"hidden": [1, 3]},
                  overwrite=True, shard_bytes=1)  # two shards of the new cache were on disk when it failed
    assert files() == before  # and were removed
    with pytest.raises(ValueError, match="expected the loader to give at least one batch, got none"):
        dkc.write(live, iter([]), tmp_path, overwrite=True)  # an exhausted loader replaces nothing
    with pytest.raises(FileExistsError, match="already holds a cache; pass overwrite=True"):
        write_set(tmp_path, 1)
    assert files() == before
    cache = dkc.read(tmp_path)
    assert cache.info == info
    assert_is_set(cache, 0)


@pytest.mark.parametrize("logits", ["dense", ("topk", 2)])
def test_logits_without_a_batch_dimension_are_refused(tmp_path, logits):
    with pytest.raises(ValueError, match=rf"expected teacher output 'logits' of batch 0 to have a batch and a class "
                                         rf"dimension \[B, \.\.\., V\] with V >= 1, got shape \({V},\)"):
        dkc.write(lambda batch: {"logits": torch.randn(V)}, [0], tmp_path, logits=logits)  # was a bare IndexError
    assert not (tmp_path / "index.json").exists()


def test_a_reader_notices_an_overwrite_and_a_removal(tmp_path):
    write_set(tmp_path, 0)
    cache = dkc.read(tmp_path, open_shards=1)
    assert_is_set(cache, 0, [0])
    pickled = pickle.dumps(cache)
    assert_is_set(pickle.loads(pickled), 0)  # unpickled (a loader worker): the same cache, reopened
    write_set(tmp_path, 1, overwrite=True)  # other shapes: old offsets into the new files would be garbage
    for i in (0, 1):
        with pytest.raises(dkc.CacheChangedError, match=rf"expected the cache at {re.escape(repr(str(tmp_path)))} to "
                                                        r"be the one opened \(generation [0-9a-f]{16}\), got another"):
            cache[i]
    with pytest.raises(dkc.CacheChangedError, match="to be the one pickled, got another"):
        pickle.loads(pickled)
    fresh = dkc.read(tmp_path)
    assert_is_set(fresh, 1)
    os.unlink(tmp_path / "index.json")
    with pytest.raises(dkc.CacheChangedError, match=r"got another: its index\.json was replaced or removed"):
        fresh[0]


# ---------------------------------------------------------------------------------- real processes
def _write_slowly(path, which, overwrite, start, ready=None, block=None):
    """Write data set ``which`` (a batch every 50 ms) once ``start`` lets go; with ``ready``, signal after 3 batches and
    block (to be killed). Returns ``(which, outcome, message)``."""
    s = SETS[which]
    live = teacher(s["seed"])

    def loader():
        for i, batch in enumerate(batches(s["lengths"])):
            if ready is not None and i == 3:
                ready.set()
                block.wait()
            yield batch

    def slow(batch):
        time.sleep(0.05)  # so that racing writers overlap
        return live(batch)

    start.wait(timeout=120)
    try:
        dkc.write(slow, loader(), path, dtype="float32", features={"hidden": [1, 3]}, overwrite=overwrite,
                  shard_bytes=1)
        return which, "ok", ""
    except Exception as error:
        return which, type(error).__name__, str(error)


def _write_in_child(results, *args):
    results.put(_write_slowly(*args))


def test_racing_writer_processes_one_wins_the_other_is_refused(tmp_path):
    ctx = spawn()
    start, results = ctx.Barrier(2), ctx.Queue()
    child = ctx.Process(target=_write_in_child, args=(results, tmp_path, 1, False, start))
    child.start()
    try:
        ours = _write_slowly(tmp_path, 0, False, start)  # this process is the other writer
        outcome = sorted([ours, results.get(timeout=120)])
    finally:
        child.join(timeout=60)
    [winner] = [which for which, status, _ in outcome if status == "ok"]
    [(_, status, message)] = [o for o in outcome if o[0] != winner]
    if status == "CacheLockedError":  # refused while the winner writes
        assert re.match(r"dk.cache.write: expected no other writer on the cache directory .* got one: process \d+ on "
                        r"host", message), message
    else:  # or after it committed
        assert status == "FileExistsError" and "already holds a cache; pass overwrite=True" in message, outcome
    assert_is_set(dkc.read(tmp_path), winner)  # the winner's data, untouched by the loser


@pytest.mark.parametrize("first", [False, True], ids=["overwrite", "first-write"])
def test_a_writer_killed_midway(tmp_path, first):
    if not first:
        old = write_set(tmp_path, 0)
    ctx = spawn()
    start, ready, block, results = ctx.Barrier(1), ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_write_in_child, args=(results, tmp_path, 1, True, start, ready, block))
    child.start()
    try:
        assert ready.wait(timeout=120), "the writer never got mid-way"
        ours = set() if first else {f"-{old.generation}-"}
        partial = {n for n in data_files(tmp_path) if not any(tag in n for tag in ours)}
        assert len(partial) >= 2  # the new cache's first shards are on disk
        if first:
            with pytest.raises(FileNotFoundError, match=r"expected index\.json in"):
                dkc.read(tmp_path)
        else:
            assert_is_set(dkc.read(tmp_path), 0)  # read during the overwrite: the old cache, whole
        with pytest.raises(dkc.CacheLockedError, match=rf"got one: process {child.pid} on host"):
            write_set(tmp_path, 0, overwrite=True)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL and results.empty()
    assert partial <= data_files(tmp_path)  # left behind by the killed writer ...
    if first:
        with pytest.raises(FileNotFoundError, match=r"expected index\.json in"):
            dkc.read(tmp_path)
    else:
        assert_is_set(dkc.read(tmp_path), 0)  # ... and ignored: the old cache is whole
        with pytest.raises(FileExistsError, match="already holds a cache"):
            write_set(tmp_path, 1)
    info = write_set(tmp_path, 1, overwrite=not first)  # the lock died with the writer
    assert_is_set(dkc.read(tmp_path), 1)
    assert data_files(tmp_path) and all(f"-{info.generation}-" in n for n in data_files(tmp_path))  # cleaned


def _overwrite_in_child(path, stop, results):
    """Child process: overwrite the cache with data sets 1, 0, 1, ... until ``stop``."""
    writes = 0
    while not stop.is_set() and writes < 400:
        write_set(path, 1 - writes % 2, overwrite=True)
        writes += 1
    results.put(writes)


def test_a_reader_process_never_mixes_two_writes(tmp_path):
    write_set(tmp_path, 0)
    expected = {which: [teacher(s["seed"])(b) for b in batches(s["lengths"])] for which, s in SETS.items()}
    which_by_len = {len(s["lengths"]): which for which, s in SETS.items()}
    ctx = spawn()
    stop, results = ctx.Event(), ctx.Queue()
    cache = dkc.read(tmp_path)
    index_inode = os.stat(tmp_path / "index.json").st_ino
    child = ctx.Process(target=_overwrite_in_child, args=(tmp_path, stop, results))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while os.stat(tmp_path / "index.json").st_ino == index_inode:  # the first overwrite committed
            assert time.monotonic() < deadline and child.is_alive()
            time.sleep(0.01)
        with pytest.raises(dkc.CacheChangedError):
            cache[1]  # opened before the overwrite: raises, never new data at old offsets
        complete = changed = 0
        end, hard_end = time.monotonic() + 1.0, time.monotonic() + 90
        # at least 1 s of reads; then on until both outcomes were seen (on a loaded machine the writer can outpace
        # the reader for a while: it stops after 400 writes, so a whole read comes at the latest then)
        while time.monotonic() < end or ((complete == 0 or changed == 0) and time.monotonic() < hard_end):
            try:
                cache = dkc.read(tmp_path)  # during writes: one of the two caches, whole
                want = expected[which_by_len[len(cache)]]
                for i in range(len(cache)):
                    got = cache[i]
                    assert torch.equal(got["logits"], want[i]["logits"]), i
                    assert torch.equal(got["hidden"][1], want[i]["hidden"][1]), i
                    time.sleep(0.002)
                complete += 1
            except dkc.CacheChangedError:
                changed += 1
    finally:
        stop.set()
        child.join(timeout=60)
    assert child.exitcode == 0 and results.get(timeout=10) > 2
    assert complete > 0 and changed > 0, (complete, changed)
