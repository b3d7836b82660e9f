"""H200: for circles on their default kernel tiles (row-major tokens), what ``backward="auto"``
picks and the split against the fused backward, FLUX 2K / 4K, SDXL 4K, Wan 480p, PixArt 4K, bf16;
five interleaved rounds. Writes $OUT/auto_circle_27th.json (benchmarks/results/: the 27th
session's run, made before ``default_backward`` moved to "split" everywhere).

    OUT=/tmp python benchmarks/backward_auto_circle.py     # on the GPU
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
from linfusion.kernels import local_triton as lt
res = {"env": environment(), "cases": []}
CASES = {  # name: B, H, D, grid, window, text
    "flux-2k": (1, 24, 128, (128, 128), 16, 512),
    "flux-4k": (1, 24, 128, (256, 256), 16, 512),
    "sdxl-4k": (2, 10, 64, (128, 128), 16, 0),
    "wan-480p": (1, 12, 128, (21, 30, 52), (3, 8, 8), 0),
    "pixart-4k": (2, 16, 72, (128, 128), 16, 0),
}
for name, (B, H, D, grid, window, text) in CASES.items():
    L = text + math.prod(grid)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, generator=gen, device="cuda").bfloat16() for _ in range(4))
    layout = lt._prepare(q, k, v, grid, window, text, "circle", None)[0]
    o, lse = lt._forward(q, k, v, layout, text, False)
    auto = lt._auto_backward(q, layout)
    base = lt._backward(do, q, k, v, o, lse, layout, text, False, "split")
    rec = {"case": name, "tile": list(layout.tile), "auto": auto, "ms": {}, "rounds": {}}
    fns = {"fwd": lambda: lt._forward(q, k, v, layout, text, False),
           "split": lambda: lt._backward(do, q, k, v, o, lse, layout, text, False, "split"),
           "fused_dq": lambda: lt._backward(do, q, k, v, o, lse, layout, text, False, "fused_dq")}
    out = fns["fused_dq"]()
    rec["fused_err_vs_split"] = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(out, base))
    for _ in range(5):
        for key, fn in fns.items():
            rec["rounds"].setdefault(key, []).append(bench_ms(fn))
    rec["ms"] = {key: statistics.median(r) for key, r in rec["rounds"].items()}
    print(name, rec["tile"], "auto:", auto, {k_: round(v_, 3) for k_, v_ in rec["ms"].items()}, flush=True)
    res["cases"].append(rec)
    json.dump(res, open(os.environ.get("OUT", "/tmp") + "/auto_circle_27th.json", "w"), indent=1)
