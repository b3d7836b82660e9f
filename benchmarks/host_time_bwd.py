"""Host (CPU) time of one backward call of the FLUX tile window, per backward variant and token order:
the time Python takes to issue the launches (no synchronisation), against the GPU time of the call.

    python benchmarks/host_time_bwd.py --case flux-1k
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_fused_bwd import CASES, TEXT, _attn, _randn  # noqa: E402
from timing import bench_ms, environment  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="flux-1k", choices=list(CASES))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    grid = CASES[args.case]
    L = TEXT + grid[0] * grid[1]
    q, k, v, do = (_randn(L, s) for s in range(4))
    res = {"env": environment(), "case": args.case, "rows": {}}
    for bwd in ("split", "fused_gluon"):
        for tile_order in (True, False):
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            out = _attn(bwd, tile_order)(*inputs, grid)

            def call(out=out, inputs=inputs):
                return torch.autograd.grad(out, inputs, do, retain_graph=True)

            for _ in range(5):
                call()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                call()
            host_ms = (time.perf_counter() - t0) / 20 * 1e3  # issue time (the queue absorbs it while the GPU lags)
            torch.cuda.synchronize()
            key = f"{bwd}/{'tile' if tile_order else 'row'}"
            res["rows"][key] = {"host_issue_ms": host_ms, "gpu_ms": bench_ms(call)}
            print(key, res["rows"][key], flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
