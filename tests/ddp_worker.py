"""Run by test_distributed.py under torchrun on CPU (gloo): each rank accumulates two micro-batches with different
numbers of valid tokens (one fully masked), normalised by dk.distributed.global_counts(..., spec=spec) (kept
positions, labels, samples for nst and position pairs for mmd), with the student (and the spec's projections)
wrapped by one engine — DDP, FSDP2 (``fully_shard``) or Hugging Face Accelerate — and the frozen teacher never
wrapped. Rank 0 saves the full gradients."""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from ddp_common import ROWS_PER_RANK, Trainable, data, make_spec

import distilkit as dk


def wrap(engine: str, model: torch.nn.Module):
    """``(wrapped model, the module holding .params, backward, no_sync context for the first micro-batch)``."""
    if engine == "ddp":
        dist.init_process_group("gloo")
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
        return wrapped, wrapped.module, lambda loss: loss.backward(), wrapped.no_sync
    if engine == "fsdp2":
        dist.init_process_group("gloo")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(model.student, mesh=mesh)
        fully_shard(model, mesh=mesh)

        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            yield
            model.set_requires_gradient_sync(True)

        return model, model, lambda loss: loss.backward(), no_sync
    if engine == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        wrapped = accelerator.prepare(model)
        return (wrapped, accelerator.unwrap_model(wrapped), accelerator.backward,
                lambda: accelerator.no_sync(wrapped))
    raise ValueError(engine)


def main(engine: str, out_path: str) -> None:
    spec = make_spec()
    params = dk.init_params(spec)
    params.load_state_dict(torch.load(out_path + ".params"))
    model, inner, backward, no_sync = wrap(engine, Trainable(params))
    rank = dist.get_rank()
    x, teacher, mask, labels = data()
    rows = ROWS_PER_RANK[rank]
    micro = [rows[:1], rows[1:]]
    batches = [{"attention_mask": mask[r], "labels": labels[r]} for r in micro]
    counts = dk.distributed.global_counts(batches, spec=spec)  # every key the spec's terms need
    assert sorted(counts) == ["attention_mask", "attention_mask@pairs", "attention_mask@samples", "labels"]
    step = dk.make_step(spec, compile=False)
    for i, (r, b) in enumerate(zip(micro, batches, strict=True)):
        with no_sync() if i == 0 else contextlib.nullcontext():  # accumulate, then reduce once
            out = step(model(x[r]), {k: v[r] for k, v in teacher.items()}, b, params=inner.params, counts=counts)
            backward(out.loss)
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in inner.parameters()]
    if rank == 0:
        torch.save(grads, out_path)
    dist.barrier()  # no rank tears the process group down while another still talks to it
    del model, inner, out  # release the engine's pending gloo work while the group is alive
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Skip interpreter finalisation: gloo's worker threads can still hold tensors then, and freeing them during
    # finalisation aborts the process ("terminate called without an active exception", pytorch/pytorch#179291).
    # Everything this worker produces is already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
