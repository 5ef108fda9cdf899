"""`awaker serve MODEL`: an OpenAI-compatible HTTP server (chat completions) with continuous batching."""
from __future__ import annotations

import typer

from ..cli import app
from ..errors import AwakerError
from ..progress import stderr


@app.command()
def serve(
    model: str = typer.Argument(..., help="A model directory: awaker (upcycled/trained), merged dense, or quantized."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback only: 127.0.0.1 or localhost)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="AWAKER_API_KEY",
                                       help="Require `Authorization: Bearer KEY` on /v1/ requests."),
    max_batch: int = typer.Option(16, "--max-batch", help="Most requests decoded together (rows of the shared cache)."),
    max_context: int | None = typer.Option(None, "--max-context",
                                           help="Most tokens per request, prompt + max_tokens; longer prompts get "
                                                "a 400 [default: the model's context, at most 4096]."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting for a row; beyond that a 503."),
    allow_local_images: str | None = typer.Option(None, "--allow-local-images",
                                                  help="Let image_url name local files under this directory."),
    device: str | None = typer.Option(None, "--device", help="cuda or cpu (default: cuda when a GPU is visible)."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights dtype: auto (as stored), bf16, fp16 or fp32."),
    max_pixels: int | None = typer.Option(None, "--max-pixels", help="Largest image size in pixels after resizing."),
):
    """Serve a model over the OpenAI Chat Completions API (POST /v1/chat/completions, GET /v1/models,
    /health, /metrics). Requests that arrive while others are answered join the running batch at the next
    decode step, each with its own routing. Ctrl-C or SIGTERM stops the server cleanly."""
    from pathlib import Path

    from ..generate import load_engine
    from ..serve import serve as run

    if host not in ("127.0.0.1", "localhost", "::1"):
        raise AwakerError(f"--host {host}: awaker serve binds to the loopback only (127.0.0.1); "
                          "put a reverse proxy in front of it to expose it")
    if not 0 < port < 65536:
        raise AwakerError(f"--port must be 1-65535, got {port}")
    if max_batch < 1 or max_queue < 0 or (max_context is not None and max_context < 2):
        raise AwakerError("--max-batch must be >= 1, --max-queue >= 0 and --max-context >= 2")
    if allow_local_images is not None and not Path(allow_local_images).is_dir():
        raise AwakerError(f"--allow-local-images {allow_local_images}: not a directory")
    with stderr.status(f"loading {model}", spinner="dots"):
        engine = load_engine(model, device=device, dtype=dtype, max_pixels=max_pixels)
    stderr.print(f"serving {model} on http://{host}:{port}/v1 (Ctrl-C stops)", markup=False, highlight=False,
                 soft_wrap=True)
    run(engine, model_name=Path(model).name, host=host, port=port, api_key=api_key, max_batch=max_batch,
        max_context=max_context, max_queue=max_queue, allow_local_images=allow_local_images)
    stderr.print("stopped", markup=False, highlight=False)
