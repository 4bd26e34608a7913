"""Hardware floors measured in the same run: memory copy bandwidth, fresh-memory write bandwidth, ``exp`` throughput
and matrix-product throughput. A loss row's floor is what it cannot avoid at these rates. Floors take the fastest
block of their measurement (the best the machine did in this run), implementations the median: on a shared machine
that makes every ratio to a floor conservative."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .harness import measure


@dataclass
class Floors:
    copy_gbps: float  # (bytes read + bytes written) / time of ``dst.copy_(src)`` into an allocated buffer
    fresh_write_gbps: float  # bytes / time of writing a newly allocated tensor (allocation and first touch)
    exp_per_s: float  # float32 exp per second, data in cache (CPU) / from a fused chain of exps (GPU)
    matmul_gflops: float  # float32 GEMM throughput at a BERT-base projection shape
    copy_mb: float  # size of the tensors copied

    def to_json(self) -> dict:
        return asdict(self)

    def memory_ms(self, bytes_moved: float) -> float:
        """Moving ``bytes_moved`` (each byte read or written once) at copy bandwidth."""
        return bytes_moved / (self.copy_gbps * 1e9) * 1e3

    def exp_ms(self, count: float) -> float:
        return count / self.exp_per_s * 1e3

    def matmul_ms(self, flops: float) -> float:
        return flops / (self.matmul_gflops * 1e9) * 1e3


def kd_floor(floors: Floors, rows: int, vocab: int, itemsize: int = 4) -> dict:
    """A kd loss reads both logits once, writes the gradient once, and needs two ``exp`` per element.

    ``floor_ms`` is the larger of the two (a kernel that streams its logits overlaps the memory traffic with the
    arithmetic, so the slower of the two bounds it below); the sum is reported too.
    """
    elements = rows * vocab
    bytes_moved = 3 * elements * itemsize
    mem = floors.memory_ms(bytes_moved)
    exp = floors.exp_ms(2 * elements)
    fresh = 2 * elements * itemsize / (floors.copy_gbps * 1e9) * 1e3 + elements * itemsize / (
        floors.fresh_write_gbps * 1e9) * 1e3
    return {"bytes_moved": bytes_moved, "memory_ms": mem, "exp_ms": exp, "floor_ms": max(mem, exp),
            "sum_ms": mem + exp, "memory_fresh_grad_ms": fresh}


def measure_floors(device: torch.device, *, size_mb: float = 256.0, min_run_time: float = 1.0) -> Floors:
    n = int(size_mb * 2**20 / 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.fill_(0)  # touch it
    t_copy, _, _ = measure(lambda: dst.copy_(src), device, min_run_time=min_run_time, best=True)
    copy_gbps = 2 * n * 4 / t_copy / 1e9
    t_fresh, _, _ = measure(lambda: torch.empty(n, device=device).fill_(1.0), device, min_run_time=min_run_time,
                            best=True)
    fresh_gbps = n * 4 / t_fresh / 1e9
    src = dst = None  # free them before the next measurements

    if device.type == "cpu":
        # in-cache blocks: 8 rows of a 32k vocabulary (1 MiB), as a chunked kernel sees them
        block = torch.randn(8, 32000, device=device)
        out = torch.empty_like(block)
        t_exp, _, _ = measure(lambda: torch.exp(block, out=out), device, min_run_time=min_run_time, best=True)
        exp_per_s = block.numel() / t_exp
    else:
        # arithmetic-bound: a fused chain of exps on data read once (compiled)
        x = torch.randn(1 << 24, device=device) * 0.01
        depth = 16

        def chain(x):
            for _ in range(depth):
                x = torch.exp(x) - 1.0
            return x

        compiled = torch.compile(chain)
        t_exp, _, _ = measure(lambda: compiled(x), device, min_run_time=min_run_time, warmup=2, best=True)
        exp_per_s = depth * x.numel() / t_exp

    a = torch.randn(4096, 312, device=device)
    w = torch.randn(312, 768, device=device)
    t_mm, _, _ = measure(lambda: a @ w, device, min_run_time=min_run_time, best=True)
    gflops = 2 * 4096 * 312 * 768 / t_mm / 1e9
    return Floors(copy_gbps, fresh_gbps, exp_per_s, gflops, size_mb)
