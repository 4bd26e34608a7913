"""Sparse (top-k) teacher losses: k = V equals the dense losses, float64 references for k < V, masks, compile.

The references below are written from the definitions (module docstring of ``distilkit/losses/_sparse.py``) with
Python floats and ``math``, row by row: the renormalised teacher is built over the whole vocabulary from the dense
teacher logits (zero outside K) and compared with the full student distribution; the tail policy sums the dense
distributions into k + 1 buckets first. Neither touches distilkit.
"""

from __future__ import annotations

import math

import pytest
import torch

import distilkit as dk
from distilkit.losses._sparse import (
    sparse_jsd,
    sparse_kd_ce,
    sparse_kd_kl,
    sparse_reverse_kl,
    sparse_skew_kl,
    sparse_tvd,
)

B, L, V, K = 2, 3, 7, 3
F64 = torch.float64
INF = math.inf


def topk_teacher(zt: torch.Tensor, indices: torch.Tensor, stored: float = 1.0, dtype=None) -> dict:
    """The top-k mapping of teacher logits ``zt`` at ``indices``, written row by row with ``math``."""
    logprobs = torch.empty(indices.shape, dtype=F64)
    tail = torch.empty(indices.shape[:-1], dtype=F64)
    for r in range(zt.shape[:-1].numel()):
        z = [float(v) / stored for v in zt.reshape(-1, zt.shape[-1])[r]]
        log_z = math.log(sum(math.exp(v) for v in z))
        kept = [int(i) for i in indices.reshape(-1, indices.shape[-1])[r]]
        logprobs.view(-1, len(kept))[r] = torch.tensor([z[i] - log_z for i in kept], dtype=F64)
        rest = [math.exp(z[v] - log_z) for v in range(len(z)) if v not in kept]
        tail.view(-1)[r] = math.log(sum(rest)) if rest else -INF
    dtype = dtype or zt.dtype
    return {"indices": indices.int(), "logprobs": logprobs.to(dtype), "tail": tail.to(dtype), "temperature": stored}


def random_indices(gen: torch.Generator, k: int, lead=(B, L), v: int = V) -> torch.Tensor:
    rows = [torch.randperm(v, generator=gen)[:k] for _ in range(math.prod(lead))]
    return torch.stack(rows).reshape(*lead, k)


def softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    total = 0.0
    for pi, qi in zip(p, q, strict=True):
        if pi > 0:
            total += INF if qi == 0 else pi * math.log(pi / qi)
    return total


def divergence(name: str, p: list[float], q: list[float], beta=0.5, alpha=0.1) -> float:
    if name == "sparse_kd_ce":
        return -sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True) if pi > 0)
    if name == "sparse_kd_kl":
        return kl(p, q)
    if name == "sparse_reverse_kl":
        return kl(q, p)
    if name == "sparse_jsd":
        if beta in (0.0, 1.0):
            return kl(p, q) if beta == 0.0 else kl(q, p)
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "sparse_skew_kl":
        return kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q, strict=True)])
    if name == "sparse_tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))
    raise AssertionError(name)


def reference(name, zs, zt, indices, *, temperature, policy, stored=1.0, mask=None, t2_scale=True, **options):
    """``(per-row values with 0 at masked rows, sum, count)`` in float64, from the definitions."""
    rows, k = zs.shape[:-1].numel(), indices.shape[-1]
    temps = (temperature.reshape(-1).tolist() if isinstance(temperature, torch.Tensor) and temperature.ndim
             else [float(temperature)] * rows)
    keep = [True] * rows if mask is None else [bool(m) for m in mask.reshape(-1)]
    values = []
    for r in range(rows):
        t = temps[r]
        kept = [int(i) for i in indices.reshape(-1, k)[r]]
        q = softmax([float(v) / t for v in zs.reshape(-1, zs.shape[-1])[r]])
        if policy == "renormalize":
            full = softmax([float(v) / t for v in zt.reshape(-1, zt.shape[-1])[r]])
            mass = sum(full[i] for i in kept)
            p = [full[v] / mass if v in kept else 0.0 for v in range(len(full))]
            value = divergence(name, p, q, **options)
        else:
            full = softmax([float(v) / stored for v in zt.reshape(-1, zt.shape[-1])[r]])
            rest = [v for v in range(len(full)) if v not in kept]
            p = [full[i] for i in kept] + ([sum(full[v] for v in rest)] if rest else [])
            qb = [q[i] for i in kept] + ([sum(q[v] for v in rest)] if rest else [])
            value = divergence(name, p, qb, **options)
        values.append(value * (t * t if t2_scale else 1.0) if keep[r] else 0.0)
    total = sum(values)
    return torch.tensor(values, dtype=F64).reshape(zs.shape[:-1]), total, float(sum(keep))


SPARSE = {f.__name__: f for f in (sparse_kd_ce, sparse_kd_kl, sparse_reverse_kl, sparse_jsd, sparse_skew_kl,
                                  sparse_tvd)}
DENSE = {"sparse_kd_ce": dk.losses.kd_ce, "sparse_kd_kl": dk.losses.kd_kl, "sparse_reverse_kl": dk.losses.reverse_kl,
         "sparse_jsd": dk.losses.jsd, "sparse_skew_kl": dk.losses.skew_kl, "sparse_tvd": dk.losses.tvd}
# (name, options, policies that are defined for it)
CASES = [
    ("sparse_kd_ce", {}, ("renormalize", "tail")),
    ("sparse_kd_kl", {}, ("renormalize", "tail")),
    ("sparse_reverse_kl", {}, ("tail",)),
    ("sparse_jsd", {"beta": 0.3}, ("renormalize", "tail")),
    ("sparse_jsd", {"beta": 0.0}, ("renormalize", "tail")),
    ("sparse_jsd", {"beta": 1.0}, ("tail",)),
    ("sparse_skew_kl", {"alpha": 0.2}, ("renormalize", "tail")),
    ("sparse_tvd", {}, ("renormalize", "tail")),
]
PARAMS = [pytest.param(n, o, p, id=f"{n}-{p}" + "".join(f"-{k}{v}" for k, v in o.items()))
          for n, o, ps in CASES for p in ps]


def make(seed: int, dtype=F64, shape=(B, L, V)):
    gen = torch.Generator().manual_seed(seed)
    zs = torch.randn(*shape, generator=gen, dtype=F64) * 2
    zt = torch.randn(*shape, generator=gen, dtype=F64) * 2
    return zs.to(dtype), zt.to(dtype), gen


# ----------------------------------------------------------------------------------------------- k = V
@pytest.mark.parametrize(("name", "options", "policy"), PARAMS)
@pytest.mark.parametrize("temperature", [2.0, "per-row"])
def test_k_equals_v_is_the_dense_loss(name, options, policy, temperature):
    zs, zt, gen = make(0, torch.float32)
    if temperature == "per-row":
        temperature = torch.rand(B, L, generator=gen) * 2 + 0.5
    # renormalize re-tempers the stored log-probs from T_c = 3 to T; tail must be used at T = T_c.
    stored = 3.0 if policy == "renormalize" else temperature
    if isinstance(stored, torch.Tensor):
        scaled = zt / stored.unsqueeze(-1)
        teacher = {"indices": torch.arange(V).expand(B, L, V), "logprobs": scaled.log_softmax(-1),
                   "tail": torch.full((B, L), -INF), "temperature": stored}
    else:
        teacher = topk_teacher(zt, torch.arange(V).flip(0).expand(B, L, V), stored)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    s1, s2 = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    got = SPARSE[name](s1, teacher, temperature=temperature, mask=mask, policy=policy, **options)
    want = DENSE[name](s2, zt, temperature=temperature, mask=mask, **options)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------- k < V, float64
@pytest.mark.parametrize(("name", "options", "policy"), PARAMS)
def test_k_less_than_v_matches_the_float64_reference(name, options, policy):
    zs, zt, gen = make(1)
    indices = random_indices(gen, K)  # any distinct classes, not only the top ones
    stored = 1.5
    temperature = stored if policy == "tail" else 2.5
    teacher = topk_teacher(zt, indices, stored)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    fn = SPARSE[name]
    values, total, count = reference(name, zs, zt, indices, temperature=temperature, policy=policy, stored=stored,
                                     mask=mask, **options)
    kwargs = dict(temperature=temperature, mask=mask, policy=policy, **options)
    torch.testing.assert_close(fn(zs, teacher, reduction="none", **kwargs), values, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fn(zs, teacher, reduction="sum", **kwargs).item(), total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fn(zs, teacher, **kwargs).item(), total / count, rtol=1e-10, atol=1e-12)
    total_t, count_t = fn.sum_count(zs, teacher, **kwargs)
    assert count_t.item() == count and math.isclose(total_t.item(), total, rel_tol=1e-10, abs_tol=1e-12)


@pytest.mark.parametrize("name", ["sparse_kd_kl", "sparse_jsd", "sparse_tvd"])
def test_per_row_temperature_without_t2_scale_matches_the_reference(name):
    zs, zt, gen = make(2)
    indices = random_indices(gen, K)
    temperature = torch.rand(B, L, generator=gen, dtype=F64) + 0.5
    teacher = topk_teacher(zt, indices)
    got = SPARSE[name](zs, teacher, temperature=temperature, t2_scale=False, reduction="none")
    want, _, _ = reference(name, zs, zt, indices, temperature=temperature, policy="renormalize", t2_scale=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_tail_policy_is_a_lower_bound_and_renormalize_is_not_the_tail():
    zs, zt, _ = make(3)
    teacher = topk_teacher(zt, zt.topk(K, -1).indices)
    dense = dk.losses.kd_kl(zs, zt, reduction="none")
    tail = sparse_kd_kl(zs, teacher, policy="tail", reduction="none")
    assert (tail <= dense + 1e-12).all()  # data-processing inequality
    assert not torch.allclose(tail, sparse_kd_kl(zs, teacher, reduction="none"))


def test_tail_policy_normalises_the_k_plus_1_teacher_weights():
    """softmax(cat(logprobs, tail)): a common shift (storage rounding of the total) changes nothing."""
    zs, zt, gen = make(11)
    teacher = topk_teacher(zt, random_indices(gen, K))
    shifted = {**teacher, "logprobs": teacher["logprobs"] + 0.3, "tail": teacher["tail"] + 0.3}
    for fn in SPARSE.values():
        torch.testing.assert_close(fn(zs, shifted, policy="tail"), fn(zs, teacher, policy="tail"))


def test_tensor_beta_and_alpha_end_points():
    zs, zt, gen = make(4)
    teacher = topk_teacher(zt, random_indices(gen, K))
    for beta in (0.0, 0.4, 1.0):
        for policy in ("renormalize", "tail"):
            s = zs.clone().requires_grad_()
            got = sparse_jsd(s, teacher, beta=torch.tensor(beta, dtype=F64), policy=policy)
            if beta == 1.0 and policy == "renormalize":
                assert got.item() == INF  # the reverse KL of a truncated teacher
            else:
                torch.testing.assert_close(got, sparse_jsd(zs, teacher, beta=beta, policy=policy))
            got.backward()
            assert s.grad.isfinite().all()
    for alpha in (0.0, 1.0):
        s = zs.clone().requires_grad_()
        got = sparse_skew_kl(s, teacher, alpha=torch.tensor(alpha, dtype=F64))
        torch.testing.assert_close(got, sparse_skew_kl(zs, teacher, alpha=alpha))
        got.backward()
        assert s.grad.isfinite().all()
    assert sparse_skew_kl(zs, teacher, alpha=1.0).item() == 0.0
    torch.testing.assert_close(sparse_skew_kl(zs, teacher, alpha=0.0), sparse_kd_kl(zs, teacher))


def test_gradcheck():
    zs, zt, gen = make(5, shape=(2, 5))
    teacher = topk_teacher(zt, random_indices(gen, 2, lead=(2,), v=5))
    mask = torch.tensor([True, False])
    for name, options, policy in [(n, o, p) for n, o, ps in CASES for p in ps]:
        fn = SPARSE[name]
        s = zs.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, fn=fn, o=options, p=policy: fn(x, teacher, mask=mask, policy=p,
                                                                                 **o), (s,))


# ------------------------------------------------------------------------------------ masks, dtypes, teacher
def test_masked_rows_do_not_matter_and_fully_masked_gives_zero():
    zs, zt, gen = make(6)
    teacher = topk_teacher(zt, random_indices(gen, K))
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    other_s = torch.where(mask.unsqueeze(-1), zs, 1e4)
    other_t = {**teacher, "logprobs": torch.where(mask.unsqueeze(-1), teacher["logprobs"], -50.0),
               "tail": torch.where(mask, teacher["tail"], -1e3)}
    for fn in SPARSE.values():
        policy = "tail" if fn is sparse_reverse_kl else "renormalize"
        torch.testing.assert_close(fn(zs, teacher, mask=mask, policy=policy),
                                   fn(other_s, other_t, mask=mask, policy=policy))
        s = zs.clone().requires_grad_()
        none = torch.zeros(B, L, dtype=torch.bool)
        value = fn(s, teacher, mask=none, policy="tail")
        assert value.item() == 0.0
        value.backward()
        assert s.grad.isfinite().all() and (s.grad == 0).all()


def test_half_inputs_are_upcast():
    zs, zt, gen = make(7, torch.float32)
    teacher = topk_teacher(zt.double(), random_indices(gen, K), dtype=torch.float16)
    half = sparse_kd_kl(zs.half(), teacher, policy="tail")
    assert half.dtype == torch.float32
    full = sparse_kd_kl(zs.half().float(), {**teacher, "logprobs": teacher["logprobs"].float(),
                                            "tail": teacher["tail"].float()}, policy="tail")
    torch.testing.assert_close(half, full)


def test_teacher_gets_no_grad():
    zs, zt, gen = make(8)
    teacher = topk_teacher(zt, random_indices(gen, K))
    logprobs = teacher["logprobs"].clone().requires_grad_()
    tail = teacher["tail"].clone().requires_grad_()
    s = zs.clone().requires_grad_()
    value = sparse_jsd(s, {**teacher, "logprobs": logprobs, "tail": tail}, policy="tail")
    value.backward()
    assert logprobs.grad is None and tail.grad is None and s.grad is not None


def test_compiled_fullgraph_equals_eager():
    zs, zt, gen = make(9, torch.float32)
    teacher = topk_teacher(zt.double(), random_indices(gen, K), dtype=torch.float32)
    teacher["temperature"] = torch.tensor(2.0)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)

    def both(s, t, m, temperature, beta):
        return (sparse_kd_kl(s, t, mask=m, temperature=temperature, policy="tail")
                + sparse_jsd(s, t, mask=m, beta=beta, temperature=temperature * 1.5))

    args = (teacher, mask, torch.tensor(2.0), torch.tensor(0.3))
    s1, s2 = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    eager = both(s1, *args)
    compiled = torch.compile(both, fullgraph=True, backend="inductor")(s2, *args)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ errors
def test_errors():
    zs, zt, gen = make(10)
    teacher = topk_teacher(zt, random_indices(gen, K))
    with pytest.raises(TypeError, match=r"^sparse_kd_kl: expected the teacher to be a top-k mapping"):
        sparse_kd_kl(zs, zt)
    with pytest.raises(ValueError, match=r"^sparse_kd_kl: expected teacher keys among .* unknown keys \['values'\]"):
        sparse_kd_kl(zs, {**teacher, "values": teacher["logprobs"]})
    with pytest.raises(ValueError, match="expected the top-k teacher to have key 'logprobs'"):
        sparse_kd_kl(zs, {"indices": teacher["indices"]})
    with pytest.raises(ValueError, match="policy='tail' needs the teacher's leftover mass"):
        sparse_kd_kl(zs, {k: v for k, v in teacher.items() if k != "tail"}, policy="tail")
    with pytest.raises(ValueError, match=r"^sparse_reverse_kl: expected policy='tail'"):
        sparse_reverse_kl(zs, teacher, policy="renormalize")
    with pytest.raises(ValueError, match=r"^sparse_jsd: expected policy='tail' for beta=1"):
        sparse_jsd(zs, teacher, beta=1.0)
    with pytest.raises(ValueError, match=r"^sparse_kd_ce: expected policy to be one of"):
        sparse_kd_ce(zs, teacher, policy="drop")
    with pytest.raises(ValueError, match=r"stored temperature 1\.0 under policy='tail'"):
        sparse_kd_kl(zs, teacher, temperature=2.0, policy="tail")
    with pytest.raises(ValueError, match="stored temperature"):  # eager check of a CPU tensor
        sparse_kd_kl(zs, teacher, temperature=torch.tensor(2.0, dtype=F64), policy="tail")
    with pytest.raises(ValueError, match=r"expected teacher indices of shape \(2, 3, 'k'\)"):
        sparse_kd_kl(zs, {**teacher, "indices": teacher["indices"][0]})
    with pytest.raises(TypeError, match="expected integer teacher indices"):
        sparse_kd_kl(zs, {**teacher, "indices": teacher["indices"].double()})
    with pytest.raises(ValueError, match=r"expected teacher indices in \[0, 7\)"):
        sparse_kd_kl(zs, {**teacher, "indices": teacher["indices"] + 7})
    with pytest.raises(ValueError, match="expected teacher logprobs of the indices' shape"):
        sparse_kd_kl(zs, {**teacher, "logprobs": teacher["logprobs"][..., :1]})
    with pytest.raises(ValueError, match=r"expected 1 <= k <= V = 2"):
        sparse_kd_kl(zs[..., :2], teacher)
    with pytest.raises(ValueError, match=r"expected teacher tail of shape \(2, 3\)"):
        sparse_kd_kl(zs, {**teacher, "tail": teacher["tail"][0]}, policy="tail")
    with pytest.raises(ValueError, match=r"expected teacher temperature > 0"):
        sparse_kd_kl(zs, {**teacher, "temperature": -1.0})
    with pytest.raises(ValueError, match=r"expected mask of shape \(2, 3\)"):
        sparse_kd_kl(zs, teacher, mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected reduction"):
        sparse_kd_kl(zs, teacher, reduction="avg")
