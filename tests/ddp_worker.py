"""Run by test_distributed.py under torchrun: DDP on CPU (gloo), each rank accumulating two micro-batches with
different numbers of valid tokens, normalised by dk.distributed.global_counts. Rank 0 saves the gradients."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from ddp_common import ROWS_PER_RANK, Trainable, data, make_spec
from torch.nn.parallel import DistributedDataParallel as DDP

import distilkit as dk


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = make_spec()
    params = dk.init_params(spec)
    params.load_state_dict(torch.load(out_path + ".params"))
    model = DDP(Trainable(params))  # the teacher is frozen and never wrapped
    x, teacher, mask, labels = data()
    rows = ROWS_PER_RANK[rank]
    micro = [rows[:1], rows[1:]]
    batches = [{"attention_mask": mask[r], "labels": labels[r]} for r in micro]
    counts = dk.distributed.global_counts(batches, masks=["attention_mask"], labels=["labels"])
    step = dk.make_step(spec, compile=False)
    for i, (r, b) in enumerate(zip(micro, batches, strict=True)):
        with model.no_sync() if i == 0 else torch.enable_grad():  # accumulate, then all-reduce once
            out = step(model(x[r]), {k: v[r] for k, v in teacher.items()}, b, params=model.module.params,
                       counts=counts)
            out.loss.backward()
    if rank == 0:
        torch.save([p.grad for p in model.module.parameters()], out_path)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
