"""The ``distilkit`` command: in-process through ``main(argv)``, and once as the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import distilkit as dk
from distilkit import cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("distilkit"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def good_spec():
    return (dk.kd_ce.on("logits", temperature=2.0).named("kd")
            + 0.5 * dk.hidden_mse.on(("hidden", 0), ("hidden", 2), proj=dk.proj.linear(16, 32))
            + dk.hard_ce.on("logits", labels="labels"))


TEXTBREWER = {"temperature": 8, "intermediate_matches": [
    {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 312, 768]}]}


# ------------------------------------------------------------------------------------------------ top level
def test_version_help_and_bare_command(capsys):
    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"distilkit {dk.__version__}"
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for command in ("demo", "validate", "schema", "convert-textbrewer", "bench"):
        assert command in out
    status, out, err = run(capsys)
    assert status == 2 and out == "" and "usage: distilkit" in err and "convert-textbrewer" in err


@pytest.mark.parametrize(("argv", "fragment"), [
    (["frob"], "invalid choice: 'frob'"),
    (["--nope"], "unrecognized arguments: --nope"),
    (["validate"], "required: SPEC.json"),
    (["validate", "a.json", "b.json"], "unrecognized arguments: b.json"),
    (["demo", "--seeds", "0"], "--seeds: expected a positive integer, got '0'"),
    (["demo", "--seeds", "three"], "--seeds: expected a positive integer, got 'three'"),
    (["convert-textbrewer", "c.json", "--total-steps", "-3"], "--total-steps: expected a positive integer"),
    (["schema", "extra"], "unrecognized arguments: extra"),
])
def test_bad_arguments_give_one_line_and_status_2(capsys, argv, fragment):
    status, out, err = run(capsys, *argv)
    assert out == ""
    assert_one_line_error(status, err, fragment)


def test_installed_console_script(tmp_path):
    script = Path(sys.executable).with_name("distilkit")
    script = script if script.is_file() else shutil.which("distilkit")
    if script is None:
        pytest.skip("the distilkit console script is not installed (pip install -e .)")
    result = subprocess.run([str(script), "validate", "missing.json"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert_one_line_error(result.returncode, result.stderr, "distilkit validate: missing.json: no such file")
    assert result.stdout == ""


# ------------------------------------------------------------------------------------------------ validate, schema
def test_validate_prints_the_normalised_spec(capsys, tmp_path):
    spec = good_spec()
    path = tmp_path / "spec.json"
    path.write_text(dk.to_config(spec).model_dump_json())  # compact, as a user might write it
    status, out, err = run(capsys, "validate", str(path))
    assert status == 0, err
    assert out.strip() == dk.to_config(spec).model_dump_json(indent=2)
    assert dk.from_config(out) == spec


def test_validate_fills_in_defaults(capsys, tmp_path):
    path = tmp_path / "short.json"
    path.write_text(json.dumps({"version": 1, "terms": [{"loss": "kd_kl", "student": "logits"}]}))
    status, out, _ = run(capsys, "validate", str(path))
    assert status == 0
    term = json.loads(out)["terms"][0]
    assert term["loss"] == "kd_kl" and term["name"] == "kd_kl" and term["weight"] == [] and term["proj"] is None


@pytest.mark.parametrize(("content", "fragments"), [
    (None, ["missing.json: no such file"]),
    ('{"version": 1, "terms": [', ["malformed JSON at line 1"]),
    ("[1, 2]", ["expected a JSON object", "got a JSON list"]),
    ('{"version": 1, "terms": [{"loss": "nope", "student": "logits"}]}', ["terms.0.loss: unknown loss 'nope'"]),
    ('{"version": 1, "terms": [{"loss": "kd_ce", "student": "logits", "weight": "x"}]}', ["terms.0.weight:"]),
    ('{"version": 1, "terms": [{"loss": "kd_ce", "student": "logits", "colour": 1}]}', ["terms.0.colour:"]),
])
def test_validate_bad_files_give_one_line_and_status_2(capsys, tmp_path, content, fragments):
    path = tmp_path / "missing.json"
    if content is not None:
        path.write_text(content)
    status, out, err = run(capsys, "validate", str(path))
    assert out == ""
    assert_one_line_error(status, err, f"distilkit validate: {path}", *fragments)


def test_validate_lists_every_problem_with_its_path(capsys, tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"version": 1, "terms": [
        {"loss": "kd_ce", "student": "logits", "weight": "x"},
        {"loss": "kd_kl", "student": "logits", "mask": 3}]}))
    status, out, err = run(capsys, "validate", str(path))
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and "Traceback" not in err
    assert len(lines) == 2, err
    assert "terms.0.weight:" in lines[0] and "terms.1.mask:" in lines[1], err


def test_schema_is_json_schema_that_accepts_spec_files(capsys):
    status, out, _ = run(capsys, "schema")
    assert status == 0
    schema = json.loads(out)
    assert schema == json.loads(json.dumps(dk.config.schema()))
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(dk.to_config(good_spec()).model_dump_json()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "terms": [{"loss": "kd_ce"}]}, schema)  # no student selector


# ------------------------------------------------------------------------------------------------ convert-textbrewer
def test_convert_textbrewer_to_stdout_and_file(capsys, tmp_path):
    config = tmp_path / "textbrewer.json"
    config.write_text(json.dumps(TEXTBREWER))
    expected = dk.from_textbrewer(TEXTBREWER)

    status, out, err = run(capsys, "convert-textbrewer", str(config))
    assert status == 0, err
    assert dk.from_config(out) == expected

    target = tmp_path / "spec.json"
    status, out, err = run(capsys, "convert-textbrewer", str(config), "-o", str(target))
    assert status == 0 and out == "" and str(target) in err
    assert dk.from_config(target) == expected
    names = [t["name"] for t in json.loads(target.read_text())["terms"]]
    assert names == ["kd", "hidden_hidden_mse_1_2"]

    status, out, _ = run(capsys, "validate", str(target))  # the converted file validates
    assert status == 0 and dk.from_config(out) == expected


def test_convert_textbrewer_total_steps_for_weight_schedulers(capsys, tmp_path):
    config = tmp_path / "sched.json"
    config.write_text(json.dumps({**TEXTBREWER, "kd_loss_weight_scheduler": "linear_decay"}))
    status, _, err = run(capsys, "convert-textbrewer", str(config))
    assert_one_line_error(status, err, "sched.json", "total_steps")
    status, out, err = run(capsys, "convert-textbrewer", str(config), "--total-steps", "100")
    assert status == 0, err
    assert dk.from_config(out) == dk.from_textbrewer({**TEXTBREWER, "kd_loss_weight_scheduler": "linear_decay"},
                                                     total_steps=100)


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "no such file"),
    ("{temperature: 8}", "malformed JSON"),
    (json.dumps({"temperature": 8, "colour": 1}), "colour"),
    (json.dumps({"intermediate_matches": [{**TEXTBREWER["intermediate_matches"][0], "loss": "nope"}]}),
     "intermediate_matches.0.loss"),
])
def test_convert_textbrewer_bad_files(capsys, tmp_path, content, fragment):
    path = tmp_path / "tb.json"
    if content is not None:
        path.write_text(content)
    status, out, err = run(capsys, "convert-textbrewer", str(path))
    assert out == ""
    assert_one_line_error(status, err, "distilkit convert-textbrewer:", fragment)


# ------------------------------------------------------------------------------------------------ bench
def test_bench_outside_a_clone_says_so(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_benchmarks_dirs", lambda: [])
    status, out, err = run(capsys, "bench", "--help")
    assert out == ""
    assert_one_line_error(status, err, "distilkit bench:", "clone of the repository")


@pytest.fixture
def fresh_benchmarks_module():
    saved = {k: v for k, v in sys.modules.items() if k == "benchmarks" or k.startswith("benchmarks.")}
    for k in saved:
        del sys.modules[k]
    yield
    for k in [k for k in sys.modules if k == "benchmarks" or k.startswith("benchmarks.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_bench_passes_the_rest_of_the_arguments_on(capsys, monkeypatch, tmp_path, fresh_benchmarks_module):
    package = tmp_path / "benchmarks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "def main(argv):\n    print('bench got', argv)\n    return 3\n")
    monkeypatch.chdir(tmp_path)  # the current directory is searched first
    status, out, _ = run(capsys, "bench", "--loss", "kd_kl", "--help")
    assert status == 3
    assert out.strip() == "bench got ['--loss', 'kd_kl', '--help']"
    assert str(tmp_path) not in sys.path


# ------------------------------------------------------------------------------------------------ demo
def test_demo_quick_writes_summary_and_tensorboard_logs(capsys, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tmp_path / "demo"
    status, out, err = run(capsys, "demo", "--quick", "--out", str(out_dir))
    assert status == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert isinstance(summary["dataset"], str) and "digits" in summary["dataset"]
    assert isinstance(summary["teacher_accuracy"], float) and 0 <= summary["teacher_accuracy"] <= 1
    for key in ("student_kd_accuracy", "student_baseline_accuracy"):
        values = summary[key]
        assert isinstance(values, list) and len(values) == 1, key  # --quick: one seed
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in values), key
    assert summary["quick"] is True and summary["seeds"] == [0]
    assert summary["test_examples"] + summary["train_examples"] == 1797  # the whole digits data set
    for line in ("teacher", "KD student", "baseline student"):
        assert line in out
    assert "tensorboard --logdir" in out

    runs = {p.parent.relative_to(out_dir).as_posix() for p in out_dir.rglob("events.out.tfevents.*")}
    assert runs == {"teacher", "seed0/kd", "seed0/baseline"}
    kd = EventAccumulator(str(out_dir / "seed0" / "kd"), size_guidance={"scalars": 0, "tensors": 0})
    kd.Reload()
    tags = set(kd.Tags()["scalars"])
    assert {"loss", "kd/loss", "kd/temperature", "feature/loss", "hard/loss", "accuracy/held_out"} <= tags
    (accuracy,) = kd.Scalars("accuracy/held_out")
    assert accuracy.value == pytest.approx(summary["student_kd_accuracy"][0])
    (text,) = kd.Tensors("config/text_summary")  # log_config(spec): the KD spec as JSON text
    config = text.tensor_proto.string_val[0].decode().removeprefix("```json\n").removesuffix("\n```")
    assert dk.from_config(config) == dk.from_config(summary["kd_spec"])


def test_demo_out_must_be_a_directory(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    status, out, err = run(capsys, "demo", "--quick", "--out", str(target))
    assert out == ""
    assert_one_line_error(status, err, "distilkit demo:", "not a directory")
