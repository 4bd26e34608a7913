"""Parity of distilkit's logit divergences with the peers' own installed code (issue 11, item 7).

The peers, as installed by the ``dev`` extra, and how their conventions map onto distilkit's arguments:

* TRL 1.16 ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd``): ``m = β p_T + (1−β) p_S``,
  ``β KL(p_T‖m) + (1−β) KL(p_S‖m)``, ``β = 0`` forward KL(p_T‖p_S), ``β = 1`` reverse KL(p_S‖p_T) — the same side
  weighted by β as ``dk.jsd``, so ``beta`` passes unchanged. Logits divided by T, no T² (``t2_scale=False``).
  ``labels == -100`` are dropped (``mask=labels != -100``). ``"batchmean"``: mean over kept tokens with labels, but
  the sum over all tokens divided by the *batch size* without them; ``"mean"``: over tokens × classes;
  ``num_items_in_batch``: sum / that number.
* TRL 1.16 ``DistillationTrainer``'s ``_chunked_divergence_loss`` (``trl.trainer.distillation_trainer``): the same
  generalized JSD from hidden states and ``lm_head`` weights (biases optional), mean over ``completion_mask`` or sum
  / ``num_items_in_batch``; ↔ ``dk.fused_linear_kd(divergence="jsd")``. Torch fallback of its Triton kernels on the CPU.
* Liger-Kernel 0.8.5 ``LigerFusedLinearJSDLoss`` (``liger_kernel.chunked_loss``, pure torch + ``torch.compile``):
  the same β convention, logits divided by T, no T², mean over tokens whose label is not ``ignore_index``, plus
  ``weight_hard_loss`` × the hard cross-entropy of the *untempered* student logits (↔ ``dk.hard_ce``, or
  ``dk.fused_linear_kd(labels=..., ce_weight=...)``); a wider teacher head pads the student's logits with zeros.
* torchtune 0.6.1 ``ForwardKLLoss`` / ``ReverseKLLoss`` / ``SymmetricKLLoss`` and their ``…WithChunkedOutputLoss``
  variants: no temperature, no T², mean over tokens whose label is not ``ignore_index`` (``normalize=False``: sum).
  torchtune's "forward KL" is the soft cross-entropy ``−Σ p_T log p_S`` (DistiLLM's convention): it equals
  ``dk.kd_ce``, and ``dk.kd_kl`` plus the teacher's entropy (same gradient). ``SymmetricKLLoss(r)`` is
  ``r · kd_ce + (1 − r) · reverse_kl``. Classes where a logit is ±inf are zeroed out of its sums.

Values and gradients (w.r.t. the student logits, or hidden states, weight and bias for the fused losses) are compared
in float32 within ``rtol=1e-4, atol=1e-6`` (float64 where the peer computes in float64). Each side gets its own leaf
copies. The peers are dev dependencies and are imported at module top: if one is missing this file fails to import.

−inf logits (a class banned in both models, or only in the teacher): where the peer gives NaN, distilkit is checked
against the float64 formula below (:func:`_ref_rows`) and against the peer on the same logits with the −inf replaced
by −1e4 (a finite logit whose probability underflows to exactly 0, so the peer stays finite and has the same value).
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
from torch.testing import assert_close
from torchtune.modules.loss import (
    ForwardKLLoss,
    ForwardKLWithChunkedOutputLoss,
    ReverseKLLoss,
    ReverseKLWithChunkedOutputLoss,
    SymmetricKLLoss,
    SymmetricKLWithChunkedOutputLoss,
)
from trl.trainer.distillation_trainer import _chunked_divergence_loss

import distilkit as dk

with warnings.catch_warnings():  # TRLExperimentalWarning: GKDTrainer lives in trl.experimental since TRL 1.x
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDTrainer

gkd_jsd = GKDTrainer.generalized_jsd_loss

B, L, V, D_S, D_T = 2, 5, 11, 8, 6  # batch, length, vocabulary, student and teacher widths
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-6}, torch.float64: {"rtol": 1e-9, "atol": 1e-12}}
IMPLS = ("dense", "chunked")
BANNED = 3  # a class whose logit is -inf in both models
TEACHER_BANNED = 7  # a class whose logit is -inf in the teacher only
STAND_IN = -1e4  # a finite logit whose probability is exactly 0 in float32 and float64 (exp(-1e4) underflows)


# --------------------------------------------------------------------------------------------------- helpers


def _logits(dtype=torch.float32, seed=0):
    """Student and teacher logits [B, L, V] (teacher sharper, so the divergences are not small)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g, dtype=dtype)
    t = 2.0 * torch.randn(B, L, V, generator=g, dtype=dtype)
    return s, t


def _mask():
    """[B, L] keep-mask with ignored positions in both samples (and 7 kept of 10)."""
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 0] = False
    return mask


def _labels(mask, ignore_index=-100, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, L), generator=g)
    return labels.masked_fill(~mask, ignore_index)


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _value_and_grads(fn, *inputs):
    """``fn(*leaves)`` and its gradients w.r.t. fresh leaf copies of ``inputs``."""
    leaves = [_leaf(x) for x in inputs]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def assert_parity(ours, theirs, *inputs, dtype=torch.float32):
    """``ours`` and ``theirs`` agree in value and in the gradient w.r.t. each of ``inputs``."""
    v_ours, g_ours = _value_and_grads(ours, *inputs)
    v_theirs, g_theirs = _value_and_grads(theirs, *inputs)
    assert torch.isfinite(v_theirs) and all(torch.isfinite(g).all() for g in g_theirs)  # a real comparison
    assert_close(v_ours, v_theirs.to(v_ours.dtype), **TOL[dtype])
    for a, b in zip(g_ours, g_theirs, strict=True):
        assert_close(a, b.to(a.dtype), **TOL[dtype])


def _xlogy_rows(p, log_p, log_q):
    """Σ p (log p − log q) over the last dimension with 0·log 0 = 0 (selected, so gradients stay finite)."""
    keep = p > 0
    terms = p * (torch.where(keep, log_p, 0.0) - torch.where(keep, log_q, 0.0))
    return torch.where(keep, terms, 0.0).sum(-1)


def _ref_rows(kind, zs, zt, *, temperature=1.0, beta=0.5, banned=()):
    """float64 per-row divergence, no T², written from the definitions (not from distilkit).

    Classes in ``banned`` are -inf in both models: they have no mass under either distribution, so they are dropped
    from the vocabulary (their gradient is 0 through the indexing). A class that is -inf in the teacher only stays.
    """
    keep = torch.ones(zs.shape[-1], dtype=torch.bool)
    keep[list(banned)] = False
    zs, zt = zs.double()[..., keep] / temperature, zt.double().detach()[..., keep] / temperature
    ls, lt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "kd_ce":
        return -torch.where(pt > 0, pt * torch.where(pt > 0, ls, 0.0), 0.0).sum(-1)
    if kind == "kd_kl" or (kind == "jsd" and beta == 0):
        return _xlogy_rows(pt, lt, ls)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _xlogy_rows(ps, ls, lt)
    assert kind == "jsd"
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
    return beta * _xlogy_rows(pt, lt, lm) + (1 - beta) * _xlogy_rows(ps, ls, lm)


def _ref_mean(kind, zs, zt, mask, **options):
    """Mean of :func:`_ref_rows` over the kept rows, by selection."""
    return _ref_rows(kind, zs, zt, **options)[mask].mean()


def _banned(s, t, case, fill=-math.inf):
    """Logits with ``fill`` at ``BANNED`` in both models (``case="both"``) or at ``TEACHER_BANNED`` in the teacher
    only (``case="teacher"``)."""
    s, t = s.clone(), t.clone()
    if case == "both":
        s[..., BANNED] = fill
        t[..., BANNED] = fill
    else:
        t[..., TEACHER_BANNED] = fill
    return s, t


def _stand_in(x):
    return x.masked_fill(torch.isneginf(x), STAND_IN)


# ------------------------------------------------------------------------ TRL: GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_trl_gkd_jsd(beta, temperature, impl, dtype):
    """Labels with -100 → mask; TRL's "batchmean" with labels is the mean over kept tokens; no T²; β unchanged
    (both weight the teacher; β = 0 forward KL, β = 1 reverse KL in both)."""
    s, t = _logits(dtype)
    labels = _labels(_mask())
    assert_parity(
        lambda x: dk.jsd(x, t, beta=beta, temperature=temperature, mask=labels != -100, t2_scale=False, impl=impl),
        lambda x: gkd_jsd(x, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean"),
        s, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_gkd_endpoints_are_the_kls(beta, impl):
    """TRL's endpoints against distilkit's KLs: β = 0 ↔ dk.kd_kl, β = 1 ↔ dk.reverse_kl, (and β = 0.5 ↔ dk.jsd),
    so that the β side cannot be swapped without a failure."""
    s, t = _logits(torch.float64)
    labels = _labels(_mask())
    ours = {0.0: dk.kd_kl, 1.0: dk.reverse_kl}.get(beta, dk.jsd)
    assert_parity(
        lambda x: ours(x, t, temperature=2.0, mask=labels != -100, t2_scale=False, impl=impl),
        lambda x: gkd_jsd(x, t, labels=labels, beta=beta, temperature=2.0),
        s, dtype=torch.float64)


def test_trl_gkd_beta_is_not_mirrored():
    """A check of the check: with β ↔ 1 − β the two disagree (TRL and distilkit weight the same side)."""
    s, t = _logits(torch.float64)
    ours = dk.jsd(s, t, beta=0.1, t2_scale=False)
    theirs = gkd_jsd(s, t, beta=0.9, reduction="sum") / (B * L)
    assert not torch.allclose(ours, theirs, rtol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["batchmean_unlabelled", "sum", "mean", "none", "num_items_in_batch"])
def test_trl_gkd_reductions(reduction, impl):
    s, t = _logits()
    mask = _mask()
    labels = _labels(mask)
    n_kept = int(mask.sum())
    weights = torch.rand(n_kept, generator=torch.Generator().manual_seed(2))  # for "none": a weighted sum

    def ours(x):
        kw = {"beta": 0.3, "temperature": 2.0, "t2_scale": False, "impl": impl}
        if reduction == "batchmean_unlabelled":  # TRL divides the token sum by jsd.size(0), the batch size
            return dk.jsd(x, t, reduction="sum", **kw) / B
        if reduction == "none":
            return (dk.jsd(x, t, mask=mask, reduction="none", **kw)[mask] * weights).sum()
        total = dk.jsd(x, t, mask=mask, reduction="sum", **kw)
        return {"sum": total, "mean": total / (n_kept * V), "num_items_in_batch": total / 13}[reduction]

    def theirs(x):
        kw = {"beta": 0.3, "temperature": 2.0}
        if reduction == "batchmean_unlabelled":
            return gkd_jsd(x, t, reduction="batchmean", **kw)
        if reduction == "none":  # per token and class [n_kept, V]
            return (gkd_jsd(x, t, labels=labels, reduction="none", **kw).sum(-1) * weights).sum()
        if reduction == "num_items_in_batch":
            return gkd_jsd(x, t, labels=labels, num_items_in_batch=13, **kw)
        return gkd_jsd(x, t, labels=labels, reduction=reduction, **kw)

    assert_parity(ours, theirs, s)


@pytest.mark.parametrize("temperature", [2.0, 3.0])
def test_trl_gkd_t2_scale(temperature):
    """distilkit's default ``t2_scale=True`` is T² times TRL's value and gradient."""
    s, t = _logits()
    labels = _labels(_mask())
    assert_parity(
        lambda x: dk.jsd(x, t, beta=0.5, temperature=temperature, mask=labels != -100),
        lambda x: temperature**2 * gkd_jsd(x, t, labels=labels, beta=0.5, temperature=temperature),
        s)


def test_trl_gkd_all_ignored():
    """Every label -100: TRL clamps the count to 1 (0, not 0/0); distilkit's mean is 0 too, with a zero gradient."""
    s, t = _logits()
    labels = torch.full((B, L), -100)
    for fn in (lambda x: dk.jsd(x, t, mask=labels != -100, t2_scale=False), lambda x: gkd_jsd(x, t, labels=labels)):
        value, (grad,) = _value_and_grads(fn, s)
        assert value.item() == 0.0
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("case", ["both", "teacher"])
def test_trl_gkd_neg_inf(case, beta, temperature, impl):
    """-inf logits. TRL 1.16 gives NaN here: ``F.kl_div(..., log_target=True)`` computes ``exp(t) * (t − x)``, which
    is 0 · (−inf) = NaN where the target's log-probability is -inf (every β, both cases). So distilkit is checked
    against the float64 formula, and against TRL on the −1e4 stand-in logits (finite there, same limit)."""
    s, t = _banned(*_logits(), case)
    mask = _mask()
    labels = _labels(mask)
    banned = (BANNED,) if case == "both" else ()

    def ours(x):
        return dk.jsd(x, t, beta=beta, temperature=temperature, mask=mask, t2_scale=False, impl=impl)

    if case == "teacher" and beta == 1.0:  # KL(p_S‖p_T) with student mass where the teacher has none: +inf
        assert _ref_mean("jsd", s, t, mask, beta=beta, temperature=temperature).item() == math.inf
        assert ours(_leaf(s)).item() == math.inf
        return
    assert_parity(ours, lambda x: _ref_mean("jsd", x, t, mask, beta=beta, temperature=temperature, banned=banned), s)
    assert_parity(ours, lambda x: gkd_jsd(_stand_in(x), _stand_in(t), labels=labels, beta=beta,
                                          temperature=temperature), s)


# -------------------------------------------------------------------- TRL: DistillationTrainer's chunked JSD


def _fused_inputs(dtype=torch.float32, seed=3):
    """Student/teacher hidden states [B, L, D], lm_head weights [V, D] and biases [V] (widths differ)."""
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(B, L, D_S, generator=g, dtype=dtype), torch.randn(B, L, D_T, generator=g, dtype=dtype)
    ws, wt = torch.randn(V, D_S, generator=g, dtype=dtype), torch.randn(V, D_T, generator=g, dtype=dtype)
    bs, bt = torch.randn(V, generator=g, dtype=dtype), torch.randn(V, generator=g, dtype=dtype)
    return hs, ws, bs, ht, wt, bt


DK_FUSED = {"default": {}, "chunk_size=3": {"chunk_size": 3}, "recompute": {"chunk_size": 4, "recompute": True}}


@pytest.mark.parametrize("variant", list(DK_FUSED))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_trl_chunked_divergence(beta, temperature, variant):
    """completion_mask → mask; mean over completion tokens; β unchanged; no T²; biases on both heads."""
    hs, ws, bs, ht, wt, bt = _fused_inputs()
    mask = _mask()
    assert_parity(
        lambda h, w, b: dk.fused_linear_kd(h, w, ht, wt, divergence="jsd", beta=beta, temperature=temperature,
                                           mask=mask, t2_scale=False, student_bias=b, teacher_bias=bt,
                                           **DK_FUSED[variant]),
        lambda h, w, b: _chunked_divergence_loss(h, ht, w, wt, mask.long(), beta, student_lm_head_bias=b,
                                                 teacher_lm_head_bias=bt, temperature=temperature)[0],
        hs, ws, bs)


def test_trl_chunked_divergence_num_items():
    """``num_items_in_batch`` → distilkit's sum divided by it."""
    hs, ws, _, ht, wt, _ = _fused_inputs()
    mask = _mask()
    assert_parity(
        lambda h, w: dk.fused_linear_kd(h, w, ht, wt, divergence="jsd", beta=0.5, temperature=2.0, mask=mask,
                                        t2_scale=False, reduction="sum") / 17,
        lambda h, w: _chunked_divergence_loss(h, ht, w, wt, mask.long(), 0.5, num_items_in_batch=17,
                                              temperature=2.0)[0],
        hs, ws)


# ------------------------------------------------------------------------------ Liger: LigerFusedLinearJSDLoss


def _liger(beta, temperature, *, ignore_index=-100, weight_hard_loss=0.0, compiled=False):
    """Liger's loss with the hard loss off (weight 0, soft 1) unless asked; chunk_size=4 → two chunks of 5 rows."""
    return LigerFusedLinearJSDLoss(weight_hard_loss=weight_hard_loss, weight_soft_loss=1.0 - weight_hard_loss,
                                   beta=beta, ignore_index=ignore_index, temperature=temperature, compiled=compiled,
                                   chunk_size=4)


def _flat(x):
    return x.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("variant", list(DK_FUSED))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_liger_fused_jsd(beta, temperature, variant):
    """labels != ignore_index → mask (ignore_index=-1 here); mean over kept tokens; β unchanged; no T²; Liger takes
    [N, D] rows, distilkit the [B, L, D] hidden states."""
    hs, ws, bs, ht, wt, bt = _fused_inputs()
    mask = _mask()
    labels = _labels(mask, ignore_index=-1)
    liger = _liger(beta, temperature, ignore_index=-1)
    assert_parity(
        lambda h, w, b: dk.fused_linear_kd(h, w, ht, wt, divergence="jsd", beta=beta, temperature=temperature,
                                           mask=labels != -1, t2_scale=False, student_bias=b, teacher_bias=bt,
                                           **DK_FUSED[variant]),
        lambda h, w, b: liger(_flat(h), w, _flat(ht), wt, labels.reshape(-1), b, bt),
        hs, ws, bs)


def test_liger_fused_jsd_compiled():
    """Liger's default ``compiled=True`` (torch.compile of its chunk step; one case, it compiles for seconds)."""
    hs, ws, _, ht, wt, _ = _fused_inputs()
    mask = _mask()
    labels = _labels(mask)
    liger = _liger(0.5, 2.0, compiled=True)
    assert_parity(
        lambda h, w: dk.fused_linear_kd(h, w, ht, wt, divergence="jsd", beta=0.5, temperature=2.0, mask=mask,
                                        t2_scale=False),
        lambda h, w: liger(_flat(h), w, _flat(ht), wt, labels.reshape(-1)),
        hs, ws)


@pytest.mark.parametrize("form", ["hard_ce_plus_fused", "fused_labels"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_liger_hard_and_soft(temperature, form):
    """``weight_hard_loss · CE(z_S, labels) + weight_soft_loss · JSD``, both over the tokens whose label is kept: the
    hard loss is taken on the untempered logits ↔ ``dk.hard_ce`` of ``h Wᵀ + b`` added to the fused JSD, or the
    fused loss with ``labels`` and ``ce_weight = weight_hard / weight_soft`` (``dk.fused_linear_kd`` returns its
    ``FusedLoss.loss``), times ``weight_soft``."""
    hs, ws, bs, ht, wt, bt = _fused_inputs()
    mask = _mask()
    labels = _labels(mask)
    liger = _liger(0.5, temperature, weight_hard_loss=0.3)

    def ours(h, w, b):
        kw = {"divergence": "jsd", "beta": 0.5, "temperature": temperature, "t2_scale": False, "student_bias": b,
              "teacher_bias": bt, "chunk_size": 4}
        if form == "fused_labels":
            return 0.7 * dk.fused_linear_kd(h, w, ht, wt, labels=labels, ce_weight=0.3 / 0.7, **kw).loss
        return 0.3 * dk.hard_ce(h @ w.T + b, labels) + 0.7 * dk.fused_linear_kd(h, w, ht, wt, mask=mask, **kw)

    assert_parity(ours, lambda h, w, b: liger(_flat(h), w, _flat(ht), wt, labels.reshape(-1), b, bt), hs, ws, bs)


def test_liger_padded_teacher_vocabulary():
    """A teacher head with more rows than the student's (V_T = V + 2): Liger pads the student's logits with zeros
    up to V_T, distilkit compares the first ``vocab_size`` classes; Liger's convention is distilkit's with the
    student's weight and bias padded with zeros and ``vocab_size=V_T``."""
    hs, ws, bs, ht, _, _ = _fused_inputs()
    g = torch.Generator().manual_seed(4)
    wt, bt = torch.randn(V + 2, D_T, generator=g), torch.randn(V + 2, generator=g)
    mask = _mask()
    labels = _labels(mask)
    liger = _liger(0.3, 2.0)

    def ours(h, w, b):
        w_pad, b_pad = torch.cat([w, w.new_zeros(2, D_S)]), torch.cat([b, b.new_zeros(2)])
        return dk.fused_linear_kd(h, w_pad, ht, wt, divergence="jsd", beta=0.3, temperature=2.0, mask=mask,
                                  t2_scale=False, student_bias=b_pad, teacher_bias=bt, vocab_size=V + 2)

    assert_parity(ours, lambda h, w, b: liger(_flat(h), w, _flat(ht), wt, labels.reshape(-1), b, bt), hs, ws, bs)


# --------------------------------------------------------- both fused peers with a -inf bias (a banned class)


def _trl_fused(h, w, b, ht, wt, bt, mask, beta, temperature):
    return _chunked_divergence_loss(h, ht, w, wt, mask.long(), beta, student_lm_head_bias=b, teacher_lm_head_bias=bt,
                                    temperature=temperature)[0]


def _liger_fused(h, w, b, ht, wt, bt, mask, beta, temperature):
    return _liger(beta, temperature)(_flat(h), w, _flat(ht), wt, _labels(mask).reshape(-1), b, bt)


@pytest.mark.parametrize("peer", [_trl_fused, _liger_fused], ids=["trl", "liger"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("case", ["both", "teacher"])
def test_fused_neg_inf_bias(case, beta, peer):
    """A -inf bias entry bans a class. Both peers give NaN there (TRL 1.16: ``0 · (log p_S − log m)`` with
    ``log p_S = log m = −inf`` in its torch fallback, and ``t − s`` = −inf − (−inf) in its online statistics;
    Liger 0.8.5: ``F.kl_div(..., log_target=True)`` = ``exp(t) · (t − x)`` = 0 · (−inf)). distilkit is checked
    against the float64 formula and against the peer with a −1e4 bias entry instead."""
    hs, ws, bs, ht, wt, bt = _fused_inputs()
    mask = _mask()
    (bs, bt), banned = _banned(bs, bt, case), ((BANNED,) if case == "both" else ())

    def ours(h, w, b):
        return dk.fused_linear_kd(h, w, ht, wt, divergence="jsd", beta=beta, mask=mask, t2_scale=False, student_bias=b,
                                  teacher_bias=bt, chunk_size=4)

    def formula(h, w, b):
        return _ref_mean("jsd", h.double() @ w.double().T + b.double(), ht.double() @ wt.double().T + bt.double(),
                         mask, beta=beta, banned=banned)

    if case == "teacher" and beta == 1.0:  # reverse KL with student mass where the teacher has none: +inf
        assert formula(hs, ws, bs).item() == math.inf
        assert ours(_leaf(hs), _leaf(ws), _leaf(bs)).item() == math.inf
        return
    assert_parity(ours, formula, hs, ws, bs)
    assert_parity(ours, lambda h, w, b: peer(h, w, _stand_in(b), ht, wt, _stand_in(bt), mask, beta, 1.0), hs, ws, bs)


# ------------------------------------------------------------------------------------- torchtune: KD losses


def _chunks(n):
    """torchtune's chunked losses take lists of [B, L/n, V] chunks; L=5 in n=2 chunks of 3 and 2 tokens."""
    return lambda x: list(x.chunk(n, dim=1))


# torchtune's ForwardKLLoss is the soft cross-entropy (↔ dk.kd_ce), its ReverseKLLoss dk.reverse_kl; both
# t2_scale=False with the mask from the labels, plain and with chunked outputs
TORCHTUNE_PAIRS = {"forward_kl_is_kd_ce": (dk.kd_ce, ForwardKLLoss, ForwardKLWithChunkedOutputLoss),
                   "reverse_kl": (dk.reverse_kl, ReverseKLLoss, ReverseKLWithChunkedOutputLoss)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
@pytest.mark.parametrize("pair", TORCHTUNE_PAIRS)
def test_torchtune_kl(pair, chunked, impl):
    ours, plain, chunked_peer = TORCHTUNE_PAIRS[pair]
    s, t = _logits()
    labels = _labels(_mask())
    peer = chunked_peer(num_output_chunks=2) if chunked else plain()
    split = _chunks(2) if chunked else (lambda x: x)
    assert_parity(lambda x: ours(x, t, mask=labels != -100, t2_scale=False, impl=impl),
                  lambda x: peer(split(x), split(t), labels), s)


@pytest.mark.parametrize("impl", IMPLS)
def test_torchtune_forward_kl_vs_kd_kl(impl):
    """torchtune's ForwardKLLoss is also ``dk.kd_kl`` plus the mean teacher entropy (float64 formula), with kd_kl's
    gradient."""
    s, t = _logits()
    mask = _mask()
    labels = _labels(mask)
    lt = F.log_softmax(t.double(), -1)
    entropy = -(lt.exp() * lt).sum(-1)[mask].mean()
    assert_parity(lambda x: dk.kd_kl(x, t, mask=mask, t2_scale=False, impl=impl) + entropy.float(),
                  lambda x: ForwardKLLoss()(x, t, labels), s)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_torchtune_symmetric_kl(ratio, chunked, impl):
    """``SymmetricKLLoss(sym_kd_ratio=r)`` ↔ ``r · dk.kd_ce + (1 − r) · dk.reverse_kl`` (r = 1: the soft CE)."""
    s, t = _logits()
    mask = _mask()
    labels = _labels(mask)
    peer = (SymmetricKLWithChunkedOutputLoss(num_output_chunks=2, sym_kd_ratio=ratio) if chunked
            else SymmetricKLLoss(sym_kd_ratio=ratio))
    split = _chunks(2) if chunked else (lambda x: x)

    def ours(x):
        kw = {"mask": mask, "t2_scale": False, "impl": impl}
        return ratio * dk.kd_ce(x, t, **kw) + (1 - ratio) * dk.reverse_kl(x, t, **kw)

    assert_parity(ours, lambda x: peer(split(x), split(t), labels), s)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("peer", [ForwardKLLoss, ReverseKLLoss])
def test_torchtune_unnormalised_and_ignore_index(peer, impl):
    """``normalize=False`` ↔ ``reduction="sum"``; a custom ``ignore_index`` ↔ the mask of labels != it."""
    s, t = _logits()
    mask = _mask()
    labels = _labels(mask, ignore_index=-1)
    ours = {ForwardKLLoss: dk.kd_ce, ReverseKLLoss: dk.reverse_kl}[peer]
    assert_parity(lambda x: ours(x, t, mask=labels != -1, t2_scale=False, reduction="sum", impl=impl),
                  lambda x: peer(ignore_index=-1)(x, t, labels, normalize=False), s)


@pytest.mark.parametrize("peer", [ForwardKLLoss, ReverseKLLoss])
def test_torchtune_all_ignored(peer):
    """Every label ignored: torchtune returns 0 (a constant); distilkit's mean is 0 with a zero gradient."""
    s, t = _logits()
    labels = torch.full((B, L), -100)
    assert peer()(_leaf(s), t, labels).item() == 0.0
    ours = {ForwardKLLoss: dk.kd_ce, ReverseKLLoss: dk.reverse_kl}[peer]
    value, (grad,) = _value_and_grads(lambda x: ours(x, t, mask=labels != -100, t2_scale=False), s)
    assert value.item() == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["both", "teacher"])
def test_torchtune_forward_kl_neg_inf(case, impl):
    """-inf logits: torchtune's soft CE is finite in both cases (its 0·(−inf) terms are masked) ↔ dk.kd_ce, value
    and gradient, and both equal the float64 formula."""
    s, t = _banned(*_logits(), case)
    mask = _mask()
    labels = _labels(mask)
    banned = (BANNED,) if case == "both" else ()

    def ours(x):
        return dk.kd_ce(x, t, mask=mask, t2_scale=False, impl=impl)

    assert_parity(ours, lambda x: ForwardKLLoss()(x, t, labels), s)
    assert_parity(ours, lambda x: _ref_mean("kd_ce", x, t, mask, banned=banned), s)


@pytest.mark.parametrize("impl", IMPLS)
def test_torchtune_reverse_kl_neg_inf_both(impl):
    """A class -inf in both models: torchtune's value is finite and equals distilkit's, but its gradient is NaN
    (``masked_fill`` zeroes the 0·(−inf) product, and the product's backward multiplies that 0 by −inf), so the
    gradient is checked against the float64 formula."""
    s, t = _banned(*_logits(), "both")
    mask = _mask()
    labels = _labels(mask)
    value = dk.reverse_kl(_leaf(s), t, mask=mask, t2_scale=False, impl=impl)
    assert_close(value.detach(), ReverseKLLoss()(_leaf(s), t, labels).detach(), **TOL[torch.float32])
    assert_parity(lambda x: dk.reverse_kl(x, t, mask=mask, t2_scale=False, impl=impl),
                  lambda x: _ref_mean("reverse_kl", x, t, mask, banned=(BANNED,)), s)


@pytest.mark.parametrize("impl", IMPLS)
def test_torchtune_reverse_kl_neg_inf_teacher(impl):
    """A class -inf in the teacher only: KL(p_S‖p_T) is +inf (the student has mass there), as distilkit returns.
    torchtune gives a finite value instead (it drops every class where either logit is ±inf — a convention, not
    the divergence) and a NaN gradient; so only distilkit and the float64 formula are compared."""
    s, t = _banned(*_logits(), "teacher")
    mask = _mask()
    assert _ref_mean("reverse_kl", s, t, mask).item() == math.inf
    assert dk.reverse_kl(_leaf(s), t, mask=mask, t2_scale=False, impl=impl).item() == math.inf
