"""H200 timing of the stored-dS backward (``backward="stored_ds"``) against the split backwards.

The split backward recomputes each block pair's scores and dP twice, once in the dK/dV kernel and
once in the dQ kernel: 7 block products per pair against the forward's 2. The stored-dS backward
has the dK/dV kernel write dSᵀ (the inputs' dtype, the same rounding the split kernels apply
before their dots) and a second kernel reduce dQ = Σ dS·K from it: 5 products, for writing and
reading dS once (``local_triton._StoredDS``; in head groups within
``local_configs.stored_ds_budget``).

Per case and window (bf16), interleaved over ``--repeats`` rounds: the forward, each backward, and
on FLUX tile windows the same on tile-ordered tokens (with ``split_ws``); the peak extra memory of
each backward; and the gradients of ``stored_ds`` against the split backward's.

    python benchmarks/stored_ds.py --out sd.json            # on the GPU
    python benchmarks/stored_ds.py --plot sd.json           # anywhere: sd.png beside it
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench_ms, environment  # noqa: E402

CASES = {  # name: (B, H, D, grid, text)
    "flux-1k": (1, 24, 128, (64, 64), 512),
    "flux-2k": (1, 24, 128, (128, 128), 512),
    "flux-4k": (1, 24, 128, (256, 256), 512),
    "flux-8k": (1, 24, 128, (512, 512), 512),
    "sdxl-4k": (2, 10, 64, (128, 128), 0),
    "sd15-2k": (2, 8, 40, (256, 256), 0),
    "wan-480p": (1, 12, 128, (21, 30, 52), 0),
    "pixart-4k": (1, 16, 72, (256, 256), 0),
}
WINDOWS = {  # per grid rank: (name, shape, window, tile on tile-ordered tokens); row-major circles: kernel tile
    2: [("tile-8x16-r2x1", "tile", 16, (8, 16)), ("circle-r16", "circle", 16, (8, 8))],
    3: [("tile-2x8x8-r1x1x1", "tile", (2, 8, 8), (2, 8, 8)), ("circle-r2x8x8", "circle", (2, 8, 8), (1, 8, 8))],
}
TILED = ("flux-2k", "flux-4k", "flux-8k")  # tile windows on tile-ordered tokens too


def _peak_extra_mb(fn) -> float:
    """Peak memory fn() allocates beyond what is allocated before it (MB)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm()) if torch.isfinite(a).all() else float("nan")


def run_case(name: str, wname: str, shape: str, window, tile, repeats: int, budgets) -> dict:
    from linfusion.kernels import local_triton as lt
    from linfusion.kernels.local_configs import set_config_override
    from linfusion.kernels.local_layout import get_layout, to_tile_order

    B, H, D, grid, text = CASES[name]
    L = text + math.prod(grid)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, L, H, D, generator=gen, device="cuda").to(torch.bfloat16).transpose(1, 2)
                   for _ in range(4))  # heads-interleaved memory, as the processors' projections give
    row_tile = tile if shape == "tile" else lt.circle_tile(len(grid), q.dtype, D) or tile
    layout = get_layout(grid, window, shape, row_tile, q.device)
    o, lse = lt._forward(q, k, v, layout, text, False)

    def backward(variant, tile_order=False, args=None):
        qq, kk, vv, oo, ll, dd, lay = args or (q, k, v, o, lse, do, layout)
        return lambda: lt._backward(dd, qq, kk, vv, oo, ll, lay, text, tile_order, variant)

    def with_budget(fn, budget):
        def run():
            set_config_override("stored_ds", {"budget_bytes": budget})
            try:
                return fn()
            finally:
                set_config_override("stored_ds", None)
        return run

    calls = {"fwd": lambda: lt._forward(q, k, v, layout, text, False),
             "bwd_split": backward("split"), "bwd_stored_ds": backward("stored_ds")}
    for budget in budgets:
        calls[f"bwd_stored_ds_budget{budget >> 20}MiB"] = with_budget(backward("stored_ds"), budget)
    tiled = shape == "tile" and name in TILED
    if tiled:
        tlay = get_layout(grid, window, shape, tile, q.device)
        tq, tk, tv, tdo = (to_tile_order(t, grid, tile, text) for t in (q, k, v, do))
        to, tlse = lt._forward(tq, tk, tv, tlay, text, True)
        targs = (tq, tk, tv, to, tlse, tdo, tlay)
        calls["fwd_tile_order"] = lambda: lt._forward(tq, tk, tv, tlay, text, True)
        calls["bwd_split_ws_tile_order"] = backward("split_ws", True, targs)
        calls["bwd_stored_ds_tile_order"] = backward("stored_ds", True, targs)
    # gradients of stored_ds against the split backward's (same inputs, same LSE)
    ref = calls["bwd_split"]()
    got = calls["bwd_stored_ds"]()
    agree = {n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), got, ref)}
    del ref, got
    memory = {key: _peak_extra_mb(fn) for key, fn in calls.items() if key.startswith("bwd")}
    for fn in calls.values():
        fn()
    torch.cuda.synchronize()
    rounds = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            rounds[key].append(bench_ms(fn))
    med = {key: statistics.median(vals) for key, vals in rounds.items()}
    ratios = {key[4:]: med[key] / med["fwd_tile_order" if key.endswith("tile_order") else "fwd"]
              for key in med if key.startswith("bwd")}
    rec = {"case": name, "window": wname, "shape": [B, H, L, D], "grid": list(grid), "text": text,
           "tile": list(row_tile), "ms": med, "rounds": rounds, "bwd_over_fwd": ratios,
           "stored_ds_vs_split_rel_diff": agree, "peak_extra_mb": memory,
           "stored_ds_mb_per_head": lt._StoredDS.bytes_per_head(layout, text, L, q.dtype) / 2**20}
    print({k_: rec[k_] for k_ in ("case", "window", "ms", "bwd_over_fwd", "stored_ds_vs_split_rel_diff")}, flush=True)
    return rec


def plot(path: str) -> None:
    """Backward / forward per case: split against stored_ds (and tile order) beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.load(open(path))
    recs = res["timings"]
    labels = [f"{r['case']}\n{r['window'].split('-')[0]}" for r in recs]
    keys = ("split", "stored_ds", "split_ws_tile_order", "stored_ds_tile_order")
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(recs)), 4.2))
    width = 0.2
    for i, key in enumerate(keys):
        vals = [r["bwd_over_fwd"].get(key, float("nan")) for r in recs]
        ax.bar([x + i * width for x in range(len(recs))], vals, width, label=key)
    ax.axhline(3.0, color="k", linestyle="--", linewidth=1, label="target 3x")
    ax.set_xticks([x + 1.5 * width for x in range(len(recs))], labels, fontsize=7)
    ax.set_ylabel("backward / forward time")
    ax.set_title(f"stored-dS backward, bf16, {res['env'].get('gpu', '')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(Path(path).with_suffix(".png")), dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON to write (GPU run)")
    parser.add_argument("--plot", help="a JSON this script wrote: draw its PNG")
    parser.add_argument("--cases", nargs="+", default=["flux-2k", "flux-4k", "flux-8k"], choices=sorted(CASES))
    parser.add_argument("--windows", nargs="+", default=["tile", "circle"], choices=["tile", "circle"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budgets-mib", type=int, nargs="*", default=[],
                        help="also time stored_ds under these budgets (MiB)")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="stop starting cases after this many seconds")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    start = time.time()
    res = {"env": environment(), "timings": []}
    for name in args.cases:
        for wname, shape, window, tile in WINDOWS[len(CASES[name][3])]:
            if shape not in args.windows:
                continue
            if time.time() - start > args.deadline_s:
                print(f"deadline: skipping {name} {wname}", flush=True)
                continue
            res["timings"].append(run_case(name, wname, shape, window, tile, args.repeats,
                                           [m << 20 for m in args.budgets_mib]))
            torch.cuda.empty_cache()
            if args.out:
                Path(args.out).write_text(json.dumps(res, indent=1))
    if args.out:
        plot(args.out)


if __name__ == "__main__":
    main()
