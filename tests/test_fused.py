"""fused_linear_kd: equal to the unfused loss on explicit logits (float64 exactly, float32 within tolerance), never
materialises the full logits, composes with the algebra as a term through ``dk.make_step``."""

from __future__ import annotations

import pytest
import torch
from references import REFERENCES
from torch.utils._python_dispatch import TorchDispatchMode

import distilkit as dk
from distilkit.losses._fused import KINDS, fused_linear_kd, fused_linear_kd_term

F64 = torch.float64
B, L, DS, DT, VS, VT, V = 2, 7, 5, 6, 13, 16, 11
EXTRA = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}}


def _inputs(seed: int, dtype=F64, bias: bool = True, lead=(B, L), ds=DS, dt=DT, vs=VS, vt=VT):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype)

    hs, ws = r(*lead, ds).requires_grad_(), r(vs, ds).requires_grad_()
    bs = r(vs).requires_grad_() if bias else None
    ht, wt = r(*lead, dt), r(vt, dt, scale=2.0)
    bt = r(vt) if bias else None
    mask = torch.rand(lead, generator=g) > 0.3
    return hs, ws, bs, ht, wt, bt, mask


def _logits(h, w, b, vocab):
    z = h @ w[:vocab].t()
    return z if b is None else z + b[:vocab]


def _grads(value, xs):
    return torch.autograd.grad(value, [x for x in xs if x is not None])


@pytest.mark.parametrize("loss", KINDS)
@pytest.mark.parametrize("recompute", [False, True])
def test_equals_the_unfused_loss_float64(loss, recompute):
    """Padded vocabularies (V < V_S < V_T), different widths, biases, a mask, per-row temperatures."""
    kind = loss
    hs, ws, bs, ht, wt, bt, mask = _inputs(0)
    temp = torch.rand(B, L, dtype=F64, generator=torch.Generator().manual_seed(1)) + 0.5
    opts = {"temperature": temp, "mask": mask, **EXTRA.get(kind, {})}
    for chunk in (1, 3, None):
        value = fused_linear_kd(hs, ws, ht, wt, divergence=loss, student_bias=bs, teacher_bias=bt, vocab_size=V,
                                chunk_size=chunk, recompute=recompute, **opts)
        zs, zt = _logits(hs, ws, bs, V), _logits(ht, wt, bt, V)
        ref_sum, ref_count = REFERENCES[kind](zs, zt, **opts)
        ref = ref_sum / max(ref_count, 1.0)
        torch.testing.assert_close(value, ref.detach(), rtol=1e-10, atol=1e-12)
        for a, b in zip(_grads(1.7 * value, (hs, ws, bs)), _grads(1.7 * ref, (hs, ws, bs)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", KINDS)
def test_reductions_and_sum_count(loss):
    kind = loss
    hs, ws, bs, ht, wt, bt, mask = _inputs(2)
    opts = {"temperature": 2.0, "mask": mask, "t2_scale": False, **EXTRA.get(kind, {})}
    fused = dict(student_bias=bs, teacher_bias=bt, vocab_size=V, chunk_size=4)
    rows = fused_linear_kd(hs, ws, ht, wt, divergence=loss, reduction="none", **fused, **opts)
    zs, zt = _logits(hs, ws, bs, V), _logits(ht, wt, bt, V)
    dense = getattr(dk.losses, kind)(zs, zt, reduction="none", **opts)
    assert rows.shape == (B, L)
    torch.testing.assert_close(rows, dense, rtol=1e-10, atol=1e-12)
    w = torch.randn(B, L, dtype=F64, generator=torch.Generator().manual_seed(3))
    for a, b in zip(_grads((rows * w).sum(), (hs, ws, bs)), _grads((dense * w).sum(), (hs, ws, bs)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    total, count = fused_linear_kd.sum_count(hs, ws, ht, wt, divergence=loss, **fused, **opts)
    ref_total, ref_count = getattr(dk.losses, kind).sum_count(_logits(hs, ws, bs, V), zt, **opts)
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-12)
    assert count.item() == ref_count.item() == mask.sum().item()
    summed = fused_linear_kd(hs, ws, ht, wt, divergence=loss, reduction="sum", **fused, **opts)
    torch.testing.assert_close(summed, ref_total, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["kd_kl", "kd_ce", "jsd"])
def test_float32_within_tolerance_of_the_unfused_loss(loss):
    kind = loss
    hs, ws, bs, ht, wt, bt, mask = _inputs(4, torch.float32, lead=(4, 32), ds=24, dt=40, vs=300, vt=320)
    opts = {"temperature": 2.0, "mask": mask, **EXTRA.get(kind, {})}
    value = fused_linear_kd(hs, ws, ht, wt, divergence=loss, student_bias=bs, teacher_bias=bt, chunk_size=16, **opts)
    ref = getattr(dk.losses, kind)(_logits(hs, ws, bs, 300), _logits(ht, wt, bt, 300), **opts)
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(value, (hs, ws, bs)), _grads(ref, (hs, ws, bs)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradients_only_for_the_student_and_zero_for_padded_rows():
    hs, ws, bs, ht, wt, bt, mask = _inputs(5)
    wt.requires_grad_()
    ht.requires_grad_()
    fused_linear_kd(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, vocab_size=V, mask=mask).backward()
    assert ht.grad is None and wt.grad is None
    assert torch.equal(ws.grad[V:], torch.zeros_like(ws.grad[V:]))
    assert torch.equal(bs.grad[V:], torch.zeros_like(bs.grad[V:]))
    assert ws.grad[:V].abs().sum() > 0


def test_weight_without_grad_and_bf16():
    hs, ws, _, ht, wt, _, mask = _inputs(6, torch.float32, bias=False)
    ws.requires_grad_(False)
    value = fused_linear_kd(hs, ws, ht, wt, mask=mask, vocab_size=V)
    (g,) = torch.autograd.grad(value, hs)
    ref = dk.kd_kl(_logits(hs, ws, None, V), _logits(ht, wt, None, V), mask=mask)
    torch.testing.assert_close(g, torch.autograd.grad(ref, hs)[0], rtol=1e-4, atol=1e-6)
    hb, wb = hs.detach().bfloat16().requires_grad_(), ws.detach().bfloat16().requires_grad_()
    value = fused_linear_kd(hb, wb, ht.bfloat16(), wt.bfloat16(), mask=mask, vocab_size=V)
    value.backward()
    assert value.dtype == torch.float32 and hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    ref = dk.kd_kl(_logits(hb, wb, None, V), _logits(ht.bfloat16(), wt.bfloat16(), None, V), mask=mask)
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-5)


class _NewTensors(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in (*args, *(kwargs or {}).values())
                  if isinstance(x, torch.Tensor)}
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(x.numel())
        return out


@pytest.mark.parametrize("loss", KINDS)
@pytest.mark.parametrize("recompute", [False, True])
def test_never_materialises_the_logits(loss, recompute):
    rows, vocab, chunk = 96, 211, 8
    hs, ws, bs, ht, wt, bt, mask = _inputs(7, torch.float32, lead=(rows,), ds=4, dt=6, vs=vocab, vt=vocab + 5)
    with _NewTensors() as seen:
        value = fused_linear_kd(hs, ws, ht, wt, divergence=loss, student_bias=bs, teacher_bias=bt, vocab_size=vocab,
                                chunk_size=chunk, mask=mask, recompute=recompute, **EXTRA.get(loss, {}))
        value.backward()
    assert max(seen.sizes) <= chunk * vocab  # one chunk of logits at most; the gradients are smaller here


def test_compiled_fullgraph_equals_eager():
    hs, ws, bs, ht, wt, bt, mask = _inputs(8, torch.float32)

    def f(hs, ws, bs, ht, wt, bt, mask):
        return fused_linear_kd(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, vocab_size=V, mask=mask,
                               temperature=2.0, chunk_size=4)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (hs, ws, bs, ht, wt, bt, mask)
    value, expected = compiled(*args), f(*args)
    torch.testing.assert_close(value, expected)
    for a, b in zip(_grads(value, (hs, ws, bs)), _grads(expected, (hs, ws, bs)), strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------- the algebra
NAME = "fused_linear_kd_under_test"


@pytest.fixture(scope="module")
def fused_loss():
    return dk.register_loss(fused_linear_kd_term, name=NAME, pair=True, replace=True)


def _model_outputs(seed: int, bias: bool):
    hs, ws, bs, ht, wt, bt, mask = _inputs(seed, torch.float32, bias=bias)
    student = {"hidden": [hs.detach().requires_grad_() for _ in range(2)], "lm_head": [ws, bs] if bias else ws}
    teacher = {"hidden": [ht, ht], "lm_head": [wt, bt] if bias else wt}
    student["hidden"][1] = hs
    return student, teacher, {"attention_mask": mask}, (hs, ws, bs, ht, wt, bt, mask)


@pytest.mark.parametrize("compile", [False, "aot_eager"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_term_through_make_step(fused_loss, compile, bias):
    student, teacher, batch, (hs, ws, bs, ht, wt, bt, mask) = _model_outputs(9, bias)
    temperature = dk.schedules.linear(4.0, 1.0, steps=10)
    spec = (fused_loss.on([("hidden", -1), "lm_head"], mask="attention_mask", temperature=temperature,
                          vocab_size=V).named("fkd")
            + 0.5 * fused_loss.on([("hidden", -1), "lm_head"], divergence="jsd", beta=0.3, vocab_size=V).named("fjsd"))
    out = dk.make_step(spec, compile=compile)(student, teacher, batch, step=3)
    zs, zt = _logits(hs, ws, bs, V), _logits(ht, wt, bt, V)
    expected = (dk.kd_kl(zs, zt, temperature=temperature(3).item(), mask=mask)
                + 0.5 * dk.jsd(zs, zt, beta=0.3))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert set(out.metrics) == {"loss", "fkd/loss", "fkd/weight", "fjsd/loss", "fjsd/weight"}
    leaves = [x for x in (hs, ws, bs) if x is not None]
    for a, b in zip(torch.autograd.grad(out.loss, leaves), torch.autograd.grad(expected, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_registered_loss_is_callable_with_four_tensors(fused_loss):
    hs, ws, _, ht, wt, _, mask = _inputs(14, bias=False)
    direct = fused_loss(hs, ws, ht, wt, mask=mask, temperature=2.0)
    torch.testing.assert_close(direct, fused_linear_kd(hs, ws, ht, wt, mask=mask, temperature=2.0))
    total, count = fused_loss.sum_count((hs, ws), (ht, wt), mask=mask)
    torch.testing.assert_close(total / count, fused_linear_kd(hs, ws, ht, wt, mask=mask))
    with pytest.raises(TypeError, match="fused_linear_kd: expected"):
        fused_loss(hs, ws, ht)
    bs, bt = torch.randn(VS, dtype=F64), torch.randn(VT, dtype=F64)
    torch.testing.assert_close(fused_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, vocab_size=V),
                               fused_linear_kd(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, vocab_size=V))
    with pytest.raises(ValueError, match="fused_linear_kd: expected student_bias once"):
        fused_loss((hs, [ws, bs]), (ht, wt), student_bias=bs)


def test_global_normalisation_through_make_step(fused_loss):
    student, teacher, batch, (hs, ws, _, ht, wt, _, mask) = _model_outputs(10, bias=False)
    spec = fused_loss.on([("hidden", -1), "lm_head"], mask="attention_mask", vocab_size=V)
    out = dk.make_step(spec, compile=False)(student, teacher, batch, counts={"attention_mask": 40})
    total, _ = dk.kd_kl.sum_count(_logits(hs, ws, None, V), _logits(ht, wt, None, V), mask=mask)
    torch.testing.assert_close(out.loss, total / 40, rtol=1e-5, atol=1e-7)


def test_pair_errors(fused_loss):
    hs, _, _, ht, wt, _, _ = _inputs(11, torch.float32, bias=False)
    with pytest.raises(TypeError, match="fused_linear_kd: expected student to be a pair"):
        fused_linear_kd_term(hs, (ht, wt))
    with pytest.raises(ValueError, match=r"expected student and teacher selectors of the same kind"):
        fused_loss.on([("hidden", -1), "lm_head"], ("hidden", -1))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"divergence": "kl"}, ValueError, "fused_linear_kd: expected divergence to be one of"),
    ({"loss": "kd"}, ValueError, "fused_linear_kd: expected loss .deprecated; use divergence=. to be one of"),
    ({"vocab_size": 99}, ValueError, "fused_linear_kd: expected vocab_size"),
    ({"chunk_size": 0}, ValueError, "fused_linear_kd: expected chunk_size"),
    ({"reduction": "avg"}, ValueError, "fused_linear_kd: expected reduction"),
    ({"temperature": -1.0}, ValueError, "fused_linear_kd: expected temperature > 0"),
    ({"student_bias": torch.zeros(3)}, ValueError, "fused_linear_kd: expected student_bias of shape"),
])
def test_errors(kwargs, error, match):
    hs, ws, _, ht, wt, _, _ = _inputs(12, bias=False)
    with pytest.raises(error, match=match):
        fused_linear_kd(hs, ws, ht, wt, **kwargs)


def test_shape_errors():
    hs, ws, _, ht, wt, _, _ = _inputs(13, bias=False)
    with pytest.raises(ValueError, match="fused_linear_kd: expected student_weight of shape"):
        fused_linear_kd(hs, ws.t(), ht, wt)
    with pytest.raises(ValueError, match="fused_linear_kd: expected student_hidden and teacher_hidden of the same"):
        fused_linear_kd(hs, ws, ht[:, :-1], wt)
    with pytest.raises(TypeError, match=r"fused_linear_kd: expected teacher_weight to be a torch\.Tensor"):
        fused_linear_kd(hs, ws, ht, "lm_head")


# ------------------------------------------------------------------------ KD + hard labels from the same chunks
def _labels(seed: int, lead=(B, L), vocab=V):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[0, :2] = -100  # no next token there (e.g. the prompt, or the last position)
    return labels


def _hard_reference(hs, ws, bs, ht, wt, bt, mask, labels, kind, ce_weight, reduction, **opts):
    """Formula, written independently: the divergence and the cross-entropy on explicit logits, both over the
    positions kept by the mask and having a label, each reduced over those positions."""
    zs, zt = _logits(hs, ws, bs, V), _logits(ht, wt, bt, V)
    keep = mask & (labels != -100)
    kd_rows = getattr(dk.losses, kind)(zs, zt, mask=keep, reduction="none", impl="dense", **opts)
    safe = torch.where(keep, labels, 0)
    ce_rows = torch.where(keep, -torch.log_softmax(zs, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    rows = kd_rows + ce_weight * ce_rows
    if reduction == "none":
        return rows, kd_rows, ce_rows
    n = keep.sum().clamp_min(1)
    scale = 1 if reduction == "sum" else 1 / n
    return rows.sum() * scale, kd_rows.sum() * scale, ce_rows.sum() * scale


@pytest.mark.parametrize("dtype", [F64, torch.float32])  # float32: the CPU kernel; float64: the torch chunk loop
@pytest.mark.parametrize("kind", ["kd_kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("recompute", [False, True])
def test_kd_and_hard_labels_from_the_same_chunks(dtype, kind, reduction, recompute):
    hs, ws, bs, ht, wt, bt, mask = _inputs(21, dtype)
    labels = _labels(22)
    opts = {"temperature": 2.0, **EXTRA.get(kind, {})}
    out = fused_linear_kd(hs, ws, ht, wt, divergence=kind, student_bias=bs, teacher_bias=bt, vocab_size=V, mask=mask,
                          labels=labels, ce_weight=0.7, token_logprobs=True, chunk_size=5, recompute=recompute,
                          reduction=reduction, **opts)
    loss, kd, ce = _hard_reference(hs, ws, bs, ht, wt, bt, mask, labels, kind, 0.7, reduction, **opts)
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(out.loss, loss, **tol)
    torch.testing.assert_close(out.kd, kd.detach(), **tol)
    torch.testing.assert_close(out.ce, ce.detach(), **tol)
    assert not out.kd.requires_grad and not out.ce.requires_grad and not out.token_logprobs.requires_grad
    keep = mask & (labels != -100)
    zs = _logits(hs, ws, bs, V).detach()
    expected_logp = torch.log_softmax(zs, -1).gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.token_logprobs, torch.where(keep, expected_logp, 0.0), **tol)
    upstream = torch.rand_like(loss) if reduction == "none" else torch.tensor(1.3, dtype=loss.dtype)
    got = torch.autograd.grad(out.loss, [hs, ws, bs], upstream)
    want = torch.autograd.grad(loss, [hs, ws, bs], upstream)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **({"rtol": 1e-9, "atol": 1e-12} if dtype == F64 else
                                            {"rtol": 1e-3, "atol": 1e-5}))


def test_hard_labels_garbage_at_ignored_positions_never_leaks():
    hs, ws, bs, ht, wt, bt, _ = _inputs(23)
    labels = _labels(24)
    ignored = labels == -100
    ht = ht.clone()
    ht[ignored] = float("nan")  # a teacher that computed nothing there
    with torch.no_grad():
        hs[ignored] = float("inf")
    out = fused_linear_kd(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, vocab_size=V, labels=labels)
    assert out.loss.isfinite()
    grads = torch.autograd.grad(out.loss, [hs, ws, bs])
    assert all(g.isfinite().all() for g in grads)
    assert (grads[0][ignored] == 0).all()


def test_hard_labels_as_a_term_of_a_spec_with_global_counts(fused_loss):
    student, teacher, batch, (hs, ws, bs, ht, wt, bt, mask) = _model_outputs(25, bias=True)
    batch = {**batch, "labels": _labels(26)}
    spec = fused_loss.on([("hidden", -1), "lm_head"], mask="attention_mask", labels="labels", ce_weight=0.5,
                         temperature=2.0, vocab_size=V)
    for compile in (False, "aot_eager"):
        out = dk.make_step(spec, compile=compile)(student, teacher, batch)
        loss, _, _ = _hard_reference(hs, ws, bs, ht, wt, bt, mask, batch["labels"], "kd_kl", 0.5, "mean",
                                     temperature=2.0)
        torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
        a, b = torch.autograd.grad(out.loss, [hs, ws]), torch.autograd.grad(loss, [hs, ws])
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # exact global normalisation: with labels only (the -100 already marks padding), the count key is "labels" and
    # its global count is the number of positions with a label over the whole step (here two equal micro-batches)
    spec = fused_loss.on([("hidden", -1), "lm_head"], labels="labels", ce_weight=0.5, temperature=2.0, vocab_size=V)
    everything = torch.ones_like(mask)
    loss, _, _ = _hard_reference(hs, ws, bs, ht, wt, bt, everything, batch["labels"], "kd_kl", 0.5, "mean",
                                 temperature=2.0)
    counts = {"labels": 2 * (batch["labels"] != -100).sum()}
    out = dk.make_step(spec)(student, teacher, batch, counts=counts)
    torch.testing.assert_close(out.loss, loss / 2, rtol=1e-5, atol=1e-6)


def test_hard_labels_errors():
    hs, ws, _, ht, wt, _, _ = _inputs(27)
    with pytest.raises(TypeError, match="fused_linear_kd: expected integer class labels"):
        fused_linear_kd(hs, ws, ht, wt, labels=torch.zeros(B, L))
    with pytest.raises(ValueError, match=r"fused_linear_kd: expected labels of shape \(2, 7\)"):
        fused_linear_kd(hs, ws, ht, wt, labels=torch.zeros(B, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"fused_linear_kd: expected labels in \[0, 13\)"):
        fused_linear_kd(hs, ws, ht, wt, labels=torch.full((B, L), 13))
    with pytest.raises(ValueError, match="token_logprobs=True needs labels"):
        fused_linear_kd(hs, ws, ht, wt, token_logprobs=True)


def test_under_torch_func_the_fused_path_gives_the_same_gradient():
    hs, ws, bs, ht, wt, bt, mask = _inputs(28)
    labels = _labels(29)

    def loss(w):
        return fused_linear_kd(hs.detach(), w, ht, wt, student_bias=bs.detach(), teacher_bias=bt, vocab_size=V,
                               mask=mask, labels=labels, temperature=2.0).loss

    got = torch.func.grad(loss)(ws.detach())
    (want,) = torch.autograd.grad(loss(ws), ws)  # the chunked path, closed-form gradients
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    per_t = torch.func.vmap(lambda t: fused_linear_kd(hs, ws, ht, wt, vocab_size=V, temperature=t))(
        torch.tensor([1.0, 2.0], dtype=F64))
    for k, t in enumerate((1.0, 2.0)):
        torch.testing.assert_close(per_t[k], fused_linear_kd(hs, ws, ht, wt, vocab_size=V, temperature=t))


def test_padded_vocabulary_conventions():
    """distilkit compares the first V classes (the teacher's extra rows are padding); Liger-Kernel's convention,
    zero student logits on the teacher's extra classes, is a student weight padded with zero rows."""
    hs, ws, _, ht, wt, _, mask = _inputs(30, bias=False)  # V_S = 13 < V_T = 16
    first = fused_linear_kd(hs, ws, ht, wt, vocab_size=VS, mask=mask)
    torch.testing.assert_close(first, dk.kd_kl(hs @ ws.t(), (ht @ wt.t())[..., :VS], mask=mask))
    padded = torch.cat([ws, ws.new_zeros(VT - VS, DS)])
    liger = fused_linear_kd(hs, padded, ht, wt, vocab_size=VT, mask=mask)
    zs = torch.cat([hs @ ws.t(), (hs @ ws.t()).new_zeros(B, L, VT - VS)], -1)
    torch.testing.assert_close(liger, dk.kd_kl(zs, ht @ wt.t(), mask=mask))
    assert not torch.allclose(first, liger)
