"""Size and time of `awaker export` quantization at the 7B shape, on one decoder layer (CPU).

Quantizes the 7 linear weights of one Qwen2-VL-7B decoder layer with the same function the export uses
(bitsandbytes' own Linear4bit / Linear8bitLt state_dict) and reports bytes against bf16 and the time;
the whole language model is 28 such layers. Run: python bench/export.py
"""
from __future__ import annotations

import json
import time

import torch

from awaker_cli.ops.export import quantize_weight

HIDDEN, INTER, KV = 3584, 18944, 512  # 28 heads of 128, 4 KV heads of 128
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
          "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}


def main():
    torch.manual_seed(0)
    weights = {k: (torch.randn(s) * 0.02).to(torch.bfloat16) for k, s in SHAPES.items()}
    bf16 = sum(w.numel() * 2 for w in weights.values())
    results = {"layer_bf16_bytes": bf16, "threads": torch.get_num_threads()}
    for method, dq in (("nf4", False), ("nf4", True), ("fp4", False), ("int8", False)):
        start = time.perf_counter()
        size = 0
        for w in weights.values():
            size += sum(t.numel() * t.element_size() for t in
                        quantize_weight(w, method, double_quant=dq, dtype=torch.bfloat16).values())
        seconds = time.perf_counter() - start
        results[method + ("+dq" if dq else "")] = {"ratio_vs_bf16": round(size / bf16, 4),
                                                   "seconds_per_layer": round(seconds, 2),
                                                   "seconds_28_layers": round(28 * seconds, 1)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
