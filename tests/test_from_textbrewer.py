"""``from_textbrewer``: the spec of a TextBrewer ``DistillationConfig`` equals ``GeneralDistiller.compute_loss``.

Every comparison builds a real ``textbrewer.GeneralDistiller`` from the same config, copies its projections
(``distiller.projs``, one per intermediate match) into ``dk.init_params(spec)``, and checks on the same adaptor
outputs (float32, ``rtol=1e-5``): the loss, its gradient with respect to every student tensor, and the projections'
gradients. Weight schedulers are applied to the distiller the way TextBrewer's training loop applies them
(``weight = scheduler(global_step / total_steps)`` after each optimizer step); one test runs that loop itself.

Every intermediate match is given an ``inputs_mask``: without one, TextBrewer's attention losses zero every score
``<= -1e-3`` (a defect distilkit does not copy, see DESIGN.md). The released ``mmd_loss`` divides its masked grams by
the padded length ``L`` instead of the width ``D``; the mmd/nst matches below use ``L == D`` (student width after any
projection, and teacher width), where that defect is neutral, and the T4-tiny test, whose widths differ, swaps in the
corrected function.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
from textbrewer import presets as tb_presets
from textbrewer.distiller_utils import post_adaptor
from torch import nn
from torch.testing import assert_close

import distilkit as dk
from distilkit.config._textbrewer import from_textbrewer

RTOL, ATOL = 1e-5, 1e-6
B, L, H, C, V = 3, 6, 2, 5, 7  # batch, length, heads, classes, vocabulary
DT, DS = 6, 4  # teacher and narrow-student widths (BERT-base 768 / TinyBERT 312, scaled down); DT == L for mmd
LENGTHS = (6, 4, 2)
N_T, N_S = 4, 3  # hidden / attention layers returned by the teacher and student adaptors


# --------------------------------------------------------------------------------------------------- helpers
def _mask(lengths=LENGTHS, length=L) -> torch.Tensor:
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()


def _features(seed: int, width: int, layers: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": [torch.randn(B, L, width, generator=g) for _ in range(layers)],
        "attention": [torch.randn(B, H, L, L, generator=g) for _ in range(layers)],
        "inputs_mask": _mask(),
    }


def _pair(seed: int = 0, *, student_width: int = DT, logits=None) -> tuple[dict, dict]:
    """Student and teacher adaptor dicts: features, an inputs_mask and (unless logits=False) [B, C] logits."""
    results_S, results_T = _features(seed, student_width, N_S), _features(seed + 1, DT, N_T)
    g = torch.Generator().manual_seed(seed + 2)
    if logits is None:
        results_S["logits"], results_T["logits"] = torch.randn(B, C, generator=g), 3 * torch.randn(B, C, generator=g)
    return results_S, results_T


def _clone(x, leaf: bool):
    """A deep copy; with ``leaf`` every floating tensor becomes a fresh leaf that requires grad."""
    if isinstance(x, torch.Tensor):
        y = x.detach().clone()
        return y.requires_grad_(True) if leaf and y.is_floating_point() else y
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v, leaf) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v, leaf) for k, v in x.items()}
    return x


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x] if x.requires_grad else []
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _tensors(x[k])]
    return []


def _grad(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x) if x.grad is None else x.grad


def _distiller(config: dict, tmp_path) -> GeneralDistiller:
    train_config = TrainingConfig(output_dir=str(tmp_path / "textbrewer"), device="cpu")
    distill_config = DistillationConfig.from_dict(copy.deepcopy(config))  # it appends to the proj lists
    model = nn.Linear(1, 1)
    return GeneralDistiller(train_config, distill_config, model, model, None, None)


def _match_terms(spec) -> list:
    return [t for t in spec.terms if t.name not in ("kd", "hard_label")]


def _params(spec, distiller: GeneralDistiller) -> nn.Module:
    """``dk.init_params(spec)`` holding copies of the distiller's projections (one per match, in order)."""
    params = dk.init_params(spec)
    matches = _match_terms(spec)
    assert len(matches) == len(distiller.projs)
    g = torch.Generator().manual_seed(99)
    for term, tb_proj in zip(matches, distiller.projs, strict=True):
        assert (term.proj is None) == (tb_proj is None), term.name
        if tb_proj is not None:
            # Larger weights and a bias than the N(0, 0.02) initialisation, so that no projected vector is nearly
            # zero (a relu projection of a 4-wide feature often is; cosine's gradient is ill-conditioned there).
            with torch.no_grad():
                for p in tb_proj.parameters():
                    p.copy_(0.5 * torch.randn(p.shape, generator=g) + (0.2 if p.ndim == 1 else 0.0))
            params[term.name].load_state_dict(tb_proj.state_dict())
    return params


def _textbrewer_step(distiller: GeneralDistiller, global_step: int, total_steps: int | None) -> None:
    """Set the weights as TextBrewer's training loop does after ``global_step`` optimizer steps."""
    d = distiller.d_config
    if global_step > 0 and d.kd_loss_weight_scheduler is not None:
        d.kd_loss_weight = d.kd_loss_weight_scheduler(global_step / total_steps)
    if global_step > 0 and d.hard_label_weight_scheduler is not None:
        d.hard_label_weight = d.hard_label_weight_scheduler(global_step / total_steps)


def compare(config: dict, results_S: dict, results_T: dict, tmp_path, *, total_steps=None, step=0, spec=None,
            textbrewer_results: tuple[dict, dict] | None = None):
    """Assert that the spec of ``config`` and TextBrewer give the same loss and gradients; return the spec.

    ``textbrewer_results``: equivalent adaptor dicts for TextBrewer where it cannot read the same ones.
    """
    spec = from_textbrewer(copy.deepcopy(config), total_steps=total_steps) if spec is None else spec
    distiller = _distiller(config, tmp_path)
    _textbrewer_step(distiller, step, total_steps)
    params = _params(spec, distiller)

    ours_S, ours_T = _clone(results_S, leaf=True), _clone(results_T, leaf=False)
    out = dk.make_step(spec, compile=False)(ours_S, ours_T, step=step, params=params)
    results_S, results_T = textbrewer_results or (results_S, results_T)
    theirs_S, theirs_T = _clone(results_S, leaf=True), _clone(results_T, leaf=False)
    theirs, _ = distiller.compute_loss(post_adaptor(dict(theirs_S)), post_adaptor(dict(theirs_T)))

    assert_close(out.loss, theirs, rtol=RTOL, atol=ATOL)
    out.loss.backward()
    theirs.backward()
    for a, b in zip(_tensors(ours_S), _tensors(theirs_S), strict=True):  # no grad: unused (or weight 0)
        assert_close(_grad(a), _grad(b), rtol=RTOL, atol=ATOL)
    tb_params = [p for proj in distiller.projs if proj is not None for p in proj.parameters()]
    for a, b in zip(params.parameters(), tb_params, strict=True):
        assert_close(a.grad, b.grad, rtol=RTOL, atol=ATOL)
    return spec


# ------------------------------------------------------------------------------------------------ kd on logits
def _logits_3d(seed: int, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, vocab, generator=g), 3 * torch.randn(B, L, vocab, generator=g)


@pytest.mark.parametrize("kd_loss_type", ["ce", "mse"])
@pytest.mark.parametrize("temperature", [1, 8, 2.5])
def test_kd(kd_loss_type, temperature, tmp_path):
    results_S, results_T = _pair(0)
    config = {"temperature": temperature, "kd_loss_type": kd_loss_type, "kd_loss_weight": 0.7}
    spec = compare(config, results_S, results_T, tmp_path)
    assert [t.name for t in spec.terms] == ["kd"]
    assert spec["kd"].option_dict.get("t2_scale", False) is False


SCHEDULERS = [
    "constant",
    ["flsw", 1.0, 2.0],
    ["flsw", 0.5, 1, 1e-3],
    ["flsw", {"beta": 0.5, "gamma": 1.0, "eps": 1e-3}],
    ["cwsm", 0.5],
    ["cwsm", {"beta": 1}],
]


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=str)
@pytest.mark.parametrize("kd_loss_type", ["ce", "mse"])
def test_kd_temperature_schedulers(scheduler, kd_loss_type, tmp_path):
    results_S, results_T = _pair(1)
    config = {"temperature": 8, "temperature_scheduler": scheduler, "kd_loss_type": kd_loss_type}
    compare(config, results_S, results_T, tmp_path)


@pytest.mark.parametrize("scheduler", ["none", ["flsw", 1.0, 2.0], ["cwsm", 0.5]], ids=str)
@pytest.mark.parametrize("kd_loss_type", ["ce", "mse"])
def test_kd_3d_logits_with_logits_mask(scheduler, kd_loss_type, tmp_path):
    """[B, L, V] logits: TextBrewer selects the kept rows; the flsw/cwsm batch mean is over the kept rows."""
    results_S, results_T = _pair(2, logits=False)
    results_S["logits"], results_T["logits"] = _logits_3d(3)
    mask = _mask((6, 3, 1))
    results_S["logits_mask"], results_T["logits_mask"] = mask, mask.clone()  # TextBrewer masks each side
    config = {"temperature": 8, "temperature_scheduler": scheduler, "kd_loss_type": kd_loss_type}
    compare(config, results_S, results_T, tmp_path)


@pytest.mark.parametrize("masks", ["per_logits", "shared", "none"])
@pytest.mark.parametrize("scheduler", ["none", ["flsw", 1.0, 1.0], ["cwsm", 0.5]], ids=str)
def test_kd_logits_lists(masks, scheduler, tmp_path):
    """A list of two logits tensors (different vocabularies) is summed over, with one mask each or one shared."""
    results_S, results_T = _pair(4, logits=False)
    (s0, t0), (s1, t1) = _logits_3d(5, V), _logits_3d(6, V + 4)
    results_S["logits"], results_T["logits"] = [s0, s1], [t0, t1]
    if masks == "per_logits":
        m = [_mask((5, 3, 2)), _mask((6, 1, 4))]
    elif masks == "shared":
        m = [_mask((5, 3, 2))]
    else:
        m = None
    if m is not None:
        results_S["logits_mask"], results_T["logits_mask"] = m, _clone(m, leaf=False)
    theirs = None
    if masks == "shared":  # TextBrewer's select_logits_with_mask breaks a shared mask after the first [B, L, V] logits
        theirs = tuple({**r, "logits_mask": m * 2} for r in (results_S, results_T))
    compare({"temperature": 8, "temperature_scheduler": scheduler}, results_S, results_T, tmp_path,
            textbrewer_results=theirs)


@pytest.mark.parametrize("kd_loss_type", ["ce", "mse"])
@pytest.mark.parametrize("scheduler", ["none", ["flsw", 1.0, 2.0]], ids=str)
def test_probability_shift_2d(kd_loss_type, scheduler, tmp_path):
    """The teacher's top logit is swapped with the label's (before the adaptive temperature, as TextBrewer)."""
    results_S, results_T = _pair(7)
    results_S["labels"] = torch.tensor([0, 3, 4])
    config = {"temperature": 4, "probability_shift": True, "kd_loss_type": kd_loss_type,
              "temperature_scheduler": scheduler}
    compare(config, results_S, results_T, tmp_path)
    # the shift matters here: without it the loss differs
    plain = from_textbrewer({**config, "probability_shift": False})
    shifted = from_textbrewer(config)
    s, t = _clone(results_S, leaf=False), _clone(results_T, leaf=False)
    a = dk.make_step(plain, compile=False)(s, t).loss
    b = dk.make_step(shifted, compile=False)(s, t).loss
    assert not torch.allclose(a, b)


def test_probability_shift_3d_and_lists(tmp_path):
    """[B, L, V] logits (no logits_mask) with -100 labels left unshifted; a list of logits with a list of labels."""
    results_S, results_T = _pair(8, logits=False)
    (s0, t0), (s1, t1) = _logits_3d(9), _logits_3d(10, V + 2)
    results_S["logits"], results_T["logits"] = [s0, s1], [t0, t1]
    g = torch.Generator().manual_seed(11)
    labels0 = torch.randint(0, V, (B, L), generator=g)
    labels0[0, 2] = labels0[2, -1] = -100
    labels1 = torch.randint(0, V + 2, (B, L), generator=g)
    results_S["labels"] = [labels0, labels1]
    compare({"temperature": 8, "probability_shift": True}, results_S, results_T, tmp_path)


# ------------------------------------------------------------------------------------------- hard-label losses
@pytest.mark.parametrize("form", ["tensor", "list"])
def test_hard_label_losses(form, tmp_path):
    results_S, results_T = _pair(12)
    g = torch.Generator().manual_seed(13)
    if form == "tensor":
        results_S["losses"] = torch.rand((), generator=g)
    else:  # the second one as DataParallel returns it: one value per device
        results_S["losses"] = [torch.rand((), generator=g), torch.rand(2, generator=g)]
    spec = compare({"temperature": 8, "hard_label_weight": 0.3}, results_S, results_T, tmp_path)
    assert [t.name for t in spec.terms] == ["kd", "hard_label"]


def test_zero_weights_leave_terms_out(tmp_path):
    """TextBrewer skips KD without logits and the hard-label term without losses; a weight of 0 leaves them out."""
    results_S, results_T = _pair(14, logits=False)
    config = {"kd_loss_weight": 0, "intermediate_matches": [
        {"layer_T": 1, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1}]}
    spec = compare(config, results_S, results_T, tmp_path)
    assert [t.name for t in spec.terms] == ["hidden_hidden_mse_0_1"]
    assert len(from_textbrewer({"kd_loss_weight": 0})) == 0
    assert [t.name for t in from_textbrewer({})] == ["kd"]  # hard_label_weight defaults to 0


# ------------------------------------------------------------------------------------------- weight schedulers
@pytest.mark.parametrize(("kd_sched", "hl_sched"),
                         [("linear_decay", "linear_growth"), ("linear_growth", "none"), ("none", "linear_decay")])
@pytest.mark.parametrize("global_step", [1, 3, 7, 10])
def test_weight_schedulers(kd_sched, hl_sched, global_step, tmp_path):
    results_S, results_T = _pair(15)
    results_S["losses"] = [torch.tensor(0.8)]
    config = {"temperature": 8, "kd_loss_weight": 0.5, "hard_label_weight": 0.25,
              "kd_loss_weight_scheduler": kd_sched, "hard_label_weight_scheduler": hl_sched}
    compare(config, results_S, results_T, tmp_path, total_steps=10, step=global_step)


def test_weight_schedules_follow_textbrewers_training_loop(tmp_path):
    """Run TextBrewer's own training loop (gradient accumulation 2) and record the weights ``compute_loss`` used.

    TextBrewer's ``global_step`` counts the optimizer steps already taken; after each one it sets
    ``weight = scheduler(global_step / total_steps)``. So distilkit's ``step`` is that count, the same for every
    micro-batch of an accumulation window. Its first optimizer step still uses the static weights (the scheduler has
    not run yet); distilkit uses ``scheduler(0)`` there.
    """
    total, accumulation = 5, 2
    config = {"temperature": 8, "kd_loss_weight": 0.7, "hard_label_weight": 0.2,
              "kd_loss_weight_scheduler": "linear_growth", "hard_label_weight_scheduler": "linear_decay"}
    g = torch.Generator().manual_seed(16)
    student, teacher = nn.Linear(4, C), nn.Linear(4, C)

    def adaptor(batch, outputs):
        return {"logits": outputs, "losses": F.cross_entropy(outputs, batch["y"])}

    train_config = TrainingConfig(output_dir=str(tmp_path / "tb"), device="cpu", ckpt_steps=100,
                                  gradient_accumulation_steps=accumulation)
    distiller = GeneralDistiller(train_config, DistillationConfig.from_dict(copy.deepcopy(config)), teacher, student,
                                 adaptor, adaptor)
    recorded = []
    compute_loss = distiller.compute_loss

    def spy(results_S, results_T):
        recorded.append((distiller.d_config.kd_loss_weight, distiller.d_config.hard_label_weight))
        return compute_loss(results_S, results_T)

    distiller.compute_loss = spy

    class Model(nn.Module):  # TextBrewer calls model(**batch)
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x, y):
            return self.linear(x)

    distiller.model_S, distiller.model_T = Model(student), Model(teacher)
    batches = [{"x": torch.randn(B, 4, generator=g), "y": torch.randint(0, C, (B,), generator=g)} for _ in range(3)]
    distiller.train(torch.optim.SGD(student.parameters(), lr=0.01), batches, num_steps=total)
    assert len(recorded) == total * accumulation

    spec = from_textbrewer(config, total_steps=total)
    step = dk.make_step(spec, compile=False)
    s = {"logits": torch.randn(B, C), "losses": torch.tensor(1.0)}
    for call, (kd_weight, hl_weight) in enumerate(recorded):
        global_step = call // accumulation
        metrics = step(s, {"logits": torch.randn(B, C)}, step=global_step).metrics
        if global_step == 0:
            assert (kd_weight, hl_weight) == (0.7, 0.2)  # TextBrewer: static weights before its first update
            assert_close(metrics["kd/weight"], torch.tensor(0.0))  # distilkit: linear_growth(0)
            assert_close(metrics["hard_label/weight"], torch.tensor(1.0))  # linear_decay(0)
        else:
            assert_close(metrics["kd/weight"], torch.tensor(kd_weight, dtype=torch.float32))
            assert_close(metrics["hard_label/weight"], torch.tensor(hl_weight, dtype=torch.float32))


# ----------------------------------------------------------------------------------------- intermediate matches
ALL_LOSSES = sorted(tb_presets.MATCH_LOSS_MAP)
PAIR_LOSSES = {"fsp", "gram", "mmd", "nst"}


def test_every_textbrewer_match_loss_is_mapped():
    from distilkit.config._textbrewer import MATCH_LOSSES

    assert set(MATCH_LOSSES) == set(tb_presets.MATCH_LOSS_MAP)


def _match(loss: str, feature: str, proj: str | None, weight: float = 0.5, layers=((2, 3), ([0, 2], [1, -1]))):
    (s, t), (s_pair, t_pair) = layers
    match = {"feature": feature, "loss": loss, "weight": weight}
    match.update({"layer_S": s_pair, "layer_T": t_pair} if loss in PAIR_LOSSES else {"layer_S": s, "layer_T": t})
    if proj is not None:
        widths = (L, L) if feature == "attention" else (DS, DT)
        match["proj"] = [proj, *widths]
    return match


def _feature(loss: str) -> str:
    return "attention" if loss.startswith("attention") else "hidden"


@pytest.mark.parametrize("proj", [None, "linear", "relu", "tanh"])
@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_intermediate_match(loss, proj, tmp_path):
    feature = _feature(loss)
    width = DS if proj is not None and feature == "hidden" else DT  # mmd: every width == L (see module docstring)
    results_S, results_T = _pair(20, student_width=width, logits=False)
    config = {"kd_loss_weight": 0, "intermediate_matches": [_match(loss, feature, proj)]}
    spec = compare(config, results_S, results_T, tmp_path)
    (term,) = spec.terms
    s, t = ("0-2", "1--1") if loss in PAIR_LOSSES else ("2", "3")
    assert term.name == f"{feature}_{loss}_{s}_{t}"
    assert term.mask == (None if loss == "pkd" else "inputs_mask?")


@pytest.mark.parametrize("loss", ["hidden_mse", "cos", "mmd", "fsp"])
def test_several_layer_pairs(loss, tmp_path):
    """One loss on several layer pairs, with different weights (one term and one name each)."""
    results_S, results_T = _pair(21, logits=False)
    layers = [((0, 1), ([0, 0], [1, 1])), ((2, 3), ([1, 2], [3, 0]))]
    config = {"kd_loss_weight": 0, "intermediate_matches": [_match(loss, "hidden", None, 0.3 + i, ls)
                                                             for i, ls in enumerate(layers)]}
    compare(config, results_S, results_T, tmp_path)


def test_everything_at_once(tmp_path):
    """kd (flsw, probability shift) + every match loss with and without projections + hard-label losses."""
    results_S, results_T = _pair(22, student_width=DS)
    results_S["labels"] = torch.tensor([1, 0, 4])
    results_S["losses"] = [torch.tensor(0.4), torch.tensor([0.1, 0.3])]
    matches = []
    for i, loss in enumerate(ALL_LOSSES):
        feature = _feature(loss)
        proj = ["linear", "relu", "tanh"][i % 3] if feature == "hidden" or i % 2 else None
        matches.append(_match(loss, feature, proj, weight=0.1 * (i + 1)))
    matches.append(_match("hidden_mse", "hidden", "linear", weight=2.0))  # the same match twice
    config = {"temperature": 8, "temperature_scheduler": ["flsw", 1, 2], "probability_shift": True,
              "kd_loss_weight": 0.9, "hard_label_weight": 0.1, "intermediate_matches": matches}
    spec = compare(config, results_S, results_T, tmp_path)
    names = [t.name for t in spec.terms]
    assert len(set(names)) == len(names) == len(matches) + 2
    assert names[-2:] == [f"hidden_hidden_mse_2_3_{len(matches) - 1}", "hard_label"]


# --------------------------------------------------------------------------------------------- T4-tiny round trip
def _mmd_loss_corrected(state_S, state_T, mask=None):
    """The released ``textbrewer.losses.mmd_loss`` with its masked grams divided by the width, as its current
    source (and distilkit) do, instead of by the padded length."""
    if mask is None:
        return tb_presets.mmd_loss(state_S, state_T)
    mask = mask.to(state_S[0])
    gram_S = torch.bmm(state_S[0], state_S[1].transpose(1, 2)) / state_S[1].size(2)  # released: size(1)
    gram_T = torch.bmm(state_T[0], state_T[1].transpose(1, 2)) / state_T[1].size(2)  # released: size(1)
    loss = F.mse_loss(gram_S, gram_T, reduction="none") * mask.unsqueeze(-1) * mask.unsqueeze(1)
    return loss.sum() / torch.pow(mask.sum(dim=1), 2).sum()


T4_TINY = {  # TextBrewer's T4-tiny recipe (L4t_hidden_mse + L4t_hidden_smmd), widths 312 → 768 scaled down
    "temperature": 8,
    "intermediate_matches": [
        *({"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
           "proj": ["linear", DS, DT]} for s, t in [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]),
        *({"layer_T": [t, t], "layer_S": [s, s], "feature": "hidden", "loss": "mmd", "weight": 1}
          for s, t in [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]),
    ],
}


def test_t4_tiny(tmp_path, monkeypatch):
    monkeypatch.setitem(tb_presets.MATCH_LOSS_MAP, "mmd", _mmd_loss_corrected)  # widths differ from L here
    path = tmp_path / "t4_tiny.json"
    path.write_text(json.dumps(T4_TINY))
    spec = from_textbrewer(path)
    assert spec == from_textbrewer(str(path)) == from_textbrewer(json.dumps(T4_TINY)) == from_textbrewer(T4_TINY)
    assert [t.name for t in spec.terms] == [
        "kd", "hidden_hidden_mse_0_0", "hidden_hidden_mse_1_3", "hidden_hidden_mse_2_6", "hidden_hidden_mse_3_9",
        "hidden_hidden_mse_4_12", "hidden_mmd_0-0_0-0", "hidden_mmd_1-1_3-3", "hidden_mmd_2-2_6-6",
        "hidden_mmd_3-3_9-9", "hidden_mmd_4-4_12-12",
    ]
    g = torch.Generator().manual_seed(30)
    length = 7  # != the widths: the released mmd defect would show, hence the corrected function
    mask = _mask((7, 5, 2), length)
    results_S = {"hidden": [torch.randn(B, length, DS, generator=g) for _ in range(5)], "inputs_mask": mask,
                 "logits": torch.randn(B, C, generator=g)}
    results_T = {"hidden": [torch.randn(B, length, DT, generator=g) for _ in range(13)], "inputs_mask": mask,
                 "logits": torch.randn(B, C, generator=g)}
    compare(T4_TINY, results_S, results_T, tmp_path, spec=spec)


def test_t4_tiny_through_spec_config(tmp_path):
    """The imported spec survives distilkit's own config round trip (and its params fit the rebuilt spec)."""
    config_module = pytest.importorskip("distilkit.config")
    if not hasattr(config_module, "from_config"):
        pytest.skip("distilkit.config.from_config does not exist yet")
    rich = {"temperature": 8, "temperature_scheduler": ["flsw", 1, 2], "probability_shift": True,
            "kd_loss_weight_scheduler": "linear_decay", "hard_label_weight": 0.3,
            "hard_label_weight_scheduler": "linear_growth",
            "intermediate_matches": [_match(loss, _feature(loss), "relu" if _feature(loss) == "hidden" else None)
                                     for loss in ALL_LOSSES]}
    for spec in (from_textbrewer(T4_TINY), from_textbrewer(rich, total_steps=100)):
        rebuilt = config_module.from_config(dk.to_config(spec).model_dump_json())
        assert rebuilt == spec
        dk.init_params(rebuilt).load_state_dict(dk.init_params(spec).state_dict())


def test_compiled_step(tmp_path):
    """Optional masks, adaptive temperatures, weight schedules and projections compile with fullgraph=True."""
    config = {"temperature": 8, "temperature_scheduler": ["cwsm", 0.5], "kd_loss_weight_scheduler": "linear_decay",
              "hard_label_weight": 0.5, "intermediate_matches": [_match("hidden_mse", "hidden", "relu"),
                                                                 _match("attention_ce", "attention", None)]}
    spec = from_textbrewer(config, total_steps=4)
    results_S, results_T = _pair(31, student_width=DS)
    results_S["losses"] = torch.tensor(0.5)
    params = dk.init_params(spec)
    eager = dk.make_step(spec, compile=False)
    compiled = dk.make_step(spec, compile="aot_eager")
    for i in range(3):
        assert_close(compiled(results_S, results_T, step=i, params=params).loss,
                     eager(results_S, results_T, step=i, params=params).loss, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------- accepted inputs
def test_accepted_forms(tmp_path):
    base = {"temperature": 8, "intermediate_matches": [
        {"layer_T": 1, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", DS, DT, {"lr": 1e-3}]}]}
    spec = from_textbrewer(base)
    no_group = copy.deepcopy(base)
    no_group["intermediate_matches"][0]["proj"] = ["linear", DS, DT]
    assert from_textbrewer(no_group) == spec
    # explicit defaults, "none" strings (TextBrewer's own JSON loader rejects those: it compares with `is`)
    explicit = {**base, "temperature_scheduler": "none", "kd_loss_weight_scheduler": "none",
                "hard_label_weight_scheduler": "none", "is_caching_logits": True, "probability_shift": False,
                "kd_loss_type": "ce", "kd_loss_weight": 1, "hard_label_weight": 0}
    assert from_textbrewer(json.dumps(explicit)) == spec
    assert from_textbrewer({**base, "temperature_scheduler": "constant"}) == spec
    assert from_textbrewer({**base, "intermediate_matches": None}) == from_textbrewer({"temperature": 8})
    # flsw / cwsm arguments as a list or a dict
    assert (from_textbrewer({"temperature_scheduler": ["flsw", 1, 2]})
            == from_textbrewer({"temperature_scheduler": ["flsw", {"gamma": 2, "beta": 1}]}))
    assert (from_textbrewer({"temperature_scheduler": ["cwsm", 0.5]})
            == from_textbrewer({"temperature_scheduler": ("cwsm", {"beta": 0.5})}))
    # total_steps is only needed by weight schedulers
    assert from_textbrewer(base, total_steps=100) == spec


def test_kd_term_reads_textbrewer_keys():
    spec = from_textbrewer({"temperature": 8, "probability_shift": True, "kd_loss_weight": 2})
    (kd,) = spec.terms
    assert (kd.name, kd.student, kd.teacher, kd.mask, kd.probability_shift) == (
        "kd", ("logits",), ("logits",), "logits_mask?", "labels")
    assert kd.weight == (2.0,)
    assert kd.loss is dk.kd_ce and kd.option_dict == {"temperature": 8.0, "t2_scale": False}
    assert from_textbrewer({"kd_loss_type": "mse"})["kd"].loss is dk.kd_mse


# ------------------------------------------------------------------------------------------------------ errors
def _ok_match(**changes):
    return {"layer_T": 1, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1, **changes}


def _missing(key):
    match = _ok_match()
    del match[key]
    return match


INVALID = [
    ({"intermediate_matches": [_ok_match(), _ok_match(), _ok_match(loss="hidden_kl")]}, "intermediate_matches.2.loss"),
    ({"intermediate_matches": [_ok_match(layer_T=[1, 2], layer_S=0, loss="mmd")]}, "intermediate_matches.0.layer_S"),
    ({"intermediate_matches": [_ok_match(layer_T=1, layer_S=[0, 1], loss="fsp")]}, "intermediate_matches.0.layer_S"),
    ({"intermediate_matches": [_ok_match(layer_T=[1, 2], layer_S=[0, 1])]}, "intermediate_matches.0.layer_S"),
    ({"intermediate_matches": [_ok_match(loss="nst")]}, "intermediate_matches.0.layer_S"),
    ({"intermediate_matches": [_ok_match(layer_T=[1, 2, 3], layer_S=[0, 1, 2], loss="mmd")]},
     "intermediate_matches.0.layer_S"),
    ({"intermediate_matches": [_ok_match(layer_T="1")]}, "intermediate_matches.0.layer_T"),
    ({"intermediate_matches": [_ok_match(layer_S=True)]}, "intermediate_matches.0.layer_S"),
    ({"intermediate_matches": [_ok_match(feature="logits")]}, "intermediate_matches.0.feature"),
    ({"intermediate_matches": [_ok_match(weight="1")]}, "intermediate_matches.0.weight"),
    ({"intermediate_matches": [_ok_match(proj=["gelu", 4, 6])]}, "intermediate_matches.0.proj.0"),
    ({"intermediate_matches": [_ok_match(proj=["linear", 4])]}, "intermediate_matches.0.proj"),
    ({"intermediate_matches": [_ok_match(proj=["linear", 4.0, 6])]}, "intermediate_matches.0.proj.1"),
    ({"intermediate_matches": [_ok_match(proj=["linear", 4, 6, "lr"])]}, "intermediate_matches.0.proj.3"),
    ({"intermediate_matches": [_ok_match(layer_s=0)]}, "intermediate_matches.0.layer_s"),
    ({"intermediate_matches": [_missing("weight")]}, "intermediate_matches.0.weight"),
    ({"intermediate_matches": ["hidden_mse"]}, "intermediate_matches.0"),
    ({"intermediate_matches": {"layer_T": 1}}, "intermediate_matches"),
    ({"temperature_scheduler": "flsw"}, "temperature_scheduler"),
    ({"temperature_scheduler": "cwsm"}, "temperature_scheduler"),
    ({"temperature_scheduler": ["flsw", 1]}, "temperature_scheduler"),
    ({"temperature_scheduler": ["flsw", 1, 2, 3, 4]}, "temperature_scheduler"),
    ({"temperature_scheduler": ["cwsm"]}, "temperature_scheduler"),
    ({"temperature_scheduler": ["cwsm", {}]}, "temperature_scheduler.1"),
    ({"temperature_scheduler": ["flsw", {"beta": 1, "gamma": 2, "delta": 3}]}, "temperature_scheduler.1.delta"),
    ({"temperature_scheduler": ["flsw", "1", 2]}, "temperature_scheduler.1"),
    ({"temperature_scheduler": ["constant"]}, "temperature_scheduler.0"),
    ({"temperature_scheduler": "linear"}, "temperature_scheduler"),
    ({"temperature_scheduler": None}, "temperature_scheduler"),
    ({"kd_loss_type": "kl"}, "kd_loss_type"),
    ({"kd_loss_weight_scheduler": "cosine"}, "kd_loss_weight_scheduler"),
    ({"hard_label_weight_scheduler": None}, "hard_label_weight_scheduler"),
    ({"kd_loss_weight_scheduler": "linear_growth"}, "total_steps"),
    ({"hard_label_weight_scheduler": "linear_decay"}, "total_steps"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": "8"}, "temperature"),
    ({"kd_loss_weight": float("nan")}, "kd_loss_weight"),
    ({"hard_label_weight": None}, "hard_label_weight"),
    ({"probability_shift": 1}, "probability_shift"),
    ({"is_caching_logits": "no"}, "is_caching_logits"),
    ({"temprature": 8}, "temprature"),
]


@pytest.mark.parametrize(("config", "field"), INVALID, ids=[f"{i}-{f}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_configs(config, field):
    with pytest.raises(ValueError, match=r"^from_textbrewer: ") as info:
        from_textbrewer(config)
    assert f" {field}" in str(info.value)


def test_invalid_arguments(tmp_path):
    with pytest.raises(TypeError, match="total_steps"):
        from_textbrewer({}, total_steps="10")
    with pytest.raises(ValueError, match="total_steps"):
        from_textbrewer({}, total_steps=0)
    with pytest.raises(TypeError, match="expected a dict"):
        from_textbrewer(42)
    with pytest.raises(TypeError, match="the dict it was built from"):
        from_textbrewer(DistillationConfig(temperature=8))
    with pytest.raises(ValueError, match="JSON"):
        from_textbrewer('{"temperature": 8,')
    with pytest.raises(ValueError, match="JSON object"):
        path = tmp_path / "list.json"
        path.write_text("[1, 2]")
        from_textbrewer(path)
    with pytest.raises(FileNotFoundError):
        from_textbrewer(tmp_path / "missing.json")
