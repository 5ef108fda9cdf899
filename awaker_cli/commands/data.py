"""`awaker data inspect`: see what training will train on."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..cli import app, print_json
from ..progress import progress_bar, stderr

data_app = typer.Typer(help="Look at training data the way `awaker train` reads it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def inspect_(
    sources: list[str] = typer.Argument(None, help="Data files or Hugging Face datasets (JSON, JSONL, .parquet, "
                                                   ".arrow, a save_to_disk folder); with --recipe, also key=value "
                                                   "overrides. Default: the recipe's data."),
    recipe: str = typer.Option(None, "--recipe", help="A recipe (shipped name or YAML file): its data settings "
                                                      "(format, image_root, pixels, cutoff_len, dataset) and model."),
    model: str = typer.Option(None, "--model", help="The model whose tokenizer, chat template and image processor "
                                                    "encode the data (default: the recipe's model or init_from)."),
    samples: int = typer.Option(3, "-n", "--samples", help="How many samples to render token by token."),
    limit: int = typer.Option(0, "--limit", help="Read only the first N usable records (0: all)."),
    json_out: bool = typer.Option(False, "--json", help="Print samples and summary as JSON."),
):
    """Render the first samples as training encodes them (trained tokens in bold green, the routing span
    underlined, image tokens as one mark with their count, image sizes before and after resizing), then
    go over the whole set: records, skipped records by reason, token lengths (min, median, p95, max), how
    many exceed cutoff_len, images per record. Uses exactly the training reader and encoder; bad records
    are counted, as with data.skip_bad_records."""
    from ..train.inspect import inspect, settings_from

    files = [s for s in sources or [] if "=" not in s or Path(s).exists()]
    overrides = [s for s in sources or [] if s not in files]
    settings = settings_from(files, recipe, overrides, model)
    index_bar = (lambda total: progress_bar("index", total, enabled=not json_out))
    bar = (lambda total: progress_bar("encode", total, unit="records", enabled=not json_out))
    result = inspect(settings, samples=samples, limit=limit or None, index_bar=index_bar, bar=bar)
    if json_out:
        return print_json(result)
    for s in result["samples"]:
        _show_sample(s)
    _show_summary(result["summary"])


def _show_sample(s: dict):
    if "skipped" in s:
        stderr.print(f"[bold]{escape(s['where'])}[/]: [yellow]skipped[/] ({escape(s['skipped'])})")
        return
    head = (f"[bold]{escape(s['where'])}[/] ({s['layout']}{', task ' + escape(s['task']) if s['task'] else ''}): "
            f"{s['tokens']} tokens, {s['trained']} trained, routing span {s['span'][0]}..{s['span'][1]}")
    if s["length_before_cutoff"] and s["length_before_cutoff"] > s["tokens"]:
        head += f", cut from {s['length_before_cutoff']}"
    stderr.print(head)
    for im in s["images"]:
        stderr.print(f"  image {escape(im['source'])}: {im['size'][0]}×{im['size'][1]} → "
                     f"{im['resized'][0]}×{im['resized'][1]}, {im['tokens']} tokens")
    text = Text()
    plain = not stderr.is_terminal  # no styles in a file or pipe: mark with brackets instead
    for seg in s["segments"]:
        style = ("magenta" if seg["image_tokens"] else "bold green" if seg["trained"] else "")
        body = seg["text"]
        if plain:
            body = f"[[{body}]]" if seg["trained"] else body
            body = f"{{{body}}}" if seg["span"] else body
        text.append(body, style=style + (" underline" if seg["span"] else ""))
    stderr.print(text)
    stderr.print()


def _show_summary(m: dict):
    t = m["tokens"]
    table = Table(title="the whole set" + (f" (first {m['limit']} records)" if m["limit"] else ""),
                  show_header=False)
    table.add_row("records", f"{m['records']:,} ({m['usable']:,} usable; "
                             + ", ".join(f"{k} {v:,}" for k, v in m["layouts"].items()) + ")")
    table.add_row("skipped", f"{m['skipped']:,}" + (": " + ", ".join(f"{k} ({v:,})" for k, v in
                                                                      m["skip_reasons"].items()) if m["skipped"] else ""))
    table.add_row("tokens per record", f"min {t['min']:,}, median {t['median']:,}, p95 {t['p95']:,}, max {t['max']:,}")
    table.add_row("over cutoff_len", f"{m['over_cutoff_len']:,} longer than {m['cutoff_len']:,} tokens")
    table.add_row("trained tokens", f"{m['trained_tokens']:,}")
    table.add_row("images per record", ", ".join(f"{k}: {v:,}" for k, v in m["images_per_record"].items()))
    stderr.print(table)
    if stderr.is_terminal:
        stderr.print("[bold green]bold green[/]: trained tokens; [underline]underlined[/]: routing span; "
                     "[magenta]<image ×N>[/]: N image tokens")
    else:
        stderr.print("[[...]]: trained tokens; {...}: routing span; <image ×N>: N image tokens", markup=False)
