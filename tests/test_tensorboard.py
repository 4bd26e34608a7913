"""dk.tensorboard.Writer: event files read back with TensorBoard's own reader; host transfers only on written steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils._python_dispatch import TorchDispatchMode

import distilkit as dk


def read(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in acc.Scalars(tag)]


def config_text(acc: EventAccumulator, tag: str = "config") -> str:
    (event,) = acc.Tensors(f"{tag}/text_summary")
    assert event.step == 0
    (text,) = event.tensor_proto.string_val
    text = text.decode()
    assert text.startswith("```json\n") and text.endswith("\n```"), text  # a Markdown code block in the TEXT tab
    return text.removeprefix("```json\n").removesuffix("\n```")


def hparams(acc: EventAccumulator) -> dict[str, object]:
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: getattr(value, value.WhichOneof("kind")) for key, value in info.hparams.items()}


class CountScalarReads(TorchDispatchMode):
    """Counts `aten._local_scalar_dense`: what `.item()`, `float(t)` and `bool(t)` run on a tensor."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_scalars_written_every_k_steps_with_exact_values(tmp_path):
    with dk.tensorboard.Writer(tmp_path, every=3) as writer:
        for i in range(10):
            writer.log(
                {
                    "loss": torch.tensor(0.25 * i),  # float32
                    "kd/loss": torch.tensor(1.0 + i, dtype=torch.bfloat16),
                    "kd/temperature": torch.tensor(4.0, dtype=torch.float64),
                    "tokens": torch.tensor(10 * i),  # int64
                    "kd/weight": 0.5,  # a Python number
                },
                i,
            )
    acc = read(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["kd/loss", "kd/temperature", "kd/weight", "loss", "tokens"]
    steps = [0, 3, 6, 9]
    assert scalars(acc, "loss") == [(0, 0.0), (3, 0.75), (6, 1.5), (9, 2.25)]
    assert scalars(acc, "kd/loss") == [(0, 1.0), (3, 4.0), (6, 7.0), (9, 10.0)]
    assert scalars(acc, "kd/temperature") == [(s, 4.0) for s in steps]
    assert scalars(acc, "tokens") == [(0, 0.0), (3, 30.0), (6, 60.0), (9, 90.0)]
    assert scalars(acc, "kd/weight") == [(s, 0.5) for s in steps]


def test_every_step_by_default(tmp_path):
    with dk.tensorboard.Writer(tmp_path) as writer:
        for i in range(4):
            writer.log({"loss": torch.tensor(float(i))}, i)
    assert scalars(read(tmp_path), "loss") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]


def test_skipped_steps_read_no_tensor_value(tmp_path):
    # A meta tensor has no data: any transfer or scalar read of it raises. Skipped steps only check metadata.
    meta = {"loss": torch.zeros((), device="meta"), "kd/weight": torch.ones((), device="meta", dtype=torch.bfloat16)}
    with dk.tensorboard.Writer(tmp_path, every=3) as writer:
        for i in (1, 2, 4, 5, 7):
            writer.log(meta, i)
        with pytest.raises((NotImplementedError, RuntimeError)):  # the same input is read on a written step
            writer.log(meta, 6)


def test_written_step_moves_all_metrics_in_one_transfer(tmp_path, monkeypatch):
    copies = []
    cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    metrics = {f"term{k}/loss": torch.tensor(float(k)) for k in range(6)} | {"tokens": torch.tensor(7)}
    with dk.tensorboard.Writer(tmp_path, every=2) as writer, CountScalarReads() as mode:
        writer.log(metrics, 1)
        assert (copies, mode.reads) == ([], 0)
        writer.log(metrics, 2)
    assert copies == [(7,)], "one stacked copy of the seven metrics"
    assert mode.reads == 0, "no per-metric .item()"
    assert scalars(read(tmp_path), "tokens") == [(2, 7.0)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_metrics_synchronise_once_and_only_on_written_steps(tmp_path):
    metrics = {f"term{k}/loss": torch.tensor(0.5 * k, device="cuda") for k in range(5)}
    metrics["tokens"] = torch.tensor(12, device="cuda")
    with dk.tensorboard.Writer(tmp_path, every=4) as writer:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
        try:
            for i in (1, 2, 3, 5):
                writer.log(metrics, i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with pytest.warns(UserWarning, match="synchroniz") as record:
                writer.log(metrics, 4)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in record if "synchroniz" in str(w.message)]) == 1
    acc = read(tmp_path)
    assert scalars(acc, "term3/loss") == [(4, 1.5)]
    assert scalars(acc, "tokens") == [(4, 12.0)]


def test_config_dict_round_trips_as_text_and_hparams(tmp_path):
    config = {
        "version": 1,
        "kind": "sum",
        "terms": [
            {"kind": "term", "loss": "kd_ce", "weight": 0.5, "options": {"temperature": 4.0, "t2_scale": True}},
            {"kind": "term", "loss": "hard_ce", "weight": 1, "mask": None, "layers": []},
        ],
    }
    with dk.tensorboard.Writer(tmp_path) as writer:
        writer.log_config(config)
        writer.log({"loss": 1.0}, 0)
    acc = read(tmp_path)
    text = config_text(acc)
    assert text == json.dumps(config, indent=2)
    assert json.loads(text) == config
    assert hparams(acc) == {
        "version": 1.0,
        "kind": "sum",
        "terms.0.kind": "term",
        "terms.0.loss": "kd_ce",
        "terms.0.weight": 0.5,
        "terms.0.options.temperature": 4.0,
        "terms.0.options.t2_scale": True,
        "terms.1.kind": "term",
        "terms.1.loss": "hard_ce",
        "terms.1.weight": 1.0,
    }


class FakeModel:
    """Duck-typed pydantic model: what `dk.to_config(spec)` returns."""

    def __init__(self, data):
        self.data = data

    def model_dump_json(self, *, indent=None):
        return json.dumps(self.data, indent=indent)


class FakeSpec:
    def __init__(self, data):
        self.data = data

    def to_config(self):
        return FakeModel(self.data)


def test_config_from_a_spec_a_pydantic_model_and_a_string(tmp_path):
    pydantic = pytest.importorskip("pydantic")

    class Model(pydantic.BaseModel):
        kind: str = "term"
        weight: float = 0.25

    data = {"kind": "term", "loss": "kd_kl", "temperature": 2.0}
    raw = '{"lr": 0.001,\n "batch": 32}'
    with dk.tensorboard.Writer(tmp_path) as writer:
        writer.log_config(FakeSpec(data))
        writer.log_config(Model(), tag="model", hparams=False)
        writer.log_config(raw, tag="train", hparams=False)
    acc = read(tmp_path)
    assert config_text(acc) == json.dumps(data, indent=2)
    assert config_text(acc, "model") == Model().model_dump_json(indent=2)
    assert config_text(acc, "train") == raw  # a JSON string is written unchanged
    assert hparams(acc) == {"kind": "term", "loss": "kd_kl", "temperature": 2.0}


def test_markdown_fence_outlasts_backticks_in_the_config(tmp_path):
    with dk.tensorboard.Writer(tmp_path) as writer:
        writer.log_config({"note": "use ```code```"}, hparams=False)
    (event,) = read(tmp_path).Tensors("config/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert text.startswith("````json\n") and text.endswith("\n````")


def test_not_rank_zero_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    log_dir = tmp_path / "run"
    with dk.tensorboard.Writer(log_dir) as writer:
        assert not writer.enabled
        writer.log({"loss": torch.zeros((), device="meta")}, 0)  # not even read
        writer.log_config({"a": 1})
        writer.flush()
        with pytest.raises(TypeError, match=r"tensorboard\.Writer: expected metrics\['loss'\]"):
            writer.log({"loss": "x"}, 0)  # input is still checked
    assert not log_dir.exists()


def test_closed_writer_and_lifecycle(tmp_path):
    writer = dk.tensorboard.Writer(tmp_path, every=2, flush_secs=1)
    assert "every=2" in repr(writer) and "open" in repr(writer)
    writer.log({"loss": 3.0}, 0)
    writer.flush()
    assert scalars(read(tmp_path), "loss") == [(0, 3.0)]
    writer.close()
    writer.close()  # idempotent
    writer.flush()
    with pytest.raises(RuntimeError, match=r"tensorboard\.Writer: expected an open writer, got one that is closed"):
        writer.log({"loss": 1.0}, 2)
    with pytest.raises(RuntimeError, match="closed"):
        writer.log_config({"a": 1})
    assert len(list(tmp_path.iterdir())) == 1  # no second event file


BAD = [
    # (id, call on an open writer, exception, message)
    ("metric-string", lambda w: w.log({"loss": "0.5"}, 0), TypeError, r"expected metrics\['loss'\] to be a number"),
    ("metric-none", lambda w: w.log({"loss": None}, 0), TypeError, r"expected metrics\['loss'\] to be a number"),
    ("metric-bool", lambda w: w.log({"ok": True}, 0), TypeError, r"expected metrics\['ok'\] to be a number"),
    (
        "metric-vector",
        lambda w: w.log({"loss": torch.ones(3)}, 1),
        ValueError,
        r"expected metrics\['loss'\] to be a 0-d tensor, got shape \(3,\)",
    ),
    ("metric-complex", lambda w: w.log({"z": torch.tensor(1j)}, 1), TypeError, r"expected metrics\['z'\] to be real"),
    ("metric-name", lambda w: w.log({3: 1.0}, 0), TypeError, r"expected metric names to be non-empty strings"),
    ("not-a-mapping", lambda w: w.log([1.0], 0), TypeError, r"expected metrics to be a mapping"),
    ("step-tensor", lambda w: w.log({}, torch.tensor(3)), TypeError, r"expected step to be an int, got a tensor"),
    ("step-float", lambda w: w.log({}, 3.0), TypeError, r"expected step to be an int, got 3\.0"),
    ("step-negative", lambda w: w.log({}, -1), ValueError, r"expected step >= 0, got -1"),
    ("config-list", lambda w: w.log_config([1, 2]), TypeError, r"expected a config \(a spec"),
    ("config-bad-json", lambda w: w.log_config("lr=0.1"), ValueError, r"expected the config string to be JSON text"),
    ("config-tensor", lambda w: w.log_config({"t": torch.ones(1)}), TypeError, r"expected a JSON-serialisable config"),
    ("config-nan", lambda w: w.log_config({"t": float("nan")}), ValueError, r"expected a JSON-serialisable config"),
    ("spec-no-model", lambda w: w.log_config(FakeSpec2()), TypeError, r"expected \.to_config\(\) to return a pydantic"),
    ("tag", lambda w: w.log_config({}, tag=""), TypeError, r"expected tag to be a non-empty string"),
]


class FakeSpec2:
    def to_config(self):
        return {"not": "a model"}


@pytest.mark.parametrize(("call", "exc", "message"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input(tmp_path, call, exc, message):
    with (
        dk.tensorboard.Writer(tmp_path, every=2) as writer,
        pytest.raises(exc, match=r"^tensorboard\.Writer: " + message),
    ):
        call(writer)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"every": 0}, ValueError, r"expected every to be an int >= 1, got 0"),
        ({"every": 2.5}, ValueError, r"expected every to be an int >= 1, got 2\.5"),
        ({"flush_secs": 0}, ValueError, r"expected flush_secs to be a number > 0, got 0"),
    ],
)
def test_bad_constructor_arguments(tmp_path, kwargs, exc, message):
    with pytest.raises(exc, match=r"^tensorboard\.Writer: " + message):
        dk.tensorboard.Writer(tmp_path, **kwargs)
    with pytest.raises(TypeError, match=r"^tensorboard\.Writer: expected log_dir to be a path, got None"):
        dk.tensorboard.Writer(None)


def test_second_hparams_write_is_refused(tmp_path):
    with dk.tensorboard.Writer(tmp_path) as writer:
        writer.log_config({"a": 1})
        with pytest.raises(ValueError, match=r"^tensorboard\.Writer: expected hparams=False"):
            writer.log_config({"b": 2})
        writer.log_config({"b": 2}, tag="more", hparams=False)
    acc = read(tmp_path)
    assert hparams(acc) == {"a": 1.0}
    assert json.loads(config_text(acc, "more")) == {"b": 2}


def test_import_distilkit_does_not_import_tensorboard():
    code = "import sys, distilkit; print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorboard'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
