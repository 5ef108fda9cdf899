"""The kernels of one decode step, counted on the CPU with a GPU's launch choices (bench/kernel_budget.py).

Decode at batch 1 is launch-bound: each kernel costs microseconds even inside a CUDA graph. The budget
is a ceiling on kernels per decoder layer (issue 15's goal: at most 20); lower it when a change saves
kernels, never raise it without saying why.
"""
from __future__ import annotations

import pytest
import torch

from bench import kernel_budget as kb

BUDGET_PER_LAYER = 14  # measured: 50 before issue 15, 46 without the split-K memsets, 14 with the fused kernels


@pytest.fixture(scope="module")
def engine():
    return kb.counting_engine()


def test_the_counter_counts_kernels_not_views():
    x = torch.randn(4, 6)
    c = kb.KernelCounter()
    with c.triton_launches(), c:
        y = x.view(6, 4).transpose(0, 1)  # views: no kernel
        z = (y + 1).contiguous()  # one add, then a copy (the transpose is not contiguous)
        z.float().reshape(-1)  # same dtype, contiguous: nothing
        z.add_(1)
        z.sum().item()  # a host sync
    assert dict(c.ops) == {"add": 1, "clone": 1, "add_": 1, "sum": 1} and dict(c.syncs) == {"_local_scalar_dense": 1}


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step_kernel_budget(engine, batch):
    with kb.gpu_launch_heuristics(132):
        buf = kb.prepared_buffers(engine, ["how many shapes are there ?"] * batch)
        info = kb.per_layer(engine, buf)
    assert info["host_syncs"] == 0, "a decode step that syncs the host cannot be captured as a CUDA graph"
    assert not {"zero_", "fill_"} & set(info["ops"]), "no memsets in the step (split-K partials need none)"
    assert info["per_layer"] <= BUDGET_PER_LAYER, info
