"""Independent float64 reference implementations (test oracles) of every distilkit loss.

These functions are written straight from the (sum, count) formulas of the loss contract
(DESIGN.md and the loss-layer contract), **not** from distilkit's implementation, and they
import nothing from ``distilkit``. They are deliberately slow and literal:

* every input is converted to float64 (teacher tensors are also detached);
* they loop in Python over samples / rows and use the kept positions of each sample
  explicitly (``mask[b].nonzero()`` and indexing), so masking is done by *selection*, never by
  multiplying with the mask - a genuinely different computation from a vectorised masked one;
* within one sample they use plain torch ops (softmax, log_softmax, matmul).

Each function has the positional arguments and keyword options of the public loss of the same
name (minus ``reduction``) and returns ``(sum, count)``: ``sum`` a 0-d float64 tensor that is
differentiable w.r.t. the student input, ``count`` a Python float. The public "mean" is
``sum / max(count, 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "REFERENCES",
    "attention_ce",
    "attention_kl",
    "attention_mse",
    "cosine",
    "fsp",
    "hard_ce",
    "hidden_mse",
    "jsd",
    "kd_ce",
    "kd_kl",
    "kd_mse",
    "mmd",
    "nst",
    "pkd",
    "prob_mse",
    "pseudo_label_ce",
    "relation_kl",
    "reverse_kl",
    "sampled_kl",
    "skew_kl",
    "tvd",
    "uld",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _student(x: torch.Tensor) -> torch.Tensor:
    return x.double()


def _teacher(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double()


def _zero(x: torch.Tensor) -> torch.Tensor:
    """An exact 0.0 (float64) that is connected to ``x``'s graph (empty-slice sum, never NaN).

    Used as the start of every accumulation so that ``sum`` stays differentiable (gradient 0)
    even when every position is masked out.
    """
    return x.reshape(-1)[:0].sum()


def _keep(mask, lead_shape) -> torch.Tensor:
    """Boolean keep-tensor of exactly ``lead_shape`` (mask None = everything kept)."""
    lead_shape = tuple(lead_shape)
    if mask is None:
        return torch.ones(lead_shape, dtype=torch.bool)
    m = torch.as_tensor(mask).detach().cpu()
    if tuple(m.shape) != lead_shape:
        raise ValueError(f"reference: mask shape {tuple(m.shape)} != leading shape {lead_shape}")
    return m != 0


def _kept(keep_1d: torch.Tensor) -> list[int]:
    """The kept indices of a 1-D keep tensor, as a Python list."""
    return [int(i) for i in keep_1d.reshape(-1).nonzero().flatten().tolist()]


def _temperatures(temperature, lead_shape, device) -> torch.Tensor:
    """Flat float64 tensor of one temperature per row (float, 0-d tensor or per-row tensor)."""
    lead_shape = tuple(lead_shape)
    if isinstance(temperature, torch.Tensor):
        T = temperature.double().to(device)
    else:
        T = torch.tensor(float(temperature), dtype=torch.float64, device=device)
    if T.dim() == 0:
        T = T.expand(lead_shape)
    elif tuple(T.shape) != lead_shape:
        raise ValueError(f"reference: temperature shape {tuple(T.shape)} != leading shape {lead_shape}")
    return T.reshape(-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = Σ p (log p − log q) for one row given log-probabilities (p > 0 everywhere)."""
    return (log_p.exp() * (log_p - log_q)).sum()


def _row_divergence(s, t, temperature, mask, t2_scale, row_fn) -> tuple[torch.Tensor, float]:
    """Σ over kept rows of c_r · row_fn(log p_S, log p_T), count = #kept rows."""
    s = _student(s)
    t = _teacher(t)
    lead = s.shape[:-1]
    V = s.shape[-1]
    s_rows = s.reshape(-1, V)
    t_rows = t.reshape(-1, V)
    T = _temperatures(temperature, lead, s.device)
    keep = _keep(mask, lead).reshape(-1)
    total = _zero(s)
    count = 0
    for r in _kept(keep):
        T_r = T[r]
        log_ps = torch.log_softmax(s_rows[r] / T_r, dim=-1)
        log_pt = torch.log_softmax(t_rows[r] / T_r, dim=-1)
        c_r = T_r**2 if t2_scale else 1.0
        total = total + c_r * row_fn(log_ps, log_pt)
        count += 1
    return total, float(count)


def _attention_4d(x: torch.Tensor) -> torch.Tensor:
    """[B, L, L] attention is one head: view it as [B, 1, L, L]."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"reference: attention must be 3-D or 4-D, got {tuple(x.shape)}")
    return x


def _pair(x) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair (tuple / list of two tensors) or a single tensor used as both members."""
    if isinstance(x, torch.Tensor):
        return x, x
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return x[0], x[1]
    raise TypeError(f"reference: expected a tensor or a pair of tensors, got {type(x).__name__}")


# --------------------------------------------------------------------------------------------
# logit losses
# --------------------------------------------------------------------------------------------


def kd_ce(s, t, *, temperature=1.0, mask=None, t2_scale=True):
    """Σ_kept rows c_r · (−Σ_v p_T log p_S); count = #kept rows."""

    def row(log_ps, log_pt):
        return -(log_pt.exp() * log_ps).sum()

    return _row_divergence(s, t, temperature, mask, t2_scale, row)


def kd_kl(s, t, *, temperature=1.0, mask=None, t2_scale=True):
    """Σ_kept c_r · Σ_v p_T (log p_T − log p_S); count = #kept rows."""

    def row(log_ps, log_pt):
        return _kl(log_pt, log_ps)

    return _row_divergence(s, t, temperature, mask, t2_scale, row)


def reverse_kl(s, t, *, temperature=1.0, mask=None, t2_scale=True):
    """Σ_kept c_r · Σ_v p_S (log p_S − log p_T); count = #kept rows."""

    def row(log_ps, log_pt):
        return _kl(log_ps, log_pt)

    return _row_divergence(s, t, temperature, mask, t2_scale, row)


def jsd(s, t, *, temperature=1.0, mask=None, t2_scale=True, beta=0.5):
    """Σ_kept c_r · [β KL(p_T‖m) + (1−β) KL(p_S‖m)], m = β p_T + (1−β) p_S.

    β = 0 is defined as forward KL(p_T‖p_S) and β = 1 as reverse KL(p_S‖p_T) (special cases).
    """
    b = float(beta)

    def row(log_ps, log_pt):
        if b == 0.0:
            return _kl(log_pt, log_ps)
        if b == 1.0:
            return _kl(log_ps, log_pt)
        p_s = log_ps.exp()
        p_t = log_pt.exp()
        m = b * p_t + (1.0 - b) * p_s
        log_m = torch.log(m)
        kl_t_m = (p_t * (log_pt - log_m)).sum()
        kl_s_m = (p_s * (log_ps - log_m)).sum()
        return b * kl_t_m + (1.0 - b) * kl_s_m

    return _row_divergence(s, t, temperature, mask, t2_scale, row)


def skew_kl(s, t, *, temperature=1.0, mask=None, t2_scale=True, alpha=0.1):
    """Σ_kept c_r · KL(p_T ‖ α p_T + (1−α) p_S)."""
    a = float(alpha)

    def row(log_ps, log_pt):
        p_t = log_pt.exp()
        mix = a * p_t + (1.0 - a) * log_ps.exp()
        return (p_t * (log_pt - torch.log(mix))).sum()

    return _row_divergence(s, t, temperature, mask, t2_scale, row)


def tvd(s, t, *, temperature=1.0, mask=None, t2_scale=True):
    """Σ_kept c_r · ½ Σ_v |p_T − p_S|."""

    def row(log_ps, log_pt):
        return 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum()

    return _row_divergence(s, t, temperature, mask, t2_scale, row)


def kd_mse(s, t, *, temperature=1.0, mask=None):
    """Σ_kept rows Σ_v (z_S/T_r − z_T/T_r)² (no T² factor); count = #kept rows × V."""
    s = _student(s)
    t = _teacher(t)
    lead = s.shape[:-1]
    V = s.shape[-1]
    s_rows = s.reshape(-1, V)
    t_rows = t.reshape(-1, V)
    T = _temperatures(temperature, lead, s.device)
    keep = _keep(mask, lead).reshape(-1)
    total = _zero(s)
    n = 0
    for r in _kept(keep):
        total = total + ((s_rows[r] / T[r] - t_rows[r] / T[r]) ** 2).sum()
        n += 1
    return total, float(n * V)


def prob_mse(s, t, *, temperature=1.0, mask=None):
    """Σ_kept rows Σ_v (softmax(z_S/T_r)_v − softmax(z_T/T_r)_v)²; count = #kept rows × V."""
    s = _student(s)
    t = _teacher(t)
    lead = s.shape[:-1]
    V = s.shape[-1]
    s_rows, t_rows = s.reshape(-1, V), t.reshape(-1, V)
    T = _temperatures(temperature, lead, s.device)
    keep = _keep(mask, lead).reshape(-1)
    total = _zero(s)
    n = 0
    for r in _kept(keep):
        ps = torch.exp(s_rows[r] / T[r]) / torch.exp(s_rows[r] / T[r]).sum()
        pt = torch.exp(t_rows[r] / T[r]) / torch.exp(t_rows[r] / T[r]).sum()
        total = total + ((ps - pt) ** 2).sum()
        n += 1
    return total, float(n * V)


def pseudo_label_ce(s, t, *, mask=None):
    """Σ_kept rows −log softmax(z_S)[first index of max z_T]; count = #kept rows."""
    s = _student(s)
    t = _teacher(t)
    lead = s.shape[:-1]
    V = s.shape[-1]
    s_rows, t_rows = s.reshape(-1, V), t.reshape(-1, V)
    keep = _keep(mask, lead).reshape(-1)
    total = _zero(s)
    n = 0
    for r in _kept(keep):
        values = t_rows[r].tolist()
        label = values.index(max(values))
        total = total - (s_rows[r][label] - torch.logsumexp(s_rows[r], 0))
        n += 1
    return total, float(n)


def sampled_kl(s, t, *, estimator="k2", mask=None):
    """Σ over kept sampled tokens of Schulman's estimator of KL(q‖p) with log r = log p − log q:
    k1 = −log r, k2 = (log r)² / 2, k3 = r − 1 − log r; count = #kept tokens."""
    s = _student(s)
    t = _teacher(t)
    keep = _keep(mask, s.shape).reshape(-1)
    s_flat, t_flat = s.reshape(-1), t.reshape(-1)
    total = _zero(s)
    n = 0
    for r in _kept(keep):
        log_r = t_flat[r] - s_flat[r]
        if estimator == "k1":
            term = -log_r
        elif estimator == "k2":
            term = log_r * log_r / 2
        else:
            term = torch.exp(log_r) - 1 - log_r
        total = total + term
        n += 1
    return total, float(n)


def uld(s, t, *, temperature=1.0, mask=None):
    """Σ_kept rows Σ_i |sorted(p_S)_i − sorted(p_T)_i| (descending, the shorter vocabulary padded with zeros),
    p = softmax(z / T); count = #kept rows (Boizard et al., 2024)."""
    s = _student(s)
    t = _teacher(t)
    lead = s.shape[:-1]
    s_rows, t_rows = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    keep = _keep(mask, lead).reshape(-1)
    T = _temperatures(temperature, lead, s.device)
    total = _zero(s)
    n = 0
    for r in _kept(keep):
        ps = sorted(torch.softmax(s_rows[r] / T[r], 0).unbind(), key=lambda x: -float(x))
        pt = sorted(torch.softmax(t_rows[r] / T[r], 0).tolist(), reverse=True)
        for i in range(max(len(ps), len(pt))):
            a = ps[i] if i < len(ps) else _zero(s)
            b = pt[i] if i < len(pt) else 0.0
            total = total + (a - b).abs()
        n += 1
    return total, float(n)


def hard_ce(logits, labels, *, ignore_index=-100):
    """Σ_{labels ≠ ignore_index} −log softmax(z)[label]; count = #labels ≠ ignore_index."""
    z = _student(logits)
    C = z.shape[-1]
    z_rows = z.reshape(-1, C)
    lab = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if lab.numel() != z_rows.shape[0]:
        raise ValueError("reference: labels shape does not match the logits' leading shape")
    total = _zero(z)
    count = 0
    for r in range(lab.numel()):
        y = int(lab[r])
        if y == ignore_index:
            continue
        total = total - torch.log_softmax(z_rows[r], dim=-1)[y]
        count += 1
    return total, float(count)


# --------------------------------------------------------------------------------------------
# feature losses
# --------------------------------------------------------------------------------------------


def hidden_mse(s, t, *, mask=None):
    """Σ_kept positions Σ_d (s − t)²; count = #kept × D."""
    s = _student(s)
    t = _teacher(t)
    lead = s.shape[:-1]
    D = s.shape[-1]
    s_rows = s.reshape(-1, D)
    t_rows = t.reshape(-1, D)
    keep = _keep(mask, lead).reshape(-1)
    total = _zero(s)
    n = 0
    for r in _kept(keep):
        total = total + ((s_rows[r] - t_rows[r]) ** 2).sum()
        n += 1
    return total, float(n * D)


def cosine(s, t, *, mask=None):
    """Σ_kept (1 − cos(s, t)), cos = s·t / (‖s‖ ‖t‖); count = #kept."""
    s = _student(s)
    t = _teacher(t)
    lead = s.shape[:-1]
    D = s.shape[-1]
    s_rows = s.reshape(-1, D)
    t_rows = t.reshape(-1, D)
    keep = _keep(mask, lead).reshape(-1)
    total = _zero(s)
    n = 0
    for r in _kept(keep):
        a = s_rows[r]
        b = t_rows[r]
        cos = (a * b).sum() / (a.norm() * b.norm())
        total = total + (1.0 - cos)
        n += 1
    return total, float(n)


def pkd(s, t, *, mask=None):
    """Σ_kept samples ‖ŝ − t̂‖², ŝ = c/‖c‖ with c = x[:, 0] for 3-D x, x itself for 2-D.

    Student and teacher may independently be 2-D or 3-D. The mask is [B] (2-D input) or
    [B, L] (3-D input; then mask[:, 0] decides); count = #kept samples.
    """
    s = _student(s)
    t = _teacher(t)
    c_s = s[:, 0] if s.dim() == 3 else s
    c_t = t[:, 0] if t.dim() == 3 else t
    B = c_s.shape[0]
    if mask is None:
        keep = torch.ones(B, dtype=torch.bool)
    else:
        m = torch.as_tensor(mask).detach().cpu()
        if m.dim() == 2:
            m = m[:, 0]
        keep = _keep(m, (B,))
    total = _zero(s)
    n = 0
    for b in _kept(keep):
        s_hat = c_s[b] / c_s[b].norm()
        t_hat = c_t[b] / c_t[b].norm()
        total = total + ((s_hat - t_hat) ** 2).sum()
        n += 1
    return total, float(n)


def attention_kl(s, t, *, mask=None, inputs="probs", eps=1e-8):
    """Σ over (b, h, kept q) of Σ_{kept k} t'_k (log t'_k − log s'_k); count = H · Σ_b n_b.

    inputs="logits": t', s' = softmax over the kept keys.
    inputs="probs": t', s' = the row restricted to the kept keys and renormalised; s' is then
    clamped below at eps before the log; 0·log 0 = 0 for the teacher.
    """
    if inputs not in ("probs", "logits"):
        raise ValueError(f"reference: inputs must be 'probs' or 'logits', got {inputs!r}")
    s = _attention_4d(_student(s))
    t = _attention_4d(_teacher(t))
    B, H, L, _ = s.shape
    keep = _keep(mask, (B, L))
    total = _zero(s)
    count = 0
    for b in range(B):
        idx = torch.tensor(_kept(keep[b]), dtype=torch.long)
        n = idx.numel()
        count += H * n
        if n == 0:
            continue
        for h in range(H):
            S = s[b, h][idx][:, idx]  # [kept q, kept k]
            T = t[b, h][idx][:, idx]
            for q in range(n):
                if inputs == "logits":
                    log_t = torch.log_softmax(T[q], dim=-1)
                    log_s = torch.log_softmax(S[q], dim=-1)
                    total = total + (log_t.exp() * (log_t - log_s)).sum()
                else:
                    t_p = T[q] / T[q].sum()
                    s_p = (S[q] / S[q].sum()).clamp_min(eps)
                    total = total + (torch.xlogy(t_p, t_p) - t_p * torch.log(s_p)).sum()
    return total, float(count)


def attention_mse(s, t, *, mask=None, head_reduce=None):
    """Σ (s − t)² over b, h, kept q, kept k; count = H · Σ_b n_b².

    head_reduce="sum": s and t are summed over heads first; count = Σ_b n_b².
    """
    if head_reduce not in (None, "sum"):
        raise ValueError(f"reference: head_reduce must be None or 'sum', got {head_reduce!r}")
    s = _attention_4d(_student(s))
    t = _attention_4d(_teacher(t))
    if head_reduce == "sum":
        s = s.sum(dim=1, keepdim=True)
        t = t.sum(dim=1, keepdim=True)
    B, H, L, _ = s.shape
    keep = _keep(mask, (B, L))
    total = _zero(s)
    count = 0
    for b in range(B):
        idx = torch.tensor(_kept(keep[b]), dtype=torch.long)
        n = idx.numel()
        count += H * n * n
        for h in range(H):
            S = s[b, h][idx][:, idx]
            T = t[b, h][idx][:, idx]
            total = total + ((S - T) ** 2).sum()
    return total, float(count)


def attention_ce(s, t, *, mask=None, head_reduce=None):
    """Σ over (b, h, kept q) of −Σ_{kept k} softmax(t)_k log softmax(s)_k; count = H · Σ_b n_b.

    Both softmaxes run over ALL keys (masked ones included); only the sum is restricted.
    head_reduce="mean": the heads' scores are averaged first; count = Σ_b n_b.
    """
    if head_reduce not in (None, "mean"):
        raise ValueError(f"reference: head_reduce must be None or 'mean', got {head_reduce!r}")
    s = _attention_4d(_student(s))
    t = _attention_4d(_teacher(t))
    if head_reduce == "mean":
        s = s.mean(dim=1, keepdim=True)
        t = t.mean(dim=1, keepdim=True)
    B, H, L, _ = s.shape
    keep = _keep(mask, (B, L))
    total = _zero(s)
    count = 0
    for b in range(B):
        kept = _kept(keep[b])
        count += H * len(kept)
        idx = torch.tensor(kept, dtype=torch.long)
        for h in range(H):
            for q in kept:
                log_ps = torch.log_softmax(s[b, h, q], dim=-1)  # over all L keys
                p_t = torch.softmax(t[b, h, q], dim=-1)  # over all L keys
                total = total - (p_t[idx] * log_ps[idx]).sum()
    return total, float(count)


def relation_kl(s, t, *, num_heads, mask=None):
    """MiniLM self-relation KL.

    The last dim is split into A = num_heads contiguous heads (head a = columns a·d:(a+1)·d,
    d_s = D_s/A, d_t = D_t/A); R = softmax over the kept keys of X Xᵀ/√d per head; the sum is
    Σ over (b, a, kept q) of KL(R_T‖R_S) over the kept keys; count = A · Σ_b n_b.
    """
    A = int(num_heads)
    s = _student(s)
    t = _teacher(t)
    B, L, D_s = s.shape
    D_t = t.shape[-1]
    if D_s % A or D_t % A:
        raise ValueError("reference: widths must be divisible by num_heads")
    d_s = D_s // A
    d_t = D_t // A
    keep = _keep(mask, (B, L))
    total = _zero(s)
    count = 0
    for b in range(B):
        idx = torch.tensor(_kept(keep[b]), dtype=torch.long)
        n = idx.numel()
        count += A * n
        if n == 0:
            continue
        for a in range(A):
            Xs = s[b][idx][:, a * d_s : (a + 1) * d_s]  # [n, d_s]
            Xt = t[b][idx][:, a * d_t : (a + 1) * d_t]  # [n, d_t]
            log_Rs = torch.log_softmax(Xs @ Xs.T / math.sqrt(d_s), dim=-1)  # [n, n]
            log_Rt = torch.log_softmax(Xt @ Xt.T / math.sqrt(d_t), dim=-1)
            for q in range(n):
                total = total + _kl(log_Rt[q], log_Rs[q])
    return total, float(count)


def fsp(s_pair, t_pair, *, mask=None):
    """Σ_b Σ (G_S − G_T)², G = X0ᵀ X1 / n_b over the kept positions; count = B·D0·D1.

    n_b is sample b's kept length (L without a mask); a fully masked sample has G = 0.
    A single tensor is used as both members of the pair.
    """
    s0, s1 = _pair(s_pair)
    t0, t1 = _pair(t_pair)
    s0, s1 = _student(s0), _student(s1)
    t0, t1 = _teacher(t0), _teacher(t1)
    B, L, D0 = s0.shape
    D1 = s1.shape[-1]
    keep = _keep(mask, (B, L))
    total = _zero(s0) + _zero(s1)
    for b in range(B):
        idx = torch.tensor(_kept(keep[b]), dtype=torch.long)
        n = idx.numel()
        if n == 0:
            G_s = torch.zeros(D0, D1, dtype=torch.float64)
            G_t = torch.zeros(D0, D1, dtype=torch.float64)
        else:
            G_s = s0[b][idx].T @ s1[b][idx] / n
            G_t = t0[b][idx].T @ t1[b][idx] / n
        total = total + ((G_s - G_t) ** 2).sum()
    return total, float(B * D0 * D1)


def mmd(s, t, *, mask=None):
    """Σ_b Σ_{kept i, kept j} (G_S − G_T)²_{ij}, G = X0 X1ᵀ / D (D = width of X1); count = Σ_b n_b².

    Takes a pair or a single tensor (used as both members); student and teacher widths may differ.
    """
    s0, s1 = _pair(s)
    t0, t1 = _pair(t)
    s0, s1 = _student(s0), _student(s1)
    t0, t1 = _teacher(t0), _teacher(t1)
    B, L, _ = s0.shape
    D_s = s1.shape[-1]
    D_t = t1.shape[-1]
    keep = _keep(mask, (B, L))
    total = _zero(s0) + _zero(s1)
    count = 0
    for b in range(B):
        idx = torch.tensor(_kept(keep[b]), dtype=torch.long)
        n = idx.numel()
        count += n * n
        if n == 0:
            continue
        G_s = s0[b][idx] @ s1[b][idx].T / D_s  # [n, n]
        G_t = t0[b][idx] @ t1[b][idx].T / D_t
        total = total + ((G_s - G_t) ** 2).sum()
    return total, float(count)


def nst(s, t, *, mask=None):
    """Neuron Selectivity Transfer, per sample over its n_b kept positions.

    Each neuron (column) is L2-normalised over the kept positions, ŝ_j = S[:, j] / ‖S[:, j]‖, and
    MMD²_b = (1/D_t²) Σ_{i,i'} (t̂_iᵀ t̂_i')² + (1/D_s²) Σ_{j,j'} (ŝ_jᵀ ŝ_j')²
             − (2/(D_s D_t)) Σ_{i,j} (ŝ_jᵀ t̂_i)².
    Sum over samples with n_b > 0; count = #samples with n_b > 0.
    """
    s = _student(s)
    t = _teacher(t)
    B, L, D_s = s.shape
    D_t = t.shape[-1]
    keep = _keep(mask, (B, L))
    total = _zero(s)
    count = 0
    for b in range(B):
        idx = torch.tensor(_kept(keep[b]), dtype=torch.long)
        if idx.numel() == 0:
            continue
        S = s[b][idx]  # [n, D_s]
        T = t[b][idx]  # [n, D_t]
        s_hat = [S[:, j] / S[:, j].norm() for j in range(D_s)]
        t_hat = [T[:, i] / T[:, i].norm() for i in range(D_t)]
        tt = _zero(s)
        for i in range(D_t):
            for i2 in range(D_t):
                tt = tt + (t_hat[i] @ t_hat[i2]) ** 2
        ss = _zero(s)
        for j in range(D_s):
            for j2 in range(D_s):
                ss = ss + (s_hat[j] @ s_hat[j2]) ** 2
        st = _zero(s)
        for i in range(D_t):
            for j in range(D_s):
                st = st + (s_hat[j] @ t_hat[i]) ** 2
        mmd2 = tt / D_t**2 + ss / D_s**2 - 2.0 * st / (D_s * D_t)
        total = total + mmd2
        count += 1
    return total, float(count)


REFERENCES: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "kd_ce": kd_ce,
    "kd_kl": kd_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "tvd": tvd,
    "kd_mse": kd_mse,
    "prob_mse": prob_mse,
    "pseudo_label_ce": pseudo_label_ce,
    "sampled_kl": sampled_kl,
    "uld": uld,
    "hard_ce": hard_ce,
    "hidden_mse": hidden_mse,
    "cosine": cosine,
    "pkd": pkd,
    "attention_kl": attention_kl,
    "attention_mse": attention_mse,
    "attention_ce": attention_ce,
    "relation_kl": relation_kl,
    "fsp": fsp,
    "mmd": mmd,
    "nst": nst,
}
