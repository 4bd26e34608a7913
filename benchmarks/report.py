"""Targets from the measured rows, and the ``.json`` / ``.md`` result files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .harness import SCHEMA, Row
from .large import PLAIN, PLAIN_COMPILED

GPU_TARGETS = [
    "GPU kd fwd+bwd at LLM shapes (up to 8192 × 128k): against the floor and TextBrewer",
    "GPU T4-tiny whole step: against the matrix-product floor and TextBrewer",
    "GPU peak memory of fused_linear_kd at 8192 × 128,256 with LLM widths",
]


def _target(name: str, value: float | None, goal: str, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"name": name, "value": None if value is None else round(value, 3), "goal": goal, "met": met,
            "note": note}


def evaluate_targets(device_type: str, summaries: dict[str, dict]) -> list[dict[str, Any]]:
    targets = []
    kd = summaries.get("kd_target")
    for how, name in (("", PLAIN), (", compiled", PLAIN_COMPILED)):
        plain = kd and kd.get(name)
        if device_type != "cpu" or not plain:
            continue
        theirs = kd.get("textbrewer kd_ce_loss")
        if theirs:
            targets.append(_target(f"CPU kd 2048×32k fwd+bwd, the plain call dk.kd_kl(s, t, temperature=2.0){how}, "
                                   "fresh gradient: speed-up over TextBrewer kd_ce_loss", theirs / plain, ">= 8",
                                   theirs / plain >= 8, f"{theirs:.1f} ms / {plain:.1f} ms"))
        ratio = plain / kd["floor_fresh_ms"]
        targets.append(_target(f"CPU kd 2048×32k fwd+bwd, the plain call{how}, fresh gradient: time / floor (max of "
                               "memory with a fresh gradient write, exp)", ratio, "<= 1.5", ratio <= 1.5,
                               f"{plain:.1f} ms / {kd['floor_fresh_ms']:.1f} ms (memory read + fresh write "
                               f"{kd['memory_fresh_ms']:.1f} ms, exp {kd['exp_ms']:.1f} ms)"))
    if device_type == "cpu" and kd:
        ours = kd.get("distilkit chunked kd_ce")
        theirs = kd.get("textbrewer kd_ce_loss")
        if ours and theirs:
            speedup = theirs / ours
            targets.append(_target("CPU kd 2048×32k fwd+bwd: speed-up over TextBrewer kd_ce_loss", speedup, ">= 8",
                                   speedup >= 8, f"{theirs:.1f} ms / {ours:.1f} ms"))
        if ours:
            ratio = ours / kd["floor_ms"]
            targets.append(_target("CPU kd 2048×32k fwd+bwd: time / floor (max of memory, exp)", ratio, "<= 1.5",
                                   ratio <= 1.5, f"{ours:.1f} ms / {kd['floor_ms']:.1f} ms (memory "
                                                 f"{kd['memory_ms']:.1f} ms, exp {kd['exp_ms']:.1f} ms; "
                                                 f"x{ours / kd['sum_ms']:.2f} of their sum)"))
    step = summaries.get("step")
    if device_type == "cpu" and step and "distilkit make_step compiled" in step:
        ours = step["distilkit make_step compiled"]
        ratio = ours / step["floor_ms"]
        targets.append(_target("CPU T4-tiny step fwd+bwd: time / matrix-product floor", ratio, "<= 1.1",
                               ratio <= 1.1, f"{ours:.1f} ms / {step['floor_ms']:.1f} ms"))
        theirs = step.get("textbrewer compute_loss")
        if theirs:
            targets.append(_target("CPU T4-tiny step fwd+bwd: time / TextBrewer compute_loss", ours / theirs, "<= 1.0",
                                   ours <= theirs, f"{ours:.1f} ms / {theirs:.1f} ms"))
    peak = summaries.get("fused_peak")
    if peak and peak.get("peak_mb") is not None:
        # + 1 MiB: the per-row vectors ([N] values, a mask) and the resident-set page granularity
        bound = peak["grads_mb"] + peak["chunk_mb"] + 1.0
        targets.append(_target(
            "fused_linear_kd 8192×128,256 peak memory above the inputs (MB)", peak["peak_mb"],
            f"<= gradients {peak['grads_mb']:.1f} + one chunk {peak['chunk_mb']:.1f} (+1 MB per-row vectors) "
            f"= {bound:.1f} MB", peak["peak_mb"] <= bound,
            f"inputs {peak['inputs_mb']:.0f} MB; one dense logits tensor would be "
            f"{peak['dense_logits_mb_each']:.0f} MB"))
    if device_type == "cpu":
        targets += [_target(name, None, "-", None, "unmeasured: no GPU in this session") for name in GPU_TARGETS]
    return targets


def write(path_stem: Path, machine: dict, settings: dict, floors: dict | None, rows: list[Row],
          summaries: dict, targets: list[dict], notes: list[str] | None = None) -> tuple[Path, Path]:
    data = {"schema": SCHEMA, "machine": machine, "settings": settings, "floors": floors,
            "rows": [r.to_json() for r in rows], "summaries": summaries, "targets": targets, "notes": notes or []}
    return write_data(path_stem, data, markdown)


def write_data(path_stem: Path, data: dict, to_markdown) -> tuple[Path, Path]:
    """``<stem>.json`` (``data``) and ``<stem>.md`` (``to_markdown(data)``): every results file is written here."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = path_stem.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1, default=_default) + "\n")
    md_path = path_stem.with_suffix(".md")
    md_path.write_text(to_markdown(data))
    return json_path, md_path


def notes_lines(data: dict) -> list[str]:
    """The results markdown's closing "Notes" section (none without notes)."""
    return ["## Notes", "", *(f"- {note}" for note in data["notes"]), ""] if data.get("notes") else []


def _default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def fmt(v, digits=2) -> str:
    """A table cell: ``–`` for None, floats with ``digits`` decimals."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(data: dict) -> str:
    m = data["machine"]
    what = m.get("gpu") or f"{m.get('cpu')}, {m.get('torch_threads')} threads"
    lines = [f"# distilkit benchmarks — {m.get('device')} ({what})", ""]
    lines += ["## Machine", ""]
    for key in ("date", "cpu", "logical_cpus", "cpus_usable", "torch_threads", "cpu_capability", "caches",
                "memory_gb", "gpu", "gpu_memory_gb", "cuda", "torch", "textbrewer", "python", "platform",
                "load_average_start", "load_average_end", "transparent_hugepages", "THP_MEM_ALLOC_ENABLE",
                "distilkit_cpu_kernel"):
        if key in m:
            lines.append(f"- **{key}**: {m[key]}")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in data["settings"].items()), ""]
    if data.get("floors"):
        f = data["floors"]
        lines += ["## Floors (measured in this run)", "",
                  f"- memory copy: {f['copy_gbps']:.2f} GB/s (bytes read + written, {f['copy_mb']:.0f} MB tensors)",
                  f"- writing freshly allocated memory: {f['fresh_write_gbps']:.2f} GB/s",
                  f"- exp: {f['exp_per_s'] / 1e9:.2f} G/s",
                  f"- float32 matrix product: {f['matmul_gflops']:.1f} GFLOP/s",
                  ""]
    lines += ["## Targets", "", "| target | value | goal | met | note |", "|---|---|---|---|---|"]
    for t in data["targets"]:
        met = {True: "yes", False: "**no**", None: "unmeasured"}[t["met"]]
        lines.append(f"| {t['name']} | {fmt(t['value'], 3)} | {t['goal']} | {met} | {t['note']} |")
    lines.append("")
    suites = {}
    for r in data["rows"]:
        suites.setdefault(r["suite"], []).append(r)
    titles = {"losses": "Every loss, forward + backward", "large": "Large vocabularies",
              "fused": "fused_linear_kd", "step": "Whole step: TextBrewer T4-tiny"}
    for suite, rows in suites.items():
        lines += [f"## {titles.get(suite, suite)}", "",
                  "| loss | implementation | shape | time ms | IQR ms | n | GB/s | floor ms | × floor | peak MB "
                  "| note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
            lines.append(
                f"| {r['name']} | {r['impl']} | {r['shape']} | {fmt(r['time_ms'])} | {fmt(r['time_iqr_ms'])} | "
                f"{r['repeats']} | {fmt(r['gbps'])} | {fmt(r['floor_ms'])} | {fmt(r['floor_ratio'])} | "
                f"{fmt(r['peak_mb'], 1)} | {note} |")
        lines.append("")
    return "\n".join(lines + notes_lines(data))
