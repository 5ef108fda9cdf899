"""`awaker export MODEL OUT --quantize nf4`: a quantized copy that transformers and awaker load."""
from __future__ import annotations

import functools
from pathlib import Path

import typer

from ..cli import DEFAULT_MAX_SHARD_SIZE, app, print_json
from ..progress import progress_bar, stderr


@app.command()
def export(
    model: str = typer.Argument(..., help="An awaker model, or a dense Qwen-VL model (e.g. from "
                                          "`awaker merge --expert`)."),
    out: Path = typer.Argument(..., help="Output directory (must not exist, or be empty; never MODEL itself)."),
    quantize: str = typer.Option("nf4", "--quantize", help="nf4 | fp4 | int8 (bitsandbytes) | none: how to store "
                                                          "the language model's linear weights."),
    double_quant: bool = typer.Option(False, "--double-quant", help="4-bit only: also quantize the block scales "
                                                                   "(about 0.4 bit per weight less)."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16 | fp16: dtype of everything not quantized and the "
                                                     "4-bit compute dtype."),
    quantize_experts: bool = typer.Option(False, "--quantize-experts", help="Also quantize the LoRA experts "
                                                                          "(off: they stay in --dtype, as in QLoRA)."),
    data: Path = typer.Option(None, "--data", help="A data file (training format) to report the quality change "
                                                   "on: loss before/after and greedy next-token agreement."),
    batch_size: int = typer.Option(4, min=1, help="Records per forward pass on --data."),
    limit: int = typer.Option(None, help="Use only the first N records of --data."),
    max_shard_size: str = typer.Option(DEFAULT_MAX_SHARD_SIZE, help="Largest shard, in bytes or e.g. 2GB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and estimated size; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Write a quantized copy of a model for shipping.

    The language model's linear weights are quantized by bitsandbytes in the layout transformers reads
    (config.json gets quantization_config); vision tower, lm_head, embeddings and norms stay in --dtype.
    The result loads in `awaker chat`/`eval` and, with bitsandbytes and accelerate installed, in
    transformers' from_pretrained (a baked dense model needs nothing else).
    """
    from ..checkpoint import parse_size
    from ..ops.export import export as run_export

    r = run_export(model, out, quantize=quantize, double_quant=double_quant, dtype=dtype,
                   quantize_experts=quantize_experts, data=data, batch_size=batch_size, limit=limit, force=force,
                   dry_run=dry_run, max_shard_size=parse_size(max_shard_size),
                   bar=functools.partial(progress_bar, enabled=not json_out))
    if json_out:
        return print_json(r)
    if dry_run:
        stderr.print(f"would write {out}: {r['quantized_modules']} linear weights as {quantize}, about "
                     f"{r['estimated_bytes']:,} bytes ({r['estimated_bytes'] / r['bf16_model_bytes']:.2f}x the "
                     "bf16 model)")
        return
    lines = [f"wrote {out}: {r['size_on_disk']:,} bytes, {r['size_ratio']:.2f}x the bf16 model "
             f"({r['bf16_model_bytes']:,}); linear weights {r['linear_ratio']:.2f}x their bf16 size"]
    if "loss_after" in r:
        lines.append(f"loss on data: {r['loss_before']:.4f} -> {r['loss_after']:.4f} ({r['loss_change']:+.4f}); "
                     f"same next token {r['token_agreement']:.1%}"
                     + (f"; same routing {r['routing_agreement']:.1%}" if "routing_agreement" in r else ""))
    stderr.print("\n".join(lines))
