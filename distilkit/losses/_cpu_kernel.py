"""The CPU kernel of the chunked logit divergences: ``_rows_kernel.c``, built on first use, behind a custom op.

On the CPU the chunked losses spend their time in passes over memory, not in arithmetic: eager ATen makes about
fifteen passes over each chunk and dispatches some twenty-five ops per chunk. ``_rows_kernel.c`` does one sweep per
row (the maxima read from memory; exponentials, sums and the gradient while the row is in the cache), so a
``[N, V]`` divergence reads both logits once and writes its gradient once. It is compiled with the system C compiler
(``$CC``, else ``cc``/``gcc``) for this machine (``-march=native``) into ``$DISTILKIT_CACHE_DIR`` (default
``~/.cache/distilkit``), keyed by the source, the flags and the processor, and loaded with :mod:`ctypes` — only from
a directory and a file that belong to this user and that no other user can write (the directory is created 0700; a
foreign or shared one is skipped). Where no compiler works, or ``DISTILKIT_CPU_KERNEL=0`` is set, :func:`available`
is False and the losses run their torch chunk loop instead; :func:`status` says why, and a build that fails warns
once.

The kernel is exposed as the custom op ``distilkit::rows_grad`` so that ``torch.compile(fullgraph=True)`` treats it as
one opaque call. It reads its scalar arguments (β / α) on the host, which on the CPU is free.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import _table as table

SOURCE = Path(__file__).with_name("_rows_kernel.c")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fno-trapping-math",
         "-fassociative-math", "-fno-signed-zeros", "-freciprocal-math", "-fPIC", "-shared", "-pthread")
#: the divergences, numbered by the divergence table; the kernel is built with ``-DKD_CE=0 -DKD_KL=1 ...`` from it.
KINDS = table.KINDS
DEFINES = tuple(f"-D{kind.upper()}={i}" for i, kind in enumerate(KINDS))

_lock = threading.Lock()
_state: dict[str, object] = {}


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dirs() -> list[Path]:
    """Where built kernels are kept: ``$DISTILKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, then the
    temporary directory (for read-only homes)."""
    root = os.environ.get("DISTILKIT_CACHE_DIR")
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distilkit"
    fallback = Path(tempfile.gettempdir()) / f"distilkit-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return [Path(root)] if root else [home, fallback]


def _check_private(path: Path) -> None:
    """Raise ``PermissionError`` unless ``path`` is this user's own (not a link, writable by nobody else): a shared
    object is loaded into the process, so one that another user could have placed or changed is never loaded."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise PermissionError(f"{path} is a symbolic link")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path} is writable by other users")


def _private_dir(path: Path) -> Path:
    """``path``, created with mode 0700 when missing, checked by :func:`_check_private`."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(path)
    return path


def _compile(compiler: str, target: Path) -> None:
    # Build into a private name, then rename: concurrent processes (pytest-xdist) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, *DEFINES, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler found ({'$CC=' + repr(compiler) + ' is not' if compiler else 'none'} on "
                           "the PATH; install gcc or clang, or set $CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS + DEFINES).encode(), compiler.encode(),
                                     _processor().encode(), platform.machine().encode()])).hexdigest()[:16]
    errors = []
    for cache in _cache_dirs():
        target = cache / "kernels" / f"rows_kernel-{key}.so"
        try:
            _private_dir(target.parent)
            if not target.exists():
                _compile(compiler, target)
            _check_private(target)
            break
        except OSError as err:  # an unwritable or foreign cache: try the next one
            errors.append(f"{cache}: {err}")
    else:
        raise RuntimeError("no writable cache directory (" + "; ".join(errors) + ")")
    lib = ctypes.CDLL(str(target))
    fn = lib.dk_rows_grad
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, p, p, p, i64, p, i64, p, i64, p, i64, i64, i64, i64, i64, ctypes.c_int, ctypes.c_float,
                   ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first use; None where it cannot be built or is switched off."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                if os.environ.get("DISTILKIT_CPU_KERNEL", "1") == "0":
                    _state["lib"], _state["status"] = None, "switched off by DISTILKIT_CPU_KERNEL=0"
                else:
                    try:
                        _state["lib"], _state["status"] = _build(), "built"
                    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                        _state["lib"], _state["status"] = None, f"unavailable: {err}"
                        if not torch.compiler.is_compiling():  # (dynamo cannot trace warnings.warn)
                            warnings.warn(f"distilkit: the CPU kernel is unavailable ({err}); the chunked logit losses "
                                          "run their torch chunk loop instead, several times slower on the CPU. "
                                          "DISTILKIT_CPU_KERNEL=0 silences this.", RuntimeWarning, stacklevel=2)
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    return library() is not None


def status() -> str:
    library()
    return str(_state["status"])


def usable(student: Tensor, teacher: Tensor) -> bool:
    """Whether a ``[N, V]`` pair can go through the kernel: float32 on the CPU, unit stride over the classes."""
    return (student.device.type == "cpu" and teacher.device.type == "cpu" and student.dtype == torch.float32
            and teacher.dtype == torch.float32 and student.ndim == 2 and student.stride(-1) == 1
            and teacher.stride(-1) == 1 and not _state.get("off", False) and available())


@contextlib.contextmanager
def disabled():
    """Within the block the chunked losses run their torch chunk loop (the benchmarks compare the two)."""
    previous = _state.get("off", False)
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = previous


def _reuse_default() -> bool:
    return os.environ.get("DISTILKIT_REUSE_GRAD", "0") == "1"


@contextlib.contextmanager
def reuse_gradient_memory(enabled: bool = True):
    """Within the block, the kernel writes a large gradient into the memory of the last one it wrote, once nothing
    refers to that any more (off by default; ``DISTILKIT_REUSE_GRAD=1`` turns it on for the whole process).

    Trade-off: a fresh gradient is fresh memory, and on the CPU paging it in (a page fault and the zeroing of each
    page) can cost more than the loss itself; reuse avoids that, at the price of keeping one gradient's memory
    resident between steps. Only memory that nothing else holds is reused (checked by its storage use count), so a
    kept ``.grad``, a view or a pending graph is never overwritten."""
    previous = _state.get("reuse", _reuse_default())
    _state["reuse"] = bool(enabled)
    try:
        yield
    finally:
        _state["reuse"] = previous
        if not _state["reuse"]:
            release_buffer()


def report() -> dict[str, str]:
    """The kernel's status and switches, as words: ``cpu_kernel`` (``"built"``, ``"unavailable: <why>"`` or
    ``"switched off by DISTILKIT_CPU_KERNEL=0"``) and ``reuse_gradient_memory`` (``"on"`` / ``"off"``)."""
    return {"cpu_kernel": status(), "reuse_gradient_memory": "on" if _state.get("reuse", _reuse_default()) else "off"}


def release_buffer() -> None:
    """Drop the kept gradient memory (see :func:`gradient_buffer`); memory benchmarks start from here."""
    with _lock:
        _buffer.clear()


#: gradients at least this large (bytes) are kept for reuse by :func:`gradient_buffer`.
REUSE_BYTES = 1 << 22
_buffer: dict[str, object] = {}


def gradient_buffer(like: Tensor) -> tuple[Tensor, bool]:
    """An uninitialised float32 tensor of ``like``'s shape for the kernel's gradient, reusing the last one's memory
    when nothing else refers to it any more; and whether it did (the memory is then already paged in).

    A fresh gradient of a large loss is fresh memory, and on the CPU the first write to each fresh page costs a
    page fault and the zeroing of the page: at 2048 × 32k that alone took longer than the whole kernel. So the
    storage of the last large gradient is kept (one buffer: the resident memory grows by at most one gradient),
    and handed out again once its use count shows that only this cache still holds it: autograd has consumed it
    and no ``.grad``, hook or view keeps it — only inside :func:`reuse_gradient_memory` (or with
    ``DISTILKIT_REUSE_GRAD=1``). Otherwise, and under ``torch.compile``, a new tensor is allocated as usual.
    """
    shape = tuple(like.shape)
    if (torch.compiler.is_compiling() or like.numel() * 4 < REUSE_BYTES or not _state.get("reuse", _reuse_default())
            or not hasattr(torch._C, "_storage_Use_Count")):
        return torch.empty(shape, dtype=torch.float32), False
    with _lock:
        storage = _buffer.get("storage")
        if (storage is not None and _buffer.get("shape") == shape
                and torch._C._storage_Use_Count(storage._cdata) == 1):  # type: ignore[attr-defined]
            return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape), True
        grad = torch.empty(shape, dtype=torch.float32)
        _buffer["storage"], _buffer["shape"] = grad.untyped_storage(), shape
        return grad, False


@torch.library.custom_op("distilkit::rows_grad", mutates_args=("grad",), device_types="cpu")
def rows_grad(student: Tensor, teacher: Tensor, grad: Tensor, inv_temp: Tensor, gscale: Tensor, rscale: Tensor,
              keep: Tensor | None, kind: int, param: Tensor, paged_in: bool) -> Tensor:
    """Per-row ``rscale · D(softmax(s·inv_temp) ‖ softmax(t·inv_temp))``; writes ``gscale · ∂D/∂x_S`` into ``grad``.

    ``student``, ``teacher``: ``[N, V]`` float32 with unit class stride; ``grad``: ``[N, V]`` float32, same;
    ``inv_temp``, ``gscale``, ``rscale``: float32 ``[1]`` or ``[N]``; ``keep``: bool ``[N]`` or None; ``kind``: index
    into :data:`KINDS`; ``param``: jsd's β or skew_kl's α (0-d, read on the host); ``paged_in``: ``grad``'s memory
    has been written before (the kernel then streams the gradient out; for fresh memory it asks for huge pages).
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"distilkit::rows_grad: the CPU kernel is {status()}")
    n, v = student.shape
    rows = torch.empty(n, dtype=torch.float32)
    value = float(param)
    kind = KINDS.index(table.resolve(KINDS[kind], value))  # the table's defined end points (jsd's β = 0, 1, ...)
    vectors = [x.contiguous() for x in (inv_temp, gscale, rscale)]
    keep_c = None if keep is None else keep.contiguous().view(torch.uint8)  # alive until the call returns
    keep_ptr = None if keep_c is None else keep_c.data_ptr()
    code = lib.dk_rows_grad(student.data_ptr(), teacher.data_ptr(), grad.data_ptr(), rows.data_ptr(),
                            *[arg for x in vectors for arg in (x.data_ptr(), int(x.numel() > 1))],
                            keep_ptr, n, v, student.stride(0), teacher.stride(0), grad.stride(0), kind, value,
                            torch.get_num_threads(), 2 if paged_in else int(grad.numel() * 4 >= 1 << 22))
    if code != 0:
        raise MemoryError("distilkit::rows_grad: could not allocate the per-thread row buffers")
    return rows


@rows_grad.register_fake
def _(student, teacher, grad, inv_temp, gscale, rscale, keep, kind, param, paged_in):
    return student.new_empty(student.shape[0])
