"""How long verifying an adapter-only model's base costs when its files changed: the content hash of
checkpoint/base_ref.py over a synthetic safetensors file (`--gb` of fp32 tensors, warm page cache).

    python bench/base_hash.py --gb 1 [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from awaker_cli.checkpoint.base_ref import tensors_sha256
from awaker_cli.checkpoint.reader import read_header


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    per = 64 << 20
    count = max(1, int(args.gb * 1e9 // per))
    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "model.safetensors"
        save_file({f"t{i}": torch.randn(per // 4) for i in range(count)}, str(file))
        infos = read_header(file)
        total = sum(i.nbytes for i in infos.values())
        tensors_sha256(infos)  # warm the page cache
        t = time.perf_counter()
        tensors_sha256(infos)
        seconds = time.perf_counter() - t
    result = {"bytes": total, "seconds": round(seconds, 3), "gb_per_s": round(total / 1e9 / seconds, 3),
              "threads": min(8, os.cpu_count() or 1)}
    print(json.dumps(result) if args.json else
          f"{total / 1e9:.2f} GB hashed in {seconds:.2f} s: {result['gb_per_s']:.2f} GB/s ({result['threads']} threads)")


if __name__ == "__main__":
    main()
