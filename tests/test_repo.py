"""Repository rules that a reviewer would otherwise check by hand: layering and lint."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ROOT / "distilkit" / "losses"
# What the loss layer may import: the standard library, torch, einops, numpy, and itself.
ALLOWED_IN_LOSSES = {"torch", "einops", "numpy", "__future__"} | set(sys.stdlib_module_names)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


@pytest.mark.parametrize("path", sorted(LOSSES.glob("*.py")), ids=lambda p: p.name)
def test_loss_layer_imports_nothing_above_it(path: Path):
    bad = [
        f"{path.name}:{line}: {name}"
        for line, name in _imports(path)
        if not name.startswith(".") and name.split(".")[0] not in ALLOWED_IN_LOSSES
    ]
    bad += [f"{path.name}:{line}: {name}" for line, name in _imports(path) if name.startswith("..")]
    assert not bad, "the loss layer imports only torch, einops, numpy and the standard library"


def test_public_loss_namespace_only_reexports():
    tree = ast.parse((LOSSES / "__init__.py").read_text())
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Assign"}, kinds


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is part of the dev extra")
def test_ruff_is_clean():
    result = subprocess.run(["ruff", "check", "distilkit", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
