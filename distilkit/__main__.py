"""``python -m distilkit``: a one-minute, self-contained tour of the losses in a user-owned loop.

A small teacher MLP is fitted to a synthetic classification task, then a narrower student is distilled from it
with ``kd_kl`` on temperature-softened logits plus ``hidden_mse`` on a projected hidden layer, next to a student
trained on the hard labels alone. (The ``distilkit demo`` command on real data arrives with the CLI.)
"""

from __future__ import annotations

import torch
from torch import nn

import distilkit as dk


def _mlp(width: int, classes: int = 10, features: int = 32) -> nn.ModuleDict:
    body = nn.Sequential(nn.Linear(features, width), nn.ReLU())
    return nn.ModuleDict({"body": body, "head": nn.Linear(width, classes)})


def _forward(model: nn.ModuleDict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    hidden = model["body"](x)
    return {"hidden": hidden, "logits": model["head"](hidden)}


def main(steps: int = 200, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    centres = torch.randn(10, 32) * 1.5
    labels = torch.randint(0, 10, (4096,))
    x = centres[labels] + torch.randn(4096, 32) * 2.6
    train, test = slice(0, 3584), slice(3584, None)
    few = slice(0, 256)  # the students see only 256 labels; the teacher labels the rest softly

    teacher = _mlp(256)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = dk.hard_ce(_forward(teacher, x[train])["logits"], labels[train])
        opt.zero_grad(), loss.backward(), opt.step()

    def accuracy(model: nn.ModuleDict) -> float:
        with torch.no_grad():
            return (_forward(model, x[test])["logits"].argmax(-1) == labels[test]).float().mean().item()

    results = {"teacher": accuracy(teacher)}
    for name, distil in (("student (kd)", True), ("student (labels only)", False)):
        torch.manual_seed(seed + 1)
        student, proj = _mlp(16), nn.Linear(16, 256)
        opt = torch.optim.Adam([*student.parameters(), *proj.parameters()], lr=3e-3)
        for _ in range(steps):
            out = _forward(student, x[train])
            loss = dk.hard_ce(out["logits"][few], labels[few])
            if distil:
                with torch.no_grad():
                    teach = _forward(teacher, x[train])
                loss = loss + dk.kd_kl(out["logits"], teach["logits"], temperature=4.0)
                loss = loss + 0.1 * dk.hidden_mse(proj(out["hidden"]), teach["hidden"])
            opt.zero_grad(), loss.backward(), opt.step()
        results[name] = accuracy(student)

    for name, acc in results.items():
        print(f"{name:>22}: {acc:6.1%} held-out accuracy")
    return results


if __name__ == "__main__":
    main()
