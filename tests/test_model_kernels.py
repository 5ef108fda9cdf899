"""The whole tiny model through the Triton kernels (interpreted on the CPU) equals the torch path."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor

from awaker_cli.model import load_model

from .conftest import chat_inputs, needs_interpreter, randomize_adapters, solid

pytestmark = needs_interpreter


@pytest.fixture(scope="module")
def model_and_inputs(tiny_moe):
    model = load_model(tiny_moe)
    randomize_adapters(model, seed=11, scale=0.5)
    processor = AutoProcessor.from_pretrained(tiny_moe)
    inputs = chat_inputs(processor, ["what colour is the shape ?", "read the digit ."],
                         images=[solid((200, 30, 30)), solid((20, 40, 220), (56, 112))])
    return model, inputs


def run_with(monkeypatch, backend, model, inputs):
    monkeypatch.setenv("AWAKER_KERNELS", backend)
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits, model.awaker_state.current


def test_logits_with_kernels_equal_torch_path(monkeypatch, model_and_inputs):
    model, inputs = model_and_inputs
    ref_logits, ref_routing = run_with(monkeypatch, "torch", model, inputs)
    tri_logits, tri_routing = run_with(monkeypatch, "triton", model, inputs)
    assert torch.equal(tri_routing.expert_ids, ref_routing.expert_ids)
    assert len(set(ref_routing.expert_ids[:, :, 0].flatten().tolist())) > 1, "want mixed routes"
    torch.testing.assert_close(tri_logits, ref_logits, atol=2e-5, rtol=2e-5)  # fp32, summation order only
