"""The research notebooks: each one runs from top to bottom without an error, and every notebook is stored stripped.

Each notebook is executed with nbclient in a fresh kernel whose working directory is a temporary directory (the
notebooks write nothing into the repository) and with ``MPLBACKEND=Agg``. The kernel is started from a kernel spec
written for this interpreter (``sys.executable``), so the kernel imports the same environment as the tests
whatever kernel specs, virtual environments or ``PATH`` the machine has.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbclient  # the dev extra installs nbclient, nbformat and ipykernel: no skipping when they are missing
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ["01_quickstart.ipynb", "02_loss_zoo.ipynb", "03_textbrewer_recipes.ipynb", "04_multi_teacher.ipynb",
            "05_temperature_sweep.ipynb", "06_llm_distillation.ipynb"]
CELL_TIMEOUT_S = 240  # per cell; the notebooks take seconds to tens of seconds in all


def _stored() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_notebooks_are_there():
    missing = sorted(set(EXPECTED) - {p.name for p in _stored()})
    assert not missing, f"notebooks/ lacks {missing}"


@pytest.mark.parametrize("path", _stored(), ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; strip them before committing"
    attachments = [i for i, cell in enumerate(nb.cells) if cell.get("attachments")]
    assert not attachments, f"{path.name}: cells {attachments} carry attachments"


def _kernel_manager(tmp_path: Path):
    """A kernel manager whose only kernel spec, ``python3``, runs ipykernel with this interpreter."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    kernels = tmp_path / "kernels"
    kernels.mkdir()
    spec_dir = write_kernel_spec(str(kernels / "python3"))  # argv: [sys.executable, "-m", "ipykernel_launcher", ...]
    specs = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    assert specs.get_kernel_spec("python3").argv[0] == sys.executable, spec_dir
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.name for p in _stored()], ids=lambda n: n.removesuffix(".ipynb"))
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("DISTILKIT_NOTEBOOK_QUICK", "1")  # 06: the CI-sized run (tiny models, a few steps)
    work, scratch = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the notebooks' tempfile directories end up under tmp_path
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the cell and the traceback, on the first error
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors
    ran = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert ran and all(cell.execution_count is not None for cell in ran)
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before, "the notebook wrote into notebooks/"
