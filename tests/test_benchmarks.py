"""Smoke test of the benchmark harness at tiny shapes: it runs every suite and writes result files of the documented
schema. It checks structure only — never speed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives in the source checkout, next to distilkit/
    sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as bench  # noqa: E402
from benchmarks.harness import SCHEMA  # noqa: E402

ROW_KEYS = {"suite", "name", "impl", "shape", "time_ms", "time_iqr_ms", "repeats", "bytes_moved", "gbps", "floor_ms",
            "floor_ratio", "peak_mb", "status", "note", "extra"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    stem = tmp_path_factory.mktemp("bench") / "smoke"
    code = bench.main(["--quick", "--no-compile", "--out", str(stem), "--loss", "kd_ce", "--loss", "mmd",
                       "--note", "smoke test"])
    assert code == 0
    return stem, json.loads(stem.with_suffix(".json").read_text())


def test_schema_and_machine(result):
    _, data = result
    assert data["schema"] == SCHEMA
    assert set(data) == {"schema", "machine", "settings", "floors", "rows", "summaries", "targets", "notes"}
    machine = data["machine"]
    for key in ("date", "device", "cpu", "logical_cpus", "torch_threads", "torch", "load_average_start",
                "load_average_end", "wall_time_s"):
        assert key in machine
    assert data["settings"]["quick"] is True and data["notes"] == ["smoke test"]
    floors = data["floors"]
    assert set(floors) == {"copy_gbps", "fresh_write_gbps", "exp_per_s", "matmul_gflops", "copy_mb"}
    assert all(isinstance(v, float) and v > 0 for v in floors.values())


def test_rows(result):
    _, data = result
    rows = data["rows"]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert {r["suite"] for r in rows} == {"losses", "large", "fused", "step"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["time_ms"] > 0 and math.isfinite(r["time_ms"]) for r in ok)
    losses = {(r["name"], r["impl"]) for r in rows if r["suite"] == "losses"}
    assert losses == {("kd_ce", "distilkit"), ("kd_ce", "distilkit chunked"), ("kd_ce", "naive"),
                      ("kd_ce", "textbrewer"), ("mmd", "distilkit"), ("mmd", "naive"), ("mmd", "textbrewer")}
    for r in (r for r in ok if r["suite"] == "losses"):
        assert r["floor_ms"] > 0 and r["floor_ratio"] == pytest.approx(r["time_ms"] / r["floor_ms"])
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / r["time_ms"] / 1e6)
    step = {r["impl"] for r in rows if r["suite"] == "step"}
    assert step == {"distilkit make_step eager", "textbrewer compute_loss", "floor: matrix products"}
    kd = {r["impl"] for r in rows if r["name"] == "kd_target"}
    assert kd == {"distilkit kd_kl plain call (T=2, default impl)",
                  "distilkit kd_kl plain call (T=2, default impl) reusing gradient memory", "distilkit chunked kd_ce",
                  "distilkit chunked kd_ce (torch chunk loop)", "distilkit kd_ce (dense eager)",
                  "textbrewer kd_ce_loss"}  # (the compiled row only with --compile)


def test_targets_are_never_judged_at_tiny_shapes(result):
    _, data = result
    targets = data["targets"]
    assert targets and all(set(t) == {"name", "value", "goal", "met", "note"} for t in targets)
    assert all(t["met"] is None for t in targets)
    assert any("GPU" in t["name"] for t in targets) or data["machine"]["device"].startswith("cuda")


def test_markdown(result):
    stem, data = result
    text = stem.with_suffix(".md").read_text()
    assert text.startswith("# distilkit benchmarks")
    for heading in ("## Machine", "## Floors", "## Targets", "## Whole step", "## Every loss"):
        assert heading in text
    assert data["machine"]["cpu"] in text


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--suite", "nope"])
