"""The CPU kernel behind the chunked logit divergences (distilkit/losses/_rows_kernel.c): it builds wherever a C
compiler exists, equals the float64 references and the torch chunk loop, keeps masked rows out, compiles as one
opaque op, and reuses its gradient memory only when nothing else can see it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from references import REFERENCES

import distilkit as dk
import distilkit.backends
from distilkit.losses import _cpu_kernel
from distilkit.losses._chunked import CHUNKED

KINDS = sorted(CHUNKED)
EXTRA = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}}
HAS_COMPILER = any(shutil.which(c) for c in ("cc", "gcc")) or bool(os.environ.get("CC"))
needs_kernel = pytest.mark.skipif(not _cpu_kernel.available(), reason=f"CPU kernel {_cpu_kernel.status()}")


def _inputs(seed: int, rows: int, vocab: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(rows, vocab, generator=g)).requires_grad_()
    t = scale * torch.randn(rows, vocab, generator=g)
    mask = torch.rand(rows, generator=g) > 0.3
    return s, t, mask


def _grad(value, x):
    (g,) = torch.autograd.grad(value, x)
    return g


def _torch_path(monkeypatch):
    monkeypatch.setattr(_cpu_kernel, "usable", lambda *args: False)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_the_kernel_builds_where_a_compiler_exists():
    assert _cpu_kernel.available(), _cpu_kernel.status()
    assert _cpu_kernel.status() == "built"


def test_switched_off_by_the_environment():
    code = ("from distilkit.losses import _cpu_kernel as k; import torch, distilkit as dk; "
            "s = torch.randn(3, 5, requires_grad=True); dk.chunked_kd_kl(s, torch.randn(3, 5)).backward(); "
            "print(k.available(), k.status())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DISTILKIT_CPU_KERNEL": "0"})
    assert out.stdout.strip() == "False switched off by DISTILKIT_CPU_KERNEL=0"


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """The kernel module as if never loaded (its state restored afterwards)."""
    saved = dict(_cpu_kernel._state)
    _cpu_kernel._state.clear()
    monkeypatch.delenv("DISTILKIT_CPU_KERNEL", raising=False)
    yield
    _cpu_kernel._state.clear()
    _cpu_kernel._state.update(saved)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_a_cache_directory_others_can_write_is_never_used(tmp_path, monkeypatch, fresh_kernel_state):
    shared = tmp_path / "shared"
    (shared / "kernels").mkdir(parents=True)
    (shared / "kernels").chmod(0o777)
    monkeypatch.setenv("DISTILKIT_CACHE_DIR", str(shared))
    with pytest.warns(RuntimeWarning, match="the CPU kernel is unavailable"):
        assert not _cpu_kernel.available()
    assert "writable by other users" in _cpu_kernel.status()
    assert not list((shared / "kernels").iterdir())  # nothing was built or loaded there


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_a_planted_shared_object_is_not_loaded(tmp_path, monkeypatch, fresh_kernel_state):
    # Build once into a private directory, then make the built file writable by others, as a planted one would be.
    monkeypatch.setenv("DISTILKIT_CACHE_DIR", str(tmp_path))
    assert _cpu_kernel.available(), _cpu_kernel.status()
    assert (tmp_path / "kernels").stat().st_mode & 0o777 == 0o700
    (built,) = (tmp_path / "kernels").glob("rows_kernel-*.so")
    built.chmod(0o666)
    _cpu_kernel._state.clear()
    with pytest.warns(RuntimeWarning):
        assert not _cpu_kernel.available()
    assert "writable by other users" in _cpu_kernel.status()


def test_a_missing_compiler_is_named_and_warned_about(tmp_path, monkeypatch, fresh_kernel_state):
    monkeypatch.setenv("DISTILKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert not _cpu_kernel.available()
    assert "no-such-compiler-xyz" in _cpu_kernel.status() and "cache" not in _cpu_kernel.status()
    s = torch.randn(3, 5, requires_grad=True)  # the losses still run (the torch loop)
    dk.chunked_kd_kl(s, torch.randn(3, 5)).backward()
    assert torch.isfinite(s.grad).all()


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab", [1, 17, 1000])
@pytest.mark.parametrize("temperature", ["float", "tensor", "per_row"])
@pytest.mark.parametrize("t2_scale", [True, False])
def test_equals_the_float64_reference(kind, vocab, temperature, t2_scale):
    s, t, mask = _inputs(1, 37, vocab)
    temp = {"float": 2.5, "tensor": torch.tensor(0.7),
            "per_row": torch.rand(37, generator=torch.Generator().manual_seed(2)) + 0.5}[temperature]
    opts = {"mask": mask, "t2_scale": t2_scale, **EXTRA.get(kind, {})}
    value = CHUNKED[kind](s, t, temperature=temp, **opts)
    s64 = s.detach().double().requires_grad_()
    temp64 = temp.double() if isinstance(temp, torch.Tensor) else temp
    ref = REFERENCES[kind](s64, t.double(), temperature=temp64, **opts)
    ref = ref[0] / max(float(ref[1]), 1.0)
    torch.testing.assert_close(value.double(), ref, rtol=2e-6, atol=1e-6)
    g = _grad(value, s).double()
    g_ref = _grad(ref, s64)
    # float32 rounding of log-probabilities of size |z|/T, relative to the largest gradient entry
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7 + 1e-5 * float(g_ref.abs().max()))


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_the_torch_chunk_loop(kind, reduction, monkeypatch):
    s, t, mask = _inputs(3, 64, 300, scale=5.0)
    opts = {"mask": mask, "temperature": 1.3, "reduction": reduction, **EXTRA.get(kind, {})}
    weights = torch.rand(64, generator=torch.Generator().manual_seed(4))
    calls = []
    op = _cpu_kernel.rows_grad
    monkeypatch.setattr(_cpu_kernel, "rows_grad", lambda *args: calls.append(1) or op(*args))
    value = CHUNKED[kind](s, t, **opts)
    assert calls == [1]  # the kernel ran, once for all rows
    g = _grad((value * weights).sum() if reduction == "none" else 3.0 * value, s)
    _torch_path(monkeypatch)
    loop = CHUNKED[kind](s, t, chunk_size=8, **opts)
    g_loop = _grad((loop * weights).sum() if reduction == "none" else 3.0 * loop, s)
    torch.testing.assert_close(value, loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_loop, rtol=1e-4, atol=1e-7 + 1e-5 * float(g_loop.abs().max()))


@needs_kernel
@pytest.mark.parametrize("beta", [0.0, 1.0, torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.25)])
def test_jsd_endpoints_and_tensor_beta(beta):
    s, t, mask = _inputs(5, 16, 64)
    value = CHUNKED["jsd"](s, t, mask=mask, beta=beta, reduction="sum")
    s64 = s.detach().double().requires_grad_()
    ref = REFERENCES["jsd"](s64, t.double(), mask=mask, beta=float(beta))[0]
    torch.testing.assert_close(value.double(), ref, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(_grad(value, s).double(), _grad(ref, s64), rtol=1e-4, atol=1e-6)


@needs_kernel
def test_skew_kl_endpoints_with_underflowing_probabilities():
    """α = 0 is forward KL even where p_S underflows to 0 in float32 (logits 40 apart at T = 1)."""
    s, t, _ = _inputs(13, 6, 33, scale=40.0)
    for alpha in (0.0, 1.0):
        value = CHUNKED["skew_kl"](s, t, alpha=alpha)
        s64 = s.detach().double().requires_grad_()
        ref = REFERENCES["skew_kl"](s64, t.double(), alpha=alpha)
        ref = ref[0] / ref[1]
        torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-5)
        g, g_ref = _grad(value, s).double(), _grad(ref, s64)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7 + 1e-5 * float(g_ref.abs().max()))


@needs_kernel
def test_empty_batch_is_zero():
    s = torch.zeros(0, 7, requires_grad=True)
    for kind in KINDS:
        value = CHUNKED[kind](s, torch.zeros(0, 7), **EXTRA.get(kind, {}))
        assert value.item() == 0.0 and _grad(value, s).shape == (0, 7)


@needs_kernel
def test_masked_rows_are_never_read_and_a_fully_masked_batch_is_zero():
    s, t, _ = _inputs(6, 8, 50)
    mask = torch.ones(8, dtype=torch.bool)
    mask[3] = False
    bad = s.detach().clone()
    bad[3] = float("nan")
    bad[3, 0] = float("inf")
    bad.requires_grad_()
    for kind in KINDS:
        opts = EXTRA.get(kind, {})
        value = CHUNKED[kind](bad, t, mask=mask, **opts)
        clean = CHUNKED[kind](s.detach(), t, mask=mask, **opts)
        torch.testing.assert_close(value, clean)
        g = _grad(value, bad)
        assert torch.isfinite(g).all() and (g[3] == 0).all()
        nothing = CHUNKED[kind](s, t, mask=torch.zeros(8, dtype=torch.bool), **opts)
        assert nothing.item() == 0.0
        assert torch.equal(_grad(nothing, s), torch.zeros_like(s))


@needs_kernel
def test_large_logits_stay_finite():
    s, t, _ = _inputs(7, 4, 257, scale=1e4)
    for kind in KINDS:
        value = CHUNKED[kind](s, t, temperature=0.5, **EXTRA.get(kind, {}))
        assert torch.isfinite(value) and torch.isfinite(_grad(value, s)).all()


@needs_kernel
def test_strided_rows_go_through_the_kernel():
    """A teacher slice of a padded vocabulary (row stride > V) is read in place, not copied."""
    s, t, mask = _inputs(8, 12, 40)
    padded = torch.randn(12, 48)
    padded[:, :40] = t
    value = CHUNKED["kd_kl"](s, padded[:, :40], mask=mask)
    torch.testing.assert_close(value, CHUNKED["kd_kl"](s, t, mask=mask))


@needs_kernel
def test_compiled_with_inductor_equals_eager():
    s, t, mask = _inputs(9, 24, 130)

    def f(s, t, mask):
        return CHUNKED["kd_ce"](s, t, mask=mask, temperature=2.0) + CHUNKED["tvd"](s, t, mask=mask)

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    value = compiled(s, t, mask)
    expected = f(s, t, mask)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(_grad(value, s), _grad(expected, s))


@pytest.fixture
def reuse(monkeypatch):
    monkeypatch.setattr(_cpu_kernel, "REUSE_BYTES", 1)
    with dk.backends.reuse_gradient_memory():
        assert dk.backends.report()["reuse_gradient_memory"] == "on"
        yield


def test_gradient_memory_is_not_reused_by_default():
    assert dk.backends.report()["reuse_gradient_memory"] == "off"
    s, t, _ = _inputs(12, 2048, 1024)  # 8 MiB: above the reuse size
    for _ in range(3):
        s.grad = None
        CHUNKED["kd_ce"](s, t).backward()
    assert not _cpu_kernel._buffer  # nothing is kept by the kernel


@needs_kernel
def test_gradient_memory_is_reused_only_when_nothing_else_holds_it(reuse):
    s, t, mask = _inputs(10, 32, 100)
    expected = _grad(CHUNKED["kd_kl"](s, t, mask=mask), s)

    def step(scale):
        s.grad = None
        (scale * CHUNKED["kd_kl"](s, t, mask=mask)).backward()
        return s.grad

    first = step(1.0)
    first_ptr = first.data_ptr()
    kept = first.clone()
    second = step(2.0)  # ``first`` (the previous .grad) is still referenced here: a new buffer
    assert second.data_ptr() != first_ptr
    torch.testing.assert_close(first, kept)  # the gradient the user kept is untouched
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, 2.0 * expected)
    del first, second
    third = step(1.0)  # the kept buffer is referenced by nothing any more: its memory comes back
    torch.testing.assert_close(third, expected)
    views = [third[:4]]
    fourth = step(1.0)  # a view of the last .grad keeps it alive
    assert fourth.data_ptr() != views[0].data_ptr()
    torch.testing.assert_close(views[0], expected[:4])


@needs_kernel
def test_gradient_memory_is_reused_after_the_graph_is_freed(reuse):
    s, t, _ = _inputs(11, 16, 64)
    ptrs = []
    for _ in range(3):
        s.grad = None
        CHUNKED["kd_ce"](s, t).backward()
        ptrs.append(s.grad.data_ptr())
    assert ptrs[1] == ptrs[2]  # after the first, each step's gradient lands in the same memory
    pending = CHUNKED["kd_ce"](s, t)  # graph alive: its saved gradient may not be handed out again
    other = CHUNKED["kd_ce"](s.detach().requires_grad_(), -t)  # would overwrite ``pending``'s buffer if reused
    assert pending.grad_fn is not None and other.grad_fn is not None
    s.grad = None
    pending.backward()
    g_pending = s.grad.clone()
    s.grad = None
    CHUNKED["kd_ce"](s, t).backward()
    torch.testing.assert_close(g_pending, s.grad)


@needs_kernel
@pytest.mark.parametrize("loss", ["kl", "ce", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("recompute", [False, True])
def test_fused_linear_kd_uses_the_kernel_per_chunk(loss, recompute, monkeypatch):
    g = torch.Generator().manual_seed(12)
    hs = torch.randn(40, 16, generator=g).requires_grad_()
    ws = torch.randn(90, 16, generator=g).requires_grad_()
    ht, wt = torch.randn(40, 24, generator=g), torch.randn(96, 24, generator=g)  # padded teacher vocabulary
    mask = torch.rand(40, generator=g) > 0.25
    opts = {"loss": loss, "temperature": 1.5, "mask": mask, "chunk_size": 16, "vocab_size": 90,
            "recompute": recompute}
    calls = []
    op = _cpu_kernel.rows_grad
    monkeypatch.setattr(_cpu_kernel, "rows_grad", lambda *args: calls.append(1) or op(*args))
    value = dk.fused_linear_kd(hs, ws, ht, wt, **opts)
    grads = torch.autograd.grad(2.0 * value, (hs, ws))
    assert len(calls) >= 3  # one call per chunk of 16 rows
    with _cpu_kernel.disabled():
        loop = dk.fused_linear_kd(hs, ws, ht, wt, **opts)
        loop_grads = torch.autograd.grad(2.0 * loop, (hs, ws))
    torch.testing.assert_close(value, loop, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, loop_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 + 1e-5 * float(b.abs().max()))
