"""`awaker chat MODEL`: talk to a model in the terminal, or answer one prompt for scripts."""
from __future__ import annotations

import logging
import sys

import typer

from ..cli import app, print_json
from ..errors import AwakerError
from ..progress import stderr
from .options import MaxPixels, MinPixels


def _info(text: str) -> None:
    stderr.print(text, style="dim", markup=False, highlight=False, soft_wrap=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_line() -> str:
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        return input(">>> ")
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


@app.command()
def chat(
    model: str = typer.Argument(..., help="A model directory: awaker (upcycled/trained), merged dense, or quantized."),
    image: list[str] = typer.Option([], "--image", "-i", help="An image for the first message (repeat for several)."),
    prompt: str | None = typer.Option(None, "--prompt", "-p",
                                      help="Answer this one message and exit (for scripts). Without it: interactive chat."),
    system: str | None = typer.Option(None, "--system", help="A system message that sets the assistant's behaviour."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (deterministic); higher = more varied."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample only from the most likely tokens holding this much "
                                                     "probability (1 = all)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample only from the k most likely tokens (0 = no limit)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed for sampling (reported in --json)."),
    device: str | None = typer.Option(None, "--device", help="cuda or cpu (default: cuda when a GPU is visible)."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights dtype: auto (as stored), bf16, fp16 or fp32."),
    min_pixels: MinPixels = None,
    max_pixels: MaxPixels = None,
    show_routing: bool = typer.Option(False, "--show-routing",
                                      help="After each answer, show which expert each router group chose and how sure it was."),
    json_out: bool = typer.Option(False, "--json", help="With --prompt: print text, tokens, timings and routing as JSON."),
):
    """Chat with a model. Interactive by default: answers stream as they are generated; type /image PATH to
    attach an image to your next message, /reset to start over, /routing to see the experts, /quit to leave;
    Ctrl-C stops an answer. With --prompt, print one answer and exit."""
    from ..generate import ChatSession, SamplingParams, interactive, load_engine, load_image, stats_line

    if json_out and prompt is None:
        raise AwakerError("--json needs --prompt (one answer); the interactive chat prints text")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed).validate()
    images = [load_image(p) for p in image]  # a bad image fails before the model loads
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # quantized models: per-call notices, not for a chat
    if device is None:
        import torch

        if not torch.cuda.is_available():
            _info("no GPU visible: running on the CPU (slow for full-size models)")
    with stderr.status(f"loading {model}", spinner="dots"):
        engine = load_engine(model, device=device, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels)
    session = ChatSession(engine, system=system, params=params)
    session.pending_images = images

    if prompt is None:
        interactive(session, read_line=_read_line, write=_write, info=_info, show_routing=show_routing)
        return
    if json_out:
        for _ in session.ask(prompt):
            pass
        g = session.last
        from ..generate import routing_report

        routing = None if g.routing is None else routing_report(engine.model.awaker_config, g.routing)
        return print_json({"model": str(model), "device": str(engine.device), "text": g.text, "tokens": g.tokens,
                           "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
                           "new_tokens": g.new_tokens, "seed": g.seed,
                           "timings": {k: v for k, v in g.stats().items() if k.endswith(("_s", "tokens_per_s"))},
                           "routing": routing})
    for piece in session.ask(prompt):
        _write(piece)
    _write("\n")
    _info(stats_line(session.last))
    if show_routing:
        for line in session.routing_lines():
            _info(line)
