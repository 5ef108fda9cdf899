"""`awaker convert`: the official Awaker2.5-VL release checkpoint -> awaker.

A tiny model's state dict is built in the release's key layout (docs/design.md section 2) with random non-zero
adapters and gates. The release's forward is written out here directly, with hooks on a plain transformers
Qwen2-VL and none of awaker's layers, routing or kernels; the converted awaker model must compute the same
logits.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor

from awaker_cli.checkpoint import Checkpoint
from awaker_cli.cli import run
from awaker_cli.model import AwakerConfig, load_base, load_model

from .conftest import chat_inputs, solid

N, R, ALPHA = 3, 4, 12.0  # 3 routed experts (not the release's 4: the converter must read N from shapes)
P = "base_model.model."
LORA = ("q_proj", "k_proj", "v_proj")
MOE = ("o_proj", "gate_proj", "up_proj", "down_proj")
ROUTER_OF = {"o_proj": "o_proj", "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "gate_proj"}
SLOTS = [*map(str, range(N)), "g"]

PROMPTS = ["what colour is the shape ?", "how many shapes are there in the picture ?", "read the digit .",
           "describe the image with a word or a number ."]
IMAGES = [solid((200, 30, 30)), solid((20, 40, 220), (56, 112)), solid((250, 250, 250)), solid((10, 120, 10))]


def block(proj: str) -> str:
    return "self_attn" if proj in (*LORA, "o_proj") else "mlp"


def module(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{block(proj)}.{proj}"


def release_state_dict(base_dir, seed=0) -> dict[str, torch.Tensor]:
    """The PeftModel state dict the release would save for this base: prefix, old layout, adapters."""
    base = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        base.update(load_file(f))
    hidden = json.loads((base_dir / "config.json").read_text())["text_config"]["hidden_size"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return torch.randn(shape, generator=g) * scale

    sd = {}
    for key, value in base.items():
        sd[P + key] = value.clone()
        m = re.match(r"^(model\.layers\.\d+\.\w+\.(\w+_proj))\.weight$", key)
        if not m:
            continue
        path, proj = m.groups()
        out_f, in_f = value.shape
        if proj in LORA:
            sd[f"{P}{path}.lora_A.default.weight"] = rnd(R, in_f, scale=0.3)
            sd[f"{P}{path}.lora_B.default.weight"] = rnd(out_f, R, scale=0.3)
            continue
        for s in SLOTS:
            sd[f"{P}{path}.lora_moe_A.{s}.weight"] = rnd(R, in_f, scale=0.3)
            sd[f"{P}{path}.lora_moe_B.{s}.weight"] = rnd(out_f, R, scale=0.3)
        if ROUTER_OF[proj] == proj:
            sd[f"{P}{path}.w_gate.weight"] = rnd(N, hidden, scale=0.3)
            sd[f"{P}{path}.w_gate.bias"] = rnd(N, scale=0.3)
            sd[f"{P}{path}.ln.weight"] = 1 + rnd(hidden, scale=0.3)
    return sd


class ReleaseForward:
    """The release's computation, written out on a plain transformers Qwen2VLForConditionalGeneration.

    Routing: per sequence, the mean of the layer-0 input embeddings over its prompt span; per router,
    RMSNorm (fp32, cast back, times ln weight) -> w_gate -> softmax -> top-1 (e, p). A MoE linear adds,
    dispatcher-style, the routed expert's output times p, then mixes p·(that) + (1 − p)·global, all
    scaled by alpha/r. q/k/v add a plain LoRA. mix="convex" is p·E + (1 − p)·G, only to show the test
    tells the two apart.
    """

    def __init__(self, base_dir, sd, alpha, mix="release"):
        self.model = load_base(base_dir)[0].float()
        self.t = {k[len(P):]: v.float() for k, v in sd.items()}
        self.s = alpha / R
        self.mix = mix
        processor = AutoProcessor.from_pretrained(base_dir)
        tok = processor.tokenizer
        self.im_start, self.im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
        self.vision_start = self.model.config.vision_start_token_id
        self.routes, self.spans = {}, None
        lm = self.model.model.language_model
        lm.register_forward_pre_hook(self._route, with_kwargs=True)
        for i, layer in enumerate(lm.layers):
            for proj in (*LORA, *MOE):
                parent = layer.self_attn if block(proj) == "self_attn" else layer.mlp
                getattr(parent, proj).register_forward_hook(self._hook(i, proj))

    def spans_of(self, input_ids):
        spans = []
        for row in input_ids.tolist():
            starts = [i for i, t in enumerate(row) if t == self.im_start]
            ends = [i for i, t in enumerate(row) if t == self.im_end]
            vision = [i for i, t in enumerate(row) if t == self.vision_start]
            spans.append((vision[0] if vision else starts[1] + 2, ends[1]))
        return spans

    def _route(self, _module, _args, kwargs):
        embeds = kwargs["inputs_embeds"]
        x = torch.stack([embeds[b, s:e].mean(0) for b, (s, e) in enumerate(self.spans)])
        for layer in range(len(self.model.model.language_model.layers)):
            for owner in ("o_proj", "gate_proj"):
                path = module(layer, owner)
                x32 = x.float()
                normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
                normed = normed * self.t[f"{path}.ln.weight"]
                logits = normed @ self.t[f"{path}.w_gate.weight"].T + self.t[f"{path}.w_gate.bias"]
                p, e = torch.softmax(logits, dim=-1).max(dim=-1)
                self.routes[(layer, owner)] = (e, p)

    def _hook(self, layer, proj):
        path = module(layer, proj)

        def lora(x, slot=None):
            name = "lora_{}.default" if slot is None else "lora_moe_{}.%s" % slot
            A, B = self.t[f"{path}.{name.format('A')}.weight"], self.t[f"{path}.{name.format('B')}.weight"]
            return self.s * ((x @ A.T) @ B.T)

        def hook(_module, args, output):
            x = args[0]
            if proj in LORA:
                return output + lora(x)
            e, p = self.routes[(layer, ROUTER_OF[proj])]
            rows = []
            for b in range(x.shape[0]):
                dispatched = lora(x[b], int(e[b])) * p[b]  # the dispatcher weights the expert by its gate
                if self.mix == "release":  # ... and the global mix weights it by the top gate again
                    rows.append(dispatched * p[b] + lora(x[b], "g") * (1 - p[b]))
                else:
                    rows.append(dispatched + lora(x[b], "g") * (1 - p[b]))
            return output + torch.stack(rows)

        return hook

    @torch.no_grad()
    def __call__(self, inputs):
        self.spans = self.spans_of(inputs["input_ids"])
        return self.model(**inputs).logits


def expect_error(capsys, argv, *fragments):
    """Exit code 2 and one `error:` line holding every fragment, no traceback."""
    assert run(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


def convert(src, out, base, *extra):
    return run(["convert", str(src), str(out), "--base", str(base), "--alpha", str(ALPHA), "--json", *extra])


@pytest.fixture(scope="module")
def release(tiny_base, tmp_path_factory):
    """(state dict, its .bin, the converted directory)."""
    root = tmp_path_factory.mktemp("release")
    sd = release_state_dict(tiny_base)
    torch.save(sd, root / "pytorch_model.bin")
    out = root / "converted"
    assert convert(root / "pytorch_model.bin", out, tiny_base) == 0
    return sd, root / "pytorch_model.bin", out


@pytest.fixture(scope="module")
def models(tiny_base, release):
    sd, _, out = release
    return (ReleaseForward(tiny_base, sd, ALPHA), load_model(out).float(), AutoProcessor.from_pretrained(out),
            load_base(tiny_base)[0])


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "image"])
def test_logits_equal_the_release_forward(models, tiny_base, release, with_images):
    reference, model, processor, base = models
    inputs = chat_inputs(processor, PROMPTS, IMAGES if with_images else None)
    if with_images:
        assert "pixel_values" in inputs
    expected = reference(inputs)
    with torch.no_grad():
        got = model(**inputs).logits
    routing = model.awaker_state.current
    cfg = model.awaker_config
    routes = []
    for (layer, owner), (e, p) in sorted(reference.routes.items()):
        r = cfg.router_index(layer, owner)
        assert torch.equal(routing.expert_ids[:, r, 0], e), (layer, owner)
        torch.testing.assert_close(routing.probs[:, r, 0], p)
        routes.append(e)
    per_sequence = {tuple(int(e[b]) for e in routes) for b in range(len(PROMPTS))}
    assert len(per_sequence) > 1, "the batch must route its sequences to different experts"
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-5)
    with torch.no_grad():
        assert (got - base(**inputs).logits).abs().max() > 0.05, "the adapters must change the output"
    convex = ReleaseForward(tiny_base, release[0], ALPHA, mix="convex")(inputs)
    assert (convex - expected).abs().max() > 1e-3, "the test must tell p²·E from p·E"


def test_mapping_and_config(release, tiny_base):
    sd, _, out = release
    ckpt, cfg = Checkpoint(out), AwakerConfig.load(out)
    assert (cfg.num_experts, cfg.rank, cfg.alpha, cfg.top_k, cfg.combine) == (N, R, ALPHA, 1, "release")
    assert cfg.global_expert and cfg.router_norm_eps == 1e-6 and cfg.router_temperature == 1.0
    assert cfg.lora_targets == list(LORA) and cfg.moe_targets == list(MOE) and cfg.num_layers == 2
    tok = AutoProcessor.from_pretrained(tiny_base).tokenizer
    assert cfg.span_token_ids == {"im_start": tok.convert_tokens_to_ids("<|im_start|>"),
                                  "im_end": tok.convert_tokens_to_ids("<|im_end|>"),
                                  "vision_start": json.loads((tiny_base / "config.json").read_text())[
                                      "vision_start_token_id"]}
    for layer in range(2):
        for proj in MOE:
            path = module(layer, proj)
            A, B = ckpt.get(f"{path}.lora_A"), ckpt.get(f"{path}.lora_B")
            assert A.shape[0] == B.shape[0] == N + 1
            for i, s in enumerate(SLOTS):  # routed experts in order, the global expert last
                assert torch.equal(A[i], sd[f"{P}{path}.lora_moe_A.{s}.weight"])
                assert torch.equal(B[i], sd[f"{P}{path}.lora_moe_B.{s}.weight"])
        for proj in LORA:
            path = module(layer, proj)
            assert torch.equal(ckpt.get(f"{path}.lora_A"), sd[f"{P}{path}.lora_A.default.weight"])
            assert torch.equal(ckpt.get(f"{path}.lora_B"), sd[f"{P}{path}.lora_B.default.weight"])
        for owner in ("o_proj", "gate_proj"):
            r, path = cfg.router_index(layer, owner), module(layer, owner)
            assert r == layer * 2 + (0 if owner == "o_proj" else 1)
            assert torch.equal(ckpt.get("awaker_routers.gate_weight")[r], sd[f"{P}{path}.w_gate.weight"])
            assert torch.equal(ckpt.get("awaker_routers.gate_bias")[r], sd[f"{P}{path}.w_gate.bias"])
            assert torch.equal(ckpt.get("awaker_routers.norm_weight")[r], sd[f"{P}{path}.ln.weight"])
    base = Checkpoint(tiny_base)
    for key in base.tensors:
        assert torch.equal(ckpt.get(key), base.get(key)), key
    assert len(ckpt.tensors) == len(base.tensors) + 2 * 7 * 2 + 3
    assert (out / "config.json").read_bytes() == (tiny_base / "config.json").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        assert (out / name).read_bytes() == (tiny_base / name).read_bytes()
    assert "awaker convert" in (out / "README.md").read_text()


def test_bin_is_streamed_from_mmap(release, tiny_base, tmp_path, monkeypatch):
    """torch.load is weights-only and memory-mapped; the writer never buffers more than one shard."""
    from awaker_cli.checkpoint import writer

    _, src, reference_out = release
    loads, buffered = [], []
    real_load, real_flush = torch.load, writer.ShardWriter._flush

    def spy_load(*args, **kwargs):
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    def spy_flush(self):
        buffered.append((self._buffer_bytes, len(self._buffer)))
        real_flush(self)

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(writer.ShardWriter, "_flush", spy_flush)
    out = tmp_path / "out"
    assert convert(src, out, tiny_base, "--max-shard-size", "60KB") == 0
    assert loads and all(k.get("weights_only") is True and k.get("mmap") is True for k in loads)
    assert len(buffered) > 5 and all(size <= 60_000 or count == 1 for size, count in buffered)
    got, ref = Checkpoint(out), Checkpoint(reference_out)
    assert len(got.files) == len(buffered) and set(got.tensors) == set(ref.tensors)
    for key in ref.tensors:
        assert torch.equal(got.get(key), ref.get(key)), key


def test_safetensors_copy_and_default_alpha(release, tiny_base, tmp_path):
    sd, _, reference_out = release
    src = tmp_path / "release.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "out"
    assert run(["convert", str(src), str(out), "--base", str(tiny_base), "--json"]) == 0
    assert AwakerConfig.load(out).alpha == 512.0
    got, ref = Checkpoint(out), Checkpoint(reference_out)
    assert set(got.tensors) == set(ref.tensors)
    for key in ref.tensors:
        assert torch.equal(got.get(key), ref.get(key)), key


def test_base_without_weights_and_base_layer_names(release, tiny_base, tmp_path):
    """--base with only config + processor files (shapes from its config); newer peft's base_layer names."""
    sd, _, reference_out = release
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    renamed = {}
    for k, v in sd.items():
        m = re.match(r"^(.*\.(?:q_proj|o_proj|down_proj))\.(weight|bias)$", k)
        renamed[f"{m.group(1)}.base_layer.{m.group(2)}" if m else k] = v
    torch.save(renamed, tmp_path / "release.bin")
    out = tmp_path / "out"
    assert convert(tmp_path / "release.bin", out, base) == 0
    got, ref = Checkpoint(out), Checkpoint(reference_out)
    assert set(got.tensors) == set(ref.tensors)
    for key in ref.tensors:
        assert torch.equal(got.get(key), ref.get(key)), key


def test_dry_run_writes_nothing(release, tiny_base, tmp_path, capsys):
    _, src, _ = release
    out = tmp_path / "out"
    assert convert(src, out, tiny_base, "--dry-run") == 0
    assert not out.exists()
    plan = json.loads(capsys.readouterr().out)
    assert (plan["experts"], plan["rank"], plan["alpha"], plan["routers"]) == (N, R, ALPHA, 4)
    assert plan["adapter_tensors"] == 2 * 7 * 2 + 3 and plan["source_format"] == "bin"
    assert plan["source_tensors"] == len(release[0])
    assert run(["convert", str(src), str(out), "--base", str(tiny_base), "--dry-run"]) == 0  # the table
    assert not out.exists()


# -- errors ------------------------------------------------------------------------------------------
def _save(sd, path):
    torch.save(sd, path)
    return path


def test_base_required_and_complete(capsys, release, tiny_base, tmp_path):
    _, src, _ = release
    out = tmp_path / "out"
    expect_error(capsys, ["convert", str(src), str(out)], "--base is required")
    expect_error(capsys, ["convert", str(src), str(out), "--base", str(tmp_path / "nope")], "no such directory")
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "tokenizer.json").unlink()
    expect_error(capsys, ["convert", str(src), str(out), "--base", str(base)], "missing processor/tokenizer files",
                 "tokenizer")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text("{}")
    expect_error(capsys, ["convert", str(src), str(out), "--base", str(bare)], "no config.json")
    assert not out.exists()


@pytest.mark.parametrize("change,fragments", [
    ("unknown", ["1 unknown key(s)", "gate_proj.lora_moe_C.0.weight"]),
    ("missing", ["1 missing key(s)", "up_proj.lora_moe_B.g.weight"]),
    ("missing-base", ["1 missing key(s)", "base_model.model.model.norm.weight"]),
    ("shape", ["1 shape mismatch(es)", "k_proj.lora_B.default.weight [32, 5] (expected [32, 4])"]),
    ("no-prefix", ["no key starts with 'base_model.model.'"]),
])
def test_layout_errors(capsys, release, tiny_base, tmp_path, change, fragments):
    sd = dict(release[0])
    if change == "unknown":
        sd[P + "model.layers.0.mlp.gate_proj.lora_moe_C.0.weight"] = torch.zeros(R, 64)
    elif change == "missing":
        del sd[P + "model.layers.1.mlp.up_proj.lora_moe_B.g.weight"]
    elif change == "missing-base":
        del sd[P + "model.norm.weight"]
    elif change == "shape":
        sd[P + "model.layers.1.self_attn.k_proj.lora_B.default.weight"] = torch.zeros(32, R + 1)
    else:
        sd = {k[len(P):]: v for k, v in sd.items()}
    src = _save(sd, tmp_path / "release.bin")
    out = tmp_path / "out"
    expect_error(capsys, ["convert", str(src), str(out), "--base", str(tiny_base)], *fragments)
    assert not out.exists()


def test_errors_list_the_first_few(capsys, release, tiny_base, tmp_path):
    sd = {k: v for k, v in release[0].items() if ".lora_moe_B.g." not in k}
    src = _save(sd, tmp_path / "release.bin")
    expect_error(capsys, ["convert", str(src), str(tmp_path / "out"), "--base", str(tiny_base)],
                 "8 missing key(s)", "(4 more)")


def test_output_exists_needs_force(capsys, release, tiny_base, tmp_path):
    _, src, _ = release
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(capsys, ["convert", str(src), str(out), "--base", str(tiny_base)], "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    expect_error(capsys, ["convert", str(src), str(out), "--base", str(tiny_base), "--force"], "not an awaker output")
    assert (out / "keep.txt").read_text() == "mine"
    mine = tmp_path / "converted"
    assert convert(src, mine, tiny_base) == 0
    (mine / "stale.txt").write_text("from before")
    assert convert(src, mine, tiny_base, "--force") == 0
    assert not (mine / "stale.txt").exists() and (mine / "awaker_config.json").exists()


class _RunsCode:
    """Unpickling this would create a file: the converter must refuse before that can happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused(capsys, release, tiny_base, tmp_path):
    marker = tmp_path / "pwned"
    sd = dict(release[0])
    sd["payload"] = _RunsCode(marker)
    src = _save(sd, tmp_path / "evil.bin")
    expect_error(capsys, ["convert", str(src), str(tmp_path / "out"), "--base", str(tiny_base)],
                 "refused", "pickled code", "open")
    assert not marker.exists()


def test_unreadable_sources(capsys, tiny_base, tmp_path):
    out, base = str(tmp_path / "out"), str(tiny_base)
    expect_error(capsys, ["convert", str(tmp_path / "nope.bin"), out, "--base", base], "no such file")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all" * 10)
    expect_error(capsys, ["convert", str(tmp_path / "junk.bin"), out, "--base", base], "neither a PyTorch")
    torch.save(torch.ones(3), tmp_path / "tensor.bin")
    expect_error(capsys, ["convert", str(tmp_path / "tensor.bin"), out, "--base", base], "not a state dict")
    torch.save({"a": torch.ones(1), "b": [1, 2]}, tmp_path / "mixed.bin")
    expect_error(capsys, ["convert", str(tmp_path / "mixed.bin"), out, "--base", base], "not a flat state dict")


def test_help(capsys):
    assert run(["convert", "--help"]) == 0
    assert "Awaker2.5-VL release" in capsys.readouterr().out
