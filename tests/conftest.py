"""Shared fixtures: tiny real Qwen2-VL checkpoints (both key layouts, sharded or not), built once."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest
import torch

# Triton kernels run compiled on a CUDA device and in Triton's interpreter without one (CI); an explicit
# TRITON_INTERPRET wins. Set before triton is imported. (Triton 3.6's interpreter breaks with numpy 2,
# which the GPU machine has: there the kernel tests must run compiled.)
if os.environ.get("TRITON_INTERPRET", "").strip() == "":
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
INTERPRET = os.environ["TRITON_INTERPRET"].strip() == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")


def pytest_report_header(config):
    if INTERPRET:
        return "triton kernels: interpreted on the CPU (TRITON_INTERPRET=1)"
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device: kernel tests skip"
    return f"triton kernels: compiled (TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}, {where})"
from PIL import Image

from awaker_cli.checkpoint import Checkpoint
from awaker_cli.cli import run
from awaker_cli.tiny import build_tiny_base

SHARD = 200_000  # bytes: the tiny model (~750 kB) then spans several shards


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that time or batch tiny generations: on the shared CI machine multi-threaded tiny
    kernels wait on descheduled threads (milliseconds per op). Use with pytest.mark.usefixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory under its hub name, the base of an adapter-only one included."""
    ckpt = Checkpoint(directory)
    return {key: ckpt.get(key) for key in ckpt.tensors}


def assert_base_copied(base_dir, out):
    """Every tensor of the base stands in `out` with the same dtype and the same bits."""
    base, moe = Checkpoint(base_dir), Checkpoint(out)
    assert set(base.tensors) <= set(moe.tensors)
    for key in base.tensors:
        a, b = base.get(key), moe.get(key)
        assert a.dtype == b.dtype and torch.equal(a, b), key
    return base, moe


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    variants = {
        "hub": dict(layout="hub"),
        "hub-sharded": dict(layout="hub", max_shard_size=SHARD),
        "v5": dict(layout="v5"),
        "v5-sharded": dict(layout="v5", max_shard_size=SHARD),
        "flat-config": dict(layout="hub", flat_config=True),
    }
    return {name: build_tiny_base(root / name, **kw) for name, kw in variants.items()}


@pytest.fixture(scope="session")
def tiny_base(tiny_bases):
    return tiny_bases["hub"]


@pytest.fixture(scope="session")
def tiny_moe(tiny_base, tmp_path_factory):
    """A freshly upcycled tiny model (rank 8, 4 experts + global)."""
    out = tmp_path_factory.mktemp("moe") / "moe"
    assert run(["upcycle", str(tiny_base), str(out), "--rank", "8", "--alpha", "16", "--json"]) == 0
    return out


def solid(color, size=(84, 56)):
    return Image.new("RGB", size, color)


def chat_inputs(processor, prompts, images=None):
    """Processor inputs for a batch of user prompts (optionally one image each), left-padded."""
    texts = []
    for i, prompt in enumerate(prompts):
        content = ([{"type": "image"}] if images else []) + [{"type": "text", "text": prompt}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True))
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


@torch.no_grad()
def randomize_adapters(model, seed=0, scale=0.3):
    """Give every LoRA B and router a random non-zero value so adapters change the output."""
    from awaker_cli.model import adapter_state_dict

    g = torch.Generator().manual_seed(seed)
    for key, p in adapter_state_dict(model).items():
        if key.endswith("lora_B") or "gate" in key:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def random_moe(tiny_moe, tmp_path_factory):
    """tiny_moe saved with random non-zero adapters and routers (seed 5): outputs and routes differ by input."""
    from awaker_cli.model import load_model, save_model

    model = load_model(tiny_moe)
    randomize_adapters(model, seed=5, scale=0.3)
    out = tmp_path_factory.mktemp("random_moe") / "model"
    save_model(model, out, tiny_moe)
    return out


@pytest.fixture(scope="session")
def tiny_records(tmp_path_factory):
    """A 12-record data file in the training format (messages, images, task), images beside it."""
    import json

    root = tmp_path_factory.mktemp("records")
    (root / "img").mkdir()
    colors = {"red": (200, 30, 30), "green": (20, 200, 40), "blue": (30, 40, 220), "white": (250, 250, 250),
              "black": (10, 10, 10), "yellow": (230, 220, 20)}
    lines = []
    for i, (name, rgb) in enumerate(list(colors.items()) * 2):
        size = (84, 56) if i % 2 else (56, 112)
        solid(rgb, size).save(root / "img" / f"{i}.png")
        if i % 4 == 3:  # some text-only records too
            record = {"messages": [{"role": "user", "content": f"what is {i} plus one ?"},
                                   {"role": "assistant", "content": str(i + 1)}], "task": "count"}
        else:
            record = {"messages": [{"role": "user", "content": "<image>what colour is the shape ?"},
                                   {"role": "assistant", "content": name}],
                      "images": [f"img/{i}.png"], "task": "color"}
        lines.append(json.dumps(record))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


NEW_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def family_bases(tmp_path_factory):
    """Tiny random bases of the families besides Qwen2-VL, in both key layouts (Qwen3-VL's hub files
    already use transformers 5's names, so its two are the same)."""
    root = tmp_path_factory.mktemp("family_bases")
    return {(fam, layout): build_tiny_base(root / f"{fam}-{layout}", family=fam, layout=layout, seed=1)
            for fam in NEW_FAMILIES for layout in ("hub", "v5")}


@pytest.fixture(scope="session")
def family_moes(family_bases, tmp_path_factory):
    """Each new family's hub base upcycled (rank 8, 4 experts + global), then given random non-zero
    adapters and routers (seed 5) so outputs and routes depend on the input."""
    from awaker_cli.model import load_model, save_model

    out = {}
    for fam in NEW_FAMILIES:
        root = tmp_path_factory.mktemp(f"moe-{fam}")
        assert run(["upcycle", str(family_bases[fam, "hub"]), str(root / "fresh"), "--rank", "8", "--alpha", "16",
                    "--json"]) == 0
        model = load_model(root / "fresh")
        randomize_adapters(model, seed=5, scale=0.3)
        save_model(model, root / "random", root / "fresh")
        out[fam] = root / "random"
    return out
