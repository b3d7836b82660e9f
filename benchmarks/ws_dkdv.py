"""H200 check and timing of the warp-specialised dK/dV kernel (``backward="split_ws"``,
``linfusion/kernels/local_dkdv_hopper.py``) against the split backward's dK/dV kernel.

Tile windows (8×16 tiles, r = 16: the 2 × 1 tile-radius box, ``kernels_local.py``'s
``tile-8x16-r2x1``) on tokens in tile order, bf16, head dim 128. First the gradients of both
backwards against a float32 reference (and fp16, batch 2 with heads-interleaved strided inputs),
then per case, interleaved over ``--repeats`` rounds: the forward, both backwards, the two dK/dV
kernels alone, and the row-major forward and split backward (the layout pipelines use) with the
cost of moving q, k, v into tile order and the output back.

    python benchmarks/ws_dkdv.py --out ws.json            # on the GPU
    python benchmarks/ws_dkdv.py --plot ws.json           # anywhere: ws.png beside it
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

# this script times or probes backward="split_ws", which the library refuses on GPUs (32nd session)
os.environ.setdefault("LINFUSION_UNSAFE_SPLIT_WS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench_ms, environment  # noqa: E402

CASES = {  # name: (B, H, D, grid, text)
    "flux-1k": (1, 24, 128, (64, 64), 512),
    "flux-2k": (1, 24, 128, (128, 128), 512),
    "flux-4k": (1, 24, 128, (256, 256), 512),
    "flux-4k-notext": (1, 24, 128, (256, 256), 0),
    "flux-8k": (1, 24, 128, (512, 512), 512),
}
WINDOW, TILE, SHAPE = 16, (8, 16), "tile"
DQ_WS_BLOCKS = ((128, 64, 2), (128, 128, 2), (64, 64, 2), (64, 128, 2), (128, 64, 3))  # (BM, BN, stages)


def _inputs(B, H, D, grid, text, dtype, strided=False, seed=0):
    """q, k, v, dO (B, H, L, D) in row-major token order; ``strided``: (B, L, H, D) memory."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    L = text + math.prod(grid)
    if strided:
        return [torch.randn(B, L, H, D, generator=gen, device="cuda").to(dtype).transpose(1, 2) for _ in range(4)]
    return [torch.randn(B, H, L, D, generator=gen, device="cuda").to(dtype) for _ in range(4)]


def check(name, B, H, D, grid, text, dtype, strided):
    """Relative errors of dq, dk, dv of both backwards against a float32 reference."""
    from linfusion.kernels.local_layout import from_tile_order, to_tile_order
    from linfusion.kernels.local_reference import local_attention_reference
    from linfusion.kernels.local_triton import local_attention_tiled

    q, k, v, do = _inputs(B, H, D, grid, text, dtype, strided)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = local_attention_reference(*ref_in, grid, WINDOW, text, SHAPE, TILE)
    ref_grads = torch.autograd.grad(ref, ref_in, do.float())
    tiled = [to_tile_order(t, grid, TILE, text).detach().requires_grad_() for t in (q, k, v)]
    rec = {"case": name, "dtype": str(dtype).split(".")[-1], "strided": strided, "B": B}
    for variant in ("split", "split_ws", "split_ws+dq_ws"):
        def grads_of(variant=variant.split("+")[0]):
            out = local_attention_tiled(*tiled, grid, WINDOW, text, SHAPE, TILE, backward=variant)
            return torch.autograd.grad(out, tiled, to_tile_order(do, grid, TILE, text))
        grads = _with_dq_ws(grads_of) if variant.endswith("+dq_ws") else grads_of()
        errs = {}
        for nm, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            g = from_tile_order(g, grid, TILE, text).float()
            errs[nm] = float((g - r).norm() / r.norm()) if torch.isfinite(g).all() else float("nan")
        rec[variant] = errs
    print(rec, flush=True)
    return rec


def _with_dq_ws(fn, config=None):
    """fn() with backward="split_ws" running the warp-specialised dQ kernel too (``config``: its
    blocks, e.g. {"block_m": 128, "block_n": 128}; default: ``local_configs.dq_ws_config``'s)."""
    from linfusion.kernels.local_configs import set_config_override

    set_config_override("dq_ws", config or {})
    try:
        return fn()
    finally:
        set_config_override("dq_ws", None)


def timings(name, B, H, D, grid, text, repeats, dq_ws=False):
    """Median ms over interleaved rounds of every timed call of one case (bf16); ``dq_ws``: also the
    warp-specialised dQ kernel (``launch_dq_ws``, after the Δ pass it needs) against the split
    backward's dQ kernel (which computes Δ itself), and the backward both WS kernels would make."""
    from linfusion.kernels import local_triton as lt
    from linfusion.kernels.local_dkdv_hopper import launch_dkdv_ws, launch_dq_ws
    from linfusion.kernels.local_layout import from_tile_order, get_layout, to_tile_order

    q, k, v, do = _inputs(B, H, D, grid, text, torch.bfloat16)
    layout = get_layout(grid, WINDOW, SHAPE, TILE, q.device)
    tq, tk, tv, tdo = (to_tile_order(t, grid, TILE, text) for t in (q, k, v, do))
    to, tlse = lt._forward(tq, tk, tv, layout, text, True)
    ro, rlse = lt._forward(q, k, v, layout, text, False)
    # the dK/dV kernels alone, on the statistics one split backward leaves behind
    setup = lt._BackwardSetup.of(tq, layout, text, True)
    delta = lt._stats(B, H, tq.shape[2], layout, 0.0, q.device)
    dq, dk, dv = (lt._new((B, tq.shape[2], H, D), q.dtype, q.device).transpose(1, 2) for _ in range(3))
    lt._launch_dq(setup, tq, tk, tv, to, tdo, tlse, delta, dq, delta_here=True)

    def permute_in_out():  # what a row-major caller pays to use tile order: q, k, v in, the output back
        [to_tile_order(t, grid, TILE, text) for t in (q, k, v)]
        from_tile_order(to, grid, TILE, text)

    calls = {
        "fwd_tile_order": lambda: lt._forward(tq, tk, tv, layout, text, True),
        "bwd_split_tile_order": lambda: lt._backward(tdo, tq, tk, tv, to, tlse, layout, text, True, "split"),
        "bwd_split_ws_tile_order": lambda: lt._backward(tdo, tq, tk, tv, to, tlse, layout, text, True, "split_ws"),
        "dkdv_split": lambda: lt._launch_dkdv(setup, tq, tk, tv, tdo, tlse, delta, dk, dv),
        "dkdv_ws": lambda: launch_dkdv_ws(tq, tk, tv, tdo, tlse, delta, dk, dv, layout, text, setup.sl,
                                          setup.qk_scale, setup.sm_scale),
        **({
            "dq_split": lambda: lt._launch_dq(setup, tq, tk, tv, to, tdo, tlse, delta, dq, delta_here=True),
            "delta_pass": lambda: lt._launch_delta(setup, to, tdo, delta, tile_copy=False),
            "bwd_split_ws_dq_ws_tile_order": lambda: _with_dq_ws(
                lambda: lt._backward(tdo, tq, tk, tv, to, tlse, layout, text, True, "split_ws")),
            "bwd_split_ws_dq_ws128_tile_order": lambda: _with_dq_ws(
                lambda: lt._backward(tdo, tq, tk, tv, to, tlse, layout, text, True, "split_ws"),
                {"block_m": 128, "block_n": 128}),
            **{f"dq_ws_{bm}x{bn}_s{st}": (lambda bm=bm, bn=bn, st=st: launch_dq_ws(
                tq, tk, tv, tdo, tlse, delta, dq, layout, text, setup.sl, setup.qk_scale, setup.sm_scale,
                block_m=bm, block_n=bn, num_stages=st)) for bm, bn, st in DQ_WS_BLOCKS},
        } if dq_ws else {}),
        "fwd_row_major": lambda: lt._forward(q, k, v, layout, text, False),
        "bwd_split_row_major": lambda: lt._backward(do, q, k, v, ro, rlse, layout, text, False, "split"),
        "permute_in_out": permute_in_out,
    }
    dq_ws_err = {}
    if dq_ws:  # each WS dQ variant against the split backward's dQ kernel, on the same Δ
        calls["dq_split"]()
        dq_ref = dq.float().clone()
        for key in [key for key in calls if key.startswith("dq_ws_")]:
            dq.fill_(float("nan"))
            calls[key]()
            dq_ws_err[key] = float((dq.float() - dq_ref).norm() / dq_ref.norm())
    for fn in calls.values():
        fn()
    torch.cuda.synchronize()
    rounds = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            rounds[key].append(bench_ms(fn))
    med = {key: statistics.median(vals) for key, vals in rounds.items()}
    L = tq.shape[2]
    n_img = math.prod(grid)
    keys_per_query = 5 * 3 * 128  # the 2 x 1 tile-radius box of whole 128-token tiles (interior tiles)
    pairs = B * H * (n_img * (keys_per_query + text) + text * L)  # useful query-key pairs (edges ignored)
    rec = {"case": name, "shape": [B, H, L, D], "grid": list(grid), "text": text, "ms": med, "rounds": rounds,
           "dkdv_tflops": {key: 4 * 2 * pairs * D / med[key] / 1e9 for key in ("dkdv_split", "dkdv_ws")},
           "bwd_over_fwd": {
               "split_tile_order": med["bwd_split_tile_order"] / med["fwd_tile_order"],
               "split_ws_tile_order": med["bwd_split_ws_tile_order"] / med["fwd_tile_order"],
               "split_row_major": med["bwd_split_row_major"] / med["fwd_row_major"]}}
    if dq_ws:  # kernel times summed: what backward="split_ws" would take with the WS dQ kernel too
        best = min((key for key in med if key.startswith("dq_ws_")), key=med.get)
        rec["dq_ws_rel_err_vs_split"] = dq_ws_err
        rec["dq_ws_best"] = best
        rec["bwd_both_ws_projected_ms"] = med["delta_pass"] + med[best] + med["dkdv_ws"]
        rec["bwd_over_fwd"]["both_ws_projected"] = rec["bwd_both_ws_projected_ms"] / med["fwd_tile_order"]
        for key in ("split_ws_dq_ws_tile_order", "split_ws_dq_ws128_tile_order"):
            rec["bwd_over_fwd"][key] = med[f"bwd_{key}"] / med["fwd_tile_order"]
    print({k_: rec[k_] for k_ in ("case", "ms", "bwd_over_fwd")}, flush=True)
    return rec


def plot(path: str) -> None:
    """Backward / forward per case and backward: a bar chart beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.load(open(path))
    cases = [r["case"] for r in res["timings"]]
    keys = ("split_row_major", "split_tile_order", "split_ws_tile_order")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.25
    for i, key in enumerate(keys):
        ax.bar([x + i * width for x in range(len(cases))], [r["bwd_over_fwd"][key] for r in res["timings"]],
               width, label=key)
    ax.axhline(3.0, color="k", linestyle="--", linewidth=1, label="target 3x")
    ax.set_xticks([x + width for x in range(len(cases))], cases)
    ax.set_ylabel("backward / forward time")
    ax.set_title(f"tile window 8x16 r2x1, bf16, {res['env'].get('gpu', '')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(Path(path).with_suffix(".png")), dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON to write (GPU run)")
    parser.add_argument("--plot", help="a JSON this script wrote: draw its PNG")
    parser.add_argument("--cases", nargs="+", default=["flux-2k", "flux-4k", "flux-4k-notext", "flux-8k"],
                        choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--dq", action="store_true", help="also time the warp-specialised dQ kernel")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    res = {"env": environment(), "window": {"shape": SHAPE, "tile": TILE, "window": WINDOW}, "checks": [],
           "timings": []}
    if not args.no_check:
        for dtype, strided, B in ((torch.bfloat16, False, 1), (torch.float16, True, 2)):
            res["checks"].append(check("flux-1k", B, 24 // B, 128, (64, 64), 512, dtype, strided))
        res["checks"].append(check("flux-1k-notext", 1, 8, 128, (64, 48), 0, torch.bfloat16, False))
    for name in args.cases:
        res["timings"].append(timings(name, *CASES[name], args.repeats, dq_ws=args.dq))
        json.dump(res, open(args.out, "w"), indent=1)
    json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
