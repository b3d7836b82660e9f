"""H200: the fused backward (dQ inside the dK/dV kernel, default config, with TMA loads, with
64-key blocks, and on tile-ordered tokens) against the split one, FLUX 4K / 8K, tile window and
circle on 8×16 tiles, bf16; median of 3 timings each. Writes $OUT/fused_27th.json
(benchmarks/results/fused_27th.json: the 27th session's run).

    OUT=/tmp python benchmarks/backward_fused_vs_split.py     # on the GPU
"""
import json
import math
import os
import statistics
import sys

import torch
sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from timing import bench_ms, environment
from linfusion.kernels import local_configs, local_triton as lt
from linfusion.kernels.local_layout import to_tile_order
res = {"env": environment(), "cases": []}
TILE = (8, 16)
for name, grid in (("flux-4k", (256, 256)), ("flux-8k", (512, 512))):
    B, H, D, text = 1, 24, 128, 512
    L = text + math.prod(grid)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, generator=gen, device="cuda").bfloat16() for _ in range(4))
    tq, tk, tv, tdo = (to_tile_order(t, grid, TILE, text).contiguous() for t in (q, k, v, do))
    rec = {"case": name, "ms": {}, "err": {}}
    for shape in ("tile", "circle"):
        layout = lt._prepare(q, k, v, grid, 16, text, shape, TILE)[0]
        o, lse = lt._forward(q, k, v, layout, text, False)
        to, tlse = lt._forward(tq, tk, tv, layout, text, True)
        base = lt._backward(do, q, k, v, o, lse, layout, text, False, "split")
        variants = {
            f"{shape}:fwd": (None, lambda: lt._forward(q, k, v, layout, text, False)),
            f"{shape}:split": (None, lambda: lt._backward(do, q, k, v, o, lse, layout, text, False, "split")),
            f"{shape}:fused": (None, lambda: lt._backward(do, q, k, v, o, lse, layout, text, False, "fused_dq")),
            f"{shape}:fused+tma": ({"dkdv_fused": {"tma_loads": True}}, lambda: lt._backward(do, q, k, v, o, lse, layout, text, False, "fused_dq")),
            f"{shape}:fused+tma+bn64": ({"dkdv_fused": {"tma_loads": True, "BN": 64, "num_warps": 4}}, lambda: lt._backward(do, q, k, v, o, lse, layout, text, False, "fused_dq")),
            f"{shape}:fused_tileorder": (None, lambda: lt._backward(tdo, tq, tk, tv, to, tlse, layout, text, True, "fused_dq")),
        }
        for key, (ov, fn) in variants.items():
            local_configs._OVERRIDE = ov or {}
            try:
                out = fn()
                torch.cuda.synchronize()
                if "fwd" not in key and "tileorder" not in key:
                    rec["err"][key] = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(out, base))
                rec["ms"][key] = statistics.median(bench_ms(fn) for _ in range(3))
            except Exception as e:
                rec["ms"][key] = repr(e)[:200]
            local_configs._OVERRIDE = {}
            print(name, key, rec["ms"][key], rec["err"].get(key), flush=True)
    res["cases"].append(rec)
    json.dump(res, open(os.environ.get("OUT", "/tmp") + "/fused_27th.json", "w"), indent=1)
