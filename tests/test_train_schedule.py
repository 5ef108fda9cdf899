"""The learning-rate schedule against transformers' own schedulers (what LLaMA-Factory and the HF Trainer
use): the same curve, except that awaker's warmup starts at lr/warmup instead of 0 so that the first
optimizer step trains (docs/design.md, "Learning-rate schedule")."""
from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from awaker_cli.train.loop import lr_factor


def hf_factors(name: str, total: int, warmup: int, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                          scheduler_specific_kwargs=kw or None)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind, hf_name, min_ratio", [
    ("cosine", "cosine", 0.0), ("cosine", "cosine_with_min_lr", 0.1), ("linear", "linear", 0.0),
    ("constant", "constant_with_warmup", 0.0),
])
@pytest.mark.parametrize("total, warmup", [(20, 3), (7, 0), (6, 5)])
def test_schedule_is_transformers_with_warmup_one_step_ahead(kind, hf_name, min_ratio, total, warmup):
    hf = hf_factors(hf_name, total, warmup, **({"min_lr_rate": min_ratio} if hf_name.endswith("min_lr") else {}))
    ours = [lr_factor(s, total=total, warmup=warmup, kind=kind, min_ratio=min_ratio) for s in range(total)]
    want = [hf[s + 1] if s < warmup else hf[s] for s in range(total)]
    assert ours == pytest.approx(want, abs=1e-12)
    if warmup:
        assert hf[0] == 0.0 and ours[0] == pytest.approx(1 / warmup)  # the one difference: step 0 trains
