"""2-process runs on CPU (torchrun, gloo) with DDP, FSDP2 and Accelerate give the single-process full-batch
gradient when the step is normalised by dk.distributed.global_counts — for token-wise, label, per-sample (nst) and
pair (mmd) losses, with uneven micro-batches, one of them fully masked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_common import Trainable, data, make_spec

import distilkit as dk

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "accelerate"])
def test_data_parallel_with_global_counts_equals_the_single_process_full_batch(engine, tmp_path):
    spec = make_spec()
    torch.manual_seed(1)
    params = dk.init_params(spec)
    out_path = str(tmp_path / "grads.pt")
    torch.save(params.state_dict(), out_path + ".params")

    model = Trainable(params)
    x, teacher, mask, labels = data()
    out = dk.make_step(spec, compile=False)(model(x), teacher, {"attention_mask": mask, "labels": labels},
                                             params=params)
    expected = torch.autograd.grad(out.loss, list(model.parameters()))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "ddp_worker.py"), engine, out_path],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = torch.load(out_path)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
