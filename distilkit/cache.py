"""Teacher caching: run the teacher once, store its outputs on disk, read them back.

Two formats. **Keyed top-k caches** (:func:`write_topk`, :func:`read_topk`), for LLM distillation: the top-k of
the teacher per *example id* and position, padding not stored, read back for any batch of ids in any order, batch
size and padding::

    def teacher_fn(batch):                           # batch: {"ids", "input_ids", "attention_mask"}
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    info  = dk.cache.write_topk("cache/", loader, k=64, teacher_fn=teacher_fn)  # stores no padding
    cache = dk.cache.read_topk("cache/")
    for batch in student_loader:                     # reshuffled, re-batched, re-padded: looked up by id
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = cache.teacher(batch["ids"], logits.shape[1])  # positions 0..L-2, each predicting the next token
        loss = dk.kd_kl(logits, t.topk, mask=batch["attention_mask"][:, 1:].bool() & t.mask)

**Batch-position caches** (:func:`write`, :func:`read`): any teacher outputs (dense or top-k logits, features),
stored batch by batch and read back in the loader's order::

    info  = dk.cache.write(teacher_fn, loader, "cache/", logits=("topk", 64), features={"hidden": [4, 8]})
    cache = dk.cache.read("cache/")                  # a Sequence: cache[i] is batch i's teacher output mapping
    for i, (batch, teacher_out) in enumerate(zip(loader, cache)):  # the same batches in the same order as at write
        out = step(student(batch), teacher_out, batch, step=i)

:func:`info` describes either (``distilkit cache info DIR`` prints :func:`format_info` of it); :func:`upgrade`
converts a batch-position cache into a keyed one, given each batch's example ids.

Keyed top-k caches
------------------

*Rows.* Each kept position of an example is one row: the top-k classes of ``z / T_c`` (``indices``), their
log-probabilities ``log_softmax(z / T_c)[indices]`` and the log of the leftover mass ``tail = log(1 − Σ_K p)``
(as the ``("topk", k)`` format below). Only the positions of the ``keep`` mask are stored (the attention mask:
no padding; or e.g. only a completion's positions), each with its position in the example. Rows are stored as the
teacher emits them: the row at position i is the teacher's distribution after tokens 0..i, over token i + 1
(Hugging Face causal-LM logits, unshifted). :meth:`TopKCache.teacher` returns, for the student's position p, the
row at p + ``shift`` (default 0: a causal student on the same tokens predicts the same token at p), as a
``dk.TopK`` ``[B, L, k]`` plus a ``mask`` ``[B, L]`` of the positions held; the student's ``logits[:, :-1]`` take
``length = L - 1``; left padding passes ``positions`` (``attention_mask.cumsum(-1) - 1``, negative for padding).

*Layout.* ``index.json`` (``format`` ``"distilkit.cache.keyed-topk"``, ``version``, k, vocab, T_c, encodings,
counts, the kept-mass statistics, per shard its rows and files, the example table's files and SHA-256s, a digest of
the whole) and flat 1-D ``.npy`` files: per shard ``shard-<n>-<generation>-<array>.npy`` for ``positions``
(int32 [N]), ``indices`` (uint16 when V <= 65536, else int32, [N·k]), ``logprobs`` (float32, float16 or uint8,
[N·k]; for int8 also ``lp-max`` and ``lp-step``, float32 [N]) and ``tail`` (float32 [N]), the rows of consecutive
examples; and the example table ``table-<generation>-keys.npy`` (the ids sorted: int64, or UTF-8 bytes ``S<n>``) and
``table-<generation>-rows.npy`` (int64 [E·3]: shard, first row, rows). An id is found by binary search in the
memory-mapped table and its rows sliced from the memory-mapped shard: random access reads only what it returns.

*Bytes per stored position*: ``4 + k · (index bytes + log-prob bytes) + 4`` (+ 8 for int8); at V = 32000 and
k = 64: float32 392, float16 264, int8 208 (the batch-position top-k format stores 388 in float16, padding included).
Per example, 8 (or the longest id's UTF-8 length) + 24 bytes of table.

*Coverage.* The writer records, over the stored positions, the kept mass Σ_K p = 1 − exp(tail) at T_c: its mean,
min, p5, p25, p50, p75, p95 and max (percentiles by nearest rank, to within 1e-4), in the index and in
:func:`info`. It decides between the losses' policies: ``"renormalize"`` scales the kept mass up to 1 (exact at any
temperature), ``"tail"`` keeps the rest as one bucket (exact at T_c only).

*Compression* (``dtype``) of the log-probabilities: ``"float32"`` exact; ``"float16"`` relative error <= 2⁻¹¹;
``"int8"``: per row the maximum m and a step s = (m − min) / 254, each entry one byte, error <= s / 2, the most
likely class exact. The indices and tail are exact in every encoding.

*Versions.* The keyed format has its own ``format`` and ``version`` (1). :func:`read_topk` of a batch-position
cache says to convert it with :func:`upgrade` (or to rewrite it); of an unknown version, that a newer distilkit wrote
it or how to rewrite it. :func:`read` of a keyed cache says to use :func:`read_topk`. Both formats share the safety
rules below (one writer, atomic overwrite, readers that notice an overwrite, a validated index; the keyed example
table is checked against its SHA-256s, sorted, unique and tiling every shard exactly).

Batch-position caches
---------------------

Layout: a directory with ``index.json`` (format, dtypes, each batch's shard and array shapes) and one flat 1-D
``.npy`` file per array per shard, ``shard-<n>-<generation>-<array>.npy``, holding the elements of consecutive
batches up to ``shard_bytes``; read back memory-mapped (a few shards open at a time; never pickled). Offsets are the
running sums of the batches' sizes, so batches of any shapes (dynamic padding) share shards. Every array keeps its
batch structure (``[B, L, ...]``): ``cache[i]`` has the shapes of the teacher's outputs for batch i, padding
included. The names ``index.json``, ``index.json.tmp``, ``index.json.lock``, ``shard-*.npy`` and ``table-*.npy``
belong to the cache; other files in the directory are left alone.

Safety, as a data format should:

* One writer at a time: :func:`write` takes an exclusive ``flock`` on ``index.json.lock`` and never waits: a second
  writer, in any process, gets :class:`CacheLockedError` naming the directory and the holder's pid. The kernel drops
  the lock of a writer that dies, so it is never stale. (Over NFS, ``flock`` is only as good as the server's locks.)
* Atomic writes: a write's files are new ones, named by its random *generation*, written and synced next to the
  old cache, which the index still lists; the write commits by renaming its index over ``index.json``, then removes
  the old files. An existing cache is replaced only with ``overwrite=True``. A failed write removes its files; a
  killed one leaves the old cache whole and readable and its files to be removed by the next writer.
* Readers see one write: :func:`read` of a cache being replaced opens the old one or the new one; a
  :class:`Cache` whose cache was then replaced or removed raises :class:`CacheChangedError` on the next
  ``cache[i]`` (it compares ``index.json``'s inode, mtime and size with the file it holds open: one ``stat`` per
  batch) instead of returning data of two writes.
* A checked index: every field is validated (types, ranges, shapes against the vocabulary and k, file names, sizes
  against the shards, token and byte counts), the JSON may not nest deeper than :data:`MAX_DEPTH` nor repeat a
  key, and a SHA-256 ``digest`` of the index catches any other edit; a failure is a :class:`CacheError`
  (a ``ValueError``) naming the file and the field's JSON path. Files are opened without following symbolic links
  and must be regular files: nothing is read outside the cache directory. Caches of format version 1 (no
  generation, no digest) are still read.

Logit formats (``logits=``), for the teacher output ``"logits"`` (``[..., V]``):

* ``"dense"``: the logits, in ``dtype`` (``"float16"`` halves the size; ``"float32"`` is exact).
  ``cache[i]["logits"]`` is a tensor, for the dense losses.
* ``("topk", k)``: per row the top-k classes of ``z / temperature`` (``temperature`` = T_c, default 1):
  ``indices`` (int32), ``logprobs`` = ``log_softmax(z / T_c)[indices]`` (in ``dtype``; log-probabilities rather
  than logits keep float16's precision where the mass is) and ``tail`` = log of the leftover mass
  ``log(1 − Σ_K p)`` = ``logsumexp_{v∉K}(z / T_c) − logsumexp_v(z / T_c)`` (float32, computed without
  cancellation; −inf when k = V). ``cache[i]["logits"]`` is the mapping ``{"indices", "logprobs", "tail",
  "temperature": T_c}`` that the sparse losses take (``dk.losses.sparse_kd_kl`` and co.): ``policy="renormalize"``
  works at any loss temperature, ``policy="tail"`` only at T_c (see :mod:`distilkit.losses._sparse`).
* ``None``: no logits.

Bytes per token (``CacheInfo.bytes_per_token``, data only, ``.npy`` headers excluded): dense ``V × itemsize``;
top-k ``k × (4 + itemsize) + 4``; plus ``D × itemsize`` per cached ``[B, L, D]`` feature layer. For V = 32000,
k = 64, float16: dense 64000 B, top-k 388 B (165× less).

Features: ``features={"hidden": [1, 3], "pooled": None}`` caches ``outputs["hidden"][1]`` and ``[3]`` (a list or
tuple of layers) and the whole ``outputs["pooled"]``; or pass a spec and its teacher selectors decide
(:func:`features_of`). Read back, ``cache[i]["hidden"]`` is a list as long as the teacher's, holding the cached
layers at their indices, so the spec's ``("hidden", 3)`` selectors work unchanged; reading a layer that was not
cached raises ``SpecKeyError``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import reprlib
import secrets
import socket
import stat
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .algebra import SpecKeyError
from .losses import TopK

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["Cache", "CacheChangedError", "CacheError", "CacheInfo", "CacheLockedError", "CachedLayers", "CachedTeacher",
           "TopKCache", "features_of", "format_info", "info", "read", "read_topk", "teacher_selectors", "upgrade",
           "write", "write_topk"]

FORMAT = "distilkit.cache"
VERSION = 2  # written; version 1 (no generation, no digest) is still read
VERSIONS = (1, 2)
KEYED_FORMAT = "distilkit.cache.keyed-topk"  # dk.cache.write_topk: top-k rows keyed by example
KEYED_VERSION = 1
KEYED_VERSIONS = (1,)
ENCODINGS = ("float32", "float16", "int8")  # of a keyed cache's log-probabilities
COVERAGE = ("mean", "min", "p5", "p25", "p50", "p75", "p95", "max")  # the kept-mass statistics recorded
INDEX = "index.json"
LOCK = "index.json.lock"
LOGITS = "logits"
MAX_DEPTH = 16  # JSON nesting accepted in an index (one needs 5)
_DTYPES = {"float16": np.float16, "float32": np.float32}
_OPEN_ATTEMPTS = 5
_GENERATION = re.compile(r"[0-9a-f]{16}")
_ARRAY = (r"(logits|logits-indices|logits-logprobs|logits-tail|feature-\d+"  # batch-position caches
          r"|positions|indices|logprobs|tail|lp-max|lp-step)")  # keyed top-k caches
_DATA_V2 = re.compile(rf"shard-(\d{{5,}})-([0-9a-f]{{16}})-{_ARRAY}\.npy")
_DATA_V1 = re.compile(rf"shard-(\d{{5,}})-{_ARRAY}\.npy")
_TABLE = re.compile(r"table-([0-9a-f]{16})-(keys|rows)\.npy")  # a keyed cache's example table
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


# --------------------------------------------------------------------------------------------- errors
class CacheError(ValueError):
    """A ``dk.cache`` error: a corrupt index (naming the file and the field) or shard file, or the errors below."""


class CacheChangedError(CacheError):
    """The cache was overwritten (or removed) after it was opened: reopen it with :func:`read`."""


class CacheLockedError(CacheError, BlockingIOError):
    """Another writer holds the cache directory's lock (:func:`write` never waits)."""


# ----------------------------------------------------------------------------------------------- info
@dataclass(frozen=True)
class CacheInfo:
    """What a cache holds and what it costs.

    Attributes:
        path: the cache directory.
        batches: number of batches.
        tokens: token positions stored: the logits' rows (all dims but the last, padding included), or without
            logits the first feature's.
        nbytes: bytes of array data in all shards (``.npy`` headers excluded).
        logits: ``"dense"``, ``"topk"`` or ``None``.
        k: kept classes per row (top-k), else ``None``.
        vocab: V, the teacher's number of classes (``None`` without logits).
        dtype: storage dtype of logits / log-probabilities / features (``"float16"`` or ``"float32"``).
        temperature: T_c, the temperature of the stored top-k log-probabilities and tail (1.0 for dense).
        features: ``{key: cached layer indices, or None for the whole output}``.
        per_token: bytes per token of each stored array (``"logits"``, ``"logits.indices"``, ``"hidden.3"``, ...).
        generation: the random id of the write that made the cache (``None`` for a cache of format version 1).
    """

    path: str
    batches: int
    tokens: int
    nbytes: int
    logits: str | None
    k: int | None
    vocab: int | None
    dtype: str
    temperature: float
    features: dict = field(default_factory=dict, hash=False)
    per_token: dict = field(default_factory=dict, hash=False)
    generation: str | None = None

    @property
    def bytes_per_token(self) -> float:
        """``nbytes / tokens``: stored bytes per token position."""
        return self.nbytes / self.tokens if self.tokens else 0.0


# ------------------------------------------------------------------------------------------ selectors
def teacher_selectors(spec) -> tuple[tuple, ...]:
    """The teacher selectors ``(key,)`` / ``(key, index)`` that the terms of ``spec`` read, once each, in order.

    ``spec`` is a term, a spec or ``dk.tasks(...)``; pair selectors (fsp, mmd) contribute both members.
    """
    terms = getattr(spec, "all_terms", None)
    if not callable(terms):
        raise TypeError(f"dk.cache.teacher_selectors: expected a dk term, spec or tasks, got {type(spec).__name__}.")
    found: list[tuple] = []
    for term in terms():
        if term.teacher is None:
            continue
        sels = term.teacher if isinstance(term.teacher[0], tuple) else (term.teacher,)
        found += [s for s in sels if s not in found]
    return tuple(found)


def features_of(spec, *, logits_key: str = LOGITS) -> dict[str, list[int] | None]:
    """The ``features=`` selection that caches what ``spec``'s terms read from the teacher, besides the logits.

    ``{key: sorted layer indices}`` for ``(key, index)`` selectors; ``{key: None}`` (the whole output) when a term
    reads the key itself. Negative indices are kept (resolved against the teacher's number of layers at write).
    """
    out: dict[str, list[int] | None] = {}
    for sel in teacher_selectors(spec):
        key = sel[0]
        if key == logits_key:
            continue
        if len(sel) == 1:
            out[key] = None
        elif key not in out or out[key] is not None:
            out[key] = sorted({*(out.get(key) or []), sel[1]})
    return out


# -------------------------------------------------------------------------------------------- writing
def _logits_format(api: str, logits) -> tuple[str | None, int | None]:
    if logits is None or logits == "dense":
        return logits, None
    if (isinstance(logits, (tuple, list)) and len(logits) == 2 and logits[0] == "topk"
            and isinstance(logits[1], int) and not isinstance(logits[1], bool) and logits[1] >= 1):
        return "topk", int(logits[1])
    raise ValueError(f"{api}: expected logits to be 'dense', ('topk', k) with k >= 1, or None, got {logits!r}.")


def _dtype(api: str, dtype) -> str:
    names = {torch.float16: "float16", torch.float32: "float32", np.float16: "float16", np.float32: "float32"}
    name = dtype.name if isinstance(dtype, np.dtype) else names.get(dtype, dtype) if _hashable(dtype) else dtype
    if name not in _DTYPES:
        raise ValueError(f"{api}: expected dtype 'float16' or 'float32', got {dtype!r}.")
    return name


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _selection(api: str, features, logits_key: str) -> dict[str, list[int] | None]:
    if features is None:
        return {}
    if callable(getattr(features, "all_terms", None)):
        return features_of(features, logits_key=logits_key)
    if not isinstance(features, Mapping):
        raise TypeError(f"{api}: expected features to be a mapping {{key: [layer indices] or None}} or a dk spec, "
                        f"got {type(features).__name__}.")
    out: dict[str, list[int] | None] = {}
    for key, layers in features.items():
        if not isinstance(key, str) or key == logits_key:
            raise ValueError(f"{api}: expected feature keys to be output names other than {logits_key!r}, "
                             f"got {key!r}.")
        if layers is None:
            out[key] = None
            continue
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if not (isinstance(layers, Sequence) and not isinstance(layers, str) and layers
                and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise ValueError(f"{api}: expected features[{key!r}] to be a non-empty list of layer indices or None, "
                             f"got {layers!r}.")
        out[key] = list(layers)
    return out


def _numpy(x: Tensor, dtype) -> np.ndarray:
    return x.detach().to("cpu", torch.float32 if x.is_floating_point() else x.dtype).numpy().astype(dtype, copy=False)


def _floating(api: str, name: str, batch: int, x, dtype: str) -> np.ndarray:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{api}: expected teacher output {name} of batch {batch} to be a floating-point tensor, "
                        f"got {got}.")
    if x.ndim == 0:
        raise ValueError(f"{api}: expected teacher output {name} of batch {batch} to have a batch dimension, "
                         "got a 0-d tensor.")
    with np.errstate(over="ignore"):  # overflow is reported below, with a hint
        out = _numpy(x, _DTYPES[dtype])
    if dtype == "float16" and np.isinf(out).any() and not torch.isinf(x).any():
        raise ValueError(f"{api}: teacher output {name} of batch {batch} overflows float16 (|x| > 65504); "
                         "use dtype='float32'.")
    return out


def _topk(z: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(indices, log-probs, log tail mass)`` of the top k of ``z / temperature`` per row (float32 math)."""
    z = z.detach().float() / temperature
    log_z = z.logsumexp(-1, keepdim=True)
    values, indices = z.topk(k, dim=-1)
    if k < z.shape[-1]:
        tail = z.scatter(-1, indices, -math.inf).logsumexp(-1) - log_z.squeeze(-1)
    else:
        tail = torch.full(z.shape[:-1], -math.inf, device=z.device)
    return indices, values - log_z, tail


def _arrays(api: str, i: int, out, fmt, k, selection, dtype: str, temperature: float, logits_key: str):
    """``({array id: numpy array}, {array id: description})`` of batch ``i``'s teacher outputs."""
    if not isinstance(out, Mapping):
        raise TypeError(f"{api}: expected teacher_fn(batch) to return an output mapping (e.g. {{'logits': ...}}), "
                        f"got {type(out).__name__} for batch {i}.")
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, dict] = {}
    if fmt is not None:
        if logits_key not in out:
            raise KeyError(f"{api}: expected key {logits_key!r} in the teacher outputs of batch {i}, "
                           f"got keys {sorted(map(str, out))}.")
        z = out[logits_key]
        if not isinstance(z, Tensor) or not z.is_floating_point():
            got = f"dtype {z.dtype}" if isinstance(z, Tensor) else type(z).__name__
            raise TypeError(f"{api}: expected teacher output {logits_key!r} of batch {i} to be a floating-point "
                            f"tensor [B, ..., V], got {got}.")
        if z.ndim < 2 or z.shape[-1] == 0:
            raise ValueError(f"{api}: expected teacher output {logits_key!r} of batch {i} to have a batch and a "
                             f"class dimension [B, ..., V] with V >= 1, got shape {tuple(z.shape)}.")
        if fmt == "dense":
            arrays[LOGITS] = _floating(api, repr(logits_key), i, z, dtype)
            meta[LOGITS] = {"key": logits_key, "part": "dense"}
        else:
            if z.shape[-1] < k:
                raise ValueError(f"{api}: expected at least k = {k} classes in the teacher logits, got shape "
                                 f"{tuple(z.shape)} for batch {i}.")
            indices, logprobs, tail = _topk(z, k, temperature)
            arrays["logits-indices"] = _numpy(indices, np.int32)
            arrays["logits-logprobs"] = _numpy(logprobs, _DTYPES[dtype])
            arrays["logits-tail"] = _numpy(tail, np.float32)
            for part in ("indices", "logprobs", "tail"):
                meta[f"logits-{part}"] = {"key": logits_key, "part": part}
    for key, layers in selection.items():
        if key not in out:
            raise KeyError(f"{api}: expected feature key {key!r} in the teacher outputs of batch {i}, "
                           f"got keys {sorted(map(str, out))}.")
        value = out[key]
        if isinstance(value, Tensor) and layers is None:
            name = f"feature-{sum('layer' in m for m in meta.values())}"
            arrays[name] = _floating(api, repr(key), i, value, dtype)
            meta[name] = {"key": key, "layer": None, "layers": None}
            continue
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{api}: expected teacher outputs[{key!r}] to be a list or tuple of layers to select "
                            f"{layers} from, got {type(value).__name__} for batch {i}.")
        n = len(value)
        for layer in layers or ():
            if not -n <= layer < n:
                raise ValueError(f"{api}: layer index {layer} is out of range for teacher outputs[{key!r}], which "
                                 f"has {n} layers (batch {i}).")
        for layer in range(n) if layers is None else sorted({layer % n for layer in layers}):
            name = f"feature-{sum('layer' in m for m in meta.values())}"
            arrays[name] = _floating(api, f"{key!r}[{layer}]", i, value[layer], dtype)
            meta[name] = {"key": key, "layer": layer, "layers": n}
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) > 1:
        raise ValueError(f"{api}: expected every cached output of batch {i} to have the same batch size "
                         f"(first dimension), got {sorted(rows)}.")
    return arrays, meta


# ----------------------------------------------------------------------------------------- file system
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO planted as a cache file must not hang


def _unlink(file: Path) -> None:
    """Remove ``file`` if it is there (best effort: a file that cannot be removed is left for the next writer)."""
    with contextlib.suppress(OSError):
        os.unlink(file)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(file: Path):
    """A new file opened for writing; never follows or reuses an existing name (a planted link cannot redirect it)."""
    return os.fdopen(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666), "wb")


@contextlib.contextmanager
def _write_lock(api: str, path: Path):
    """Hold the cache directory's writer lock (``index.json.lock``, ``flock``), or raise :class:`CacheLockedError`.

    Non-blocking: a second writer fails at once instead of waiting for a write that may take hours. The kernel drops
    the lock when its holder exits, killed or not (and when every process it forked without exec, which share the
    descriptor, has exited too), so a lock is never stale; the file itself stays.
    """
    file = path / LOCK
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
    except OSError as error:
        raise CacheError(f"{api}: expected to create or open the lock file {str(file)!r} of the cache directory, "
                         f"got {error.strerror or error}.") from None
    try:
        try:
            _lock_fd(fd)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            for _ in range(20):  # the holder writes its pid right after it takes the lock
                try:
                    os.lseek(fd, 0, os.SEEK_SET)
                    holder = re.fullmatch(r"pid (\d+) on host (\S+)\n", os.read(fd, 256).decode("ascii", "replace"))
                except OSError:  # Windows: a locked byte cannot be read
                    holder = None
                if holder:
                    break
                time.sleep(0.005)
            who = f"process {holder[1]} on host {holder[2]}" if holder else "another process"
            raise CacheLockedError(f"{api}: expected no other writer on the cache directory {str(path)!r}, got one: "
                                   f"{who} holds its lock {str(file)!r}. Wait for that write to finish (or stop "
                                   "it), or write elsewhere.") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname() or '?'}\n".encode("ascii", "replace"))
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no stale pid for the next contender to name
            _unlock_fd(fd)  # explicitly: a forked child (a loader worker) holding the descriptor keeps no lock
    finally:
        os.close(fd)


if fcntl is not None:
    def _lock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
else:  # pragma: no cover - Windows: a byte-range lock on the lock file's first byte
    import msvcrt

    def _lock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


# -------------------------------------------------------------------------------------------- writing
def _shard_file(number: int, name: str, generation: str | None) -> str:
    """The file of array ``name`` in shard ``number``: a name of its own per generation (version 1: none)."""
    return f"shard-{number:05d}-{name}.npy" if generation is None else f"shard-{number:05d}-{generation}-{name}.npy"


class _ShardWriter:
    """Collects batches and writes them as shards: per array one flat 1-D ``.npy`` of the batches' elements.

    Every file is new (its name carries the write's generation), written in full and synced before the index that
    lists it is committed; :meth:`discard` removes them all when the write fails.
    """

    def __init__(self, path: Path, shard_bytes: int, generation: str):
        self.path, self.shard_bytes, self.generation = path, shard_bytes, generation
        self.pending: list[dict[str, np.ndarray]] = []
        self.held = 0
        self.shards: list[dict] = []
        self.batches: list[dict] = []
        self.files: list[str] = []

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        nbytes = sum(a.nbytes for a in arrays.values())
        if self.pending and self.held + nbytes > self.shard_bytes:
            self.flush()
        self.pending.append(arrays)
        self.held += nbytes
        self.batches.append({"shard": len(self.shards), "shapes": {n: list(a.shape) for n, a in arrays.items()}})

    def flush(self) -> None:
        if not self.pending:
            return
        number = len(self.shards)
        files = {}
        for name in self.pending[0]:
            parts = [p[name] for p in self.pending]
            size = sum(p.size for p in parts)
            file = _shard_file(number, name, self.generation)
            fh = _create(self.path / file)
            self.files.append(file)
            with fh:
                header = {"descr": np.lib.format.dtype_to_descr(parts[0].dtype), "fortran_order": False,
                          "shape": (size,)}
                np.lib.format.write_array_header_1_0(fh, header)
                for p in parts:
                    fh.write(np.ascontiguousarray(p).data)
                fh.flush()
                os.fsync(fh.fileno())
            files[name] = {"file": file, "size": size, "dtype": parts[0].dtype.name}
        self.shards.append({"files": files})
        self.pending, self.held = [], 0

    def discard(self) -> None:
        for file in self.files:
            _unlink(self.path / file)


def _committed_generation(path: Path) -> str | bool | None:
    """The generation of the committed index at ``path``: a str, None (no index, or a version-1 one) or False
    (an index that cannot be read: its generation is unknown)."""
    try:
        fd = _open_regular(path / INDEX)
    except FileNotFoundError:
        return None
    except (OSError, CacheError):
        return False
    try:
        index = _parse(_read_all(fd), str(path / INDEX))
    except CacheError:
        return False
    finally:
        os.close(fd)
    generation = index.get("generation") if isinstance(index, dict) else False
    if generation is None or (isinstance(generation, str) and _GENERATION.fullmatch(generation)):
        return generation
    return False


def _remove_debris(path: Path, keep: set[str] | None, generation: str | bool | None) -> None:
    """Remove files of the cache format that no committed index lists (the writer holds the lock).

    ``keep`` given: every data file but these (after a commit: the replaced cache and any interrupted write's).
    Otherwise only other generations' files than ``generation`` (before a write: an interrupted write's), and
    nothing when the committed index cannot be read (``generation is False``).
    """
    if keep is None and generation is False:
        return
    for name in os.listdir(path):
        if name == INDEX + ".tmp":
            _unlink(path / name)
        elif keep is not None:
            if name not in keep and (_DATA_V2.fullmatch(name) or _DATA_V1.fullmatch(name) or _TABLE.fullmatch(name)):
                _unlink(path / name)
        elif ((match := _DATA_V2.fullmatch(name)) and match[2] != generation) or (
                (match := _TABLE.fullmatch(name)) and match[1] != generation):
            _unlink(path / name)


def write(teacher_fn: Callable[[Any], Mapping], loader: Iterable, path: str | os.PathLike, *,
          logits: str | tuple[str, int] | None = "dense", features=None, dtype="float16", temperature: float = 1.0,
          logits_key: str = LOGITS, shard_bytes: int = 1 << 30, overwrite: bool = False) -> CacheInfo:
    """Run ``teacher_fn`` on every batch of ``loader`` (under ``torch.no_grad()``) and store its outputs at ``path``.

    Args:
        teacher_fn: ``batch -> output mapping`` (``{"logits": [..., V], "hidden": [layers], ...}``, e.g. through
            ``dk.adapters``).
        loader: an iterable of batches (at least one); read the cache back in the same order (no reshuffling
            between the runs).
        path: a directory (created; it must not already hold a cache unless ``overwrite``).
        logits: ``"dense"``, ``("topk", k)`` or ``None`` (module docstring).
        features: ``{key: [layer indices] | None}`` or a dk term/spec/tasks whose teacher selectors decide.
        dtype: ``"float16"`` or ``"float32"`` (or the torch/numpy dtype) for dense logits, top-k log-probabilities
            and features. Indices are int32 and the tail float32 regardless.
        temperature: T_c for the top-k format (the temperature whose log-probabilities and leftover mass are
            stored); only 1.0 for the dense format, which stores raw logits.
        logits_key: the teacher output holding the logits.
        shard_bytes: a shard is closed once it would exceed this many bytes (a batch is never split; batches of
            any shapes, e.g. other padded lengths, share shards).
        overwrite: replace an existing cache at ``path``. The replacement is atomic: the new cache is written
            beside the old one, which stays whole and readable until the new index is renamed over the old one;
            then the old cache's files are removed. A failed or killed write leaves the old cache as it was.

    Returns:
        the :class:`CacheInfo` of the written cache.

    Raises:
        CacheLockedError: another writer (any process) is writing to ``path``; writers never wait.
        FileExistsError: ``path`` already holds a cache and ``overwrite`` is False, or ``path`` is a file.
    """
    api = "dk.cache.write"
    if not callable(teacher_fn):
        raise TypeError(f"{api}: expected teacher_fn to be callable (batch -> outputs), "
                        f"got {type(teacher_fn).__name__}.")
    fmt, k = _logits_format(api, logits)
    dtype = _dtype(api, dtype)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{api}: expected temperature to be a float > 0, got {temperature!r}.")
    temperature = float(temperature)
    if fmt != "topk" and temperature != 1.0:
        raise ValueError(f"{api}: temperature applies to the top-k format only (dense logits are stored raw and "
                         f"tempered by the loss), got temperature={temperature} with logits={logits!r}.")
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ValueError(f"{api}: expected shard_bytes to be a positive int, got {shard_bytes!r}.")
    if not isinstance(logits_key, str):
        raise TypeError(f"{api}: expected logits_key to be a str, got {type(logits_key).__name__}.")
    selection = _selection(api, features, logits_key)
    if fmt is None and not selection:
        raise ValueError(f"{api}: nothing to cache: expected logits='dense' or ('topk', k), or some features.")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{api}: expected a directory path for the cache, got the file {str(path)!r}.")
    index = _locked_write(api, path, overwrite, shard_bytes, lambda writer: _write_shards(
        api, teacher_fn, loader, writer, fmt, k, selection, dtype, temperature, logits_key))
    return _info(path, index)


def _locked_write(api: str, path: Path, overwrite: bool, shard_bytes: int,
                  body: Callable[[_ShardWriter], dict]) -> dict:
    """Under the directory's writer lock: ``body(writer)`` writes a new generation's files and returns their index,
    which is committed by one rename over ``index.json``; then the replaced cache's files are removed."""
    path.mkdir(parents=True, exist_ok=True)
    with _write_lock(api, path):
        if ((path / INDEX).exists() or (path / INDEX).is_symlink()) and not overwrite:
            raise FileExistsError(f"{api}: expected an empty or new directory, got {str(path)!r}, which already "
                                  "holds a cache; pass overwrite=True to replace it.")
        _remove_debris(path, None, _committed_generation(path))
        generation = secrets.token_hex(8)
        writer = _ShardWriter(path, shard_bytes, generation)
        try:
            index = body(writer)
            tmp = path / (INDEX + ".tmp")
            with _create(tmp) as fh:
                fh.write(json.dumps(index, indent=1).encode())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path / INDEX)  # the commit: readers see the old cache or the new one, whole
        except BaseException:
            writer.discard()
            _unlink(path / (INDEX + ".tmp"))
            raise
        with contextlib.suppress(OSError):  # committed: what follows is housekeeping
            _fsync_dir(path)
            _remove_debris(path, set(writer.files), generation)
    return index


def _write_shards(api: str, teacher_fn, loader, writer: _ShardWriter, fmt, k, selection, dtype: str,
                  temperature: float, logits_key: str) -> dict:
    """Run the teacher over the loader into ``writer``'s shards; return the index to commit."""
    arrays_meta: dict[str, dict] | None = None
    vocab = None
    tokens = 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            out = teacher_fn(batch)
            arrays, meta = _arrays(api, i, out, fmt, k, selection, dtype, temperature, logits_key)
            if arrays_meta is None:
                arrays_meta = meta
            elif meta != arrays_meta:
                raise ValueError(f"{api}: expected every batch to give the same outputs, but batch {i} gives "
                                 f"{_names(meta)} after {_names(arrays_meta)} (a different number of layers?).")
            if fmt is not None:
                z = out[logits_key]
                if vocab is not None and z.shape[-1] != vocab:
                    raise ValueError(f"{api}: expected {vocab} classes in every batch's logits, got {z.shape[-1]} "
                                     f"for batch {i}.")
                vocab = int(z.shape[-1])
            tokens += _tokens({n: a.shape for n, a in arrays.items()})
            writer.add(arrays)
    if arrays_meta is None:
        raise ValueError(f"{api}: expected the loader to give at least one batch, got none (an exhausted "
                         "iterator?); nothing was written.")
    writer.flush()
    nbytes = sum(f["size"] * np.dtype(f["dtype"]).itemsize
                 for shard in writer.shards for f in shard["files"].values())
    index = {
        "format": FORMAT, "version": VERSION, "generation": writer.generation,
        "logits": None if fmt is None else {"format": fmt, "key": logits_key, "k": k, "vocab": vocab,
                                            "temperature": temperature},
        "dtype": dtype, "features": selection, "arrays": arrays_meta, "tokens": tokens, "nbytes": nbytes,
        "shards": writer.shards, "batches": writer.batches,
    }
    index["digest"] = _digest(index)
    return index


def _names(meta: Mapping[str, dict]) -> list[str]:
    return [_array_name(m) for m in meta.values()]


def _array_name(m: Mapping) -> str:
    if "part" in m:
        return m["key"] if m["part"] == "dense" else f"{m['key']}.{m['part']}"
    return m["key"] if m["layer"] is None else f"{m['key']}.{m['layer']}"


def _tokens(shapes: Mapping[str, Sequence[int]]) -> int:
    """Token positions of a batch (its arrays' shapes): the logits' rows (all dims but the last), or else the first
    feature's."""
    if "logits-tail" in shapes:
        return math.prod(shapes["logits-tail"])
    first = shapes["logits" if "logits" in shapes else "feature-0"]
    return math.prod(first[:-1]) if len(first) > 1 else first[0]


def _info(path: Path, index: Mapping) -> CacheInfo:
    logits = index["logits"]
    tokens = int(index["tokens"])
    per_token: dict[str, float] = {}
    for shard in index["shards"]:
        for name, f in shard["files"].items():
            label = _array_name(index["arrays"][name])
            per_token[label] = per_token.get(label, 0) + f["size"] * np.dtype(f["dtype"]).itemsize
    per_token = {n: b / tokens if tokens else 0.0 for n, b in per_token.items()}
    features: dict[str, list[int] | None] = {}
    for m in index["arrays"].values():
        if "layer" in m:
            features[m["key"]] = None if m["layer"] is None else [*features.get(m["key"], []), m["layer"]]
    return CacheInfo(
        path=str(path), batches=len(index["batches"]), tokens=tokens, nbytes=int(index["nbytes"]),
        logits=None if logits is None else logits["format"], k=None if logits is None else logits["k"],
        vocab=None if logits is None else logits["vocab"], dtype=index["dtype"],
        temperature=1.0 if logits is None else float(logits["temperature"]), features=features,
        per_token=per_token, generation=index.get("generation"),
    )


# -------------------------------------------------------------------------------------------- reading
class CachedLayers(list):
    """A teacher's list of layers with only some cached: indexing an uncached layer raises ``SpecKeyError``."""

    def __init__(self, key: str, layers: list):
        super().__init__(layers)
        self.key = key

    def __getitem__(self, index):
        value = super().__getitem__(index)
        if value is None:
            cached = [i for i, v in enumerate(list.__iter__(self)) if v is not None]
            raise SpecKeyError(f"dk.cache: layer {index} of teacher output {self.key!r} was not cached; cached "
                               f"layers: {cached}. Write the cache with features={{{self.key!r}: [...]}} or from "
                               "the spec.")
        return value


def _changed(api: str, path, generation: str, reopen: str) -> CacheChangedError:
    """The error of a reader whose cache was replaced since it was opened."""
    return CacheChangedError(
        f"{api}: expected the cache at {str(path)!r} to be the one opened (generation {generation}), got another: "
        f"its index.json was replaced or removed since (an overwrite?). Reopen it with {reopen}.")


class Cache(Sequence):
    """A written cache, read back: ``cache[i]`` is batch i's teacher output mapping; ``len(cache)`` batches.

    Shard files are memory-mapped on first use (at most ``open_shards`` shards at a time); indexing copies one
    batch into tensors (on ``device`` when given). Every ``cache[i]`` first checks (one ``stat`` of ``index.json``)
    that the cache is still the one that was opened, and raises :class:`CacheChangedError` once it was overwritten
    or removed: a cache never returns data of two writes.
    """

    def __init__(self, path: Path, index: Mapping, slots: list, device=None, open_shards: int = 4, *,
                 _opened: tuple[int, tuple] | None = None):
        self.path = path
        self._index = index
        self._slots = slots  # per batch: (shard, {array: (offset, shape)})
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._open_shards = open_shards
        self.device = None if device is None else torch.device(device)
        self.info = _info(path, index)
        self._index_file = os.fspath(path / INDEX)
        if _opened is None:
            fd = _open_regular(path / INDEX)
            _opened = fd, _stamp(os.fstat(fd))
        self._hold(*_opened)

    def _hold(self, fd: int, stamp: tuple) -> None:
        """Keep ``index.json`` open: while it is, its inode number cannot be reused, so "``path/index.json`` has
        this inode, mtime and size" means "it is the file that was read"."""
        self._stamp = stamp
        self._close_index = weakref.finalize(self, os.close, fd)

    def _unchanged(self) -> bool:
        try:
            st = os.stat(self._index_file, follow_symlinks=False)
        except OSError:
            return False
        return _stamp(st) == self._stamp

    def _check_unchanged(self) -> None:
        if not self._unchanged():
            raise _changed("dk.cache.Cache", self.path, self.info.generation or "of version 1", "dk.cache.read")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        del state["_stamp"], state["_close_index"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        fd, stamp, index, _ = _open_index(self.path)
        if index != self._index:
            os.close(fd)
            raise CacheChangedError(f"dk.cache.Cache: expected the cache at {str(self.path)!r} to be the one "
                                    "pickled, got another (it was overwritten since). Reopen it with dk.cache.read.")
        self._hold(fd, stamp)

    @property
    def bytes_per_token(self) -> float:
        """Stored bytes per token position (:attr:`CacheInfo.bytes_per_token`)."""
        return self.info.bytes_per_token

    def __len__(self) -> int:
        return len(self._slots)

    def __repr__(self) -> str:
        i = self.info
        what = i.logits if i.logits != "topk" else f"topk(k={i.k})"
        return (f"Cache({str(self.path)!r}, batches={i.batches}, logits={what}, features={i.features}, "
                f"bytes_per_token={i.bytes_per_token:.1f})")

    def _shard(self, number: int) -> dict[str, np.ndarray]:
        arrays = self._open.get(number)
        if arrays is None:
            try:
                arrays = {name: _open_shard(self.path, f, mmap=True)
                          for name, f in self._index["shards"][number]["files"].items()}
            except (OSError, CacheError):
                self._check_unchanged()  # a file of a replaced cache, removed since: say so
                raise
            self._open[number] = arrays
            while len(self._open) > self._open_shards:
                self._open.popitem(last=False)
        self._open.move_to_end(number)
        return arrays

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"dk.cache.Cache: expected an int batch index, got {type(i).__name__}.")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"dk.cache.Cache: batch index {i} out of range for a cache of {n} batches.")
        self._check_unchanged()
        shard, places = self._slots[i % n]
        arrays = self._shard(shard)
        out: dict[str, Any] = {}
        layered: dict[str, list] = {}
        topk: dict[str, Any] = {}
        for name, m in self._index["arrays"].items():
            offset, shape = places[name]
            flat = arrays[name][offset:offset + math.prod(shape)]
            x = torch.from_numpy(np.array(flat).reshape(shape))
            x = x if self.device is None else x.to(self.device)
            if "part" in m and m["part"] != "dense":
                topk[m["part"]] = x
            elif "part" in m or m["layer"] is None:
                out[m["key"]] = x
            else:
                layered.setdefault(m["key"], [None] * m["layers"])[m["layer"]] = x
        if topk:
            logits = self._index["logits"]
            out[logits["key"]] = {**topk, "temperature": float(logits["temperature"])}
        for key, layers in layered.items():
            out[key] = CachedLayers(key, layers)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]


# ------------------------------------------------------------------------------------ reading the index
def _open_regular(file: Path, api: str = "dk.cache.read", what: str = "file") -> int:
    """A read-only descriptor of the regular file ``file``, which must not be a symbolic link (a cache reads nothing
    outside its directory) nor a FIFO or device (which could block)."""
    try:
        fd = os.open(file, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.EMLINK):  # Linux, macOS / FreeBSD: the file is a link
            raise
        raise CacheError(f"{api}: expected the {what} {str(file)!r} to be a regular file in the cache directory, "
                         "got a symbolic link.") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CacheError(f"{api}: expected the {what} {str(file)!r} to be a regular file, got "
                         f"{'a directory' if stat.S_ISDIR(mode) else 'a special file'}.")
    return fd


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 24):
        chunks.append(chunk)
    return b"".join(chunks)


def _stamp(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _open_index(path: Path, validate: Callable[[Any, str], Any] | None = None,
                api: str = "dk.cache.read") -> tuple[int, tuple, dict, Any]:
    """``(descriptor, stamp, index, validate(index))`` of the cache at ``path`` (``validate``: that of the
    batch-position format by default); the caller closes the descriptor."""
    validate = validate or _validate
    if not path.is_dir():
        raise FileNotFoundError(f"{api}: expected a cache directory written by dk.cache, got {str(path)!r} "
                                "(no such directory).")
    file = path / INDEX
    try:
        fd = _open_regular(file, api, what="cache index")
    except FileNotFoundError:
        raise FileNotFoundError(f"{api}: expected {INDEX} in {str(path)!r}, found none: not a cache, or its first "
                                "write is still running or was interrupted.") from None
    try:
        stamp = _stamp(os.fstat(fd))
        index = _parse(_read_all(fd), str(file))
        if _stamp(os.fstat(fd)) != stamp:
            raise CacheChangedError(f"{api}: expected {str(file)!r} to stay unchanged while it is read, got an edit.")
        return fd, stamp, index, validate(index, str(file))
    except BaseException:
        os.close(fd)
        raise


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Duplicate(key)
    return out


class _Duplicate(Exception):
    pass


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _parse(data: bytes, file: str) -> Any:
    """``json.loads`` that refuses duplicate keys, NaN/Infinity and nesting deeper than :data:`MAX_DEPTH`
    (checked before parsing, so a deeply nested file gives a :class:`CacheError`, never a ``RecursionError``)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _corrupt(file, f"not JSON (not UTF-8: {error})") from None
    brackets = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "replace"), np.uint8)
    step = (brackets == ord("[")).astype(np.int64) + (brackets == ord("{")) - (brackets == ord("]")) \
        - (brackets == ord("}"))
    depth = int(np.cumsum(step).max()) if step.size else 0
    if depth > MAX_DEPTH:
        raise _corrupt(file, f"expected JSON nested at most {MAX_DEPTH} levels deep (an index needs 5), got "
                             f"{depth} levels")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except _Duplicate as duplicate:
        raise _corrupt(file, f"expected every key once per JSON object, got the key {_show(duplicate.args[0])} "
                             "twice") from None
    except ValueError as error:
        raise _corrupt(file, f"not JSON ({error})") from None


def _corrupt(file: str, what: str) -> CacheError:
    return CacheError(f"dk.cache.read: corrupt cache index {file!r}: {what}. Rewrite the cache with "
                      "dk.cache.write.")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 6, 4


def _show(value) -> str:
    """A short repr of a JSON value, bounded in length and depth."""
    return _REPR.repr(value)


def _at(parent: str, key) -> str:
    """The JSON path of ``parent``'s member ``key``: ``shards[0].files['logits-tail'].size``."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if key.isidentifier():
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{_show(key)}]"


def _digest(index: Mapping) -> str:
    """SHA-256 of the index without its ``digest`` field, in canonical JSON: any edit of the index shows."""
    body = {k: v for k, v in index.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_INDEX_FIELDS = {
    "format": f"{FORMAT!r}", "version": "the format version", "generation": "the write's generation id",
    "logits": "null or the logits format (an object)", "dtype": "'float16' or 'float32'",
    "features": "an object {output name: null or a list of layer indices}",
    "arrays": "an object {array name: its description}", "tokens": "an int >= 0", "nbytes": "an int >= 0",
    "shards": "a list of shards", "batches": "a list of batches", "digest": "the SHA-256 of the index",
}
_LOGITS_FIELDS = {"format": "'dense' or 'topk'", "key": "the teacher output name (a str)",
                  "k": "null (dense) or the kept classes (an int >= 1)", "vocab": "the number of classes (an int >= 1)",
                  "temperature": "a number > 0"}
_PART_FIELDS = {"key": "the teacher output name (a str)", "part": "'dense', 'indices', 'logprobs' or 'tail'"}
_LAYER_FIELDS = {"key": "the teacher output name (a str)", "layer": "null or a layer index (an int >= 0)",
                 "layers": "null or the number of layers (an int >= 1)"}
_FILE_FIELDS = {"file": "the shard file name", "size": "its number of elements (an int >= 0)",
                "dtype": "its dtype"}


class _Walk:
    """Checks of one index's fields: a failure names the file, the field's JSON path, what was expected and what
    was found."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, at: str, expected: str, got: str):
        raise _corrupt(self.file, f"{at or 'the top level'}: expected {expected}, got {got}")

    def fields(self, value, at: str, fields: Mapping[str, str]) -> dict:
        if not isinstance(value, dict):
            self.fail(at, f"an object with the fields {', '.join(fields)}", _show(value))
        for name, what in fields.items():
            if name not in value:
                self.fail(_at(at, name), what, "nothing (the field is missing)")
        for name in value:
            if name not in fields:
                self.fail(at, f"only the fields {', '.join(fields)}", f"the unknown field {_show(name)}")
        return value

    def mapping(self, value, at: str, what: str) -> dict:
        if not isinstance(value, dict):
            self.fail(at, what, _show(value))
        return value

    def list(self, value, at: str, what: str) -> list:
        if not isinstance(value, list):
            self.fail(at, what, _show(value))
        return value

    def int(self, value, at: str, low: int = 0, high: int | None = None, what: str | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None
                                                                                    and value >= high):
            span = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
            self.fail(at, what or span, _show(value))
        return value

    def str(self, value, at: str, what: str = "a str") -> str:
        if not isinstance(value, str):
            self.fail(at, what, _show(value))
        return value

    def choice(self, value, at: str, options: Sequence) -> Any:
        if isinstance(value, bool) or value not in options:
            self.fail(at, " or ".join(map(repr, options)), _show(value))
        return value

    def equal(self, value, at: str, expected, why: str) -> None:
        if type(value) is not type(expected) or value != expected:
            self.fail(at, f"{_show(expected)} ({why})", _show(value))


def _validate(index, file: str) -> list:
    """Check every field of a parsed index (structure, types, ranges, and that the parts agree with each other);
    return per batch ``(shard, {array: (offset, shape)})``. Raises :class:`CacheError` naming the file and field."""
    w = _Walk(file)
    if isinstance(index, dict) and index.get("format") == KEYED_FORMAT:
        raise CacheError(f"dk.cache.read: {file!r} is the index of a keyed top-k cache (written by "
                         "dk.cache.write_topk); open it with dk.cache.read_topk.")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        w.fail("format", f"format {FORMAT!r} (an index written by dk.cache.write)",
               _show(index.get("format") if isinstance(index, dict) else index))
    version = index.get("version")
    if isinstance(version, bool) or version not in VERSIONS:
        raise CacheError(f"dk.cache.read: expected a cache of format version {' or '.join(map(str, VERSIONS))}, got "
                         f"version {_show(version)} in {file!r}.")
    fields = dict(_INDEX_FIELDS)
    if version == 1:  # before generations and digests
        del fields["generation"], fields["digest"]
    w.fields(index, "", fields)
    generation = None
    if version >= 2:
        generation = w.str(index["generation"], "generation", "16 hexadecimal digits")
        if not _GENERATION.fullmatch(generation):
            w.fail("generation", "16 hexadecimal digits", _show(generation))
        w.str(index["digest"], "digest", "a SHA-256 in hexadecimal")
    dtype = w.choice(index["dtype"], "dtype", tuple(_DTYPES))

    arrays = w.mapping(index["arrays"], "arrays", _INDEX_FIELDS["arrays"])
    names = list(arrays)
    expected_dtype: dict[str, str] = {}
    parts: dict[str, str] = {}  # part -> array name
    layered: dict[str, dict] = {}  # feature key -> {"layers": n or None, "layer": [indices]}
    feature_numbers: list[int] = []
    for name, m in arrays.items():
        at = _at("arrays", name)
        if isinstance(m, dict) and "part" in m:
            w.fields(m, at, _PART_FIELDS)
            part = w.choice(m["part"], _at(at, "part"), ("dense", "indices", "logprobs", "tail"))
            w.str(m["key"], _at(at, "key"))
            if name != (want := "logits" if part == "dense" else f"logits-{part}"):
                w.fail("arrays", f"the name {want!r} for the logits part {part!r}", _show(name))
            parts[part] = name  # once each: the name follows from the part
            expected_dtype[name] = {"indices": "int32", "tail": "float32"}.get(part, dtype)
            continue
        w.fields(m, at, _LAYER_FIELDS)
        key = w.str(m["key"], _at(at, "key"))
        number = re.fullmatch(r"feature-(0|[1-9]\d*)", name)
        if not number:
            w.fail("arrays", "the names 'logits' or 'logits-<part>' for logits, 'feature-<n>' for features",
                   _show(name))
        feature_numbers.append(int(number[1]))
        expected_dtype[name] = dtype
        if m["layer"] is None:
            if m["layers"] is not None:
                w.fail(_at(at, "layers"), "null (the whole output is cached, layer is null)", _show(m["layers"]))
            if key in layered:
                w.fail(at, f"output {_show(key)} cached once as a whole or by layers", "a second entry")
            layered[key] = {"layers": None, "layer": []}
            continue
        layers = w.int(m["layers"], _at(at, "layers"), 1)
        layer = w.int(m["layer"], _at(at, "layer"), 0, layers,
                      f"a layer index in [0, {layers}) (the output has {layers} layers)")
        seen = layered.setdefault(key, {"layers": layers, "layer": []})
        if seen["layers"] != layers:
            w.fail(_at(at, "layers"), f"{_show(seen['layers'])} like the other layers of {_show(key)}", _show(layers))
        if layer in seen["layer"]:
            w.fail(_at(at, "layer"), f"each layer of {_show(key)} once", f"layer {layer} twice")
        seen["layer"].append(layer)

    if sorted(feature_numbers) != list(range(len(feature_numbers))):
        w.fail("arrays", f"features numbered 0 to {len(feature_numbers) - 1}",
               _show([f"feature-{n}" for n in sorted(feature_numbers)]))

    logits = index["logits"]
    vocab = k = None
    if logits is not None:
        w.fields(logits, "logits", _LOGITS_FIELDS)
        fmt = w.choice(logits["format"], "logits.format", ("dense", "topk"))
        key = w.str(logits["key"], "logits.key")
        if key in layered:
            w.fail("logits.key", "an output name other than the features'", _show(key))
        if names or logits["vocab"] is not None:  # an empty version-1 cache has no vocab
            vocab = w.int(logits["vocab"], "logits.vocab", 1)
        temperature = logits["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            w.fail("logits.temperature", "a finite number > 0", _show(temperature))
        if fmt == "dense":
            w.equal(logits["k"], "logits.k", None, "the dense format keeps every class")
            if temperature != 1:
                w.fail("logits.temperature", "1.0 (dense logits are stored raw)", _show(temperature))
        else:
            k = w.int(logits["k"], "logits.k", 1, None if vocab is None else vocab + 1,
                      f"the kept classes, an int in [1, {vocab}] (vocab is {vocab})" if vocab else None)
        for part in parts.values():
            w.equal(arrays[part]["key"], _at(_at("arrays", part), "key"), key, "logits.key")
        want = set() if not names else {"dense"} if fmt == "dense" else {"indices", "logprobs", "tail"}
        if set(parts) != want:
            w.fail("arrays", f"the arrays of logits format {fmt!r}: {sorted(want)}", f"parts {sorted(parts)}")
    elif parts:
        w.fail("arrays", "no logits arrays (logits is null)", _show(sorted(parts.values())))

    features = w.mapping(index["features"], "features", _INDEX_FIELDS["features"])
    for key, layers in features.items():
        at = _at("features", key)
        if layers is not None:
            w.list(layers, at, "null or a non-empty list of layer indices")
            if not layers:
                w.fail(at, "null or a non-empty list of layer indices", "[]")
            for j, layer in enumerate(layers):
                w.int(layer, _at(at, j), -(1 << 62), what="a layer index (an int)")
        if names and key not in layered:
            w.fail(at, f"an output cached in arrays (cached: {sorted(layered)})", _show(key))
        if not names:
            continue
        n, got = layered[key]["layers"], sorted(layered[key]["layer"])
        if layers is None:
            if not (n is None or got == list(range(n))):
                w.fail(at, f"the layers cached in arrays, {got}", "null (every layer)")
        elif n is None:
            w.fail(at, "null (arrays cache the whole output)", _show(layers))
        elif any(not -n <= layer < n for layer in layers) or sorted({layer % n for layer in layers}) != got:
            w.fail(at, f"the layers cached in arrays, {got} of {n}", _show(layers))
    missing = [key for key in layered if key not in features]
    if missing:
        w.fail("features", f"an entry for every cached output ({sorted(layered)})", f"none for {_show(missing[0])}")

    shards = w.list(index["shards"], "shards", _INDEX_FIELDS["shards"])
    for s, shard in enumerate(shards):
        at = _at("shards", s)
        files = w.fields(shard, at, {"files": "an object {array name: file}"})["files"]
        w.mapping(files, _at(at, "files"), "an object {array name: file}")
        if set(files) != set(names):
            w.fail(_at(at, "files"), f"a file for each array, {names}", _show(list(files)))
        for name, f in files.items():
            fat = _at(_at(at, "files"), name)
            w.fields(f, fat, _FILE_FIELDS)
            w.equal(f["file"], _at(fat, "file"), _shard_file(s, name, generation),
                    "the file of this shard and array")
            w.int(f["size"], _at(fat, "size"))
            w.equal(f["dtype"], _at(fat, "dtype"), expected_dtype[name], f"the dtype of {name}")

    batches = w.list(index["batches"], "batches", _INDEX_FIELDS["batches"])
    if bool(batches) != bool(names):
        w.fail("arrays" if batches else "batches", "batches and arrays, or neither", f"{len(batches)} batches and "
               f"{len(names)} arrays")
    used = [dict.fromkeys(names, 0) for _ in shards]
    slots = []
    tokens = 0
    previous = 0
    for b, batch in enumerate(batches):
        at = _at("batches", b)
        w.fields(batch, at, {"shard": "a shard number (an int)", "shapes": "an object {array name: shape}"})
        shard = w.int(batch["shard"], _at(at, "shard"), previous, len(shards),
                      f"a shard number in [{previous}, {len(shards)}) (batches are stored in order)")
        previous = shard
        shapes = w.mapping(batch["shapes"], _at(at, "shapes"), "an object {array name: shape}")
        if set(shapes) != set(names):
            w.fail(_at(at, "shapes"), f"a shape for each array, {names}", _show(list(shapes)))
        for name, shape in shapes.items():
            sat = _at(_at(at, "shapes"), name)
            w.list(shape, sat, "a shape (a non-empty list of ints >= 0)")
            if not shape:
                w.fail(sat, "a shape with a batch dimension", "[]")
            for d, size in enumerate(shape):
                w.int(size, _at(sat, d))
        first = names[0]
        for name, shape in shapes.items():
            if shape[0] != shapes[first][0]:
                w.fail(_at(_at(at, "shapes"), name), f"batch size {shapes[first][0]} (first dimension) like "
                                                     f"{first}", _show(shape))
        if "dense" in parts:
            shape = shapes[parts["dense"]]
            if len(shape) < 2 or shape[-1] != vocab:
                w.fail(_at(_at(at, "shapes"), parts["dense"]), f"a shape [B, ..., {vocab}] (vocab is {vocab})",
                       _show(shape))
        if "indices" in parts:
            shape = shapes[parts["indices"]]
            if len(shape) < 2 or shape[-1] != k:
                w.fail(_at(_at(at, "shapes"), parts["indices"]), f"a shape [B, ..., {k}] (k is {k})", _show(shape))
            w.equal(shapes[parts["logprobs"]], _at(_at(at, "shapes"), parts["logprobs"]), shape,
                    f"the shape of {parts['indices']}")
            w.equal(shapes[parts["tail"]], _at(_at(at, "shapes"), parts["tail"]), shape[:-1],
                    f"the shape of {parts['indices']} without its last dimension")
        places = {}
        for name in names:
            shape = shapes[name]
            places[name] = (used[shard][name], tuple(shape))
            used[shard][name] += math.prod(shape)
        slots.append((shard, places))
        tokens += _tokens(shapes)
    for s, (shard, counts) in enumerate(zip(shards, used, strict=True)):
        for name, f in shard["files"].items():
            w.equal(f["size"], _at(_at(_at(_at("shards", s), "files"), name), "size"), counts[name],
                    "the sizes of the batches stored in it add up to it")
    w.equal(index["tokens"], "tokens", tokens, "the token positions of the batches' shapes")
    nbytes = sum(f["size"] * np.dtype(f["dtype"]).itemsize for shard in shards for f in shard["files"].values())
    w.equal(index["nbytes"], "nbytes", nbytes, "the shard files' data bytes")
    if version >= 2 and index["digest"] != _digest(index):
        w.fail("digest", "the SHA-256 of the other fields", "another one: the index was edited or damaged after it "
               "was written")
    return slots


# ------------------------------------------------------------------------------------ reading the data
def _open_shard(path: Path, entry: Mapping, *, mmap: bool, api: str = "dk.cache.read",
                what: str = "shard file") -> np.ndarray | None:
    """Check that the shard file ``entry`` is a ``.npy`` of a C-ordered 1-D array of the index's size and dtype,
    all there; return its memory map when ``mmap`` (of the very file checked: one descriptor)."""
    file = path / entry["file"]
    try:
        fd = _open_regular(file, api, what=what)
    except FileNotFoundError:
        raise FileNotFoundError(f"{api}: expected {what} {str(file)!r} listed in the index; it is "
                                "missing.") from None
    with os.fdopen(fd, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
        except (ValueError, OSError, EOFError) as error:
            raise CacheError(f"{api}: corrupt {what} {str(file)!r}: {error}") from None
        expected = offset + entry["size"] * np.dtype(entry["dtype"]).itemsize
        if shape != (entry["size"],) or dtype != np.dtype(entry["dtype"]) or fortran:
            raise CacheError(f"{api}: corrupt {what} {str(file)!r}: expected a 1-D {entry['dtype']} "
                             f"array of {entry['size']} elements, got shape {shape} and dtype {dtype}.")
        size = os.fstat(fh.fileno()).st_size
        if size != expected:
            raise CacheError(f"{api}: corrupt {what} {str(file)!r}: expected {expected} bytes, got "
                             f"{size} (truncated?).")
        return np.memmap(fh, dtype=dtype, mode="r", offset=offset, shape=shape) if mmap else None


def read(path: str | os.PathLike, *, device=None, open_shards: int = 4) -> Cache:
    """Open the cache at ``path`` as a :class:`Cache`, after validating the index and every shard file's header.

    ``device``: where ``cache[i]``'s tensors go (default: CPU); ``open_shards``: how many shards stay
    memory-mapped at a time (least recently used closed first). Opening during an overwrite gives the old cache or
    the new one, whole; reading a batch after the cache was overwritten raises :class:`CacheChangedError`.

    Raises ``FileNotFoundError`` for a missing directory, index or shard file and :class:`CacheError` (a
    ``ValueError``) for a corrupt index or shard file, naming the file and, in the index, the field.
    """
    if isinstance(open_shards, bool) or not isinstance(open_shards, int) or open_shards < 1:
        raise ValueError(f"dk.cache.read: expected open_shards to be a positive int, got {open_shards!r}.")
    path = Path(path)
    for _ in range(_OPEN_ATTEMPTS):
        try:
            fd, stamp, index, slots = _open_index(path)
        except CacheChangedError:
            continue
        cache = Cache(path, index, slots, device, open_shards, _opened=(fd, stamp))  # closes fd when collected
        try:
            for shard in index["shards"]:
                for f in shard["files"].values():
                    _open_shard(path, f, mmap=False)
        except (OSError, CacheError):
            if cache._unchanged():
                cache._close_index()
                raise
        if cache._unchanged():
            return cache
        cache._close_index()  # overwritten meanwhile (its files maybe removed): open the new one
    raise CacheChangedError(f"dk.cache.read: expected the cache at {str(path)!r} to stay unchanged while it is "
                            f"opened, got a new one {_OPEN_ATTEMPTS} times in a row.")


# ======================================================================================= keyed top-k caches
_BINS = 10_000  # kept-mass histogram bins: percentiles to within 1e-4
_ROW_ARRAYS = ("positions", "tail", "lp-max", "lp-step")  # one element per stored position; the others have k


class CachedTeacher(NamedTuple):
    """What :meth:`TopKCache.teacher` returns: the top-k teacher aligned to the student's positions, and where it
    is defined."""

    topk: TopK
    """indices ``[B, L, k]`` (int64), logprobs ``[B, L, k]`` and tail ``[B, L]`` (float32), the stored temperature
    and the policy: the ``teacher`` argument of ``dk.kd_kl`` and co."""
    mask: Tensor
    """``[B, L]`` bool: True where the cache holds the teacher's row; elsewhere ``topk`` is a placeholder (the
    uniform distribution over classes 0..k-1) that the loss must mask out."""


def _encoding(api: str, dtype) -> str:
    names = {torch.float16: "float16", torch.float32: "float32", torch.int8: "int8", torch.uint8: "int8",
             np.float16: "float16", np.float32: "float32", np.int8: "int8", np.uint8: "int8", "uint8": "int8"}
    name = dtype.name if isinstance(dtype, np.dtype) else names.get(dtype, dtype) if _hashable(dtype) else dtype
    name = names.get(name, name) if _hashable(name) else name
    if name not in ENCODINGS:
        raise ValueError(f"{api}: expected dtype 'float32', 'float16' or 'int8' for the stored log-probabilities, "
                         f"got {dtype!r}.")
    return name


def _indices_dtype(vocab: int) -> str:
    return "uint16" if vocab <= 1 << 16 else "int32"


def _positive_int(api: str, name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{api}: expected {name} to be an int >= {low}, got {value!r}.")
    return int(value)


def _example_keys(api: str, i: int, ids, size: int, state: dict) -> list:
    """The ``size`` example ids of item ``i`` as Python ints or strs (the same kind for the whole cache)."""
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.ndim != 1:
            raise TypeError(f"{api}: expected the example ids of batch {i} to be a 1-D integer tensor, a list of "
                            f"ints or a list of strs, got a tensor of dtype {ids.dtype} and shape {tuple(ids.shape)}.")
        ids = ids.tolist()
    elif isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iuUS":
            raise TypeError(f"{api}: expected the example ids of batch {i} to be 1-D ints or strs, got an array of "
                            f"dtype {ids.dtype} and shape {ids.shape}.")
        ids = [x.decode() if isinstance(x, bytes) else x for x in ids.tolist()]
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{api}: expected the example ids of batch {i} to be a sequence (one id per sequence: a "
                        f"list or 1-D tensor of ints, or a list of strs), got {type(ids).__name__}.")
    keys = []
    for key in ids:
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            key, kind = int(key), "int"
            if not -(1 << 63) <= key < 1 << 63:
                raise ValueError(f"{api}: expected example ids in the int64 range, got {key} in batch {i}.")
        elif isinstance(key, str):
            kind = "str"
            if "\0" in key:
                raise ValueError(f"{api}: expected example ids without NUL characters, got {key!r} in batch {i}.")
        else:
            raise TypeError(f"{api}: expected each example id to be an int (e.g. a dataset index) or a str, got "
                            f"{type(key).__name__} ({_show(key)}) in batch {i}.")
        if state.setdefault("keys", kind) != kind:
            raise TypeError(f"{api}: expected every example id to be a{'n int' if state['keys'] == 'int' else ' str'} "
                            f"like the first ones, got {key!r} in batch {i}.")
        keys.append(key)
    if len(keys) != size:
        raise ValueError(f"{api}: expected one example id per sequence, {size} for batch {i}, got {len(keys)}.")
    return keys


def _leading(api: str, i: int, name: str, value, shape: tuple[int, int], device) -> Tensor | None:
    if value is None:
        return None
    if not isinstance(value, Tensor):
        value = torch.as_tensor(np.asarray(value))
    if tuple(value.shape) != shape:
        raise ValueError(f"{api}: expected {name} of batch {i} to have the shape {list(shape)} of the logits' "
                         f"leading dimensions [B, L], got {list(value.shape)}.")
    return value.to(device)


def _keyed_rows(api: str, i: int, ids, teacher, keep, positions, k: int, temperature: float, state: dict):
    """The kept rows of item ``i``: ``(keys, counts [B], rows {array: numpy}, tail float32 [n], B·L)``.

    ``teacher``: logits ``[B, L, V]``, or a top-k teacher (``dk.TopK`` or mapping) ``[B, L, k' ≥ k]``.
    """
    if isinstance(teacher, TopK):
        teacher = teacher.as_mapping()
    dense = isinstance(teacher, Tensor)
    if dense:
        if not teacher.is_floating_point() or teacher.ndim != 3 or teacher.shape[-1] == 0:
            got = f"dtype {teacher.dtype}" if not teacher.is_floating_point() else f"shape {list(teacher.shape)}"
            raise ValueError(f"{api}: expected the teacher logits of batch {i} to be a floating-point tensor "
                             f"[B, L, V] (a sequence per example; unsqueeze(1) one position per example), got {got}.")
        lead, device = tuple(teacher.shape[:2]), teacher.device
    elif isinstance(teacher, Mapping) and "indices" in teacher and "logprobs" in teacher:
        indices, logprobs = teacher["indices"], teacher["logprobs"]
        if not (isinstance(indices, Tensor) and isinstance(logprobs, Tensor) and indices.ndim == 3
                and logprobs.shape == indices.shape and not indices.is_floating_point()
                and logprobs.is_floating_point()):
            raise ValueError(f"{api}: expected a top-k teacher of batch {i} with integer indices and floating "
                             "log-probabilities of one shape [B, L, k].")
        stored = teacher.get("temperature", 1.0)
        stored = float(stored) if isinstance(stored, (int, float)) or (
            isinstance(stored, Tensor) and stored.ndim == 0) else None
        if stored is None or not math.isclose(stored, temperature, rel_tol=1e-6):
            raise ValueError(f"{api}: expected a top-k teacher at the temperature {temperature} given to write_topk "
                             f"(a float), got {teacher.get('temperature')!r} for batch {i}.")
        if state.get("vocab") is None:
            raise ValueError(f"{api}: a top-k teacher does not tell the vocabulary size: pass vocab=V.")
        lead, device = tuple(indices.shape[:2]), indices.device
    else:
        raise TypeError(f"{api}: expected the teacher of batch {i} to be logits [B, L, V] or a top-k teacher "
                        f"(dk.TopK or a mapping with 'indices' and 'logprobs'), got {type(teacher).__name__}.")
    size = lead[0]
    keys = _example_keys(api, i, ids, size, state)
    keep = _leading(api, i, "the keep mask", keep, lead, device)
    keep = torch.ones(lead, dtype=torch.bool, device=device) if keep is None else keep != 0
    given = math.prod(lead)
    positions = _leading(api, i, "positions", positions, lead, "cpu")
    if positions is None:
        positions = torch.arange(lead[1]).expand(lead)
    elif positions.is_floating_point() or positions.dtype == torch.bool:
        raise TypeError(f"{api}: expected integer positions for batch {i}, got dtype {positions.dtype}.")
    with torch.no_grad():
        if dense:
            z = teacher[keep]
            vocab = int(teacher.shape[-1])
            state["vocab"] = vocab if state["vocab"] is None else state["vocab"]
            if state["vocab"] != vocab:
                raise ValueError(f"{api}: expected {state['vocab']} classes in every batch's logits (the first "
                                 f"batch's, or vocab=), got {vocab} for batch {i}.")
            if vocab < k:
                raise ValueError(f"{api}: expected at least k = {k} classes in the teacher logits, got {vocab}.")
            indices, logprobs, tail = _topk(z, k, temperature)
        else:
            indices, logprobs = indices[keep].long(), logprobs[keep].float()
            tail = teacher.get("tail")
            tail = None if tail is None else _leading(api, i, "the top-k tail", tail, lead, device)[keep].float()
            if indices.numel() and not (int(indices.min()) >= 0 and int(indices.max()) < state["vocab"]):
                raise ValueError(f"{api}: expected top-k indices in [0, {state['vocab']}) (vocab), got indices "
                                 f"from {int(indices.min())} to {int(indices.max())} in batch {i}.")
            if indices.shape[-1] < k:
                raise ValueError(f"{api}: expected at least k = {k} classes per row in the top-k teacher, got "
                                 f"{indices.shape[-1]} for batch {i}.")
            if indices.shape[-1] > k:  # keep the k most likely; the rest joins the tail
                logprobs, order = logprobs.sort(-1, descending=True)
                indices = indices.gather(-1, order)
                rest = logprobs[:, k:].logsumexp(-1)
                tail = rest if tail is None else torch.logaddexp(tail, rest)
                indices, logprobs = indices[:, :k], logprobs[:, :k]
            if tail is None:  # the leftover mass from the kept mass (float64 against cancellation)
                tail = torch.log1p(-logprobs.double().exp().sum(-1).clamp(max=1.0)).float()
        if torch.isnan(logprobs).any() or torch.isnan(tail).any() or (logprobs == math.inf).any():
            raise ValueError(f"{api}: the teacher's kept rows of batch {i} hold NaN (or +inf) log-probabilities; "
                             "check the teacher's logits at the kept positions.")
        counts = keep.sum(1).cpu().numpy().astype(np.int64)
        kept_positions = positions[keep.cpu()].numpy().astype(np.int64)
    if kept_positions.size:
        starts = np.cumsum(counts) - counts
        later = np.ones(kept_positions.size, dtype=bool)
        later[starts[counts > 0]] = False  # the first kept position of each example
        bad = (kept_positions < 0) | (kept_positions >= 1 << 31)
        bad[1:] |= later[1:] & (np.diff(kept_positions) <= 0)
        if bad.any():
            raise ValueError(f"{api}: expected the kept positions of each sequence of batch {i} to increase along "
                             "the sequence, in [0, 2**31), got otherwise (check positions=).")
    rows = {"positions": kept_positions.astype(np.int32),
            "indices": indices.cpu().numpy().astype(_indices_dtype(state["vocab"])),
            **_encode(logprobs.cpu().numpy(), state["encoding"]),
            "tail": tail.cpu().numpy().astype(np.float32)}
    return keys, counts, rows, rows["tail"], given


def _encode(logprobs: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """Stored form of float32 log-probabilities ``[n, k]``. ``int8``: per row the maximum m (float32) and a step
    s = (m − min finite) / 254; each entry as the byte q = round((m − x) / s) ∈ [0, 254], 255 for −inf; decoded
    m − q·s, so an entry is off by at most s / 2 and the row's most likely class is exact."""
    if encoding == "float32":
        return {"logprobs": logprobs.astype(np.float32)}
    if encoding == "float16":
        with np.errstate(over="ignore"):
            return {"logprobs": np.maximum(logprobs, np.finfo(np.float16).min).astype(np.float16)}
    finite = np.isfinite(logprobs)
    if not logprobs.size:
        return {"logprobs": np.zeros(logprobs.shape, np.uint8), "lp-max": np.zeros(0, np.float32),
                "lp-step": np.zeros(0, np.float32)}
    x = logprobs.astype(np.float64)
    top = x.max(-1)
    low = np.where(finite, x, np.inf).min(-1)
    step = ((top - low) / 254).astype(np.float32)
    divide = np.where(step > 0, step, 1.0)[:, None]
    q = np.where(finite, np.clip(np.rint((top[:, None] - x) / divide), 0, 254), 255)
    return {"logprobs": q.astype(np.uint8), "lp-max": top.astype(np.float32), "lp-step": step}


def _decode(rows: Mapping[str, np.ndarray], encoding: str) -> np.ndarray:
    lp = rows["logprobs"]
    if encoding != "int8":
        return lp.astype(np.float32)
    out = rows["lp-max"][:, None] - lp.astype(np.float32) * rows["lp-step"][:, None]
    out[lp == 255] = -np.inf
    return out


class _Coverage:
    """Streaming statistics of the kept mass Σ_K p = 1 − exp(tail) of every stored position."""

    def __init__(self):
        self.hist = np.zeros(_BINS, np.int64)
        self.n, self.total, self.low, self.high = 0, 0.0, math.inf, -math.inf

    def add(self, tail: np.ndarray) -> None:
        if not tail.size:
            return
        mass = np.clip(-np.expm1(tail.astype(np.float64)), 0.0, 1.0)
        self.hist += np.bincount(np.minimum((mass * _BINS).astype(np.int64), _BINS - 1), minlength=_BINS)
        self.n += mass.size
        self.total += float(mass.sum())
        self.low, self.high = min(self.low, float(mass.min())), max(self.high, float(mass.max()))

    def stats(self) -> dict[str, float | None]:
        if not self.n:
            return dict.fromkeys(COVERAGE)
        cumulative = np.cumsum(self.hist)
        out = {"mean": min(max(self.total / self.n, self.low), self.high), "min": self.low}
        for p in (5, 25, 50, 75, 95):  # nearest rank: the smallest m with at least p % of the positions <= m
            b = int(np.searchsorted(cumulative, max(1, math.ceil(p * self.n / 100))))
            out[f"p{p}"] = min(max((b + 0.5) / _BINS, self.low), self.high)
        out["max"] = self.high
        return {name: out[name] for name in COVERAGE}


def _npy_dtype(dtype: np.dtype) -> str:
    return f"S{dtype.itemsize}" if dtype.kind == "S" else dtype.name


def _write_table(writer: _ShardWriter, name: str, array: np.ndarray) -> dict:
    """Write the 1-D ``array`` as the new generation's table file ``name``; return its index entry."""
    file = f"table-{writer.generation}-{name}.npy"
    array = np.ascontiguousarray(array)
    fh = _create(writer.path / file)
    writer.files.append(file)
    with fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                                  "fortran_order": False, "shape": (array.size,)})
        fh.write(array.data)
        fh.flush()
        os.fsync(fh.fileno())
    return {"file": file, "size": int(array.size), "dtype": _npy_dtype(array.dtype),
            "sha256": hashlib.sha256(array.data).hexdigest()}


def _keyed_items(api: str, items, teacher_fn, ids_key, mask_key, positions_key, logits_key):
    """``(i, ids, teacher, keep, positions)`` per item of ``items``."""
    if isinstance(items, (Mapping, str, bytes, Tensor)) or not isinstance(items, Iterable):
        raise TypeError(f"{api}: expected items to be an iterable of batches, got {type(items).__name__}.")
    for i, item in enumerate(items):
        if teacher_fn is None:
            if not isinstance(item, (tuple, list)) or not 2 <= len(item) <= 4:
                raise TypeError(f"{api}: expected each item to be a tuple (ids, teacher[, keep[, positions]]) (or "
                                f"pass teacher_fn= to run a teacher on batches), got {type(item).__name__} for "
                                f"item {i}.")
            ids, teacher, keep, positions = (*item, None, None)[:4]
            yield i, ids, teacher, keep, positions
            continue
        if not isinstance(item, Mapping):
            raise TypeError(f"{api}: expected each batch to be a mapping with the example ids under {ids_key!r}, "
                            f"got {type(item).__name__} for batch {i}.")
        for key in (ids_key, positions_key):
            if key is not None and key not in item:
                raise KeyError(f"{api}: expected key {key!r} in batch {i}, got keys {sorted(map(str, item))}.")
        out = teacher_fn(item)
        if isinstance(out, Tensor):
            teacher = out
        elif isinstance(out, Mapping):
            if logits_key not in out:
                raise KeyError(f"{api}: expected key {logits_key!r} in the teacher outputs of batch {i}, got keys "
                               f"{sorted(map(str, out))}.")
            teacher = out[logits_key]
        else:
            teacher = getattr(out, logits_key, None)
            if teacher is None:
                raise TypeError(f"{api}: expected teacher_fn(batch) to return logits, an output mapping or an object "
                                f"with a {logits_key!r} attribute, got {type(out).__name__} for batch {i}.")
        keep = item.get(mask_key) if mask_key is not None else None
        yield i, item[ids_key], teacher, keep, None if positions_key is None else item[positions_key]


def write_topk(path: str | os.PathLike, items: Iterable, *, k: int, teacher_fn: Callable | None = None,
               vocab: int | None = None, dtype="float32", temperature: float = 1.0, ids_key: str = "ids",
               mask_key: str | None = "attention_mask", positions_key: str | None = None, logits_key: str = LOGITS,
               shard_bytes: int = 1 << 30, overwrite: bool = False) -> dict:
    """Write a keyed top-k teacher cache at ``path``: per example id, the top-k of the teacher at its kept
    positions only (ragged, no padding), readable in any order with :func:`read_topk`.

    Args:
        path: a directory (created; it must not already hold a cache unless ``overwrite``).
        items: without ``teacher_fn``, an iterable of tuples ``(ids, teacher[, keep[, positions]])``: ``ids`` one
            example id per sequence (ints, e.g. dataset indices, or strs; unique over the cache); ``teacher`` the
            logits ``[B, L, V]`` (e.g. ``model(**batch).logits``) or a top-k teacher ``[B, L, k' >= k]``
            (``dk.TopK`` or mapping, e.g. an inference server's top log-probabilities; needs ``vocab``);
            ``keep`` ``[B, L]`` (nonzero = store; default all: pass the attention mask so that padding is not
            stored); ``positions`` ``[B, L]`` ints, each row's position in its example (default the column index,
            right padding; for left padding pass ``attention_mask.cumsum(-1) - 1``). With ``teacher_fn``, an
            iterable of batch mappings: ``ids = batch[ids_key]``, ``keep = batch[mask_key]`` (if there),
            ``positions = batch[positions_key]`` (if given) and ``teacher = teacher_fn(batch)`` (logits, or an
            output mapping or object holding them under ``logits_key``, e.g. a Hugging Face output).
        k: classes kept per position.
        teacher_fn: see ``items``; called under ``torch.no_grad()``.
        vocab: V; needed for a top-k teacher, checked against the logits otherwise.
        dtype: storage of the log-probabilities: ``"float32"`` (exact), ``"float16"`` (relative error <= 2⁻¹¹) or
            ``"int8"`` (one byte per class plus 8 bytes per position: the row's maximum and a step s; absolute error
            <= s / 2 = (range of the row's finite log-probabilities) / 508, the most likely class exact).
        temperature: T_c, the temperature of the stored log-probabilities and tail (as :func:`write`).
        shard_bytes, overwrite: as :func:`write` (atomic overwrite, one writer at a time).

    Returns:
        :func:`info` of the written cache: sizes, bytes per position and the kept-mass statistics.

    Rows are stored as the teacher emits them: the row at position i is the teacher's distribution after reading
    tokens 0..i, i.e. over the token at i + 1 (Hugging Face causal-LM logits). :meth:`TopKCache.teacher` returns the
    row at the student's position p (+ ``shift``), which is what the student's logits at p predict too.
    """
    api = "dk.cache.write_topk"
    k = _positive_int(api, "k", k)
    encoding = _encoding(api, dtype)
    if vocab is not None:
        vocab = _positive_int(api, "vocab", vocab)
        if vocab < k:
            raise ValueError(f"{api}: expected k <= vocab, got k = {k} and vocab = {vocab}.")
    if teacher_fn is not None and not callable(teacher_fn):
        raise TypeError(f"{api}: expected teacher_fn to be callable (batch -> logits), got "
                        f"{type(teacher_fn).__name__}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{api}: expected temperature to be a float > 0, got {temperature!r}.")
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ValueError(f"{api}: expected shard_bytes to be a positive int, got {shard_bytes!r}.")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{api}: expected a directory path for the cache, got the file {str(path)!r}.")
    generator = _keyed_items(api, items, teacher_fn, ids_key, mask_key, positions_key, logits_key)
    index = _locked_write(api, path, overwrite, shard_bytes, lambda writer: _write_keyed(
        api, generator, writer, k, float(temperature), encoding, vocab))
    return _keyed_info(path, index)


def _write_keyed(api: str, items, writer: _ShardWriter, k: int, temperature: float, encoding: str,
                 vocab: int | None) -> dict:
    """Store the kept rows of ``items`` in ``writer``'s shards and the example table; return the index."""
    state: dict[str, Any] = {"vocab": vocab, "encoding": encoding}
    coverage = _Coverage()
    seen: dict = {}  # key -> the batch that gave it
    keys: list = []
    places: list[np.ndarray] = []  # per item [B, 3]: shard, first row in the shard, rows
    pending_rows, current, given, batches = 0, None, 0, 0
    with torch.no_grad():
        for i, ids, teacher, keep, positions in items:
            batches += 1
            item_keys, counts, rows, tail, n = _keyed_rows(api, i, ids, teacher, keep, positions, k, temperature,
                                                           state)
            for key in item_keys:
                if key in seen:
                    raise ValueError(f"{api}: expected each example id once, got {key!r} in batch {seen[key]} and "
                                     f"again in batch {i} (a loader of more than one epoch?); nothing was written.")
                seen[key] = i
            given += n
            if not item_keys:
                continue
            writer.add(rows)
            if len(writer.shards) != current:
                current, pending_rows = len(writer.shards), 0
            starts = pending_rows + np.cumsum(counts) - counts
            pending_rows += int(counts.sum())
            places.append(np.stack([np.full_like(counts, current), starts, counts], axis=1))
            keys += item_keys
            coverage.add(tail)
    if not keys:
        raise ValueError(f"{api}: expected at least one example, got {'no batch' if not batches else 'none'} (an "
                         "exhausted iterator?); nothing was written.")
    writer.flush()
    if state["keys"] == "int":
        table_keys = np.array(keys, dtype=np.int64)
    else:
        encoded = [key.encode("utf-8") for key in keys]
        table_keys = np.array(encoded, dtype=f"S{max(1, *map(len, encoded))}")
    order = np.argsort(table_keys, kind="stable")
    table_rows = np.concatenate(places)[order].astype(np.int64)
    shards = [{"rows": shard["files"]["tail"]["size"], "files": shard["files"]} for shard in writer.shards]
    index = {
        "format": KEYED_FORMAT, "version": KEYED_VERSION, "generation": writer.generation,
        "keys": state["keys"], "k": k, "vocab": state["vocab"], "temperature": temperature,
        "logprobs": encoding, "indices": _indices_dtype(state["vocab"]),
        "examples": len(keys), "positions": sum(s["rows"] for s in shards), "positions_given": given,
        "nbytes": sum(f["size"] * np.dtype(f["dtype"]).itemsize for s in shards for f in s["files"].values()),
        "coverage": coverage.stats(), "shards": shards,
        "table": {"keys": _write_table(writer, "keys", table_keys[order]),
                  "rows": _write_table(writer, "rows", table_rows.reshape(-1))},
    }
    index["digest"] = _digest(index)
    return index


def _keyed_arrays(index: Mapping) -> dict[str, str]:
    """``{array: dtype}`` of a keyed cache's shards."""
    arrays = {"positions": "int32", "indices": index["indices"],
              "logprobs": {"int8": "uint8"}.get(index["logprobs"], index["logprobs"]), "tail": "float32"}
    if index["logprobs"] == "int8":
        arrays.update({"lp-max": "float32", "lp-step": "float32"})
    return arrays


_KEYED_FIELDS = {
    "format": f"{KEYED_FORMAT!r}", "version": "the format version", "generation": "the write's generation id",
    "keys": "'int' or 'str'", "k": "the kept classes (an int >= 1)", "vocab": "the number of classes (an int >= 1)",
    "temperature": "a number > 0", "logprobs": "the log-probabilities' encoding", "indices": "the indices' dtype",
    "examples": "an int >= 1", "positions": "an int >= 0", "positions_given": "an int >= 0", "nbytes": "an int >= 0",
    "coverage": "the kept-mass statistics (an object)", "shards": "a list of shards",
    "table": "the example table (an object)", "digest": "the SHA-256 of the index",
}


def _validate_keyed(index, file: str) -> None:
    """Check every field of a keyed cache's parsed index (the example table is checked by :func:`read_topk`)."""
    w = _Walk(file)
    fmt = index.get("format") if isinstance(index, dict) else None
    if fmt == FORMAT:
        version = index.get("version")
        raise CacheError(
            f"dk.cache.read_topk: {file!r} is the index of a batch-position cache (dk.cache.write, format version "
            f"{_show(version)}), which stores teacher outputs by batch, not by example. Read it as it is with "
            "dk.cache.read, or convert it to a keyed top-k cache with dk.cache.upgrade(path, new_path, keys) (keys: "
            "each batch's example ids and keep mask, in the order it was written), or rewrite it with "
            "dk.cache.write_topk.")
    if fmt != KEYED_FORMAT:
        w.fail("format", f"format {KEYED_FORMAT!r} (an index written by dk.cache.write_topk)", _show(fmt or index))
    version = index.get("version")
    if isinstance(version, bool) or version not in KEYED_VERSIONS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > max(KEYED_VERSIONS)
        raise CacheError(
            f"dk.cache.read_topk: expected a keyed top-k cache of format version "
            f"{' or '.join(map(str, KEYED_VERSIONS))}, got version {_show(version)} in {file!r}"
            + (": it was written by a newer distilkit; upgrade distilkit to read it" if newer else "")
            + ". Or rewrite the cache with dk.cache.write_topk(path, items, k=..., overwrite=True).")
    w.fields(index, "", _KEYED_FIELDS)
    generation = w.str(index["generation"], "generation", "16 hexadecimal digits")
    if not _GENERATION.fullmatch(generation):
        w.fail("generation", "16 hexadecimal digits", _show(generation))
    w.str(index["digest"], "digest", "a SHA-256 in hexadecimal")
    w.choice(index["keys"], "keys", ("int", "str"))
    vocab = w.int(index["vocab"], "vocab", 1)
    k = w.int(index["k"], "k", 1, vocab + 1, f"the kept classes, an int in [1, {vocab}] (vocab is {vocab})")
    temperature = index["temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        w.fail("temperature", "a finite number > 0", _show(temperature))
    w.choice(index["logprobs"], "logprobs", ENCODINGS)
    w.equal(index["indices"], "indices", _indices_dtype(vocab), f"the indices' dtype for a vocabulary of {vocab}")
    examples = w.int(index["examples"], "examples", 1)
    positions = w.int(index["positions"], "positions")
    w.int(index["positions_given"], "positions_given", positions, None,
          f"an int >= {positions} (the positions stored)")
    coverage = w.fields(index["coverage"], "coverage", dict.fromkeys(COVERAGE, "a number in [0, 1]"))
    values = [coverage[name] for name in COVERAGE]
    if positions == 0:
        for name in COVERAGE:
            w.equal(coverage[name], _at("coverage", name), None, "no position is stored")
    else:
        for name, value in zip(COVERAGE, values, strict=True):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                w.fail(_at("coverage", name), "a number in [0, 1]", _show(value))
        ordered = values[1:]
        if ordered != sorted(ordered) or not ordered[0] <= values[0] <= ordered[-1]:
            w.fail("coverage", "min <= p5 <= ... <= p95 <= max and min <= mean <= max", _show(coverage))
    arrays = _keyed_arrays(index)
    shards = w.list(index["shards"], "shards", _KEYED_FIELDS["shards"])
    total = nbytes = 0
    for s, shard in enumerate(shards):
        at = _at("shards", s)
        w.fields(shard, at, {"rows": "the positions stored in it (an int >= 0)",
                             "files": "an object {array name: file}"})
        rows = w.int(shard["rows"], _at(at, "rows"))
        total += rows
        files = w.mapping(shard["files"], _at(at, "files"), "an object {array name: file}")
        if set(files) != set(arrays):
            w.fail(_at(at, "files"), f"a file for each array, {list(arrays)}", _show(list(files)))
        for name, f in files.items():
            fat = _at(_at(at, "files"), name)
            w.fields(f, fat, _FILE_FIELDS)
            w.equal(f["file"], _at(fat, "file"), _shard_file(s, name, generation), "the file of this shard and array")
            w.equal(f["dtype"], _at(fat, "dtype"), arrays[name], f"the dtype of {name}")
            w.equal(f["size"], _at(fat, "size"), rows * (1 if name in _ROW_ARRAYS else k),
                    f"{rows} rows{'' if name in _ROW_ARRAYS else f' of k = {k}'}")
            nbytes += f["size"] * np.dtype(f["dtype"]).itemsize
    w.equal(positions, "positions", total, "the rows of the shards")
    w.equal(index["nbytes"], "nbytes", nbytes, "the shard files' data bytes")
    table = w.fields(index["table"], "table", {"keys": "the keys' file", "rows": "the rows' file"})
    for name, size in (("keys", examples), ("rows", 3 * examples)):
        at = _at("table", name)
        f = w.fields(table[name], at, {**_FILE_FIELDS, "sha256": "the SHA-256 of its data"})
        w.equal(f["file"], _at(at, "file"), f"table-{generation}-{name}.npy", "the table file of this generation")
        w.equal(f["size"], _at(at, "size"), size, f"{'the examples' if name == 'keys' else '3 × the examples'}")
        dtype = w.str(f["dtype"], _at(at, "dtype"))
        if name == "rows" or index["keys"] == "int":
            w.equal(dtype, _at(at, "dtype"), "int64", "the table's dtype")
        elif not re.fullmatch(r"S[1-9]\d{0,5}", dtype):
            w.fail(_at(at, "dtype"), "'S<n>' (UTF-8 keys of at most n bytes)", _show(dtype))
        if not re.fullmatch(r"[0-9a-f]{64}", w.str(f["sha256"], _at(at, "sha256"))):
            w.fail(_at(at, "sha256"), "a SHA-256 in hexadecimal", _show(f["sha256"]))
    if index["digest"] != _digest(index):
        w.fail("digest", "the SHA-256 of the other fields", "another one: the index was edited or damaged after it "
               "was written")


def _keyed_info(path: Path, index: Mapping) -> dict:
    positions = index["positions"]
    per_position: dict[str, float] = {}
    for shard in index["shards"]:
        for name, f in shard["files"].items():
            per_position[name] = per_position.get(name, 0) + f["size"] * np.dtype(f["dtype"]).itemsize
    table = sum(f["size"] * np.dtype(f["dtype"]).itemsize for f in index["table"].values())
    return {
        "path": str(path), "kind": "keyed-topk", "format": index["format"], "version": index["version"],
        "generation": index["generation"], "examples": index["examples"], "positions": positions,
        "positions_given": index["positions_given"], "k": index["k"], "vocab": index["vocab"],
        "temperature": float(index["temperature"]), "keys": index["keys"], "logprobs": index["logprobs"],
        "indices": index["indices"], "shards": len(index["shards"]), "nbytes": index["nbytes"],
        "table_bytes": table, "bytes_per_position": index["nbytes"] / positions if positions else 0.0,
        "per_position": {n: b / positions if positions else 0.0 for n, b in per_position.items()},
        "coverage": dict(index["coverage"]),
    }


def _check_table(path: Path, index: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """The example table ``(keys [E], rows [E, 3])`` memory-mapped, after checking its files' digests and that
    it is sorted, unique, and tiles every shard's rows exactly."""
    api, file = "dk.cache.read_topk", str(path / INDEX)
    out = []
    for name in ("keys", "rows"):
        entry = index["table"][name]
        array = _open_shard(path, entry, mmap=True, api=api, what="table file")
        if hashlib.sha256(np.ascontiguousarray(array).data).hexdigest() != entry["sha256"]:
            raise CacheError(f"{api}: corrupt table file {str(path / entry['file'])!r}: its data does not have the "
                             f"SHA-256 the index records ({file!r}, table.{name}.sha256).")
        out.append(array)
    keys, rows = out[0], out[1].reshape(-1, 3)

    def fail(what: str):
        raise CacheError(f"{api}: corrupt example table in {str(path)!r}: expected {what}. Rewrite the cache with "
                         "dk.cache.write_topk.")

    if keys.size > 1 and not bool(np.all(keys[1:] > keys[:-1])):
        fail("example ids sorted and unique")
    shard, start, count = rows[:, 0], rows[:, 1], rows[:, 2]
    sizes = np.array([s["rows"] for s in index["shards"]], dtype=np.int64)
    if ((shard < 0) | (shard >= sizes.size) | (start < 0) | (count < 0)).any():
        fail("shard numbers in range and rows >= 0")
    order = np.lexsort((start, shard))
    shard, start, count = shard[order], start[order], count[order]
    first = np.ones(shard.size, dtype=bool)
    first[1:] = shard[1:] != shard[:-1]
    end = start + count
    if (start[first] != 0).any() or (start[~first] != end[:-1][~first[1:]]).any() or (
            np.bincount(shard, weights=count, minlength=sizes.size) != sizes).any():
        fail("each shard's rows given to the examples in consecutive runs")
    return keys, rows


def read_topk(path: str | os.PathLike, *, device=None, open_shards: int = 4) -> TopKCache:
    """Open the keyed top-k cache at ``path`` (written by :func:`write_topk` or :func:`upgrade`) as a
    :class:`TopKCache`, after validating its index, its example table and every shard file's header.

    Raises ``FileNotFoundError`` for a missing directory, index or file; :class:`CacheError` for a corrupt index
    or file (naming the file and field), for a batch-position cache (saying how to convert it) and for an unknown
    format version (saying how to rewrite it).
    """
    api = "dk.cache.read_topk"
    if isinstance(open_shards, bool) or not isinstance(open_shards, int) or open_shards < 1:
        raise ValueError(f"{api}: expected open_shards to be a positive int, got {open_shards!r}.")
    path = Path(path)
    for _ in range(_OPEN_ATTEMPTS):
        try:
            fd, stamp, index, _ = _open_index(path, _validate_keyed, api)
        except CacheChangedError:
            continue
        try:  # the cache owns fd from here (closed when it is collected)
            cache = TopKCache(path, index, device, open_shards, _opened=(fd, stamp))
            for shard in index["shards"]:
                for f in shard["files"].values():
                    _open_shard(path, f, mmap=False, api=api)
        except (OSError, CacheError):
            if _same_index(path, stamp):
                raise
            continue  # overwritten meanwhile (its files maybe removed): open the new one
        if cache._unchanged():
            return cache
        cache._close_index()
    raise CacheChangedError(f"{api}: expected the cache at {str(path)!r} to stay unchanged while it is opened, got "
                            f"a new one {_OPEN_ATTEMPTS} times in a row.")


def _same_index(path: Path, stamp: tuple) -> bool:
    try:
        return _stamp(os.stat(path / INDEX, follow_symlinks=False)) == stamp
    except OSError:
        return False


class TopKCache:
    """A keyed top-k teacher cache, read back: the teacher of any examples, in any order, at any positions.

    ``len(cache)`` examples; ``key in cache``; :meth:`teacher` for a batch, :meth:`get` for one example. Shards are
    memory-mapped on first use (at most ``open_shards`` at a time) and only the rows asked for are copied. Like
    :class:`Cache`, every read first checks that the cache is the one opened (:class:`CacheChangedError` after an
    overwrite); it pickles (e.g. into loader workers) by reopening the same cache.
    """

    def __init__(self, path: Path, index: Mapping, device=None, open_shards: int = 4, *,
                 _opened: tuple[int, tuple] | None = None):
        self.path = path
        self._index = index
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._open_shards = open_shards
        self.device = None if device is None else torch.device(device)
        self.info = _keyed_info(path, index)
        self.k, self.vocab, self.temperature = index["k"], index["vocab"], float(index["temperature"])
        self._index_file = os.fspath(path / INDEX)
        if _opened is None:
            fd = _open_regular(path / INDEX, "dk.cache.read_topk")
            _opened = fd, _stamp(os.fstat(fd))
        self._hold(*_opened)
        self._keys, self._rows = _check_table(path, index)

    _hold = Cache._hold
    _unchanged = Cache._unchanged

    def _check_unchanged(self) -> None:
        if not self._unchanged():
            raise _changed("dk.cache.TopKCache", self.path, self.info["generation"], "dk.cache.read_topk")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        for name in ("_stamp", "_close_index", "_keys", "_rows"):
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        fd, stamp, index, _ = _open_index(self.path, _validate_keyed, "dk.cache.read_topk")
        if index != self._index:
            os.close(fd)
            raise CacheChangedError(f"dk.cache.TopKCache: expected the cache at {str(self.path)!r} to be the one "
                                    "pickled, got another (it was overwritten since). Reopen it with "
                                    "dk.cache.read_topk.")
        self._hold(fd, stamp)
        self._keys, self._rows = _check_table(self.path, index)

    def __len__(self) -> int:
        return int(self._keys.size)

    def __repr__(self) -> str:
        i = self.info
        return (f"TopKCache({str(self.path)!r}, examples={i['examples']}, positions={i['positions']}, k={i['k']}, "
                f"logprobs={i['logprobs']}, bytes_per_position={i['bytes_per_position']:.1f})")

    def keys(self) -> list:
        """The example ids, sorted."""
        return self._keys.tolist() if self._index["keys"] == "int" else [k.decode() for k in self._keys.tolist()]

    def __contains__(self, key) -> bool:
        try:
            return bool(self._find([key], missing_ok=True)[0] >= 0)
        except TypeError:  # an id of the other kind
            return False

    def _find(self, ids, *, missing_ok: bool = False) -> np.ndarray:
        """The table rows of ``ids`` (-1 for a missing id when ``missing_ok``, else ``KeyError``)."""
        kind, n = self._index["keys"], self._keys.size
        if kind == "int":
            if not all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in ids):
                raise TypeError(f"dk.cache.TopKCache: expected int example ids (the cache's), got {_show(ids)}.")
            query = np.array([int(x) for x in ids], dtype=np.int64) if all(
                -(1 << 63) <= int(x) < 1 << 63 for x in ids) else None
            if query is None:
                found = np.full(len(ids), -1)
            else:
                at = np.searchsorted(self._keys, query)
                found = np.where((at < n) & (self._keys[np.minimum(at, n - 1)] == query), at, -1)
        else:
            if not all(isinstance(x, str) for x in ids):
                raise TypeError(f"dk.cache.TopKCache: expected str example ids (the cache's), got {_show(ids)}.")
            width = self._keys.dtype.itemsize
            found = np.full(len(ids), -1)
            for j, x in enumerate(ids):
                b = x.encode("utf-8")
                if len(b) <= width and b"\0" not in b:
                    at = int(np.searchsorted(self._keys, np.array(b, dtype=self._keys.dtype)))
                    found[j] = at if at < n and self._keys[at] == b else -1
        if not missing_ok and (found < 0).any():
            missing = [x for x, f in zip(ids, found, strict=True) if f < 0]
            raise KeyError(f"dk.cache.TopKCache: example ids not in the cache at {str(self.path)!r}: "
                           f"{_show(missing)} ({len(missing)} of {len(ids)}).")
        return found

    def _shard(self, number: int) -> dict[str, np.ndarray]:
        arrays = self._open.get(number)
        if arrays is None:
            try:
                arrays = {name: _open_shard(self.path, f, mmap=True, api="dk.cache.TopKCache")
                          for name, f in self._index["shards"][number]["files"].items()}
            except (OSError, CacheError):
                self._check_unchanged()
                raise
            arrays = {name: a if name in _ROW_ARRAYS else a.reshape(-1, self.k) for name, a in arrays.items()}
            self._open[number] = arrays
            while len(self._open) > self._open_shards:
                self._open.popitem(last=False)
        self._open.move_to_end(number)
        return arrays

    def _example(self, row: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``(the example's shard arrays, sliced to its rows; its positions)``."""
        shard, start, count = (int(x) for x in self._rows[row])
        arrays = self._shard(shard)
        positions = np.asarray(arrays["positions"][start:start + count])
        if count > 1 and not bool(np.all(positions[1:] > positions[:-1])):
            raise CacheError(f"dk.cache.TopKCache: corrupt shard {shard} of {str(self.path)!r}: the positions of an "
                             "example do not increase. Rewrite the cache with dk.cache.write_topk.")
        return {name: a[start:start + count] for name, a in arrays.items()}, positions

    def _rows_out(self, parts: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(indices int64, logprobs float32, tail float32)`` of the gathered rows, checked."""
        rows = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if parts else {}
        if not rows:
            return (np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.float32), np.zeros(0, np.float32))
        indices = rows["indices"].astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.vocab):
            raise CacheError(f"dk.cache.TopKCache: corrupt shard data in {str(self.path)!r}: class indices outside "
                             f"[0, {self.vocab}). Rewrite the cache with dk.cache.write_topk.")
        return indices, _decode(rows, self._index["logprobs"]), rows["tail"].astype(np.float32)

    def _tensor(self, x: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t if self.device is None else t.to(self.device)

    def get(self, key, *, policy: str | None = None) -> tuple[Tensor, TopK]:
        """One example: ``(positions [n] int64, TopK of [n, k] rows)``, its stored positions in order."""
        self._check_unchanged()
        row = int(self._find([key])[0])
        part, positions = self._example(row)
        indices, logprobs, tail = self._rows_out([part])
        return self._tensor(positions.astype(np.int64)), TopK(
            self._tensor(indices), self._tensor(logprobs), self._tensor(tail), self.temperature, policy)

    def teacher(self, ids, length: int | None = None, *, positions=None, shift: int = 0,
                policy: str | None = None) -> CachedTeacher:
        """The teacher of the examples ``ids`` at the student's positions, as :class:`CachedTeacher`
        ``(topk, mask)``: ``topk`` ``[B, L, k]`` for ``dk.kd_kl`` and co., ``mask`` ``[B, L]`` where it is held.

        Args:
            ids: the batch's example ids (a list, or a 1-D integer tensor), in any order.
            length: L, with the student's sequences right-padded: row b, column p is position p of example b.
            positions: instead of ``length``, ``[B, L]`` ints: each column's position in its example (left padding:
                ``attention_mask.cumsum(-1) - 1``), negative for padding.
            shift: the student's position p reads the teacher's row at p + shift (0 when the student's logits at
                p predict the same token as the teacher's, as two causal LMs on the same tokens).
            policy: the ``dk.TopK`` policy (default: ``"tail"``, as a TopK with a tail).

        Positions the cache does not hold (padding, positions not kept at write, past the example's end) are False
        in ``mask``: combine it with the student's mask.
        """
        api = "dk.cache.TopKCache.teacher"
        if isinstance(ids, (Tensor, np.ndarray)):
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"{api}: expected a sequence of example ids, got {type(ids).__name__}.")
        if isinstance(shift, bool) or not isinstance(shift, int):
            raise TypeError(f"{api}: expected shift to be an int, got {shift!r}.")
        if (length is None) == (positions is None):
            raise ValueError(f"{api}: expected either length (right padding) or positions [B, L], got "
                             f"{'both' if length is not None else 'neither'}.")
        if positions is None:
            length = _positive_int(api, "length", length, 0)
            grid = np.broadcast_to(np.arange(length, dtype=np.int64), (len(ids), length))
        else:
            grid = positions.detach().cpu().numpy() if isinstance(positions, Tensor) else np.asarray(positions)
            if grid.ndim != 2 or grid.shape[0] != len(ids) or grid.dtype.kind not in "iu":
                raise ValueError(f"{api}: expected integer positions of shape [B, L] with B = {len(ids)} (the ids), "
                                 f"got {grid.dtype} of shape {list(grid.shape)}.")
            grid = grid.astype(np.int64)
        self._check_unchanged()
        rows = self._find(ids)
        batch, width = grid.shape
        wanted = np.where(grid >= 0, grid + shift, -1)
        mask = np.zeros((batch, width), dtype=bool)
        parts, where = [], []
        for b, row in enumerate(rows):
            part, stored = self._example(int(row))
            at = np.searchsorted(stored, wanted[b])
            hit = (wanted[b] >= 0) & (at < stored.size)
            hit[hit] = stored[at[hit]] == wanted[b][hit]
            mask[b] = hit
            parts.append({name: a[at[hit]] for name, a in part.items()})
            where.append(np.flatnonzero(hit) + b * width)
        indices, logprobs, tail = self._rows_out(parts)
        flat = np.concatenate(where) if where else np.zeros(0, np.int64)
        k = self.k
        out_indices = np.broadcast_to(np.arange(k, dtype=np.int64), (batch * width, k)).copy()
        out_logprobs = np.full((batch * width, k), -math.log(k), dtype=np.float32)
        out_tail = np.full(batch * width, -np.inf, dtype=np.float32)
        out_indices[flat], out_logprobs[flat], out_tail[flat] = indices, logprobs, tail
        topk = TopK(self._tensor(out_indices.reshape(batch, width, k)),
                    self._tensor(out_logprobs.reshape(batch, width, k)),
                    self._tensor(out_tail.reshape(batch, width)), self.temperature, policy)
        return CachedTeacher(topk, self._tensor(mask))


# ---------------------------------------------------------------------------------- upgrade, info, format
def upgrade(path: str | os.PathLike, new_path: str | os.PathLike, keys: Iterable, *, k: int | None = None,
            dtype="float32", temperature: float | None = None, overwrite: bool = False,
            shard_bytes: int = 1 << 30) -> dict:
    """Convert a batch-position cache (:func:`write`, format version 1 or 2, logits dense or top-k) into a keyed
    top-k cache at ``new_path`` (``path`` itself with ``overwrite=True``: replaced atomically).

    ``keys``: per batch of the old cache, in the order it was written (e.g. the same loader, unshuffled or with the
    same seed), its example ids, or ``(ids, keep)`` / ``(ids, keep, positions)`` as in :func:`write_topk`; without a
    keep mask every position, padding included, is stored. ``k``: for a dense cache, required; for a top-k cache at
    most its k (default: its k; a smaller k moves the rest into the tail). ``temperature``: for a dense cache (its
    logits are raw), default 1; a top-k cache keeps its own. Returns :func:`info` of the new cache.
    """
    api = "dk.cache.upgrade"
    old = read(path)
    logits = old._index["logits"]
    if logits is None:
        raise ValueError(f"{api}: expected a cache with logits to convert, got {str(path)!r}, which holds only "
                         "features.")
    if logits["format"] == "topk":
        stored_k = int(logits["k"])
        k = stored_k if k is None else _positive_int(api, "k", k)
        if k > stored_k:
            raise ValueError(f"{api}: expected k <= {stored_k}, the k of the cache at {str(path)!r}, got {k}.")
        if temperature is not None and not math.isclose(temperature, logits["temperature"], rel_tol=1e-6):
            raise ValueError(f"{api}: a top-k cache keeps its stored temperature {logits['temperature']}; got "
                             f"temperature={temperature}.")
        temperature = float(logits["temperature"])
    else:
        if k is None:
            raise ValueError(f"{api}: expected k for a dense cache (the classes to keep per position), got none.")
        temperature = 1.0 if temperature is None else temperature
    if isinstance(keys, (Mapping, str, bytes)) or not isinstance(keys, Iterable):
        raise TypeError(f"{api}: expected keys to be an iterable with one entry per batch, got "
                        f"{type(keys).__name__}.")

    def items():
        entries = iter(keys)
        for i, cached in enumerate(old):
            try:
                entry = next(entries)
            except StopIteration:
                raise ValueError(f"{api}: expected an entry of keys for each of the {len(old)} batches of the cache, "
                                 f"got {i}.") from None
            if isinstance(entry, tuple):
                ids, keep, positions = (*entry, None, None)[:3]
            else:
                ids, keep, positions = entry, None, None
            yield ids, cached[logits["key"]], keep, positions
        if next(entries, None) is not None:
            raise ValueError(f"{api}: expected an entry of keys for each of the {len(old)} batches of the cache, got "
                             "more.")

    return write_topk(new_path, items(), k=k, vocab=int(logits["vocab"]), dtype=dtype, temperature=temperature,
                      overwrite=overwrite, shard_bytes=shard_bytes)


def info(path: str | os.PathLike) -> dict:
    """What the cache at ``path`` holds, as a JSON-ready dict (validated first; ``distilkit cache info DIR``).

    ``kind`` ``"keyed-topk"`` (:func:`write_topk`): ``examples``, ``positions`` (stored) and ``positions_given``
    (in the teacher's tensors, padding included), ``k``, ``vocab``, ``temperature``, ``logprobs`` (encoding),
    ``nbytes`` (shard data), ``table_bytes``, ``bytes_per_position`` and ``per_position`` (per array), and
    ``coverage``: the kept mass Σ_K p of the stored positions, ``mean``, ``min``, ``p5`` ... ``p95``, ``max``
    (percentiles by nearest rank, to within 1e-4). ``kind`` ``"batches"`` (:func:`write`): the fields of
    :class:`CacheInfo`, ``bytes_per_token`` and ``version``.
    """
    path = Path(path)
    try:
        fd, _, index, _ = _open_index(path, lambda index, file: None, "dk.cache.info")
        os.close(fd)
    except CacheError:
        index = None
    if isinstance(index, dict) and index.get("format") == KEYED_FORMAT:
        cache = read_topk(path)
        return dict(cache.info)
    batch_cache = read(path)
    out = {"path": str(path), "kind": "batches", "format": FORMAT, "version": batch_cache._index["version"]}
    for name in ("generation", "batches", "tokens", "nbytes", "logits", "k", "vocab", "dtype", "temperature",
                 "features", "per_token"):
        out[name] = getattr(batch_cache.info, name)
    out["bytes_per_token"] = batch_cache.info.bytes_per_token
    return out


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def format_info(info: Mapping) -> str:
    """:func:`info`'s dict as the text ``distilkit cache info DIR`` prints."""
    if info.get("kind") == "keyed-topk":
        given, stored = info["positions_given"], info["positions"]
        skipped = f"; {100 * (1 - stored / given):.1f} % of the {given} given not stored" if given else ""
        lines = [
            f"keyed top-k cache {info['path']} (version {info['version']}, generation {info['generation']})",
            f"examples        {info['examples']} (ids: {info['keys']})",
            f"positions       {stored} stored{skipped}",
            f"top-k           k = {info['k']} of vocab {info['vocab']}, temperature {info['temperature']:g}, "
            f"log-probs {info['logprobs']}, indices {info['indices']}",
            f"size            {_bytes(info['nbytes'])} in {info['shards']} shard(s) + {_bytes(info['table_bytes'])} "
            "table",
            f"bytes/position  {info['bytes_per_position']:.1f} ("
            + ", ".join(f"{n} {b:.1f}" for n, b in info["per_position"].items()) + ")",
        ]
        c = info["coverage"]
        if c.get("mean") is None:
            lines.append("kept mass       - (no position stored)")
        else:
            lines.append("kept mass       " + "  ".join(f"{n} {100 * c[n]:.2f} %" for n in COVERAGE))
            lines.append(f"policies        'renormalize' scales the kept mass up to 100 %; 'tail' keeps the other "
                         f"{100 * (1 - c['mean']):.1f} % as a bucket (at T = {info['temperature']:g})")
        return "\n".join(lines)
    logits = info.get("logits")
    what = "none" if logits is None else logits if logits != "topk" else f"top-k, k = {info['k']}"
    return "\n".join([
        f"batch-position cache {info['path']} (version {info['version']}, generation {info.get('generation')})",
        f"batches         {info['batches']}",
        f"tokens          {info['tokens']} (padding included)",
        f"logits          {what}" + ("" if logits is None else f" of vocab {info['vocab']}, {info['dtype']}"),
        f"features        {info['features'] or 'none'}",
        f"size            {_bytes(info['nbytes'])}",
        f"bytes/token     {info['bytes_per_token']:.1f} ("
        + ", ".join(f"{n} {b:.1f}" for n, b in info["per_token"].items()) + ")",
    ])
