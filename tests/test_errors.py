"""Bad input to a loss gives a TypeError/ValueError that names the function and what was expected."""

from __future__ import annotations

import pytest
import torch

import distilkit as dk

B, L, V, D, H = 2, 3, 5, 4, 2
z = torch.randn(B, L, V)
h = torch.randn(B, L, D)
a = torch.randn(B, H, L, L)
m = torch.ones(B, L, dtype=torch.bool)

CASES = [
    # (id, call, exception, message pattern)
    (
        "not-a-tensor",
        lambda: dk.kd_ce([1.0, 2.0], z),
        TypeError,
        r"kd_ce: expected student logits to be a torch\.Tensor",
    ),
    ("int-logits", lambda: dk.kd_kl(z.long(), z), TypeError, r"kd_kl: expected student logits .* floating-point"),
    ("complex-logits", lambda: dk.tvd(z, z.to(torch.complex64)), TypeError, r"tvd: expected teacher logits"),
    (
        "shape-mismatch",
        lambda: dk.kd_ce(z, z[..., :4]),
        ValueError,
        r"kd_ce: .*same shape, got \(2, 3, 5\) and \(2, 3, 4\)",
    ),
    ("no-classes", lambda: dk.kd_ce(z[..., :0], z[..., :0]), ValueError, r"kd_ce: expected at least one class"),
    ("mask-broadcast", lambda: dk.kd_ce(z, z, mask=m[:, :1]), ValueError, r"kd_ce: expected mask of shape \(2, 3\)"),
    (
        "mask-type",
        lambda: dk.hidden_mse(h, h, mask=[1, 0]),
        TypeError,
        r"hidden_mse: expected mask to be a torch\.Tensor",
    ),
    (
        "mask-complex",
        lambda: dk.cosine(h, h, mask=m.to(torch.complex64)),
        TypeError,
        r"cosine: expected a boolean-like",
    ),
    ("temperature-zero", lambda: dk.kd_ce(z, z, temperature=0.0), ValueError, r"kd_ce: expected temperature > 0"),
    (
        "temperature-nan",
        lambda: dk.kd_kl(z, z, temperature=float("nan")),
        ValueError,
        r"kd_kl: expected temperature > 0",
    ),
    (
        "temperature-negative-tensor",
        lambda: dk.jsd(z, z, temperature=torch.tensor(-1.0)),
        ValueError,
        r"jsd: expected temperature > 0",
    ),
    (
        "temperature-row-shape",
        lambda: dk.kd_ce(z, z, temperature=torch.ones(B)),
        ValueError,
        r"kd_ce: expected temperature to be 0-d or of shape \(2, 3\)",
    ),
    ("temperature-type", lambda: dk.kd_ce(z, z, temperature="hot"), TypeError, r"kd_ce: expected temperature"),
    ("temperature-bool", lambda: dk.kd_ce(z, z, temperature=True), TypeError, r"kd_ce: expected temperature"),
    ("beta-range", lambda: dk.jsd(z, z, beta=1.5), ValueError, r"jsd: expected 0 <= beta <= 1, got 1\.5"),
    ("beta-tensor-range", lambda: dk.jsd(z, z, beta=torch.tensor(-0.1)), ValueError, r"jsd: expected 0 <= beta <= 1"),
    ("alpha-range", lambda: dk.skew_kl(z, z, alpha=-0.1), ValueError, r"skew_kl: expected 0 <= alpha <= 1"),
    ("reduction", lambda: dk.tvd(z, z, reduction="avg"), ValueError, r"tvd: expected reduction to be one of"),
    ("labels-float", lambda: dk.hard_ce(z, torch.zeros(B, L)), TypeError, r"hard_ce: expected integer class labels"),
    (
        "labels-shape",
        lambda: dk.hard_ce(z, torch.zeros(B, dtype=torch.long)),
        ValueError,
        r"hard_ce: expected labels of shape \(2, 3\)",
    ),
    ("labels-range", lambda: dk.hard_ce(z, torch.full((B, L), V)), ValueError, r"hard_ce: expected labels in \[0, 5\)"),
    ("hidden-width", lambda: dk.hidden_mse(h, torch.randn(B, L, 8)), ValueError, r"hidden_mse: .*same shape.*project"),
    (
        "pkd-rank",
        lambda: dk.pkd(torch.randn(D), torch.randn(D)),
        ValueError,
        r"pkd: expected student features of shape",
    ),
    ("attention-rank", lambda: dk.attention_kl(h, h), ValueError, r"attention_kl: expected square attention maps"),
    (
        "attention-5d",
        lambda: dk.attention_mse(a[None], a[None]),
        ValueError,
        r"attention_mse: expected student attention of shape \[B, H, L, L\]",
    ),
    (
        "attention-inputs",
        lambda: dk.attention_kl(a, a, inputs="scores"),
        ValueError,
        r"attention_kl: expected inputs to be one of \('probs', 'logits'\)",
    ),
    ("attention-eps", lambda: dk.attention_kl(a, a, eps=0.0), ValueError, r"attention_kl: expected eps"),
    (
        "head-reduce",
        lambda: dk.attention_mse(a, a, head_reduce="mean"),
        ValueError,
        r"attention_mse: expected head_reduce to be one of \(None, 'sum'\)",
    ),
    (
        "attention-mask-shape",
        lambda: dk.attention_ce(a, a, mask=torch.ones(B, L + 1)),
        ValueError,
        r"attention_ce: expected mask of shape \(2, 3\)",
    ),
    (
        "relation-heads",
        lambda: dk.relation_kl(h, torch.randn(B, L, 6), num_heads=4),
        ValueError,
        r"relation_kl: expected num_heads=4 to divide the teacher width, got width 6",
    ),
    (
        "relation-heads-type",
        lambda: dk.relation_kl(h, h, num_heads=2.0),
        ValueError,
        r"relation_kl: expected num_heads",
    ),
    (
        "relation-length",
        lambda: dk.relation_kl(h, h[:, :2], num_heads=2),
        ValueError,
        r"relation_kl: .*same leading shape",
    ),
    (
        "fsp-pair-type",
        lambda: dk.fsp((h, h, h), (h, h)),
        TypeError,
        r"fsp: expected student to be a tensor .* length 3",
    ),
    (
        "fsp-width",
        lambda: dk.fsp((h, h), (torch.randn(B, L, 6), h)),
        ValueError,
        r"fsp: expected student\[0\] and teacher\[0\] of the same width, got 4 and 6.*projection",
    ),
    (
        "mmd-pair-width",
        lambda: dk.mmd((h, torch.randn(B, L, 6)), h),
        ValueError,
        r"mmd: expected student\[0\] and student\[1\] of the same width",
    ),
    ("nst-batch", lambda: dk.nst(h, torch.randn(B + 1, L, D)), ValueError, r"nst: .*same leading shape"),
]


@pytest.mark.parametrize(("call", "exception", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(call, exception, pattern):
    with pytest.raises(exception, match=pattern):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.gpu
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match=r"kd_ce: expected all tensors on one device"):
        dk.kd_ce(z, z.cuda())


def test_devices_are_compared_before_any_computation():
    meta = torch.empty(B, L, V, device="meta")
    with pytest.raises(ValueError, match=r"kd_ce: expected all tensors on one device, got student on cpu"):
        dk.kd_ce(z, meta)
    with pytest.raises(ValueError, match=r"hidden_mse: expected all tensors on one device"):
        dk.hidden_mse(h, h, mask=torch.ones(B, L, device="meta"))
