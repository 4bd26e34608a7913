"""Shared by test_distributed.py and ddp_worker.py: one student, one spec, one data set."""

from __future__ import annotations

import torch
from torch import nn

import distilkit as dk

L, V, DS, DT = 5, 7, 4, 6
# Rank 0 gets rows 0-2 (two micro-batches: rows [0] and [1, 2]); rank 1 gets rows 3-5 ([3], fully masked, and [4, 5]).
ROWS_PER_RANK = [[0, 1, 2], [3, 4, 5]]


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Linear(3, DS), nn.Linear(DS, V)

    def forward(self, x):
        h = self.emb(x)
        return {"logits": self.head(h), "hidden": h}


class Trainable(nn.Module):
    """What the optimizer trains: the student and the spec's projections (DDP-wrapped as one module)."""

    def __init__(self, params: nn.Module):
        super().__init__()
        self.student, self.params = Student(), params

    def forward(self, x):
        return self.student(x)


def make_spec():
    """One term per count kind the step sums over: kept positions (kd_kl, hidden_mse), labels (hard_ce), samples
    with a kept position (nst, a per-sample loss) and kept position pairs per sample (mmd, a pair loss)."""
    return (dk.kd_kl.on("logits", mask="attention_mask", temperature=2.0)
            + 0.3 * dk.hidden_mse.on("hidden", mask="attention_mask", proj=dk.proj.linear(DS, DT))
            + dk.hard_ce.on("logits")
            + dk.nst.on("hidden", mask="attention_mask")
            + dk.mmd.on("hidden", mask="attention_mask"))


def data():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, L, 3, generator=gen)
    teacher = {"logits": torch.randn(6, L, V, generator=gen), "hidden": torch.randn(6, L, DT, generator=gen)}
    # rank 1's first micro-batch (row 3) is fully masked: an empty micro-batch
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    labels = torch.where(mask.bool(), torch.randint(0, V, (6, L), generator=gen), -100)
    return x, teacher, mask, labels
