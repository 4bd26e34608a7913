"""The catalogue of bad input across the public API.

Every case must raise a ValueError / TypeError / KeyError (or a subclass) whose message names the API, the term or
config path, and what was expected — never an AttributeError, an IndexError, a NaN result or a Dynamo traceback.
Step-level cases run both eagerly and compiled. (Loss-level argument errors have their own list in test_errors.py.)
"""

from __future__ import annotations

import json

import pytest
import torch

import distilkit as dk

B, L, V, D = 2, 4, 5, 6
S = dk.schedules


def outs(width=D, layers=3, v=V):
    gen = torch.Generator().manual_seed(0)
    return {"logits": torch.randn(B, L, v, generator=gen), "hidden": [torch.randn(B, L, width, generator=gen)
                                                                       for _ in range(layers)],
            "attention": [torch.rand(B, 2, L, L, generator=gen).softmax(-1) for _ in range(layers)]}


BATCH = {"attention_mask": torch.ones(B, L, dtype=torch.bool), "labels": torch.zeros(B, L, dtype=torch.long)}


def run(spec, student=None, teacher=None, batch=None, compile_=False, **kwargs):
    step = dk.make_step(spec, compile=compile_)
    params = dk.init_params(spec)
    return step(outs() if student is None else student, outs() if teacher is None else teacher,
                BATCH if batch is None else batch, params=params, **kwargs)


KD = dk.kd_kl.on("logits", mask="attention_mask").named("kd")
HID = dk.hidden_mse.on(("hidden", 1), ("hidden", 2), mask="attention_mask").named("hid")

# (id, call(compile_), exception, pattern) — step cases take the compile flag, the others ignore it.
STEP_CASES = [
    ("missing-output-key", lambda c: run(KD, student={"hidden": outs()["hidden"]}, compile_=c), KeyError,
     r"kd_kl \(term 'kd'\): expected key 'logits' in the student outputs, got keys \['hidden'\]"),
    ("missing-teacher-key", lambda c: run(HID, teacher={"logits": outs()["logits"]}, compile_=c), KeyError,
     r"\(term 'hid'\): expected key 'hidden' in the teacher outputs"),
    ("missing-batch-key", lambda c: run(KD, batch={}, compile_=c), KeyError,
     r"\(term 'kd'\): expected mask key 'attention_mask' in the batch, the student outputs or the teacher outputs"),
    ("missing-labels", lambda c: run(dk.hard_ce.on("logits"), batch={}, compile_=c), KeyError,
     r"hard_ce \(term 'hard_ce'\): expected labels key 'labels'"),
    ("layer-out-of-range", lambda c: run(HID, teacher=outs(layers=2), compile_=c), KeyError,
     r"\(term 'hid'\): layer index 2 is out of range for teacher outputs\['hidden'\], which has 2 layers"),
    ("layers-not-a-list", lambda c: run(HID, student={**outs(), "hidden": outs()["hidden"][0]}, compile_=c),
     TypeError, r"\(term 'hid'\): expected student outputs\['hidden'\] to be a list or tuple of layers"),
    ("outputs-not-a-mapping", lambda c: run(KD, student=[torch.zeros(2)], compile_=c), TypeError,
     r"\(term 'kd'\): expected the student outputs to be a mapping"),
    ("width-mismatch", lambda c: run(HID, student=outs(width=3), compile_=c), ValueError,
     r"hidden_mse \(term 'hid'\): expected student and teacher features of the same shape.*project"),
    ("vocab-mismatch", lambda c: run(KD, teacher=outs(v=V + 1), compile_=c), ValueError,
     r"kd_kl \(term 'kd'\): expected student and teacher logits of the same shape"),
    ("wrong-rank", lambda c: run(dk.attention_kl.on(("attention", 0)).named("att"),
                                 student={**outs(), "attention": [torch.rand(B, L)]}, compile_=c), ValueError,
     r"attention_kl \(term 'att'\): expected student attention of shape \[B, H, L, L\] or \[B, L, L\]"),
    ("integer-logits", lambda c: run(KD, student={**outs(), "logits": torch.ones(B, L, V, dtype=torch.long)},
                                     compile_=c), TypeError,
     r"kd_kl \(term 'kd'\): expected student logits to be a real floating-point tensor, got dtype torch\.int64"),
    ("complex-logits", lambda c: run(KD, teacher={**outs(), "logits": torch.ones(B, L, V, dtype=torch.cfloat)},
                                     compile_=c), TypeError, r"kd_kl \(term 'kd'\): expected teacher logits"),
    ("non-tensor-output", lambda c: run(KD, student={**outs(), "logits": [[0.0] * V] * B}, compile_=c), TypeError,
     r"\(term 'kd'\): expected"),
    ("mask-shape", lambda c: run(KD, batch={"attention_mask": torch.ones(B, L + 1)}, compile_=c), ValueError,
     r"kd_kl \(term 'kd'\): expected mask of shape \(2, 4\)"),
    ("different-devices", lambda c: run(KD, teacher={**outs(), "logits": torch.empty(B, L, V, device="meta")},
                                        compile_=c), ValueError,
     r"kd_kl \(term 'kd'\): expected all tensors on one device, got student on cpu, teacher on meta"),
    ("labels-out-of-range", lambda c: run(dk.hard_ce.on("logits"), batch={"labels": torch.full((B, L), V)},
                                          compile_=c), ValueError,
     r"hard_ce \(term 'hard_ce'\): expected labels in \[0, 5\)"),
    ("negative-tensor-temperature", lambda c: run(dk.kd_kl.on("logits", temperature=torch.tensor(-2.0)),
                                                  compile_=c), ValueError,
     r"kd_kl \(term 'kd_kl'\): expected temperature > 0"),
    ("projection-width", lambda c: run(dk.hidden_mse.on(("hidden", 0), proj=dk.proj.linear(3, D)), compile_=c),
     ValueError, r"hidden_mse \(term 'hidden_mse/0-0'\): expected student features of width 3 for the projection "
     r"dk\.proj\.linear\(3, 6\), got shape \(2, 4, 6\)"),
    ("step-shape", lambda c: run(KD, step=torch.zeros(2), compile_=c), ValueError,
     r"make_step: expected step to be an int or a 0-d tensor, got shape \(2,\)"),
    ("step-type", lambda c: run(KD, step=1.5, compile_=c), TypeError,
     r"make_step: expected step to be an int or a 0-d tensor, got float"),
    ("counts-type", lambda c: run(KD, counts=[3], compile_=c), TypeError,
     r"make_step: expected counts to be a mapping"),
    ("missing-params", lambda c: dk.make_step(dk.hidden_mse.on("hidden", proj=dk.proj.linear(D, D)), compile=c)(
        outs(), outs()), TypeError, r"make_step: terms \['hidden_mse'\] have projections; pass params="),
    ("unknown-task", lambda c: dk.make_step(dk.tasks({"a": KD}), compile=c)(outs(), outs(), {"task": "b"}),
     ValueError, r"tasks: unknown task 'b'; expected one of \['a'\]"),
]


def _bad_json_version(tmp_path):
    path = tmp_path / "spec.json"
    config = json.loads(dk.to_config(KD).model_dump_json())
    path.write_text(json.dumps({**config, "version": 7}))
    return dk.from_config(path)


def _unknown_in_file(tmp_path):
    config = json.loads(dk.to_config(KD).model_dump_json())
    config["terms"][0]["loss"] = "kd_klx"
    return dk.from_config(json.dumps(config))


OTHER_CASES = [
    # algebra
    ("duplicate-term-names", lambda: KD + dk.kd_kl.on("logits").named("kd"), ValueError,
     r"Spec: duplicate term name 'kd'; give one of them another name with \.named"),
    ("unknown-option", lambda: dk.kd_kl.on("logits", temp=2.0), ValueError,
     r"kd_kl\.on: kd_kl has no option 'temp'; expected one of"),
    ("option-type", lambda: dk.kd_kl.on("logits", temperature=[2.0]), TypeError, r"kd_kl\.on: option temperature"),
    ("bad-selector", lambda: dk.kd_kl.on(3), ValueError, r"kd_kl\.on: expected a selector"),
    ("pair-on-single-loss", lambda: dk.cosine.on([("hidden", 0), ("hidden", 1)]), ValueError,
     r"cosine\.on: cosine is not a pair loss"),
    ("layers-mixed", lambda: dk.layers(dk.mmd, [(0, (1, 2))], feature="hidden"), ValueError,
     r"layers: expected both layers of an entry to be ints or both pairs"),
    ("layers-not-a-loss", lambda: dk.layers(len, [(0, 0)], feature="hidden"), TypeError,
     r"layers: expected a dk loss"),
    ("weight-nan", lambda: float("nan") * KD, ValueError, r"Term \* factor: expected a finite weight"),
    ("register-duplicate", lambda: dk.register_loss(lambda s, t: s, name="kd_kl"), ValueError,
     r"register_loss: a loss named 'kd_kl' is already registered"),
    ("proj-kind", lambda: dk.proj.Projection("gelu", 2, 3), ValueError, r"proj: expected kind to be one of"),
    ("make-step-spec-type", lambda: dk.make_step("kd"), TypeError, r"make_step: expected a dk term or spec"),
    # schedules and temperatures
    ("schedule-steps", lambda: S.linear(1.0, 0.0, steps=0), ValueError, r"linear: expected steps > 0, got 0"),
    ("schedule-boundaries", lambda: S.piecewise_constant([5, 3], [1.0, 2.0, 3.0]), ValueError,
     r"piecewise_constant: expected"),
    ("schedule-values", lambda: S.piecewise_constant([5], [1.0]), ValueError, r"piecewise_constant: expected"),
    ("schedule-nan", lambda: S.constant(float("nan")), ValueError, r"constant: expected value to be a finite"),
    ("join-lengths", lambda: S.join([S.constant(1.0)], [10]), ValueError, r"join: expected"),
    ("temperature-base", lambda: dk.temperature.flsw(0.0, 1.0, 1.0), ValueError, r"flsw: expected base to be > 0"),
    ("jsd-beta", lambda: dk.jsd.on("logits", beta=1.5) and dk.jsd(torch.zeros(2, 3), torch.zeros(2, 3), beta=1.5),
     ValueError, r"jsd: expected 0 <= beta <= 1, got 1\.5"),
    ("skew-alpha", lambda: dk.skew_kl(torch.zeros(2, 3), torch.zeros(2, 3), alpha=-1.0), ValueError,
     r"skew_kl: expected 0 <= alpha <= 1"),
    ("temperature-nan", lambda: dk.kd_ce(torch.zeros(2, 3), torch.zeros(2, 3), temperature=float("nan")),
     ValueError, r"kd_ce: expected temperature > 0"),
    # config files
    ("malformed-json", lambda: dk.from_config('{"kind": "spec", "version": 1, "terms": [}'), dk.ConfigError,
     r"line 1"),
    ("unknown-loss-in-file", lambda: _unknown_in_file(None), dk.ConfigError, r"terms\.0.*unknown loss 'kd_klx'"),
    ("extra-field", lambda: dk.from_config({**json.loads(dk.to_config(KD).model_dump_json()), "color": 1}),
     dk.ConfigError, r"color"),
    ("unknown-schedule-kind", lambda: dk.from_config({"kind": "spec", "version": 1, "terms": [
        {"loss": "kd_kl", "student": "logits", "weight": [{"kind": "sawtooth"}]}]}), dk.ConfigError,
     r"terms\.0\.weight\.0"),
    ("bad-schedule-arg-in-file", lambda: dk.from_config({"kind": "spec", "version": 1, "terms": [
        {"loss": "kd_kl", "student": "logits", "options": {"temperature": {"kind": "linear", "start": 1, "end": 2,
                                                                          "steps": -1}}}]}), dk.ConfigError,
     r"terms\.0\.options\.temperature"),
    ("missing-file", lambda: dk.from_config("/nonexistent/spec.json"), (FileNotFoundError, dk.ConfigError),
     r"spec\.json"),
    # TextBrewer configs
    ("tb-mixed-layers", lambda: dk.from_textbrewer({"intermediate_matches": [
        {"layer_T": [0, 1], "layer_S": 1, "feature": "hidden", "loss": "fsp", "weight": 1}]}), ValueError,
     r"from_textbrewer: intermediate_matches\.0"),
    ("tb-unknown-loss", lambda: dk.from_textbrewer({"intermediate_matches": [
        {"layer_T": 1, "layer_S": 1, "feature": "hidden", "loss": "hidden_l1", "weight": 1}]}), ValueError,
     r"from_textbrewer: intermediate_matches\.0\.loss"),
    ("tb-flsw-without-args", lambda: dk.from_textbrewer({"temperature_scheduler": "flsw"}), ValueError,
     r"from_textbrewer: temperature_scheduler"),
    ("tb-weight-scheduler-needs-steps", lambda: dk.from_textbrewer({"kd_loss_weight_scheduler": "linear_decay"}),
     ValueError, r"from_textbrewer: .*total_steps"),
    ("tb-kd-type", lambda: dk.from_textbrewer({"kd_loss_type": "kl"}), ValueError,
     r"from_textbrewer: kd_loss_type"),
    # losses directly
    ("loss-non-tensor", lambda: dk.kd_kl([1.0], torch.zeros(1)), TypeError, r"kd_kl: expected student logits"),
    ("loss-reduction", lambda: dk.hidden_mse(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg"), ValueError,
     r"hidden_mse: expected reduction to be one of"),
    ("ensemble-shapes", lambda: dk.ensemble([{"logits": torch.zeros(2, 3)}, {"logits": torch.zeros(2, 4)}]),
     ValueError, r"ensemble: expected the teachers' 'logits' to have one shape"),
    ("global-counts-key", lambda: dk.distributed.global_counts([{}], masks=["attention_mask"]), KeyError,
     r"global_counts: expected key 'attention_mask' in micro-batch 0"),
]


@pytest.mark.parametrize("compile_", [False, "aot_eager"], ids=["eager", "compiled"])
@pytest.mark.parametrize(("call", "error", "pattern"), [c[1:] for c in STEP_CASES], ids=[c[0] for c in STEP_CASES])
def test_step_catalogue(call, error, pattern, compile_):
    with pytest.raises(error, match=pattern) as info:
        call(compile_)
    assert isinstance(info.value, (ValueError, TypeError, KeyError))
    assert "torch._dynamo" not in type(info.value).__module__


@pytest.mark.parametrize(("call", "error", "pattern"), [c[1:] for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_api_catalogue(call, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        call()
    assert isinstance(info.value, (ValueError, TypeError, KeyError, FileNotFoundError))


def test_catalogue_is_big_enough():
    assert len(STEP_CASES) + len(OTHER_CASES) >= 40


@pytest.mark.parametrize("compile_", [False, "aot_eager"], ids=["eager", "compiled"])
def test_empty_and_fully_masked_batches_are_zero_not_nan(compile_):
    spec = KD + HID + dk.hard_ce.on("logits") + dk.attention_kl.on(("attention", 0), mask="attention_mask")
    empty = {k: (v[:0] if torch.is_tensor(v) else [x[:0] for x in v]) for k, v in outs().items()}
    out = run(spec, empty, empty, {"attention_mask": torch.ones(0, L, dtype=torch.bool),
                                   "labels": torch.zeros(0, L, dtype=torch.long)}, compile_=compile_)
    assert out.loss.item() == 0.0
    masked = run(spec, batch={"attention_mask": torch.zeros(B, L, dtype=torch.bool),
                              "labels": torch.full((B, L), -100)}, compile_=compile_)
    assert masked.loss.item() == 0.0
