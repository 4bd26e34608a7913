"""A pytest plugin that runs the shared loss tester (``tests/tester.py``, used by ``tests/test_losses.py``) on another
device without editing it: ``python -m pytest -p benchmarks.pytest_device tests/test_losses.py`` with
``DISTILKIT_TEST_DEVICE=cuda`` (the default) or ``cpu``.

The tester makes its inputs with ``torch.randn(..., generator=tester.generator(seed))`` and its masks with factory
functions that take no device. This plugin sets torch's default device (so factory calls without a device, the
tester's module-level tensors included, land there) and replaces ``tester.generator`` with one that makes generators
on that device, before any test module imports the tester (the test modules then import the patched function). The
float64 references in ``tests/references.py`` follow their inputs' device. ``benchmarks/gpu_check.py`` uses it for
its "loss tester on the device" step.
"""

from __future__ import annotations

import os
import sys

import torch

ENV = "DISTILKIT_TEST_DEVICE"


def pytest_configure(config) -> None:
    device = torch.device(os.environ.get(ENV, "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"benchmarks.pytest_device: {ENV}={device} but torch.cuda.is_available() is False")
    tests = str(config.rootpath / "tests")
    if tests not in sys.path:  # the tester imports ``references`` as a top-level module, as pytest would
        sys.path.insert(0, tests)
    torch.set_default_device(device)  # before the tester's import: its module-level tensors land there too
    import tester

    def generator(seed: int = 0) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    tester.generator = generator


def pytest_report_header(config) -> str:
    return f"benchmarks.pytest_device: the loss tester runs on {torch.get_default_device()}"
