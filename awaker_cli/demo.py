"""`awaker demo`: the whole pipeline on the shipped tiny pretrained Qwen2-VL, in minutes on a laptop CPU.

    data      synthetic images and questions from four task families with conflicting answer formats
    stage 1   one plain LoRA (recipes/demo-stage1.yaml)
    stage 2   the LoRA becomes a LoRA-MoE: experts start from it, routers learn (demo-stage2.yaml)
    stage 3   experts keep training, gates frozen (demo-stage3.yaml)
    eval      the stage-1 LoRA (dense) vs the LoRA-MoE on held-out questions: exact match, format
              compliance, macro average, routing purity
    prune     drop the least used expert, report the loss change
    export    nf4 (bitsandbytes), report size and loss change
    chat      one answer about a held-out image from the nf4 model, with its routing

Everything lands in OUT (see `LAYOUT`); every stage writes its own output atomically, and OUT keeps
what the finished stages wrote if a later one fails. The stage directories are ordinary `awaker
train` outputs: their recipe.yaml re-runs them, and the shipped recipes demo-stage1..3 name the
default OUT (demo-out/) so that `awaker train --recipe demo-stage2 ...` works after a demo.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.markup import escape

from .errors import AwakerError

LAYOUT = {
    "base": "a copy of the shipped tiny base (what the recipes' `model` names)",
    "data": "train.jsonl, test.jsonl and their images (awaker synth)",
    "stage1": "stage I output: one plain LoRA",
    "stage2": "stage II output: the LoRA-MoE, routers trained",
    "stage3": "stage III output: experts trained with frozen gates",
    "eval": "predictions of both models on the test set (one JSON line per question)",
    "pruned": "stage 3 without its least used expert",
    "nf4": "the pruned model exported with nf4 weights",
    "summary.json": "every number the demo printed",
    "demo.json": "the demo's settings (marks OUT as a demo output, which --force may replace)",
}
MARKER = "demo.json"  # written first: a directory holding it is an awaker demo output
CHAT_TASK = "caption-tags"  # the question of the chat answer: the richest one (colour, shape, count, digit)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run. Training settings live in the recipes; `overrides` changes some per stage."""

    n_train: int
    n_test: int
    overrides: tuple[dict, dict, dict] = ({}, {}, {})  # recipe fields per stage, dotted names
    eval_batch: int = 40
    max_new_tokens: int = 24  # the longest answer (a caption sentence) is 15 tokens


FULL = DemoSettings(n_train=1600, n_test=320)
# --quick: the same pipeline at toy size, for CI (it shows that every stage runs, not that they learn).
QUICK = DemoSettings(n_train=32, n_test=16, overrides=tuple(
    {"train.max_steps": steps, "train.batch_size": 4, "train.logging_steps": 1} for steps in (4, 3, 3)),
    eval_batch=16, max_new_tokens=12)

STAGES = [  # key, label
    ("data", "data · synth"),
    ("stage1", "stage 1 · LoRA"),
    ("stage2", "stage 2 · LoRA-MoE"),
    ("stage3", "stage 3 · gates frozen"),
    ("eval", "eval"),
    ("prune", "prune"),
    ("export", "export nf4"),
    ("chat", "chat"),
]


# -- the progress display ----------------------------------------------------------------------------
class _Stage:
    """One line of the display: a bar in its own unit (records, steps, answers, bytes) and a note."""

    def __init__(self, display, task):  # display: _Display
        self.display, self.task = display, task
        self.note = ""

    def _update(self, **kw):
        if self.display.progress is not None:
            if "note" in kw:  # notes hold model output and paths: never parse them as rich markup
                kw["note"] = escape(kw["note"])
            self.display.progress.update(self.task, **kw)

    def reset(self, total: int | None, unit: str = "", note: str | None = None):
        self.note = self.note if note is None else note
        self._update(total=total, completed=0, unit=unit, note=self.note)

    def advance(self, n: int = 1):
        if self.display.progress is not None:
            self.display.progress.advance(self.task, n)

    def set(self, completed: int | None = None, note: str | None = None):
        self.note = self.note if note is None else note
        self._update(note=self.note, **({} if completed is None else {"completed": completed}))

    @contextlib.contextmanager
    def bar(self, description: str, total: int, *, unit: str = "bytes") -> Iterator[Callable[[int], None]]:
        """The `bar` the ops (prune, export) take: each of their phases restarts this line."""
        self.reset(total, "" if unit == "bytes" else unit, description)
        yield self.advance


def _count_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class CountColumn(ProgressColumn):
        """done/total in the line's unit (MB when it counts bytes); the overall line's stage count."""

        def render(self, task):
            if task.fields.get("count"):
                return Text(task.fields["count"])
            if task.total is None:
                return Text("")
            unit = task.fields.get("unit", "")
            if not unit:
                return Text(f"{task.completed / 1e6:.1f}/{task.total / 1e6:.1f} MB")
            return Text(f"{int(task.completed)}/{int(task.total)} {unit}")

    return CountColumn()


class _Display:
    """The demo's progress: on a terminal, one live rich display with a line per stage (its bar, count,
    note and time) and an overall line; elsewhere (logs, CI) one plain line per finished stage."""

    def __init__(self, enabled: bool, console):
        self.console = console if enabled else None
        self.progress = None
        self.tasks: dict = {}
        self.timings: dict[str, float] = {}
        self.done = 0
        if not enabled or not console.is_terminal:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.fields[mark]} [bold]{task.description:<22}"), BarColumn(bar_width=20),
            _count_column(), TimeElapsedColumn(), TextColumn("[dim]{task.fields[note]}"),
            console=console, transient=False, refresh_per_second=4)
        for key, label in STAGES:
            self.tasks[key] = self.progress.add_task(label, total=None, start=False, mark=" ", count="", note="",
                                                     unit="")
        self.overall = self.progress.add_task("overall", total=len(STAGES), mark=" ", note="", unit="",
                                              count=f"0/{len(STAGES)} stages")

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    @contextlib.contextmanager
    def stage(self, key: str, *, total: int | None = None, unit: str = "") -> Iterator[_Stage]:
        label = dict(STAGES)[key]
        task = self.tasks.get(key)
        handle = _Stage(self, task)
        if self.progress is not None:
            self.progress.start_task(task)
            self.progress.update(task, total=total, unit=unit, mark="[yellow]›")
        started = time.perf_counter()
        ok = False
        try:
            yield handle
            ok = True
        finally:
            seconds = time.perf_counter() - started
            self.timings[key] = round(seconds, 2)
            mark = "[green]✓" if ok else "[red]✗"
            if self.progress is not None:
                total = next(t.total for t in self.progress.tasks if t.id == task)
                self.progress.update(task, mark=mark, **({"completed": total} if ok and total is not None else {}))
                self.progress.stop_task(task)
                self.done += ok
                self.progress.update(self.overall, completed=self.done, count=f"{self.done}/{len(STAGES)} stages")
            elif self.console is not None:
                note = f" · {handle.note}" if handle.note and ok else ""
                self.console.print(f"{mark}[/] {label:<22} [dim]{seconds:6.1f} s{escape(note)}", highlight=False,
                                   markup=True, soft_wrap=True)


# -- the output directory ----------------------------------------------------------------------------
def prepare_out(out: Path, force: bool) -> None:
    """A fresh OUT: refuses a non-empty one without --force; with it, the old one is moved aside, then
    deleted. Never the working directory or one of its parents (a slip of `awaker demo . --force`)."""
    out = out.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise AwakerError(f"{out}: already exists and is not empty (use --force to replace it)")
        resolved, cwd = out.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise AwakerError(f"{out}: is the working directory or one of its parents; give the demo its own "
                              "directory (e.g. demo-out)")
        if out.is_dir() and not (out / MARKER).is_file():
            raise AwakerError(f"{out}: is not an awaker demo output (no {MARKER}); --force only replaces an "
                              "earlier demo, so choose another directory or remove it yourself")
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=resolved.parent))
        os.replace(resolved, trash / out.name)
        shutil.rmtree(trash, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def demo_recipe(stage: int, source: str | Path, output_dir: str | Path, train_files, *, seed: int = 0,
                overrides: dict | None = None):
    """The shipped recipe demo-stage{stage} with its paths replaced: `source` is the dense model (stage 1)
    or the previous stage's output (stages 2, 3); `overrides` sets more fields by dotted name
    ({"train.max_steps": 100, "adapter.rank": 8}). bench/miniature.py builds its runs from it too."""
    from .train.recipe import find_recipe, read_yaml, recipe_from_dict

    data = read_yaml(find_recipe(f"demo-stage{stage}"))
    data["model" if stage == 1 else "init_from"] = str(source)
    data["output_dir"] = str(output_dir)
    data.setdefault("data", {})["train"] = [str(f) for f in ([train_files] if isinstance(train_files, (str, Path))
                                                               else train_files)]
    section = data.setdefault("train", {})
    section["seed"], section["progress"] = seed, False
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return recipe_from_dict(data)


def _total_steps(recipe, n_records: int) -> int:
    t = recipe.train
    return t.max_steps or t.epochs * (n_records // (t.batch_size * t.grad_accum))


# -- the pipeline ------------------------------------------------------------------------------------
def run_demo(out: str | Path = "demo-out", *, quick: bool = False, seed: int = 0, force: bool = False,
             show: bool = True, threads: int = 1, console=None, settings: DemoSettings | None = None) -> dict:
    """Run the demo into `out` and return its summary (also written to OUT/summary.json).

    show: the progress display and the final report on `console` (default: stderr).
    threads: torch CPU threads while it runs. One is the default: at these matrix sizes a second thread
    mostly waits, and on a busy 2-core machine it made training steps several times slower.
    """
    import torch

    from .progress import stderr

    console = console or stderr
    settings = settings or (QUICK if quick else FULL)
    out = Path(out)
    prepare_out(out, force)
    out = out.resolve()
    (out / MARKER).write_text(json.dumps({"quick": quick, "seed": seed, "settings": asdict(settings)}, indent=2) + "\n")
    (out / "README.md").write_text("# awaker demo output\n\n" + "".join(f"- `{k}`: {v}\n" for k, v in LAYOUT.items()))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    display = _Display(show, console)
    try:
        with display:
            summary = _pipeline(out, settings, seed, display)
    finally:
        torch.set_num_threads(previous_threads)
    summary.update(out=str(out), quick=quick, seed=seed, threads=threads, timings=display.timings,
                   wall_s=round(time.perf_counter() - started, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if show:
        print_report(summary, console)
    return summary


def _pipeline(out: Path, settings: DemoSettings, seed: int, display: _Display) -> dict:
    import logging

    from transformers.utils import logging as hf_logging

    from .synth import tiny_base_path, write_dataset

    hf_logging.set_verbosity_error()
    # bitsandbytes logs notices (a missing optional CPU kernel package, casts) that say nothing about the demo
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    summary: dict = {}

    with display.stage("data", total=settings.n_train + settings.n_test, unit="records") as s:
        shutil.copytree(tiny_base_path(), out / "base")
        data = write_dataset(out / "data", settings.n_train, settings.n_test, seed, progress=s.advance)
        summary["data"] = {k: data[k] for k in ("train", "test", "n_train", "n_test", "tasks")}
        s.set(note=f"{settings.n_train} train + {settings.n_test} test")
    train_file, test_file = Path(data["train"]), Path(data["test"])

    summary["train"] = {}
    for stage in (1, 2, 3):
        source = out / "base" if stage == 1 else out / f"stage{stage - 1}"
        recipe = demo_recipe(stage, source, out / f"stage{stage}", train_file, seed=seed,
                             overrides=settings.overrides[stage - 1])
        total = _total_steps(recipe, settings.n_train)
        with display.stage(f"stage{stage}", total=total, unit="steps") as s:
            summary["train"][f"stage{stage}"] = _train(recipe, s)

    with display.stage("eval", total=2 * settings.n_test, unit="answers") as s:
        summary["eval"] = _evaluate(out, test_file, settings, s)
        dense, moe = summary["eval"]["dense"]["macro"], summary["eval"]["moe"]["macro"]
        s.set(note=f"macro exact match {100 * dense['exact_match']:.1f}% → {100 * moe['exact_match']:.1f}%")

    with display.stage("prune") as s:
        summary["prune"] = _prune(out, test_file, s)
    with display.stage("export") as s:
        summary["export"] = _export(out, test_file, s)
    with display.stage("chat", total=1, unit="answer") as s:
        summary["chat"] = _chat(out, test_file)
        s.advance()
        answer = summary["chat"]["answer"]
        s.set(note=repr(answer if len(answer) < 40 else answer[:37] + "..."))
    return summary


def _train(recipe, s: _Stage) -> dict:
    from .train import train

    def after_step(step, metrics):
        s.set(completed=step, note=f"loss {metrics['loss']:.3f}")

    result = train(recipe, after_step=after_step, quiet=True)
    s.set(note=f"final loss {result['final_loss']:.3f}")
    return {"output_dir": result["output_dir"], "steps": result["step"], "final_loss": result["final_loss"],
            "recipe": recipe.to_dict()}


def _evaluate(out: Path, test_file: Path, settings: DemoSettings, s: _Stage) -> dict:
    from .evaluate import evaluate_model, load_for_eval, load_samples

    samples = load_samples(test_file)
    (out / "eval").mkdir(exist_ok=True)
    results = {}
    for name, stage in (("dense", "stage1"), ("moe", "stage3")):
        model, processor, kind = load_for_eval(out / stage)
        metrics, rows = evaluate_model(model, processor, samples, batch_size=settings.eval_batch,
                                       max_new_tokens=settings.max_new_tokens, progress=s.advance)
        (out / "eval" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results[name] = {"model": str(out / stage), "kind": kind, "data": str(test_file), **metrics}
        del model
    return results


def _prune(out: Path, test_file: Path, s: _Stage) -> dict:
    from .model.config import AwakerConfig
    from .ops.prune import prune

    experts = AwakerConfig.load(out / "stage3").num_experts
    r = prune(out / "stage3", out / "pruned", data=test_file, keep=experts - 1, batch_size=16, bar=s.bar)
    s.set(note=f"dropped expert {r['removed_experts'][0]} · loss {r['loss_change']:+.4f}")
    return {k: r[k] for k in ("usage", "kept_experts", "removed_experts", "loss_before", "loss_after",
                              "loss_change", "token_agreement", "size_on_disk")}


def _export(out: Path, test_file: Path, s: _Stage) -> dict:
    from .ops.export import export

    r = export(out / "pruned", out / "nf4", quantize="nf4", data=test_file, batch_size=16, bar=s.bar)
    s.set(note=f"{r['size_ratio']:.2f}x the bf16 size · loss {r['loss_change']:+.4f}")
    keep = ("size_on_disk", "bf16_model_bytes", "size_ratio", "linear_ratio", "loss_before", "loss_after",
            "loss_change", "token_agreement", "routing_agreement")
    return {k: r[k] for k in keep if k in r}


def _chat(out: Path, test_file: Path) -> dict:
    from .evaluate import load_samples
    from .generate import SamplingParams, format_routing, load_engine, routing_report

    samples = load_samples(test_file)
    sample = next((x for x in samples if x.task == CHAT_TASK), samples[0])
    question = sample.question.replace("<image>", "").strip()
    engine = load_engine(str(out / "nf4"), device="cpu")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(sample.images[0])},
                                             {"type": "text", "text": question}]}]
    g = engine.generate([messages], SamplingParams(max_new_tokens=32, seed=0))[0]
    report = routing_report(engine.model.awaker_config, g.routing) if g.routing is not None else None
    return {"model": str(out / "nf4"), "image": str(sample.images[0]), "task": sample.task, "question": question,
            "expected": sample.answer, "answer": g.text, "correct": g.text.strip() == sample.answer.strip(),
            "routing": report, "routing_lines": format_routing(report) if report else []}


# -- the report --------------------------------------------------------------------------------------
def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def eval_table(dense: dict, moe: dict, title: str):
    """Per task: exact match and format compliance of the stage-1 LoRA and the LoRA-MoE, the MoE's
    expert shares, then the macro averages and routing purity."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    names = list(dict.fromkeys([*dense["tasks"], *moe["tasks"]]))
    table.add_column("task", no_wrap=True, min_width=max(len(n) for n in names))
    for name in ("LoRA\nexact", "LoRA\nformat", "LoRA-MoE\nexact", "LoRA-MoE\nformat"):
        table.add_column(name, justify="right")
    routing = moe.get("routing") or {}
    histogram = routing.get("histogram") or {}
    table.add_column("MoE expert\nshares", no_wrap=True)
    for task in names:
        d, m = dense["tasks"].get(task, {}), moe["tasks"].get(task, {})
        shares = " ".join(f"{100 * f:3.0f}" for f in histogram.get(task, []))
        table.add_row(task, _pct(d.get("exact_match")), _pct(d.get("format")), _pct(m.get("exact_match")),
                      _pct(m.get("format")), shares)
    table.add_section()
    table.add_row("[bold]macro", f"[bold]{_pct(dense['macro']['exact_match'])}", _pct(dense["macro"]["format"]),
                  f"[bold]{_pct(moe['macro']['exact_match'])}", _pct(moe["macro"]["format"]), "")
    if routing.get("purity") is not None:
        experts, tasks = len(next(iter(histogram.values()))), len(histogram)
        table.caption = (f"routing purity {_pct(routing['purity'])}% (one expert for everything: "
                         f"{_pct(routing['chance'])}%; at most {_pct(min(1.0, experts / tasks))}% with "
                         f"{experts} experts for {tasks} tasks)")
        table.caption_justify = "left"
    return table


def print_report(summary: dict, console) -> None:
    e, p, x, c = summary["eval"], summary["prune"], summary["export"], summary["chat"]
    n = e["moe"]["n"]
    console.print()
    console.print(eval_table(e["dense"], e["moe"], f"stage-1 LoRA vs LoRA-MoE (stage 3) on {n} held-out questions, %"))
    steps = summary["train"]
    more = steps["stage2"]["steps"] + steps["stage3"]["steps"]
    console.print(f"[dim]The LoRA-MoE is the stage-1 LoRA trained {more} more steps as experts; bench/miniature.py "
                  "compares single-task, dense and MoE adapters at equal training and parameters.", highlight=False)
    usage = ", ".join(f"e{i} {100 * u:.1f}%" for i, u in enumerate(p["usage"]))
    console.print(f"[bold]prune[/]: expert usage {usage}; dropped expert {p['removed_experts'][0]}: loss on the test "
                  f"set {p['loss_before']:.4f} → {p['loss_after']:.4f} ({p['loss_change']:+.4f}), same next token "
                  f"{100 * p['token_agreement']:.1f}%", highlight=False)
    console.print(f"[bold]export nf4[/]: {x['size_on_disk'] / 1e6:.2f} MB of weights, {x['size_ratio']:.2f}x the bf16 "
                  f"model (linear weights {x['linear_ratio']:.2f}x); loss {x['loss_before']:.4f} → "
                  f"{x['loss_after']:.4f} ({x['loss_change']:+.4f})", highlight=False)
    console.print(f"[bold]chat[/] (nf4 model) · image {escape(c['image'])}", highlight=False)
    console.print(f"  user:      {c['question']}", highlight=False, markup=False)
    console.print(f"  assistant: {c['answer']}", highlight=False, markup=False)
    console.print(f"  expected:  {c['expected']} ({'right' if c['correct'] else 'wrong'})", highlight=False,
                  markup=False)
    for line in c["routing_lines"]:
        console.print(f"  routing:   {line}", highlight=False, markup=False)
    timings = " · ".join(f"{k} {v:.0f}s" for k, v in summary["timings"].items())
    console.print(f"[green]done[/] in {summary['wall_s']:.0f} s ({timings}); everything is in {escape(summary['out'])}",
                  highlight=False)
