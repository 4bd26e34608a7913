"""The documentation: ``mkdocs build --strict`` succeeds (API pages from the docstrings), and every python code block
in docs/ runs as written (the blocks of a page share one namespace, in order)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def _blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text(encoding="utf-8"))


def test_the_pages_are_there():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    expected = {"index.md", "contract.md", "algebra.md", "step.md", "scale-out.md", "llm.md", "api/distilkit.md",
                "api/losses.md", "api/algebra.md", "api/schedules.md", "api/temperature.md"}
    assert expected <= names, sorted(expected - names)


def test_no_links_outside_the_repository():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text and "shared/" not in text, page


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.relative_to(DOCS).as_posix())
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(_blocks(page)):
        exec(compile(code, f"{page.relative_to(ROOT)} block {i}", "exec"), namespace)


def test_every_python_block_is_found():
    """A fence the pattern misses (```py, ```Python, indented) would silently go untested."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        fences = re.findall(r"^\s*```(\w*)", text, flags=re.M)
        opening = fences[::2]
        assert all(lang in ("python", "bash", "text", "") for lang in opening), (page, opening)
        assert len(_blocks(page)) == opening.count("python"), page


def test_mkdocs_build_strict(tmp_path):
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI installs the docs extra (pip install -e '.[dev]'); mkdocs is missing")
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    losses = (site / "api" / "losses" / "index.html").read_text(encoding="utf-8")
    for name in ("kd_kl", "reverse_kl", "hidden_mse", "attention_kl", "fused_linear_kd", "sparse_kd_kl"):
        assert f'id="distilkit.losses.{name}"' in losses, name
    assert ":func:" not in losses  # Sphinx roles are rewritten (docs/griffe_roles.py)
    api = (site / "api" / "distilkit" / "index.html").read_text(encoding="utf-8")
    assert 'id="distilkit.step.make_step"' in api and 'id="distilkit.algebra.loss_fn"' in api
    for page in ("contract", "algebra", "step", "scale-out", "llm"):
        assert (site / page / "index.html").is_file(), page
