"""Does a backward variant leave gradient elements non-finite or unwritten, now and then?

FLUX tile windows (8×16 tiles, ±2 × ±1 tiles, 512 text tokens, bf16, tile order) at 2K, 4K and 8K:
the ``split_ws`` and ``split`` backwards, repeated on one graph, with every bf16 output buffer of
the Triton local kernel poisoned (777.0) before the kernels write it. Counts, per variant, runs with
non-finite values, runs with poison left, and runs that differ from the first (both variants are
deterministic). Writes ``$OUT/ws_stress_32nd.json``. On the H200: ``python benchmarks/ws_stress.py``
(``STRESS_DEADLINE`` seconds bound the repeats). The 32nd session's run also timed ``split_ws``
with a CTA barrier after the kernel's on-device descriptors (``split_ws+barrier`` in the JSON); it
did not help, and the barrier is gone.
"""
import json
import os
import time

import torch

# this script times or probes backward="split_ws", which the library refuses on GPUs (32nd session)
os.environ.setdefault("LINFUSION_UNSAFE_SPLIT_WS", "1")

from linfusion.kernels import local_triton
from linfusion.kernels.local_triton import local_attention_tiled
SENT = 777.0


def _poisoned(shape, dtype, device):
    """The kernel's allocator, with 16-bit outputs (dq, dk, dv, o) filled with SENT first."""
    if dtype == torch.float32:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, SENT, dtype=dtype, device=device)


local_triton._ALLOC = _poisoned
H, D, TEXT, TILE = 24, 128, 512, (8, 16)
res = {}
T0 = time.time()
def rnd(L, s):
    g = torch.Generator(device="cuda").manual_seed(s)
    return torch.randn(1, L, H, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
for name, grid, reps in (("flux-2k", (128, 128), 500), ("flux-4k", (256, 256), 300), ("flux-8k", (512, 512), 100)):
    L = TEXT + grid[0] * grid[1]
    q, k, v, do = (rnd(L, s) for s in range(4))
    for label, variant in (("split_ws", "split_ws"), ("split", "split")):
        inp = [t.detach().requires_grad_() for t in (q, k, v)]
        o = local_attention_tiled(*inp, grid, 16, TEXT, "tile", TILE, backward=variant)
        first = None
        stats = {"runs": 0, "nan_runs": 0, "sentinel_runs": 0, "differs_from_first": 0, "bad": []}
        for r in range(reps):
            g = torch.autograd.grad(o, inp, do, retain_graph=True)
            torch.cuda.synchronize()
            stats["runs"] += 1
            for n, t in zip("qkv", g):
                nan, sent = int((~torch.isfinite(t)).sum()), int((t == SENT).sum())
                if nan or sent:
                    bad = (~torch.isfinite(t)) | (t == SENT)
                    heads = bad.any(-1).any(-1)[0].nonzero().flatten().tolist()[:8]
                    blocks = sorted(set((bad[0].any(-1).any(0).nonzero().flatten() // 128).tolist()))[:8]
                    stats["bad"].append({"run": r, "t": n, "nan": nan, "sentinel": sent, "heads": heads, "blocks": blocks})
                stats["nan_runs"] += bool(nan)
                stats["sentinel_runs"] += bool(sent)
            if first is None:
                first = [t.clone() for t in g]
            elif any(not torch.equal(a, b) for a, b in zip(g, first)):
                stats["differs_from_first"] += 1
            del g
            if time.time() - T0 > float(os.environ.get("STRESS_DEADLINE", 400)):
                break
        res[f"{name}/{label}"] = stats
        print(name, label, json.dumps(stats)[:600], f"{time.time()-T0:.0f}s", flush=True)
        del o, inp, first
        torch.cuda.empty_cache()
open(os.path.join(os.environ.get("OUT", "/tmp"), "ws_stress_32nd.json"), "w").write(json.dumps(res, indent=1))
