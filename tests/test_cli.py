"""The ``distilkit`` command: in-process through ``main(argv)``, and once as the installed console script."""

from __future__ import annotations

import dataclasses
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


def assert_usage_error(status: int, err: str, command: str, fragment: str) -> None:
    """One line naming ``command`` and pointing at its ``--help``, then that command's usage; status 2."""
    assert status == 2, err
    assert "Traceback" not in err
    first, *usage = err.strip().splitlines()
    assert first.startswith(f"{command}: "), err
    assert fragment in first, (fragment, err)
    assert first.endswith(f"(see '{command} --help')"), err
    assert usage and usage[0].startswith(f"usage: {command} "), err
    assert f"usage: {command} " not in "".join(usage[1:]), err


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
    for command in ("demo", "doctor", "validate", "schema", "convert-textbrewer", "bench"):
        assert command in out
    status, out, err = run(capsys)
    assert status == 2 and out == "" and "usage: distilkit" in err and "convert-textbrewer" in err


@pytest.mark.parametrize(("argv", "command", "fragment"), [
    (["frob"], "distilkit", "invalid choice: 'frob'"),
    (["--nope"], "distilkit", "unrecognized arguments: --nope"),
    (["validate"], "distilkit validate", "required: SPEC.json"),
    (["validate", "a.json", "b.json"], "distilkit validate", "unrecognized arguments: b.json"),
    (["demo", "--seeds", "0"], "distilkit demo", "--seeds: expected a positive integer, got '0'"),
    (["demo", "--seeds", "three"], "distilkit demo", "--seeds: expected a positive integer, got 'three'"),
    (["demo", "--quick", "--fast"], "distilkit demo", "unrecognized arguments: --fast"),
    (["demo", "gpt"], "distilkit demo", "invalid choice: 'gpt' (choose from 'digits', 'lm')"),
    (["demo", "lm", "--seeds", "0"], "distilkit demo", "--seeds: expected a positive integer, got '0'"),
    (["convert-textbrewer", "c.json", "--total-steps", "-3"], "distilkit convert-textbrewer",
     "--total-steps: expected a positive integer"),
    (["schema", "extra"], "distilkit schema", "unrecognized arguments: extra"),
    (["doctor", "--timeout", "0"], "distilkit doctor", "--timeout: expected a positive number, got '0'"),
    (["doctor", "--timeout", "inf"], "distilkit doctor", "--timeout: expected a positive number"),
    (["doctor", "now"], "distilkit doctor", "unrecognized arguments: now"),
])
def test_bad_arguments_give_one_line_then_the_usage_of_their_command(capsys, argv, command, fragment):
    status, out, err = run(capsys, *argv)
    assert out == ""
    assert_usage_error(status, err, command, fragment)
    if command != "distilkit":  # the subcommand's usage, not the top-level one
        assert "COMMAND" not in err and "usage: distilkit [-h]" not in err


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
    ("[1, 2]", ["expected a JSON object", "got a JSON array"]),
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
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_quick_writes_a_fresh_run_folder(capsys, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    parent = tmp_path / "demo"
    status, out, err = run(capsys, "demo", "--quick", "--out", str(parent))
    assert status == 0, err
    (run_dir,) = parent.iterdir()  # one new folder per run, named by its start time
    assert run_dir.name.endswith("-quick")
    assert {p.name for p in run_dir.iterdir()} == {"summary.json", "curves.png", "teacher", "seed0"}
    summary = json.loads((run_dir / "summary.json").read_text())
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
    assert f"wrote {run_dir}" in out and f"tensorboard --logdir {parent}" in out
    assert "WARNING: --quick" in out and "mean nothing" in out  # 20-step numbers are not a result
    assert "took" in out

    # held-out accuracy is a curve: before training, every eval_every (5 with --quick) steps, after the last
    curves = summary["curves"]
    assert curves["teacher"]["steps"] == curves["kd"]["steps"] == curves["baseline"]["steps"] == [0, 5, 10, 15, 20]
    assert curves["teacher"]["accuracy"][-1] == summary["teacher_accuracy"]
    assert [c[-1] for c in curves["kd"]["accuracy"]] == summary["student_kd_accuracy"]
    assert [c[-1] for c in curves["baseline"]["accuracy"]] == summary["student_baseline_accuracy"]
    assert summary["plot"] == "curves.png" and summary["plot_note"] is None
    assert (run_dir / "curves.png").read_bytes().startswith(PNG_MAGIC)

    runs = {p.parent.relative_to(run_dir).as_posix() for p in run_dir.rglob("events.out.tfevents.*")}
    assert runs == {"teacher", "seed0/kd", "seed0/baseline"}
    kd = EventAccumulator(str(run_dir / "seed0" / "kd"), size_guidance={"scalars": 0, "tensors": 0})
    kd.Reload()
    tags = set(kd.Tags()["scalars"])
    assert {"loss", "kd/loss", "kd/temperature", "feature/loss", "hard/loss", "accuracy/held_out"} <= tags
    logged = [(e.step, e.value) for e in kd.Scalars("accuracy/held_out")]
    assert [step for step, _ in logged] == curves["kd"]["steps"]
    assert [value for _, value in logged] == pytest.approx(curves["kd"]["accuracy"][0])
    (text,) = kd.Tensors("config/text_summary")  # log_config(spec): the KD spec as JSON text
    config = text.tensor_proto.string_val[0].decode().removeprefix("```json\n").removesuffix("\n```")
    assert dk.from_config(config) == dk.from_config(summary["kd_spec"])


def test_demo_run_folders_never_mix(tmp_path):
    from distilkit import demo

    first, second = demo.new_run_dir(tmp_path / "runs"), demo.new_run_dir(tmp_path / "runs")
    assert first != second and first.parent == second.parent == tmp_path / "runs"
    assert not any(first.iterdir()) and not any(second.iterdir())
    assert sorted([second.name, first.name]) == [first.name, second.name]  # names sort by start time
    assert demo.new_run_dir(tmp_path / "runs", quick=True).name.endswith("-quick")
    (first / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"demo\.run: expected out to be a new or empty directory.*holds files"):
        demo.run(first, quick=True, progress=False)
    with pytest.raises(ValueError, match=r"demo\.run: expected seeds to be an int >= 1"):
        demo.run(second, seeds=0)


def test_demo_plot_is_optional(monkeypatch, tmp_path):
    from distilkit import demo

    curve = {"steps": [0, 10, 20], "accuracy": [[0.1, 0.8, 0.9], [0.1, 0.7, 0.95]]}
    summary = {"recipe": dataclasses.asdict(demo.Recipe()), "seeds": [0, 1], "quick": False,
               "curves": {"teacher": {"steps": [0, 10, 20], "accuracy": [0.1, 0.9, 0.97]}, "kd": curve,
                          "baseline": curve}}
    assert demo.plot_curves(summary, tmp_path / "curves.png") is None
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # as if matplotlib were missing
    note = demo.plot_curves(summary, tmp_path / "missing.png")
    assert note is not None and "needs matplotlib" in note and "pip install 'distilkit[demo]'" in note
    assert not (tmp_path / "missing.png").exists()


def test_demo_out_must_be_a_directory(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    status, out, err = run(capsys, "demo", "--quick", "--out", str(target))
    assert out == ""
    assert_one_line_error(status, err, "distilkit demo:", "not a directory")


# ------------------------------------------------------------------------------------------------ doctor
DOCTOR_LABELS = ["distilkit", "python", "torch", "devices", "C compiler", "C++ compiler", "CPU kernel", "kernel cache",
                 "gradient reuse", "environment", "packages", "torch.compile"]


def doctor_lines(text: str) -> dict[str, str]:
    lines = text.strip().splitlines()
    labels = [line.split(":", 1)[0] for line in lines]
    assert labels == DOCTOR_LABELS, text
    return {label: line.split(":", 1)[1].strip() for label, line in zip(labels, lines, strict=True)}


def test_doctor_reports_this_installation(capsys):
    import torch

    from distilkit.losses import _cpu_kernel

    status, out, err = run(capsys, "doctor", "--no-compile")
    assert status == 0, err
    report = doctor_lines(out)
    assert report["distilkit"].startswith(dk.__version__)
    assert report["torch"].startswith(torch.__version__)
    assert report["devices"].startswith("cpu: ") and "torch threads" in report["devices"]
    assert ("cuda: not available" in report["devices"]) == (not torch.cuda.is_available())
    kernel = _cpu_kernel.status()
    assert kernel in report["CPU kernel"]
    if _cpu_kernel.available():
        assert report["CPU kernel"].startswith("built") and report["kernel cache"].endswith(".so")
        assert Path(report["kernel cache"]).is_file()
    else:
        assert report["CPU kernel"].startswith("not used")
    assert report["gradient reuse"].startswith(dk.backends.report()["reuse_gradient_memory"] + " ")
    assert report["torch.compile"] == "not checked (--no-compile)"
    assert "pydantic " in report["packages"]


@pytest.mark.parametrize(("env", "kernel", "compiler"), [
    ({"DISTILKIT_CPU_KERNEL": "0"}, "not used (switched off by DISTILKIT_CPU_KERNEL=0)", None),
    ({"CC": "/nonexistent/cc"}, "not used (unavailable: ", "none found ($CC=/nonexistent/cc is not an executable"),
])
def test_doctor_says_why_the_kernel_is_not_used(tmp_path, env, kernel, compiler):
    import os

    full = {k: v for k, v in os.environ.items() if k not in ("DISTILKIT_CPU_KERNEL", "CC")}
    full.update(DISTILKIT_CACHE_DIR=str(tmp_path / "cache"), **env)
    result = subprocess.run([sys.executable, "-m", "distilkit", "doctor", "--no-compile"], cwd=tmp_path, env=full,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = doctor_lines(result.stdout)
    assert report["CPU kernel"].startswith(kernel), report["CPU kernel"]
    assert str(tmp_path / "cache") in report["kernel cache"]
    if compiler is not None:
        assert report["C compiler"].startswith(compiler), report["C compiler"]
    for name, value in env.items():
        assert f"{name}={value}" in report["environment"]


@pytest.mark.parametrize(("code", "expected"), [
    ("print('compiled ok')", "works ("),
    ("raise RuntimeError('no C++ compiler here')", "fails: RuntimeError: no C++ compiler here"),
    ("import sys; sys.exit(3)", "fails: exit status 3"),
    ("print('something else')", "fails: exit status 0"),
    ("import time; time.sleep(120)", "unknown: no answer within 1 s"),
])
def test_doctor_compile_probe_outcomes(code, expected):
    assert cli._compile_probe(1.0 if "sleep" in code else 60.0, code).startswith(expected)


@pytest.mark.slow
def test_doctor_compile_check_works_here(capsys):
    """The real probe: a tiny torch.compile(fullgraph=True) in a fresh process (the test suite compiles too)."""
    assert cli._compile_probe(600.0).startswith("works (")


# ------------------------------------------------------------------------------------------------ bench --quick
def test_bench_quick_writes_into_runs_of_the_current_directory(capsys, monkeypatch, tmp_path,
                                                               fresh_benchmarks_module):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks import __main__ as bench
    from benchmarks.harness import device_slug

    status, out, err = run(capsys, "bench", "--quick", "--suite", "losses", "--loss", "kd_kl", "--device", "cpu")
    assert status == 0, err
    stem = tmp_path / "runs" / "bench" / f"{device_slug(torch_cpu())}-quick"
    assert bench.default_stem(torch_cpu(), True) == stem
    data = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".md").is_file()
    assert data["settings"]["quick"] is True and data["settings"]["compile"] is False  # --quick: no compilation
    impls = {r["impl"] for r in data["rows"]}
    assert impls and not any("compiled" in impl for impl in impls)
    assert "a smoke test" in out and "--compile adds them" in out
    assert bench.default_stem(torch_cpu(), False) == bench.RESULTS / device_slug(torch_cpu())  # full runs: results/


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_cache_info(tmp_path, capsys):
    """`distilkit cache info DIR`: coverage (kept mass) and size of a keyed top-k cache, as text or JSON."""
    import torch

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 30, generator=gen)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    dk.cache.write_topk(tmp_path / "c", [(torch.tensor([7, 9]), logits, keep)], k=4)
    status, out, _ = run(capsys, "cache", "info", str(tmp_path / "c"), "--json")
    assert status == 0
    mass = torch.softmax(logits, -1).topk(4).values.sum(-1)[keep]  # the kept mass, from the formula
    assert f"{100 * mass.mean().item():.2f} %" in run(capsys, "cache", "info", str(tmp_path / "c"))[1]
    assert json.loads(out)  # (valid JSON)
    shown = run(capsys, "cache", "info", str(tmp_path / "c"))[1]
    assert "8 stored" in shown and "bytes/position" in shown  # 8 kept positions stored (no padding)
    status, _, err = run(capsys, "cache", "info", str(tmp_path / "missing"))
    assert status == 2 and err.startswith("distilkit cache info: ") and len(err.strip().splitlines()) == 1
