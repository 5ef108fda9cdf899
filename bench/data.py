"""Training data at real scale: index and iterate a synthetic file shaped like llava_v1_5_mix665k.

The file: N records in the LLaVA `conversations` + `image` layout (1 to 6 question/answer pairs, answers
of a sentence or a paragraph, one text-only record in 16 as in the mix's ShareGPT part, LLaVA-style
ids and COCO-style image paths), the images a few real PNGs reused. Written once per size and layout
under --dir (default /tmp/awaker-bench-data; never in the repository): pretty-printed JSON (indent 2,
as the released file) and JSONL.

Each measurement runs in a fresh process (`python bench/data.py --child ...`): imports, then
`read_records` (the index pass training runs before step 1: parse, check every record, image headers),
then every record read back through the index (`records.get(i)`: what a loader worker does before
encoding). Reported: seconds for each, and peak RSS (VmHWM) minus RSS after the imports (the "empty run").

    python bench/data.py                           # 66k and 665k, JSON and JSONL
    python bench/data.py --records 20000 --json out.json
    python bench/data.py --keep                    # leave the generated files in --dir

Record results with machine, date and command in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = ["What is the man doing in the image?", "What color is the bus in the image?",
             "How many people are visible in this picture?", "What is the main object on the table?",
             "Describe the scene in detail.", "Is there anything unusual about this image?",
             "What might be the purpose of this gathering?", "Where is the cat sitting?"]
WORDS = ("the a image shows large small red white people street table dog cat bus train building window "
         "standing sitting near next to behind in front of several two three with and on is are").split()


def _answer(rng: random.Random) -> str:
    n = rng.choice((8, 12, 20, 60, 120))
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _record(i: int, rng: random.Random, images: int) -> dict:
    turns = []
    for k in range(rng.randint(1, 6)):
        q = rng.choice(QUESTIONS)
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": _answer(rng)}]
    rec = {"id": f"{i:012d}"}
    if i % 16 != 15:  # the mix's text-only (ShareGPT) part is about 6%
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        rec["image"] = f"coco/train2017/{i % images:012d}.png"
    rec["conversations"] = turns
    return rec


def write_data(folder: Path, n: int, images: int = 4) -> dict[str, Path]:
    """The JSON and JSONL files of n records (the same records), and the images they reuse."""
    img_dir = folder / "coco" / "train2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for k in range(images):
        p = img_dir / f"{k:012d}.png"
        if not p.exists():
            Image.new("RGB", (336, 224 + 28 * k), (40 * k, 120, 200 - 40 * k)).save(p)
    paths = {"json": folder / f"mix{n}.json", "jsonl": folder / f"mix{n}.jsonl"}
    if all(p.exists() for p in paths.values()):
        return paths
    rng = random.Random(0)
    with open(paths["json"], "w") as fj, open(paths["jsonl"], "w") as fl:
        fj.write("[\n")
        for i in range(n):
            rec = _record(i, rng, images)
            fj.write(("" if i == 0 else ",\n") + "  " + json.dumps(rec, indent=2).replace("\n", "\n  "))
            fl.write(json.dumps(rec) + "\n")
        fj.write("\n]\n")
    return paths


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(path: str) -> dict:
    from awaker_cli.train.data import read_records

    base = _rss("VmRSS")
    t0 = time.perf_counter()
    records, stats = read_records([path])
    t_index = time.perf_counter() - t0
    after_index = _rss("VmHWM")
    t0 = time.perf_counter()
    turns = 0
    for i in range(len(records)):
        turns += len(records.get(i).turns)
    t_iter = time.perf_counter() - t0
    return {"records": stats.records, "turns": turns, "index_s": round(t_index, 2), "iterate_s": round(t_iter, 2),
            "rss_growth_index_mb": round((after_index - base) / 1e6, 1),
            "rss_growth_mb": round((_rss("VmHWM") - base) / 1e6, 1), "rss_after_imports_mb": round(base / 1e6, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, nargs="+", default=[66_500, 665_000])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/awaker-bench-data"))
    ap.add_argument("--keep", action="store_true", help="Keep the generated files.")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    root = Path(__file__).resolve().parent.parent
    if args.dir.resolve().is_relative_to(root):
        ap.error("--dir must be outside the repository")
    results = []
    try:
        for n in args.records:
            t0 = time.perf_counter()
            paths = write_data(args.dir, n)
            print(f"{n} records written in {time.perf_counter() - t0:.0f} s "
                  f"(JSON {paths['json'].stat().st_size / 1e6:.0f} MB, JSONL {paths['jsonl'].stat().st_size / 1e6:.0f} MB)",
                  file=sys.stderr)
            for layout, path in paths.items():
                out = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True, capture_output=True,
                                     text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
                r = {"layout": layout, "bytes": path.stat().st_size, **json.loads(out.stdout)}
                results.append(r)
                print(f"{layout:5} {n:>7}: index {r['index_s']:.1f} s, iterate {r['iterate_s']:.1f} s, "
                      f"RSS growth {r['rss_growth_mb']:.0f} MB", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    summary = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "results": results}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
