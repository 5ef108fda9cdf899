"""The paper's table in miniature: does a LoRA-MoE recover what multi-task training loses?

On the synthetic benchmark of `awaker synth` (four task families, two conflicting answer formats each:
eight tasks) and the shipped tiny pretrained Qwen2-VL, for each seed:

- single-task LoRAs: one per task, trained only on that task's records (at the dense LoRA's rank);
- a multi-task dense LoRA on all records, with as many trainable parameters as the LoRA-MoE (so a
  larger rank, computed here and printed);
- the 3-stage LoRA-MoE (stage 1 plain LoRA, stage 2 LoRA-MoE with routers, stage 3 gates frozen).

Every model sees each task's records equally often: the dense LoRA and the MoE (its three stages
together) train EPOCHS epochs over all records, each single-task LoRA EPOCHS epochs over its task's
(so an eighth of the steps; --single-epochs changes that).
Settings otherwise come from the demo recipes (recipes/demo-stage1..3.yaml). Reported per task: exact
match on held-out questions, mean ± standard deviation over seeds; the conflict gap (single − dense)
and how much of it the MoE recovers, (MoE − dense) / (single − dense), from the seed means.

    python bench/miniature.py [--seeds 0,1,2] [--epochs 6] [--workdir bench-out/miniature] [--json]
                              [--arms single,dense,moe] [--routing-span prompt|prompt-text|all]

--arms runs only some model families (the others' columns are left out); --routing-span sets the
LoRA-MoE's router input rule (default: the recipe's, `prompt`).

Finished seeds are kept in WORKDIR/results.json: re-running with the same settings skips them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from awaker_cli.checkpoint import Checkpoint
from awaker_cli.checkpoint.keys import ROUTER_PREFIX, lm_module_path
from awaker_cli.demo import demo_recipe
from awaker_cli.evaluate import evaluate
from awaker_cli.model.config import SPAN_RULES
from awaker_cli.synth import TASKS, tiny_base_path, write_dataset
from awaker_cli.train import train
from awaker_cli.train.recipe import DEFAULT_MOE_TARGETS, STAGE1_TARGETS, find_recipe, read_yaml

MOE_SPLIT = (0.5, 0.25, 0.25)  # the MoE's epochs per stage
ARMS = ("single", "dense", "moe")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- parameter counts --------------------------------------------------------------------------------
def linear_shapes(base: Path) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(layers, hidden, {target: (in, out)}) of the base's language model."""
    ckpt = Checkpoint(base)
    shapes = {}
    for target in STAGE1_TARGETS:
        out_f, in_f = ckpt.tensors[lm_module_path(0, target) + ".weight"].shape
        shapes[target] = (in_f, out_f)
    return ckpt.num_layers, ckpt.text_config["hidden_size"], shapes


def moe_trainable(base: Path, rank: int, experts: int, owners: int) -> int:
    """Stage-2 trainable parameters: plain LoRA on q/k/v, experts + global expert on the MoE targets,
    and the routers (RMSNorm weight, gate weight and bias; `owners` routers per layer)."""
    layers, hidden, shapes = linear_shapes(base)
    lora = sum(rank * sum(shapes[t]) for t in STAGE1_TARGETS if t not in DEFAULT_MOE_TARGETS)
    moe = sum(rank * sum(shapes[t]) * (experts + 1) for t in DEFAULT_MOE_TARGETS)
    routers = owners * (hidden + experts * hidden + experts)
    return layers * (lora + moe + routers)


def lora_trainable(base: Path, rank: int) -> int:
    layers, _, shapes = linear_shapes(base)
    return layers * rank * sum(sum(shapes[t]) for t in STAGE1_TARGETS)


def saved_trainable(model_dir: Path) -> int:
    """Adapter and router parameters actually stored in a trained model (checks the counts above)."""
    ckpt = Checkpoint(model_dir)
    return sum(info.numel for key, info in ckpt.tensors.items()
               if key.startswith(ROUTER_PREFIX) or key.endswith((".lora_A", ".lora_B")))


# -- data --------------------------------------------------------------------------------------------
def split_by_task(data_dir: Path, split: str) -> dict[str, Path]:
    """data/{split}-{task}.jsonl beside data/{split}.jsonl (image paths stay valid)."""
    lines: dict[str, list[str]] = {}
    for line in (data_dir / f"{split}.jsonl").read_text().splitlines():
        lines.setdefault(json.loads(line)["task"], []).append(line + "\n")
    files = {}
    for task, rows in lines.items():
        files[task] = data_dir / f"{split}-{task}.jsonl"
        files[task].write_text("".join(rows))
    return files


# -- one seed ----------------------------------------------------------------------------------------
def run_train(stage: int, source: Path, out: Path, train_file: Path, seed: int, overrides: dict) -> float:
    t = time.perf_counter()
    train(demo_recipe(stage, source, out, train_file, seed=seed, overrides=overrides), quiet=True)
    return time.perf_counter() - t


def exact(result: dict) -> dict[str, float]:
    return {task: row["exact_match"] for task, row in result["tasks"].items()}


def run_seed(seed: int, args, work: Path, base: Path, dense_rank: int) -> dict:
    root = work / f"seed-{seed}"
    if root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    data = write_dataset(root / "data", args.n_train, args.n_test, seed)
    train_file, test_file = Path(data["train"]), Path(data["test"])
    train_by_task, test_by_task = split_by_task(train_file.parent, "train"), split_by_task(test_file.parent, "test")
    bs = args.batch_size

    def steps(records: int, epochs: float) -> int:
        return max(1, round(epochs * records / bs))

    common = {"train.batch_size": bs}
    result: dict = {"seed": seed, "seconds": {}}

    # single-task LoRAs, at the dense LoRA's rank
    if "single" in args.arms:
        t = time.perf_counter()
        result["single"] = {}
        for task, file in train_by_task.items():
            n = sum(1 for _ in file.open())
            over = {**common, "adapter.rank": dense_rank, "adapter.alpha": 2 * dense_rank,
                    "train.max_steps": steps(n, args.single_epochs or args.epochs)}
            run_train(1, base, root / f"single-{task}", file, seed, over)
            r = evaluate(root / f"single-{task}", test_by_task[task], batch_size=40, max_new_tokens=24)
            result["single"][task] = r["tasks"][task]["exact_match"]
            log(f"seed {seed} single-task {task}: {100 * result['single'][task]:.1f}%")
            if not args.keep:
                shutil.rmtree(root / f"single-{task}")
        result["seconds"]["single"] = round(time.perf_counter() - t, 1)

    # the multi-task dense LoRA with the MoE's parameter count
    if "dense" in args.arms:
        t = time.perf_counter()
        over = {**common, "adapter.rank": dense_rank, "adapter.alpha": 2 * dense_rank,
                "train.max_steps": steps(args.n_train, args.epochs)}
        run_train(1, base, root / "dense", train_file, seed, over)
        r = evaluate(root / "dense", test_file, batch_size=40, max_new_tokens=24)
        result["dense"], result["dense_format"] = exact(r), r["macro"]["format"]
        result["dense_params"] = saved_trainable(root / "dense")
        result["seconds"]["dense"] = round(time.perf_counter() - t, 1)
        log(f"seed {seed} dense (rank {dense_rank}): macro {100 * r['macro']['exact_match']:.1f}%")

    # the 3-stage LoRA-MoE
    if "moe" in args.arms:
        t = time.perf_counter()
        source = base
        for stage, share in zip((1, 2, 3), MOE_SPLIT):
            over = {**common, "train.max_steps": steps(args.n_train, args.epochs * share)}
            if stage == 1:
                over.update({"adapter.rank": args.rank, "adapter.alpha": 2 * args.rank})
            if stage == 2 and args.routing_span:  # stage 3 keeps stage 2's architecture
                over["adapter.routing_span"] = args.routing_span
            run_train(stage, source, root / f"moe-stage{stage}", train_file, seed, over)
            source = root / f"moe-stage{stage}"
        r = evaluate(source, test_file, batch_size=40, max_new_tokens=24)
        result["moe"], result["moe_format"] = exact(r), r["macro"]["format"]
        result["moe_purity"] = r["routing"]["purity"]
        result["moe_params"] = saved_trainable(root / "moe-stage2")
        result["seconds"]["moe"] = round(time.perf_counter() - t, 1)
        log(f"seed {seed} LoRA-MoE: macro {100 * r['macro']['exact_match']:.1f}%, routing purity "
            f"{100 * r['routing']['purity']:.1f}%")
    if not args.keep:
        shutil.rmtree(root)
    result["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return result


# -- the table ---------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(seeds: list[dict], arms=ARMS) -> dict:
    """Per task (and macro): mean ± sd of each arm run; the gap columns only when all three ran."""
    tasks = list(TASKS)
    rows = {}
    for task in [*tasks, "macro"]:
        row = {}
        for kind in arms:
            if task == "macro":
                vals = [statistics.fmean(s[kind][t] for t in tasks) for s in seeds]
            else:
                vals = [s[kind][task] for s in seeds]
            row[kind] = mean_sd(vals)
        if all(kind in row for kind in ARMS):
            gap = row["single"][0] - row["dense"][0]
            gain = row["moe"][0] - row["dense"][0]
            row["gap"], row["moe_gain"] = gap, gain
            # recovery is a share of a positive gap; with no gap (or dense ahead of single-task) there is
            # nothing to recover and the ratio would mislead
            row["recovered"] = gain / gap if gap > 0.005 else None
        rows[task] = row
    return rows


def markdown(rows: dict, seeds: list[dict], dense_rank: int, rank: int, params: dict, budget: str,
             span_rule: str = "prompt") -> str:
    def ms(pair):
        return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"

    names = {"single": f"single-task LoRA (r={dense_rank})", "dense": f"multi-task dense LoRA (r={dense_rank})",
             "moe": f"LoRA-MoE (4+1 experts, r={rank})"}
    arms = [k for k in ARMS if k in rows["macro"]]
    gaps = "gap" in rows["macro"]
    columns = [names[k] for k in arms] + (["gap: single − dense", "MoE − dense", "gap recovered"] if gaps else [])
    lines = ["| task | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for task, row in rows.items():
        cells = [ms(row[k]) for k in arms]
        if gaps:
            rec = f"{100 * row['recovered']:.0f}%" if row["recovered"] is not None else \
                "n/a (no gap)" if abs(row["gap"]) <= 0.005 else "n/a (dense ahead)"
            cells += [f"{100 * row['gap']:+.1f}", f"{100 * row['moe_gain']:+.1f}", rec]
        name = f"**{task}**" if task == "macro" else task
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    note = (f"Exact match % on held-out questions, mean ± standard deviation over {len(seeds)} seed(s) "
            f"({', '.join(str(s['seed']) for s in seeds)}). Trainable parameters: LoRA-MoE "
            f"{params['moe']:,} (stage 2), dense LoRA {params['dense']:,} (rank {dense_rank}). {budget} ")
    if "moe" in arms:
        purity = mean_sd([s["moe_purity"] for s in seeds])
        note += (f"LoRA-MoE routing span rule {span_rule}, routing purity {100 * purity[0]:.1f} ± "
                 f"{100 * purity[1]:.1f}% (one expert for everything: 12.5%; at most 50% with 4 experts for 8 tasks). ")
    note += f"Training and evaluation took {sum(s['seconds']['total'] for s in seeds):.0f} s of CPU in all."
    lines += ["", note]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    ap.add_argument("--epochs", type=float, default=6.0, help="epochs over the data per model family")
    ap.add_argument("--single-epochs", type=float, default=None,
                    help="epochs of each single-task LoRA over its task's records (default: --epochs, so every "
                         "model sees each task equally often; 8x --epochs gives each as many steps as the dense LoRA)")
    ap.add_argument("--n-train", type=int, default=1600)
    ap.add_argument("--n-test", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the MoE's stage 1 (every expert)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/miniature"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest at this size)")
    ap.add_argument("--keep", action="store_true", help="keep the trained models under WORKDIR")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of markdown")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma list of the model families to run: "
                    "single, dense, moe (default all; the gap columns need all three)")
    ap.add_argument("--routing-span", choices=SPAN_RULES, default=None,
                    help="the LoRA-MoE's routing span rule (default: the recipe's, prompt)")
    args = ap.parse_args(argv)
    wanted = {a.strip() for a in args.arms.split(",") if a.strip()}
    if not wanted or not wanted <= set(ARMS):
        ap.error(f"--arms: a comma list of {', '.join(ARMS)}, got {args.arms!r}")
    args.arms = tuple(k for k in ARMS if k in wanted)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    base = tiny_base_path()

    stage2 = read_yaml(find_recipe("demo-stage2"))["adapter"]
    experts = stage2.get("num_experts", 4)
    owners = 2  # o_proj's router and gate_proj's (up/down reuse it): the stage-2 default
    moe_params = moe_trainable(base, args.rank, experts, owners)
    per_rank = lora_trainable(base, 1)
    dense_rank = round(moe_params / per_rank)
    params = {"moe": moe_params, "dense": lora_trainable(base, dense_rank), "per_rank": per_rank}
    log(f"LoRA-MoE trainable parameters {moe_params:,}; a plain LoRA has {per_rank:,} per rank: dense rank "
        f"{dense_rank} ({params['dense']:,} parameters)")

    settings = {k: v for k, v in vars(args).items()
                if k in ("epochs", "single_epochs", "n_train", "n_test", "batch_size", "rank")}
    settings["recipes"] = {f"demo-stage{i}": read_yaml(find_recipe(f"demo-stage{i}")) for i in (1, 2, 3)}
    # the shipped base's weights identify it: results of another base are not mixed in
    # only when not the defaults, so results saved before these options existed still count
    if args.arms != ARMS:
        settings["arms"] = list(args.arms)
    if args.routing_span:
        settings["routing_span"] = args.routing_span
    settings["base_sha256"] = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(base.glob("*.safetensors")))).hexdigest()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_file = args.workdir / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if saved.get("settings") != settings:
        saved = {"settings": settings, "seeds": {}}
    started = time.perf_counter()
    for seed in seeds:
        if str(seed) in saved["seeds"]:
            log(f"seed {seed}: done before, kept from {results_file}")
            continue
        result = run_seed(seed, args, args.workdir, base, dense_rank)
        if result.get("moe_params", moe_params) != moe_params or result.get("dense_params", params["dense"]) != params["dense"]:
            raise SystemExit(f"parameter count mismatch: computed MoE {moe_params} dense {params['dense']}, "
                             f"trained {result.get('moe_params')} / {result.get('dense_params')}")
        saved["seeds"][str(seed)] = result
        results_file.write_text(json.dumps(saved, indent=2) + "\n")
        log(f"seed {seed} done in {result['seconds']['total']:.0f} s")
    done = [saved["seeds"][str(s)] for s in seeds]
    rows = aggregate(done, args.arms)
    wall = time.perf_counter() - started
    if args.json:
        print(json.dumps({"settings": settings, "dense_rank": dense_rank, "params": params, "rows": rows,
                          "seeds": done, "wall_s": round(wall, 1)}, indent=2))
    else:
        per_task = args.n_train // len(TASKS)
        single = args.single_epochs or args.epochs
        budget = (f"Training: dense LoRA {round(args.epochs * args.n_train / args.batch_size)} steps, LoRA-MoE "
                  + " + ".join(str(round(args.epochs * f * args.n_train / args.batch_size)) for f in MOE_SPLIT)
                  + f" steps (stages 1-3), each single-task LoRA {round(single * per_task / args.batch_size)} steps "
                  f"on its {per_task} records; batch {args.batch_size}.")
        print(markdown(rows, done, dense_rank, args.rank, params, budget, args.routing_span or "prompt"))
        log(f"wall time of this run {wall:.0f} s (seeds done before are not re-run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
