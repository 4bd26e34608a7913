"""Repository rules that a reviewer would otherwise check by hand: layering and lint."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distilkit"
LOSSES = PACKAGE / "losses"
BASE = {"torch", "einops", "numpy", "__future__"} | set(sys.stdlib_module_names)
# Each layer imports only the layers above it (DESIGN.md), and nothing of pydantic, tensorboard or the CLI.
LAYERS = {"losses": set(), "schedules": {"losses"}, "algebra": {"losses", "schedules"}, "adapters": set()}


def _imports(path: Path, *, module_level: bool) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is None:  # from .. import losses
            found += [(node.lineno, "." * node.level + alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + node.module))
    return found


def _layer_files():
    return [(layer, path) for layer in LAYERS for path in sorted((PACKAGE / layer).glob("*.py"))]


@pytest.mark.parametrize(("layer", "path"), _layer_files(), ids=lambda x: getattr(x, "name", x))
def test_layers_import_only_the_layers_above_them(layer: str, path: Path):
    # Every import counts, also those inside functions: a lazy upward import is still an upward import.
    bad = []
    for line, name in _imports(path, module_level=False):
        if name.startswith(".."):
            if name[2:].split(".")[0] not in LAYERS[layer]:
                bad.append(f"{path.name}:{line}: {name}")
        elif not name.startswith(".") and name.split(".")[0] not in BASE:
            bad.append(f"{path.name}:{line}: {name}")
    assert not bad, f"the {layer} layer imports only {sorted(LAYERS[layer]) or 'no other layer'} and torch/einops/numpy"


def test_public_loss_namespace_only_reexports():
    tree = ast.parse((LOSSES / "__init__.py").read_text())
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Assign"}, kinds


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is part of the dev extra")
def test_ruff_is_clean():
    result = subprocess.run(["ruff", "check", "distilkit", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
