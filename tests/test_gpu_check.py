"""The GPU check's dry run (``python -m benchmarks.gpu_check --dry-run``): every step runs its CPU-sized version and
the result files say so. It checks structure only — never speed — and writes into ``tmp_path``, never into
``benchmarks/results``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives in the source checkout, next to distilkit/
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402


def _numbers(x, path="$"):
    """Every number in a JSON document, with where it sits."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


def test_dry_run_records_every_step_and_target(tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = sorted(results.iterdir())
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out),
                           "--wheels", str(tmp_path / "no-wheels")],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(results.iterdir()) == before  # nothing written into the published results

    jsons, mds = sorted(out.glob("*.json")), sorted(out.glob("*.md"))
    assert len(jsons) == len(mds) == 1 and jsons[0].stem == mds[0].stem
    assert jsons[0].stem.startswith("gpu-check-cpu-") and jsons[0].stem.endswith("-dry-run")
    data = json.loads(jsons[0].read_text())
    assert data["schema"] == gpu_check.SCHEMA
    assert data["settings"]["dry_run"] is True and data["settings"]["complete"] is True
    assert data["machine"]["device"] == "cpu"

    steps = data["steps"]
    assert [s["name"] for s in steps] == gpu_check.STEP_NAMES
    for s in steps:
        assert s["outcome"] in gpu_check.OUTCOMES and s["outcome"] != "failed", s
        assert isinstance(s["time_s"], float) and 0 <= s["time_s"] < 240
        assert s["note"]
    assert data["step_counts"]["failed"] == 0

    targets = {t["id"]: t for t in data["targets"]}
    assert set(targets) == set(gpu_check.TARGETS)
    for tid, t in targets.items():
        assert t["name"] == gpu_check.TARGETS[tid][0] and t["met"] is None
        assert t["note"].startswith("dry run")
    for tid in ("step_vs_textbrewer", "kd_vs_floor"):  # TextBrewer is a dev dependency: these are measured
        assert targets[tid]["value"] > 0

    numbers = list(_numbers(data))
    assert numbers and all(math.isfinite(v) for _, v in numbers), [p for p, v in numbers if not math.isfinite(v)]
    suites = {r["suite"] for r in data["rows"]}
    assert {"step", "fused", "large"} <= suites

    md = mds[0].read_text()
    assert md.startswith("# distilkit GPU check — DRY RUN — cpu")
    for heading in ("## Steps", "## Targets", "## Machine", "## Whole step"):
        assert heading in md
    table = md[md.index("## Targets"):md.index("## Machine")]
    for name, _, _ in gpu_check.TARGETS.values():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert "| dry run |" in row and "| yes |" not in row and "| **no** |" not in row
    for s in gpu_check.STEP_NAMES:
        assert f"| {s} |" in md


def test_bad_calls_exit_2():
    assert gpu_check.main(["--dry-run", "--steps", "install,nope"]) == 2
    if not __import__("torch").cuda.is_available():
        assert gpu_check.main([]) == 2  # no CUDA device: the real check refuses to run


def test_pytest_summary_and_finite_tree():
    out = "....\n=========== 3 failed, 570 passed, 4 skipped, 2 warnings in 81.20s (0:01:21) ===========\n"
    line, counts = gpu_check._pytest_summary(out)
    assert line.startswith("3 failed") and counts == {"failed": 3, "passed": 570, "skipped": 4, "warnings": 2}
    assert gpu_check._pytest_summary("ImportError: no module\n") == ("", {})
    assert gpu_check._finite_tree({"a": [1.0, float("nan")], "b": (float("inf"), "x")}) == {"a": [1.0, None],
                                                                                           "b": [None, "x"]}
