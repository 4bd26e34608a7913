"""Kernel switches and their status, in one place (as ``torch.backends``).

* :func:`report` — what runs here and why: the CPU kernel of the chunked logit divergences (``"built"``, or
  ``"unavailable: <why>"``, or switched off) and whether gradient memory is reused.
* :func:`reuse_gradient_memory` — a context manager (off by default) in which the CPU kernel writes a large gradient
  into the memory of the last one once nothing refers to it: faster on the CPU, one gradient's memory kept resident.
* :func:`cpu_kernel_disabled` — a context manager in which the chunked path runs its torch chunk loop instead.
* :func:`compiled_chunk_body` — a context manager choosing whether the torch chunk loop of the chunked and fused
  paths compiles its chunk body with ``torch.compile`` (default: on accelerators, not on the CPU).

``DISTILKIT_CPU_KERNEL=0`` switches the kernel off for the process, ``DISTILKIT_REUSE_GRAD=1`` turns reuse on.
"""

from .losses._chunked import compiled_chunk_body as compiled_chunk_body
from .losses._cpu_kernel import disabled as cpu_kernel_disabled
from .losses._cpu_kernel import report as report
from .losses._cpu_kernel import reuse_gradient_memory as reuse_gradient_memory

__all__ = ["compiled_chunk_body", "cpu_kernel_disabled", "report", "reuse_gradient_memory"]
