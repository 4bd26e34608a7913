"""Teacher caching: run the teacher once over a loader, store its outputs on disk, read them back batch by batch.

```python
info  = dk.cache.write(teacher_fn, loader, "cache/", logits=("topk", 64), features={"hidden": [4, 8]})
cache = dk.cache.read("cache/")                      # a Sequence: cache[i] is batch i's teacher output mapping
for i, (batch, teacher_out) in enumerate(zip(loader, cache)):  # the same batches in the same order as at write
    out = step(student(batch), teacher_out, batch, step=i)
```

Layout: a directory with ``index.json`` (format, dtypes, each batch's shard and array shapes) and one flat 1-D
``.npy`` file per array per shard, holding the elements of consecutive batches up to ``shard_bytes``; read back with
``numpy.load(mmap_mode="r")`` (memory-mapped, a few shards open at a time; never pickled). Offsets are the running
sums of the batches' sizes, so batches of any shapes (dynamic padding) share shards. Every array keeps its batch
structure (``[B, L, ...]``): ``cache[i]`` has the shapes of the teacher's outputs for batch i, padding included.

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

import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .algebra import SpecKeyError

__all__ = ["Cache", "CacheInfo", "CachedLayers", "features_of", "read", "teacher_selectors", "write"]

FORMAT = "distilkit.cache"
VERSION = 1
INDEX = "index.json"
LOGITS = "logits"
_DTYPES = {"float16": np.float16, "float32": np.float32}


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
        if fmt == "dense":
            arrays[LOGITS] = _floating(api, repr(logits_key), i, z, dtype)
            meta[LOGITS] = {"key": logits_key, "part": "dense"}
        else:
            if not isinstance(z, Tensor) or not z.is_floating_point() or z.ndim == 0:
                got = f"dtype {z.dtype}, shape {tuple(z.shape)}" if isinstance(z, Tensor) else type(z).__name__
                raise TypeError(f"{api}: expected teacher output {logits_key!r} of batch {i} to be a floating-point "
                                f"tensor [..., V], got {got}.")
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


class _ShardWriter:
    """Collects batches and writes them as shards: per array one flat 1-D ``.npy`` of the batches' elements."""

    def __init__(self, path: Path, shard_bytes: int):
        self.path, self.shard_bytes = path, shard_bytes
        self.pending: list[dict[str, np.ndarray]] = []
        self.held = 0
        self.shards: list[dict] = []
        self.batches: list[dict] = []

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
            file = f"shard-{number:05d}-{name}.npy"
            out = np.lib.format.open_memmap(self.path / file, mode="w+", dtype=parts[0].dtype, shape=(size,))
            offset = 0
            for p in parts:
                out[offset:offset + p.size] = p.reshape(-1)
                offset += p.size
            out.flush()
            del out
            files[name] = {"file": file, "size": size, "dtype": parts[0].dtype.name}
        self.shards.append({"files": files})
        self.pending, self.held = [], 0


def _prepare(api: str, path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{api}: expected a directory path for the cache, got the file {str(path)!r}.")
    path.mkdir(parents=True, exist_ok=True)
    ours = [p for p in path.iterdir() if p.name == INDEX or (p.name.startswith("shard-") and p.suffix == ".npy")]
    if ours and not overwrite:
        raise FileExistsError(f"{api}: expected an empty or new directory, got {str(path)!r}, which already holds a "
                              "cache; pass overwrite=True to replace it.")
    for p in sorted(ours, key=lambda p: p.name != INDEX):  # the index first: a half-removed cache never reads
        p.unlink()


def write(teacher_fn: Callable[[Any], Mapping], loader: Iterable, path: str | os.PathLike, *,
          logits: str | tuple[str, int] | None = "dense", features=None, dtype="float16", temperature: float = 1.0,
          logits_key: str = LOGITS, shard_bytes: int = 1 << 30, overwrite: bool = False) -> CacheInfo:
    """Run ``teacher_fn`` on every batch of ``loader`` (under ``torch.no_grad()``) and store its outputs at ``path``.

    Args:
        teacher_fn: ``batch -> output mapping`` (``{"logits": [..., V], "hidden": [layers], ...}``, e.g. through
            ``dk.adapters``).
        loader: an iterable of batches; read the cache back in the same order (no reshuffling between the runs).
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
        overwrite: replace an existing cache at ``path`` (only ``index.json`` and ``shard-*.npy`` are removed).

    Returns:
        the :class:`CacheInfo` of the written cache (``index.json`` is written last, so an interrupted write leaves
        nothing that reads as a cache).
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
    selection = _selection(api, features, logits_key)
    if fmt is None and not selection:
        raise ValueError(f"{api}: nothing to cache: expected logits='dense' or ('topk', k), or some features.")
    path = Path(path)
    _prepare(api, path, overwrite)
    writer = _ShardWriter(path, shard_bytes)
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
            tokens += _tokens(arrays)
            writer.add(arrays)
    writer.flush()
    arrays_meta = arrays_meta or {}
    nbytes = sum(f["size"] * np.dtype(f["dtype"]).itemsize
                 for shard in writer.shards for f in shard["files"].values())
    index = {
        "format": FORMAT, "version": VERSION,
        "logits": None if fmt is None else {"format": fmt, "key": logits_key, "k": k, "vocab": vocab,
                                            "temperature": temperature},
        "dtype": dtype, "features": selection, "arrays": arrays_meta, "tokens": tokens, "nbytes": nbytes,
        "shards": writer.shards, "batches": writer.batches,
    }
    tmp = path / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path / INDEX)
    return _info(path, index)


def _names(meta: Mapping[str, dict]) -> list[str]:
    return [_array_name(m) for m in meta.values()]


def _array_name(m: Mapping) -> str:
    if "part" in m:
        return m["key"] if m["part"] == "dense" else f"{m['key']}.{m['part']}"
    return m["key"] if m["layer"] is None else f"{m['key']}.{m['layer']}"


def _tokens(arrays: Mapping[str, np.ndarray]) -> int:
    """Token positions of a batch: the logits' rows (all dims but the last), or else the first feature's."""
    if "logits-tail" in arrays:
        return int(arrays["logits-tail"].size)
    first = next(iter(arrays.values()))
    return int(math.prod(first.shape[:-1])) if first.ndim > 1 else int(first.shape[0])


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
        per_token=per_token,
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


class Cache(Sequence):
    """A written cache, read back: ``cache[i]`` is batch i's teacher output mapping; ``len(cache)`` batches.

    Shard files are memory-mapped on first use (at most ``open_shards`` shards at a time); indexing copies one
    batch into tensors (on ``device`` when given).
    """

    def __init__(self, path: Path, index: Mapping, slots: list, device=None, open_shards: int = 4):
        self.path = path
        self._index = index
        self._slots = slots  # per batch: (shard, {array: (offset, shape)})
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._open_shards = open_shards
        self.device = None if device is None else torch.device(device)
        self.info = _info(path, index)

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
            files = self._index["shards"][number]["files"]
            arrays = {name: np.load(self.path / f["file"], mmap_mode="r", allow_pickle=False)
                      for name, f in files.items()}
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


def _corrupt(file: Path, what: str) -> ValueError:
    return ValueError(f"dk.cache.read: corrupt cache index {str(file)!r}: {what}. Rewrite the cache with "
                      "dk.cache.write.")


def _load_index(path: Path) -> tuple[dict, list]:
    api = "dk.cache.read"
    if not path.is_dir():
        raise FileNotFoundError(f"{api}: expected a cache directory written by dk.cache.write, got {str(path)!r} "
                                "(no such directory).")
    file = path / INDEX
    if not file.is_file():
        raise FileNotFoundError(f"{api}: expected {INDEX} in {str(path)!r}, found none: not a cache, or its write "
                                "was interrupted.")
    try:
        index = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _corrupt(file, f"not JSON ({error})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise _corrupt(file, f"expected format {FORMAT!r}")
    if index.get("version") != VERSION:
        raise ValueError(f"{api}: expected a cache of format version {VERSION}, got version "
                         f"{index.get('version')!r} in {str(file)!r}.")
    try:
        slots = _check_index(index)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise _corrupt(file, f"{type(error).__name__}: {error}") from None
    return index, slots


def _check_index(index: dict) -> list:
    """Validate the index's structure; return per batch ``(shard, {array: (offset, shape)})``."""
    names = set(index["arrays"])
    for m in index["arrays"].values():
        if not isinstance(m, dict) or not isinstance(m["key"], str) or not ("part" in m or "layer" in m):
            raise TypeError("array descriptions must be objects with a 'key' and a 'part' or 'layer'")
    for shard in index["shards"]:
        if set(shard["files"]) != names:
            raise ValueError("a shard does not list every array")
        for f in shard["files"].values():
            if not (isinstance(f["file"], str) and "/" not in f["file"] and "\\" not in f["file"]
                    and f["file"].endswith(".npy") and isinstance(f["size"], int) and f["size"] >= 0
                    and f["dtype"] in ("float16", "float32", "int32")):
                raise ValueError(f"bad file entry {f!r}")
    used = [dict.fromkeys(names, 0) for _ in index["shards"]]
    slots = []
    for b in index["batches"]:
        shard, shapes = b["shard"], b["shapes"]
        if not (isinstance(shard, int) and 0 <= shard < len(used) and set(shapes) == names):
            raise ValueError(f"batch entry {b} names no shard or not every array")
        places = {}
        for name, shape in shapes.items():
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError(f"bad shape {shape!r}")
            places[name] = (used[shard][name], tuple(shape))
            used[shard][name] += math.prod(shape)
        slots.append((shard, places))
    for shard, counts in zip(index["shards"], used, strict=True):
        if any(counts[name] != f["size"] for name, f in shard["files"].items()):
            raise ValueError("the batches' shapes do not add up to a shard's size")
    if index["logits"] is not None and index["logits"]["format"] not in ("dense", "topk"):
        raise ValueError("unknown logits format")
    if not (isinstance(index["tokens"], int) and isinstance(index["nbytes"], int)
            and isinstance(index["features"], dict) and index["dtype"] in _DTYPES):
        raise ValueError("bad tokens, nbytes, features or dtype")
    return slots


def _check_shard_file(file: Path, entry: Mapping) -> None:
    """The ``.npy`` header says a C-ordered 1-D array of the index's size and dtype, and the file holds all of it."""
    if not file.is_file():
        raise FileNotFoundError(f"dk.cache.read: expected shard file {str(file)!r} listed in the index; it is "
                                "missing.")
    try:
        with open(file, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"dk.cache.read: corrupt shard file {str(file)!r}: {error}") from None
    expected = offset + entry["size"] * np.dtype(entry["dtype"]).itemsize
    if shape != (entry["size"],) or dtype != np.dtype(entry["dtype"]) or fortran:
        raise ValueError(f"dk.cache.read: corrupt shard file {str(file)!r}: expected a 1-D {entry['dtype']} array "
                         f"of {entry['size']} elements, got shape {shape} and dtype {dtype}.")
    if os.path.getsize(file) != expected:
        raise ValueError(f"dk.cache.read: corrupt shard file {str(file)!r}: expected {expected} bytes, got "
                         f"{os.path.getsize(file)} (truncated?).")


def read(path: str | os.PathLike, *, device=None, open_shards: int = 4) -> Cache:
    """Open the cache at ``path`` as a :class:`Cache`, after validating the index and every shard file's header.

    ``device``: where ``cache[i]``'s tensors go (default: CPU); ``open_shards``: how many shards stay
    memory-mapped at a time (least recently used closed first). Raises ``FileNotFoundError`` for a missing
    directory, index or shard file and ``ValueError`` for a corrupt index or shard file.
    """
    if isinstance(open_shards, bool) or not isinstance(open_shards, int) or open_shards < 1:
        raise ValueError(f"dk.cache.read: expected open_shards to be a positive int, got {open_shards!r}.")
    path = Path(path)
    index, slots = _load_index(path)
    for shard in index["shards"]:
        for f in shard["files"].values():
            _check_shard_file(path / f["file"], f)
    return Cache(path, index, slots, device, open_shards)
