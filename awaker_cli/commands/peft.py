"""`awaker export-peft MODEL OUT` and `awaker import-peft ADAPTER --base BASE OUT`: plain LoRA to and from
peft adapter directories."""
from __future__ import annotations

import functools
from pathlib import Path

import typer

from ..cli import app, print_json
from ..progress import progress_bar, stderr


@app.command("export-peft")
def export_peft(
    model: str = typer.Argument(..., help="An awaker model with a plain LoRA only: a stage-I output (or one "
                                          "whose experts were merged away), full precision."),
    out: Path = typer.Argument(..., help="Output adapter directory (must not exist, or be empty)."),
    base_model: str = typer.Option(None, "--base-model", help="What adapter_config.json names as the base "
                                   "(base_model_name_or_path); default: the base recorded in MODEL."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier awaker output."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Write the plain LoRA of an awaker model as a peft LoRA adapter directory.

    \b
    awaker export-peft out/stage1 out/stage1-peft
    PeftModel.from_pretrained(base, "out/stage1-peft")     (Python)
    vllm serve BASE --enable-lora --max-lora-rank R --lora-modules s1=DIR

    OUT holds adapter_config.json and adapter_model.safetensors with peft's key names: peft (and tools that read its format, e.g. vLLM's --enable-lora with --max-lora-rank at least r) load it on top of the base. A LoRA-MoE model (routed experts) cannot be exported: peft has no routing.
    """
    from ..ops.peft import export_peft as run

    result = run(model, out, force=force, base_model=base_model,
                 bar=functools.partial(progress_bar, enabled=not json_out))
    if json_out:
        return print_json(result)
    stderr.print(f"wrote {out}: a peft LoRA adapter, r {result['r']}, lora_alpha {result['lora_alpha']}, on "
                 f"{', '.join(result['target_modules'])} (base {result['base_model_name_or_path']})")


@app.command("import-peft")
def import_peft(
    adapter: Path = typer.Argument(..., help="A peft LoRA adapter directory (adapter_config.json + "
                                             "adapter_model.safetensors), e.g. from save_pretrained."),
    out: Path = typer.Argument(..., help="Output directory for the stage-I awaker model (must not exist, "
                                         "or be empty)."),
    base: str = typer.Option(..., "--base", help="The dense model the adapter was trained on (a directory or a "
                             "hub id in the local cache)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier awaker output."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Turn a peft LoRA adapter into a stage-I awaker model, to start stage II from it.

    \b
    awaker import-peft my-lora --base Qwen/Qwen2-VL-7B-Instruct out/stage1
    awaker train stage2 init_from=out/stage1 output_dir=out/stage2 data.train=data.json

    OUT is what `awaker train` writes for stage I: the base, the LoRA (same r, alpha and tensors, so the same outputs as peft's model) and awaker_config.json. Stage II makes its experts from the LoRA of o/gate/up/down_proj, so a LoRA without them cannot start a default stage II (narrow adapter.moe_targets).
    """
    from ..ops.peft import import_peft as run

    result = run(adapter, base, out, force=force, bar=functools.partial(progress_bar, enabled=not json_out))
    if json_out:
        return print_json(result)
    filled = f"; {result['modules_filled']} modules peft left out start at zero" if result["modules_filled"] else ""
    stderr.print(f"wrote {out}: a stage-I awaker model, LoRA r {result['r']}, alpha {result['alpha']}, on "
                 f"{', '.join(result['lora_targets'])}{filled}")
