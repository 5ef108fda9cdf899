"""The training loop: one function, `train(recipe)`, for every stage, one process or many (torchrun).

Per optimizer step every process takes grad_accum micro-batches of its share of the step's records
(data.StepBatches). The loss is the sum of the token losses over the whole step (all micro-batches of
all processes) divided by the step's number of label tokens, so 2 processes × batch b, 1 process with
2 accumulated micro-batches of b, and one batch of 2b give the same gradient. Then: clipping, AdamW over
the trainable parameters only, a cosine (or linear/constant) schedule with warmup.

The output directory holds recipe.yaml (the resolved recipe), metrics.jsonl (appended), checkpoints/
(atomic, see state.py), train_state.json and, at the end, the awaker model itself (the source's base
bytes plus the trained adapters), so `awaker info/chat/...` and the next stage's init_from take the
directory as it is. Re-running the same command resumes from the newest checkpoint; a finished run is
not trained again. Processes and data parallelism (ddp, fsdp): parallel.py.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.markup import escape

from ..checkpoint import Checkpoint, check_not_an_input
from ..checkpoint.base_ref import ADAPTERS_FILE, BASE_FILE
from ..checkpoint.outputs import output_lock
from ..errors import AwakerError
from ..model.build import adapter_state_dict
from ..model.families import family_of_model
from ..model.routing import Routing, SpanTokens
from ..model.save import save_with_source_base
from ..progress import progress_bar, stderr
from . import parallel
from . import state as ckpt_io
from .data import IGNORE_INDEX, Encoder, RecordDataset, StepBatches, collate, hold_out, read_records, \
    record_image_settings
from .recipe import RUN_CONTROL_FIELDS, Recipe, diff_fields, read_yaml, require_paths
from .report import Reporter, check_available
from .stages import build_stage_model, describe_trainable, plan_stage, trainable_parameters

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "train_state.json"
LOSS_PLOT = "loss.png"
ROUTING_PLOT = "routing.png"
BEST_DIR = "best"  # the adapters of the best evaluation so far (with an eval split)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- schedule and losses -----------------------------------------------------------------------------
def lr_factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup from lr/warmup."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Per router: var / mean² over the experts (0 for a single expert)."""
    if x.shape[-1] < 2:
        return x.new_zeros(x.shape[:-1])
    return x.var(-1) / (x.mean(-1) ** 2 + 1e-10)


def balance_loss(routing: Routing, num_experts: int) -> torch.Tensor:
    """cv²(importance) + cv²(load), averaged over routers. importance: the chosen experts' router
    probabilities summed over the batch (differentiable); load: how many sequences chose each expert."""
    b, r, _ = routing.probs.shape
    gates = routing.probs.new_zeros(b, r, num_experts).scatter(2, routing.expert_ids, routing.probs)
    load = torch.zeros_like(gates).scatter(2, routing.expert_ids, 1.0).sum(0)
    return (_cv_squared(gates.sum(0)) + _cv_squared(load)).mean()


def _all_sum_tensor(ctx, x: torch.Tensor) -> torch.Tensor:
    if ctx.world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


class StepBalance:
    """The balance loss of a whole optimizer step: cv²(importance) + cv²(load) over every sequence of
    every micro-batch and process, so it means the same at batch size 1 as at 64 (per micro-batch, one
    sequence makes both histograms one-hot: a constant with no gradient).

    The router input (the span mean of the input embeddings) does not depend on anything trained, so
    only the routers get this loss's gradient. Each micro-batch's router input and RNG state (its noise)
    are kept; in the step's last micro-batch the routers are re-run on them (exactly the same
    probabilities), the importance of the other processes is added as a constant, and the loss joins
    that micro-batch's backward, so ddp and fsdp reduce its gradient with the rest."""

    def __init__(self, model, num_experts: int, ctx):
        self.model, self.num_experts, self.ctx = model, num_experts, ctx
        self.inputs: list[tuple[torch.Tensor, object]] = []
        self._rng = None
        model.awaker_routers.register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        if module.training and torch.is_grad_enabled():
            self.inputs.append((args[0].detach(), self._rng_state(args[0].device)))

    @staticmethod
    def _rng_state(device):
        return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()

    def _replay(self, x, rng):
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if x.device.type == "cuda":
                torch.cuda.set_rng_state(rng, x.device)
            else:
                torch.set_rng_state(rng)
            return self.model.awaker_routers(x)

    def observe(self, last: bool) -> torch.Tensor | None:
        """Call after each micro-batch's forward; the step's loss after the last one, else None."""
        if not last:
            return None
        current = self.model.awaker_state.current
        earlier, self.inputs = self.inputs[:-1], []
        routings = [self._replay(x, rng) for x, rng in earlier] + [current]
        probs = torch.cat([r.probs for r in routings])
        ids = torch.cat([r.expert_ids for r in routings])
        b, r, _ = probs.shape
        gates = probs.new_zeros(b, r, self.num_experts).scatter(2, ids, probs)
        importance = gates.sum(0)
        load = torch.zeros_like(gates).scatter(2, ids, 1.0).sum(0)
        # other processes' importance as a constant: the sum of every process's gradient is the exact one
        importance = importance + (_all_sum_tensor(self.ctx, importance.detach()) - importance.detach())
        load = _all_sum_tensor(self.ctx, load)
        return (_cv_squared(importance) + _cv_squared(load)).mean()


class _LateSkips:
    """Counts records replaced in the loader because they failed only when decoded (distinct, per
    process), and names the first few as they happen."""

    SHOWN = 5

    def __init__(self, say):
        self.say, self.seen, self.reasons, self.new, self.total = say, set(), {}, 0, 0

    def add(self, items):
        for where, kind in items:
            if where in self.seen:
                continue
            self.seen.add(where)
            self.reasons[kind] = self.reasons.get(kind, 0) + 1
            self.new += 1
            if len(self.seen) <= self.SHOWN:
                self.say(f"[yellow]skipped[/] {escape(where)}: {escape(kind)}"
                         + (" (further skips are counted in metrics.jsonl)" if len(self.seen) == self.SHOWN else ""))

    def take_new(self) -> int:
        n, self.new = self.new, 0
        return n

    def to_dict(self) -> dict:
        return {"skipped_while_training": self.total, "skip_reasons_while_training": dict(self.reasons)}


# -- eval split --------------------------------------------------------------------------------------
class Evaluator:
    """The loss the run trains, on the eval records: token cross-entropy over their label tokens and, with
    train.balance_loss_coef, the balance loss over all of them (as over one step), without gradients, in
    eval mode (no dropout, no router noise). Each process takes every world-th record; every process runs
    the same number of forwards (fsdp gathers in each); a shard that has run out runs record 0, masked out."""

    def __init__(self, val, encoder: Encoder, pad_id: int, batch_size: int, ctx, skip_bad: bool):
        shard = list(range(ctx.rank, len(val), ctx.world))
        n_batches = math.ceil(math.ceil(len(val) / ctx.world) / batch_size)
        self.batches, self.valid = [], []
        for b in range(n_batches):
            idx = shard[b * batch_size:(b + 1) * batch_size]
            self.valid.append(len(idx))
            self.batches.append(idx or [0])
        self.loader = torch.utils.data.DataLoader(RecordDataset(val, encoder, skip_bad=skip_bad),
                                                  batch_sampler=self.batches,
                                                  collate_fn=functools.partial(collate, pad_id=pad_id))
        self.ctx, self.records = ctx, len(val)

    def run(self, net, model, device, precision: str, coef: float, num_experts: int) -> dict:
        loss_sum = n_labels = 0.0
        importance = load = None
        model.eval()
        try:
            with torch.no_grad():
                for batch, valid in zip(self.loader, self.valid):
                    batch.pop("skipped", None)
                    batch["labels"][valid:] = IGNORE_INDEX
                    n_labels += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                    loss_sum += float(token_loss_sum(net, model, batch, device, precision))
                    if coef:
                        r = model.awaker_state.current
                        probs, ids = r.probs[:valid].float(), r.expert_ids[:valid]
                        gates = probs.new_zeros(*probs.shape[:2], num_experts).scatter(2, ids, probs)
                        used = torch.zeros_like(gates).scatter(2, ids, 1.0)
                        importance = gates.sum(0) if importance is None else importance + gates.sum(0)
                        load = used.sum(0) if load is None else load + used.sum(0)
        finally:
            model.train()
            model.model.visual.eval()
        loss_total, labels = self.ctx.all_sum([loss_sum, n_labels])
        out = {"eval_loss": loss_total / max(labels, 1.0), "eval_records": self.records}
        if coef:
            importance, load = _all_sum_tensor(self.ctx, importance), _all_sum_tensor(self.ctx, load)
            out["eval_balance_loss"] = float((_cv_squared(importance) + _cv_squared(load)).mean())
        return out


def eval_objective(ev: dict, coef: float) -> float:
    """What early stopping and the best model go by: the eval loss plus the weighted balance loss."""
    return ev["eval_loss"] + coef * ev.get("eval_balance_loss", 0.0)


def _save_best(out: Path, adapters: dict, info: dict):
    """BEST_DIR/adapters.safetensors + best.json, replaced as a whole."""
    from safetensors.torch import save_file

    tmp = out / f".{BEST_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in adapters.items()}, str(tmp / "adapters.safetensors"))
    (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n")
    old = out / BEST_DIR
    if old.exists():
        shutil.rmtree(old)
    os.replace(tmp, old)


def _restore_best(out: Path, start: int, eval_steps: int) -> dict | None:
    """The best evaluation so far when resuming at `start` (one written after that step is dropped:
    it is about to be recomputed), with the number of evaluations since it."""
    info = _read_json(out / BEST_DIR / "best.json")
    if not info or info.get("step", 0) > start or start == 0:
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
        return None
    info["bad"] = (start // eval_steps - info["step"] // eval_steps) if eval_steps else 0
    return info


def _count_routes(counts: torch.Tensor | None, model):
    """Add a forward's router decisions to counts [R, E]."""
    routing = model.awaker_state.current
    if counts is not None and routing is not None:
        counts += F.one_hot(routing.expert_ids.detach(), counts.shape[1]).sum((0, 2)).to(counts)


def _read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def write_plots(out: Path, stage: int, config, route_counts: torch.Tensor | None, steps: tuple[int, int]) -> list[str]:
    """loss.png from metrics.jsonl and (stages II-III) routing.png from the run's router decisions."""
    from ..plots import loss_plot, routing_plot, share_by_layer

    written = [loss_plot(_read_metrics(out / METRICS_FILE), out / LOSS_PLOT,
                         f"awaker stage {stage}: {out.name}").name]
    if route_counts is not None and int(route_counts.sum()):
        share = share_by_layer(route_counts.cpu().numpy(), len(config.router_names))
        routing_plot(share, config.router_names, out / ROUTING_PLOT,
                     f"stage {stage} routing of the training records, steps {steps[0] + 1}-{steps[1]} "
                     f"(top-{config.top_k} of {config.num_experts} experts)")
        written.append(ROUTING_PLOT)
    return written


# -- output directory --------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_output_dir(out: Path, recipe: Recipe) -> dict | None:
    """None: start (or resume); else the train_state of a finished run of this same recipe."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise AwakerError(f"output_dir {out}: exists and is not a directory")
    saved_recipe = out / RECIPE_FILE
    if not saved_recipe.is_file():
        if any(out.iterdir()):
            raise AwakerError(f"output_dir {out}: not empty and not a training run (no {RECIPE_FILE}); "
                              "choose a new output_dir")
        return None
    done = _read_json(out / STATE_FILE)
    done = done if done and done.get("done") else None
    if done or ckpt_io.list_checkpoints(out):
        changed = [f for f in diff_fields(read_yaml(saved_recipe), recipe.to_dict()) if f not in RUN_CONTROL_FIELDS]
        if changed:
            what = "a finished run" if done else "checkpoints"
            raise AwakerError(f"output_dir {out}: holds {what} of a different recipe ({', '.join(changed)} "
                              f"changed); use a new output_dir, or the same recipe to "
                              f"{'keep it' if done else 'resume'}")
    return done


def _truncate_metrics(path: Path, step: int):
    """Drop metric lines past the checkpoint being resumed (they are about to be recomputed)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _publish_model(staged: Path, out: Path):
    """Move the files of a saved model into the output directory (replacing an older final model)."""
    new = {p.name for p in staged.iterdir()}
    for p in out.iterdir():
        weights = p.name.startswith("model") and p.suffix in (".safetensors", ".json")
        if p.is_file() and p.name not in new and (weights or p.name in (ADAPTERS_FILE, BASE_FILE)):
            p.unlink()
    for p in staged.iterdir():
        os.replace(p, out / p.name)
    staged.rmdir()


# -- the loop ----------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, enabled: bool, total: int, start: int, title: str):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=stderr, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(title, total=total, completed=start, loss="-", lr="-", tps="-")

    def update(self, step: int, loss: float, lr: float, tps: float):
        if self.enabled:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")

    def close(self):
        if self.enabled:
            self.progress.stop()
            self.enabled = False


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_for_training(model, gradient_checkpointing: bool):
    if gradient_checkpointing:  # non-reentrant: the frozen base's inputs need no grad; RNG is replayed
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    model.train()
    family_of_model(model).vision(model).eval()  # frozen, untouched


def token_loss_sum(net, model, batch: dict, device: torch.device, precision: str) -> torch.Tensor:
    """Sum of the cross-entropies of a collated batch's label tokens (labels shifted by one). `net` is
    what runs the forward (model, or its DDP wrapper); the batch's routing spans go to the model's
    routing hook. Pops labels and spans from `batch`."""
    labels = batch.pop("labels").to(device)
    model.awaker_state.spans = batch.pop("spans").to(device)
    inputs = {k: v.to(device) for k, v in batch.items()}
    with _autocast(device, precision):
        logits = net(**inputs, use_cache=False).logits
    model.awaker_state.spans = None
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def train(recipe: Recipe, *, after_step=None, quiet: bool = False, full: bool = False) -> dict:
    """Run (or resume) the recipe's training. after_step(step, metrics) is called after every optimizer
    step and after that step's checkpoint is written (tests use it to stop a run as if killed).
    full: the final model holds a copy of the base; by default it holds the adapters and a verified
    record of the base (checkpoint/base_ref.py).
    Returns a summary: output directory, steps, final loss, data statistics."""
    require_paths(recipe)
    t, d = recipe.train, recipe.data
    out = Path(recipe.output_dir)
    check_not_an_input(out, [recipe.model, recipe.init_from, *d.train])
    finished = check_output_dir(out, recipe)
    say = (lambda *a, **k: None) if quiet else stderr.print
    if finished:
        say(f"[green]{escape(str(out))}: already trained[/] (step {finished['step']}); nothing to do")
        return {**finished, "output_dir": str(out), "resumed": False, "skipped": True}

    plan = plan_stage(recipe)  # JSON files only: every recipe problem shows before weights load
    records, stats = read_records(d.train, fmt=d.format, image_root=d.image_root, skip_bad=d.skip_bad_records,
                                  dataset=d.dataset, dataset_dir=d.dataset_dir)
    val = None
    if d.val:
        val, _ = read_records(d.val, fmt=d.format, image_root=d.image_root, skip_bad=d.skip_bad_records)
        if not len(val):
            raise AwakerError(f"data.val: no usable records in {', '.join(d.val)}")
    elif d.val_size:
        records, val = hold_out(records, d.val_size, t.seed)
    check_available(t.report_to)
    ctx = parallel.setup_dist(t.device)
    say = say if ctx.main else (lambda *a, **k: None)
    created = not out.exists()
    try:
        # one run per output_dir: the main process holds the lock (its other processes are the same run)
        with output_lock(out) if ctx.main else contextlib.nullcontext():
            try:
                return _run(recipe, plan, records, val, stats, ctx, out, say, after_step, quiet, full)
            except BaseException:
                if ctx.main and created:
                    _remove_if_nothing_trained(out)
                raise
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _remove_if_nothing_trained(out: Path):
    """A run that fails before its first step leaves no output_dir behind (recipe.yaml alone is debris);
    once a step was logged, the metrics of the failed run stay for reading."""
    metrics = out / METRICS_FILE
    if out.is_dir() and not ckpt_io.list_checkpoints(out) and not (metrics.is_file() and metrics.stat().st_size):
        shutil.rmtree(out, ignore_errors=True)


def _run(recipe, plan, records, val, stats, ctx: parallel.Dist, out: Path, say, after_step, quiet,
         full: bool) -> dict:
    from transformers import AutoProcessor

    t, d = recipe.train, recipe.data
    global_batch = ctx.world * t.grad_accum * t.batch_size
    steps_per_epoch = len(records) // global_batch
    if steps_per_epoch == 0:
        raise AwakerError(f"{len(records)} usable records, fewer than one global batch of {global_batch} "
                          f"({ctx.world} process(es) × grad_accum {t.grad_accum} × batch_size {t.batch_size})")
    total = t.max_steps or t.epochs * steps_per_epoch
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total)

    processor = AutoProcessor.from_pretrained(plan.source)
    ids = plan.config.span_token_ids
    encoder = Encoder(processor, cutoff_len=d.cutoff_len, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                      span_tokens=SpanTokens(ids["vision_start"], ids["im_start"], ids["im_end"]),
                      span_rule=plan.config.routing_span)
    pad_id = processor.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id

    base_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    model = build_stage_model(plan, dtype=base_dtype, device=ctx.device, seed=t.seed)
    prepare_for_training(model, t.gradient_checkpointing)

    if ctx.main:
        ckpt_io.remove_partials(out)
    ctx.barrier()
    found = ckpt_io.list_checkpoints(out)
    _check_shared(ctx, out, found[-1].name if found else None)
    state = _check_resumable(found[-1], ctx, len(records)) if found else None
    shard = t.parallel == "fsdp" and ctx.world > 1
    need = parallel.state_bytes(model, ctx.world, shard, fused=parallel.fused_adamw(ctx.device, shard))
    parallel.check_fits(need, ctx.device, shard)  # before DDP's buckets or FSDP's gathers take memory
    net = parallel.wrap(model, ctx, t.parallel)  # fsdp: model's parameters are now sharded DTensors
    sharded = parallel.is_sharded(model)
    named = trainable_parameters(model)
    params = [p for _, p in named]
    optimizer = parallel.make_optimizer(params, t, ctx.device, sharded)
    schedule = functools.partial(lr_factor, total=total, warmup=warmup, kind=t.scheduler, min_ratio=t.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    start, resumed, tokens_seen = 0, False, 0
    if state is not None:
        saved = ckpt_io.load_shard(found[-1], ctx.rank) if sharded else state
        with torch.no_grad():
            tensors = adapter_state_dict(model)
            for key, value in saved["adapters"].items():
                parallel.local(tensors[key]).copy_(value)
        parallel.load_optimizer_shard(optimizer, saved["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt_io.set_rng_state(state["rng"][ctx.rank])
        start, resumed, tokens_seen = state["step"], True, state.get("tokens_seen", 0)
        del saved, state  # memory-mapped: let the files go (old checkpoints get deleted later)
        if ctx.main:
            _truncate_metrics(out / METRICS_FILE, start)
        say(f"[green]resuming[/] {escape(str(out))} from step {start} ({found[-1].name})")
    else:
        if ctx.main:  # a run killed before its first checkpoint starts over: so do its metrics
            (out / METRICS_FILE).unlink(missing_ok=True)
        torch.manual_seed(t.seed + ctx.rank)
        random.seed(t.seed + ctx.rank)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (RECIPE_FILE + ".tmp")
        tmp.write_text(recipe.to_yaml())
        os.replace(tmp, out / RECIPE_FILE)
    ctx.barrier()
    _check_shared(ctx, out, (out / RECIPE_FILE).is_file())

    trainable = describe_trainable(model)
    skipped = (f", [yellow]{stats.skipped} bad record(s) skipped[/] ({escape(stats.skip_line())})"
               if stats.skipped else "")
    say(f"[bold]stage {plan.stage}[/] from {plan.source}: {stats.records} records "
        f"({', '.join(f'{k} {v}' for k, v in stats.layouts.items())}){skipped}"
        f"{f', {len(val)} for eval' + (f' (held out, {len(records)} train)' if d.val_size else '') if val else ''}, "
        f"{total} steps of {global_batch} "
        f"({steps_per_epoch} per epoch), {trainable['total']:,} trainable parameters "
        f"(LoRA {trainable['lora']:,}, experts {trainable['experts']:,}, routers {trainable['routers']:,}), "
        f"{ctx.world} process(es){f' ({t.parallel})' if ctx.world > 1 else ''} on {ctx.device.type}, {t.precision}; "
        f"weights, gradients and AdamW state ≈ {need / 1e9:.2f} GB per process")

    sampler = StepBatches(len(records), batch_size=t.batch_size, grad_accum=t.grad_accum, world=ctx.world,
                          rank=ctx.rank, seed=t.seed, shuffle=d.shuffle, start_step=start, total_steps=total)
    dataset = RecordDataset(records, encoder, skip_bad=d.skip_bad_records)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=functools.partial(collate, pad_id=pad_id),
                                         num_workers=d.num_workers, persistent_workers=False,
                                         # its own generator: creating the iterator must not draw from the
                                         # global RNG (dropout, router noise), or a resumed run would diverge
                                         generator=torch.Generator().manual_seed(t.seed))
    batches = iter(loader)
    coef = t.balance_loss_coef
    num_experts = plan.config.num_experts
    progress = _Progress(t.progress and ctx.main and not quiet, total, start, f"stage {plan.stage}")
    metrics_file = out / METRICS_FILE
    window = {"loss": 0.0, "balance": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
    last: dict = {}
    late = _LateSkips(say)  # records that fail only when decoded (data.skip_bad_records)
    balance = StepBalance(model, num_experts, ctx) if coef else None
    route_counts = (torch.zeros(plan.config.num_routers, num_experts, dtype=torch.long, device=ctx.device)
                    if plan.config.num_routers else None)
    evaluator = Evaluator(val, encoder, pad_id, t.batch_size, ctx, d.skip_bad_records) if val is not None else None
    best = _restore_best(out, start, t.eval_steps) if evaluator and ctx.main else None
    best = ctx.gather_objects(best)[0] if ctx.world > 1 else best  # the main process's view decides
    reporter = Reporter(t.report_to if ctx.main else "none", out, recipe.to_dict())
    stopped_early = False
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(t.grad_accum)]
            for m in micro:
                late.add(m.pop("skipped", []))
            local_labels = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
            local_tokens = sum(int(m["attention_mask"].sum()) for m in micro)
            n_labels, _ = ctx.all_sum([float(local_labels), 0.0])
            loss_sum = bal_sum = 0.0
            for i, m in enumerate(micro):
                sync = parallel.gradient_sync(net, sync=i == len(micro) - 1)
                with sync:
                    token_loss = token_loss_sum(net, model, m, ctx.device, t.precision)
                    _count_routes(route_counts, model)
                    loss = token_loss * (ctx.world / max(n_labels, 1.0))
                    if coef:
                        # over the whole step (every micro-batch and process), added to its last backward
                        bal = balance.observe(last=i == len(micro) - 1)
                        if bal is not None:
                            loss = loss + coef * bal * ctx.world  # ddp/fsdp average: world × is the sum
                            bal_sum = float(bal.detach())
                    loss.backward()
                loss_sum += float(token_loss.detach())
                del loss, token_loss
            if t.max_grad_norm > 0:
                grad_norm = parallel.scalar(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
            else:
                grad_norm = parallel.scalar(torch.nn.utils.get_total_norm([p.grad for p in params
                                                                           if p.grad is not None]))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            loss_total, tokens, bal_total, new_skips = ctx.all_sum([loss_sum, float(local_tokens), bal_sum,
                                                                    float(late.take_new())])
            late.total += int(new_skips)
            step_loss = loss_total / max(n_labels, 1.0)
            elapsed = time.perf_counter() - t0
            tokens_seen += int(tokens)
            window["loss"] += step_loss
            window["balance"] += bal_total / ctx.world
            window["steps"] += 1
            window["tokens"] += int(tokens)
            window["time"] += elapsed
            done_steps = step + 1
            tps = window["tokens"] / max(window["time"], 1e-9)
            last = {"step": done_steps, "epoch": round(done_steps / steps_per_epoch, 4), "loss": step_loss,
                    "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens), "tokens_per_s": round(tps, 1)}
            if coef:
                last["balance_loss"] = bal_total / ctx.world
            if d.skip_bad_records:
                last["skipped_records"] = late.total
            progress.update(done_steps, step_loss, lr, tps)
            if ctx.main and (done_steps % t.logging_steps == 0 or done_steps == total):
                record = {"step": done_steps, "epoch": last["epoch"], "loss": window["loss"] / window["steps"],
                          "lr": lr, "grad_norm": grad_norm, "tokens": window["tokens"], "tokens_per_s": round(tps, 1),
                          "tokens_seen": tokens_seen, "time": round(time.time(), 3)}
                if coef:
                    record["balance_loss"] = window["balance"] / window["steps"]
                if d.skip_bad_records:  # records replaced so far because they failed only when decoded
                    record["skipped_records"] = late.total
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
                reporter.log(record)
                window = {"loss": 0.0, "balance": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
            if evaluator and ((t.eval_steps and done_steps % t.eval_steps == 0) or done_steps == total):
                ev = evaluator.run(model if not sharded else net, model, ctx.device, t.precision, coef, num_experts)
                objective = eval_objective(ev, coef)
                improved = best is None or objective < best["objective"]
                if improved:
                    best = {"step": done_steps, "objective": objective, **ev, "bad": 0}
                    adapters = parallel.full_tensors(adapter_state_dict(model), keep=ctx.main)
                    if ctx.main:
                        _save_best(out, adapters, {k: v for k, v in best.items() if k != "bad"})
                    del adapters
                else:
                    best["bad"] += 1
                last.update(ev)
                if ctx.main:
                    record = {"step": done_steps, "epoch": last["epoch"], **ev, "best": improved,
                              "time": round(time.time(), 3)}
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    reporter.log(record, "eval")
                    was = f" (best {best['eval_loss']:.4f} at step {best['step']})"
                    say(f"step {done_steps}: eval loss {ev['eval_loss']:.4f}" + (" [green](best)[/]" if improved else was))
                if t.early_stopping_patience and best["bad"] >= t.early_stopping_patience and done_steps < total:
                    stopped_early = True
            if t.save_steps and done_steps % t.save_steps == 0 and done_steps < total:
                _save_training_state(ctx, out, model, optimizer, scheduler, done_steps, len(records), global_batch,
                                     recipe, tokens_seen, t.save_total_limit, sharded)
            if after_step is not None:
                after_step(done_steps, last)
            if stopped_early:
                say(f"[yellow]early stopping[/] at step {done_steps}: {best['bad']} evaluation(s) without improvement; "
                    f"the model keeps the best evaluation's weights (step {best['step']})")
                break
    except KeyboardInterrupt:
        progress.close()
        saved = ckpt_io.list_checkpoints(out)
        say(f"[yellow]stopped[/]; re-run the same command to resume from "
            f"{saved[-1].name if saved else 'the start (no checkpoint yet)'}")
        raise
    finally:
        progress.close()
        reporter.close()
    end = last.get("step", start)
    if route_counts is not None:
        route_counts = _all_sum_tensor(ctx, route_counts)

    # the final model: an awaker directory, in the output directory itself. The base is frozen: by default
    # only a record of it is written (adapter-only), with --full its tensors are copied byte for byte.
    adapters = parallel.full_tensors(adapter_state_dict(model), keep=ctx.main)
    if ctx.main and best is not None and best["step"] != end:
        # with an eval split the model is the best evaluation's (the adapters saved then)
        from safetensors.torch import load_file

        adapters = load_file(str(out / BEST_DIR / "adapters.safetensors"))
    if ctx.main:
        source = Checkpoint(plan.source)
        save_dtype = _source_dtype(source) if t.save_dtype == "auto" else _DTYPES[t.save_dtype]
        staged = out / ".final-model"
        if staged.exists():
            shutil.rmtree(staged)
        save_with_source_base(staged, source, adapters, plan.config, force=True,
                              title=f"awaker stage-{plan.stage} model", card=_card(recipe, plan, stats, end, last),
                              adapter_dtype=save_dtype, adapter_only=not full, final_dir=out,
                              bar=functools.partial(progress_bar, enabled=t.progress and not quiet))
        record_image_settings(staged, d.min_pixels, d.max_pixels)
        del adapters
        _publish_model(staged, out)
        summary = {"done": True, "stage": plan.stage, "step": end, "total_steps": total,
                   "final_loss": last.get("loss"), "tokens_seen": tokens_seen,
                   "data": {**stats.to_dict(), **late.to_dict()},
                   "world_size": ctx.world}
        if best is not None:
            summary["best_eval"] = {k: v for k, v in best.items() if k != "bad"}
            summary["stopped_early"] = stopped_early
        try:
            summary["plots"] = write_plots(out, plan.stage, plan.config, route_counts, (start, end))
        except Exception as e:  # noqa: BLE001 - a picture that fails must not cost the trained model
            say(f"[yellow]no plots[/]: {escape(str(e))}")
        tmp = out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, out / STATE_FILE)
        if not t.keep_checkpoints:
            shutil.rmtree(ckpt_io.checkpoint_root(out), ignore_errors=True)
            shutil.rmtree(out / BEST_DIR, ignore_errors=True)  # its weights are the final model's
        say(f"[green]wrote[/] {escape(str(out))} (stage {plan.stage}, {end} steps, "
            f"final loss {last.get('loss', float('nan')):.4f}"
            + (f"; weights of the best evaluation: step {best['step']}, eval loss {best['eval_loss']:.4f}"
               + (f", kept in {escape(str(out / BEST_DIR))}" if t.keep_checkpoints else "") if best else "")
            + (f"; {late.total} record(s) skipped while decoding" if late.total else "") + ")"
            + (f"; plots: {', '.join(summary.get('plots', []))}" if summary.get("plots") else ""))
    ctx.barrier()
    result = {"output_dir": str(out), "stage": plan.stage, "step": end, "final_loss": last.get("loss"),
              "resumed": resumed, "skipped": False, "data": {**stats.to_dict(), **late.to_dict()}}
    if best is not None:
        result.update(best_eval={k: v for k, v in best.items() if k != "bad"}, stopped_early=stopped_early)
    return result


def _check_shared(ctx: parallel.Dist, out: Path, seen):
    """Every process must see the same output directory (checkpoints, recipe.yaml): with processes on
    several machines it has to be on a filesystem they share, or they would resume from different steps."""
    if len({repr(v) for v in ctx.gather_objects(seen)}) > 1:
        raise AwakerError(f"output_dir {out}: the processes see different contents; put it (and the data) on a "
                          "filesystem every process shares")


def _check_resumable(checkpoint: Path, ctx: parallel.Dist, num_records: int) -> dict:
    state = ckpt_io.load_checkpoint(checkpoint)
    if state["world_size"] != ctx.world:
        raise AwakerError(f"{checkpoint}: written by {state['world_size']} process(es), this run has {ctx.world}; "
                          "resume with the same number of processes")
    if state["data"]["records"] != num_records:
        raise AwakerError(f"{checkpoint}: trained on {state['data']['records']} records, the data now has "
                          f"{num_records}; the data changed, use a new output_dir")
    return state


def _save_training_state(ctx: parallel.Dist, out: Path, model, optimizer, scheduler, step: int, num_records: int,
                         global_batch: int, recipe: Recipe, tokens_seen: int, keep: int, sharded: bool):
    """Checkpoint `step`: with fsdp every process writes its shard of the adapters and optimizer states,
    then the main process adds state.pt (the rest) and renames the checkpoint into place."""
    rng_all = ctx.gather_objects(ckpt_io.rng_state())
    mine = {}
    if sharded or ctx.main:  # fsdp: this process's shards; ddp: the main process's copy is everyone's
        mine = {"adapters": parallel.to_cpu(adapter_state_dict(model)),
                "optimizer": parallel.to_cpu(optimizer.state_dict())}
    if ctx.main:
        ckpt_io.begin_checkpoint(out, step)
    ctx.barrier()
    if sharded:
        ckpt_io.write_part(ckpt_io.shard_path(ckpt_io.staging_dir(out, step), ctx.rank), mine)
    ctx.barrier()
    if ctx.main:
        payload = {
            **({} if sharded else mine),
            "sharded": sharded,
            "scheduler": scheduler.state_dict(),
            "rng": rng_all,
            "world_size": ctx.world,
            "data": {"step": step, "records": num_records, "global_batch": global_batch},
            "tokens_seen": tokens_seen,
            "recipe": recipe.to_dict(),
        }
        ckpt_io.finish_checkpoint(out, step, payload, keep)
    ctx.barrier()


def _source_dtype(source: Checkpoint) -> torch.dtype:
    """The base's dtype on disk (its embedding's): adapters are saved in it by default."""
    info = source.tensors.get("model.embed_tokens.weight")
    return info.dtype if info is not None else torch.float32


def _card(recipe: Recipe, plan, stats, total: int, last: dict) -> list[str]:
    c = plan.config
    lines = [f"Trained by `awaker train` (stage {plan.stage}) from {plan.source}.",
             f"{stats.records} records from {', '.join(stats.files)}; {total} optimizer steps; "
             f"final loss {last.get('loss', float('nan')):.4f}."]
    if c.moe_targets:
        lines.append(f"LoRA-MoE: {c.num_experts} experts{' + global' if c.global_expert else ''}, top-{c.top_k}, "
                     f"rank {c.rank}, alpha {c.alpha:g}, combine {c.combine} on {', '.join(c.moe_targets)}; "
                     f"plain LoRA on {', '.join(c.lora_targets) or '-'}.")
    else:
        lines.append(f"One plain LoRA (rank {c.rank}, alpha {c.alpha:g}) on {', '.join(c.lora_targets)}.")
    lines.append("The resolved recipe is in recipe.yaml, the training curve in metrics.jsonl.")
    return lines
