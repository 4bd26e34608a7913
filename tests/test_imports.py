"""What importing distilkit loads: ``import distilkit`` and ``distilkit --help`` load no heavy package; the pure layers
(losses, schedules, algebra, step) never load pydantic or TensorBoard; every exported name still works.

Each check runs a fresh interpreter and inspects its ``sys.modules`` (module names, never wall-clock time).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import distilkit as dk

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "pydantic", "tensorboard", "sklearn", "matplotlib", "transformers", "einops")
# Every name distilkit exported when its __init__ imported everything eagerly, then the backends module, the
# prob_mse and pseudo_label_ce losses and TopK.
EXPORTED = [
    "ConfigError", "Loss", "NonFiniteError", "Spec", "SpecConfig", "SpecKeyError", "Step", "StepOutput", "Tasks",
    "TasksConfig", "Term", "TopK", "adapters", "algebra", "attention_ce", "attention_kl", "attention_mse",
    "backends", "cache", "chunked_jsd", "chunked_kd_ce", "chunked_kd_kl", "chunked_reverse_kl", "chunked_skew_kl",
    "chunked_tvd", "config", "cosine", "distributed", "ensemble", "from_config", "from_textbrewer", "fsp",
    "fused_linear_kd", "hard_ce", "hidden_mse", "init_params", "integrations", "jsd", "kd_ce", "kd_kl", "kd_mse",
    "layers",
    "loss_fn", "losses", "make_step", "mmd", "nst", "pkd", "precomputed", "prob_mse", "probability_shift", "proj",
    "pseudo_label_ce", "register_loss", "relation_kl", "reverse_kl", "sampled_kl", "schedules", "skew_kl", "sparse_jsd",
    "sparse_kd_ce", "sparse_kd_kl", "sparse_reverse_kl", "sparse_skew_kl", "sparse_tvd", "step", "task_sampler",
    "tasks", "temperature", "tensorboard", "to_config", "tvd", "uld",
]


def loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter, then report which top-level packages of :data:`HEAVY` (and which
    distilkit modules) it loaded, and whatever ``code`` stored in ``result``."""
    script = ("import json, sys\nresult = None\n" + code + "\n"
              "top = {name.split('.')[0] for name in sys.modules}\n"
              f"print(json.dumps({{'heavy': sorted(top & set({HEAVY!r})), 'result': result, "
              "'distilkit': sorted(m for m in sys.modules if m.startswith('distilkit'))}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_distilkit_loads_no_heavy_package():
    found = loaded_after("import distilkit\nresult = distilkit.__version__")
    assert found["heavy"] == []
    assert found["distilkit"] == ["distilkit"]
    assert found["result"] == dk.__version__


def test_help_and_usage_errors_load_no_heavy_package():
    code = ("import contextlib, io\nfrom distilkit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    result = [main(['--help']), main(['validate']), main(['doctor', '--help']), main(['--version'])]")
    found = loaded_after(code)
    assert found["result"] == [0, 2, 0, 0]
    assert found["heavy"] == []


@pytest.mark.parametrize("module", ["distilkit.losses", "distilkit.schedules", "distilkit.algebra", "distilkit.step",
                                    "distilkit.temperature", "distilkit.distributed", "distilkit.adapters",
                                    "distilkit.backends"])
def test_the_pure_layers_never_load_pydantic_or_tensorboard(module):
    found = loaded_after(f"import {module}")
    assert "torch" in found["heavy"]  # the check can see a loaded package
    assert "pydantic" not in found["heavy"]
    assert "tensorboard" not in found["heavy"]
    assert not any(m.startswith(("distilkit.config", "distilkit.cache", "distilkit.tensorboard", "distilkit.cli"))
                   for m in found["distilkit"]), found["distilkit"]


def test_names_load_their_own_modules_on_first_access():
    code = ("import sys\nimport distilkit as dk\n"
            "result = [sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pydantic', 'tensorboard'})]\n"
            "spec = dk.kd_kl.on('logits') + dk.hard_ce.on('logits', labels='labels')\n"
            "result.append(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pydantic', 'tensorboard'}))\n"
            "assert dk.from_config(dk.to_config(spec)) == spec\n"
            "result.append(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pydantic', 'tensorboard'}))")
    found = loaded_after(code)
    assert found["result"] == [[], ["torch"], ["pydantic", "torch"]]


def test_every_exported_name_still_works():
    assert sorted(dk.__all__) == sorted(EXPORTED)
    assert set(EXPORTED) <= set(dir(dk))
    for name in EXPORTED:
        value = getattr(dk, name)
        assert value is not None, name
        assert getattr(dk, name) is value, name  # one object, cached after the first access
    assert dk.kd_kl is dk.algebra.kd_kl and dk.make_step is dk.step.make_step
    assert dk.from_config is dk.config.from_config and dk.probability_shift is dk.losses.probability_shift
    namespace: dict = {}
    exec("from distilkit import *", namespace)
    assert set(EXPORTED) <= set(namespace)


def test_every_loss_of_the_algebra_is_exported():
    """A loss added to distilkit.algebra needs its name in ``_NAMES["algebra"]`` of distilkit/__init__.py."""
    import distilkit.algebra as algebra

    losses = {name for name in dir(algebra) if isinstance(getattr(algebra, name), algebra.Loss)}
    assert losses and not losses - set(dk.__all__), sorted(losses - set(dk.__all__))


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="module 'distilkit' has no attribute 'kd_kll'"):
        dk.kd_kll  # noqa: B018
    assert not hasattr(dk, "frobnicate")
    with pytest.raises(ImportError):
        exec("from distilkit import frobnicate", {})


def test_static_imports_match_the_lazy_table():
    """The ``if TYPE_CHECKING:`` imports (what type checkers, IDEs and the API docs see) are the lazy names."""
    tree = ast.parse((ROOT / "distilkit" / "__init__.py").read_text())
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    static = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.unparse(node)
        for alias in node.names:
            assert alias.asname == alias.name, ast.unparse(node)
            static[alias.name] = (node.module or alias.name, None if node.module is None else alias.name)
    assert static == dk._LAZY
