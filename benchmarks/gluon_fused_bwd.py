"""The Gluon fused tile-window backward (``backward="fused_gluon"``) against the split backward, one run.

FLUX tile window (8×16 tiles, ±2 tile rows × ±1 tile column, 512 text tokens), 24 heads, head dim
128, bf16, tokens in tile order, heads-interleaved memory; cases flux-2k/4k/8k. Per case:

1. correctness: gradients of both backwards with every output NaN-poisoned first, against each
   other and (flux-2k, two heads) against the float32 reference; then ``--stress`` repeated fused
   backward calls, each checked for non-finite values and against the first call (dK, dV must be
   bit-identical: no atomics there; dQ within fp32 atomic reordering);
2. speed: interleaved rounds of the forward, the split backward and the fused backward, and the
   fused backward's pieces (Δ pass, accumulator zeroing, the kernel, scale-and-round).

    python benchmarks/gluon_fused_bwd.py --out gluon_fused_bwd.json     # on an H200
    python benchmarks/gluon_fused_bwd.py --plot benchmarks/results/gluon_fused_bwd_33rd.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import environment, interleaved_rounds  # noqa: E402

H, D, TILE, WINDOW, TEXT = 24, 128, (8, 16), 16, 512
CASES = {"flux-1k": (64, 64), "flux-2k": (128, 128), "flux-4k": (256, 256), "flux-8k": (512, 512)}
SMALL = {"tiny": (32, 80)}  # checked against float32 only (a 4 × 5 tile grid, clipped windows)


def _randn(L: int, seed: int, heads: int = H) -> torch.Tensor:
    """(1, heads, L, D) bf16: a heads-first view of token-major memory."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(1, L, heads, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _nan_alloc(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _attn(backward: str, tile_order: bool = True):
    """The library call on tokens in tile order (``local_attention_tiled``) or row-major."""
    from linfusion.kernels.local_triton import local_attention_tiled, local_attention_triton

    fn = local_attention_tiled if tile_order else local_attention_triton
    return lambda q, k, v, grid: fn(q, k, v, grid, WINDOW, TEXT, "tile", TILE, backward=backward)


def check_case(name: str, grid, stress: int, tile_order: bool = True) -> dict:
    """Gradients of split and fused (poisoned outputs), their agreement, fp32 errors, repeat stress."""
    import linfusion.kernels.local_triton as lt

    L = TEXT + grid[0] * grid[1]
    heads = 2 if name in ("flux-2k", "tiny") else H
    q, k, v, do = (_randn(L, s, heads) for s in range(4))
    out = {}
    lt._ALLOC = _nan_alloc
    try:
        grads = {}
        for bwd in ("split", "fused_gluon"):
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            o = _attn(bwd, tile_order)(*inputs, grid)
            grads[bwd] = torch.autograd.grad(o, inputs, do)
            out[f"{bwd}_finite"] = [bool(torch.isfinite(g).all()) for g in grads[bwd]]
        out["fused_vs_split_rel"] = [_rel(a, b) for a, b in zip(grads["fused_gluon"], grads["split"])]
        if name in ("flux-2k", "tiny"):
            from linfusion.kernels.local_layout import from_tile_order
            from linfusion.kernels.local_reference import local_attention_reference

            def row_major(t):
                return from_tile_order(t.float(), grid, TILE, TEXT) if tile_order else t.float()

            ref_in = [row_major(t).requires_grad_() for t in (q, k, v)]
            ref = local_attention_reference(*ref_in, grid, WINDOW, TEXT, "tile", TILE)
            ref_g = torch.autograd.grad(ref, ref_in, row_major(do))
            out["vs_fp32_rel"] = {b: [_rel(row_major(a), r) for a, r in zip(g, ref_g)] for b, g in grads.items()}
        # repeats: non-finite values, dK/dV bit-identical, dQ within reordering
        bad, dkdv_diff, dq_max = 0, 0, 0.0
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        o = _attn("fused_gluon", tile_order)(*inputs, grid)
        first = torch.autograd.grad(o, inputs, do, retain_graph=True)
        for _ in range(stress):
            g = torch.autograd.grad(o, inputs, do, retain_graph=True)
            bad += int(not all(bool(torch.isfinite(x).all()) for x in g))
            dkdv_diff += int(not (torch.equal(g[1], first[1]) and torch.equal(g[2], first[2])))
            dq_max = max(dq_max, _rel(g[0], first[0]))
        out["stress"] = {"calls": stress, "nonfinite_calls": bad, "dkdv_not_identical": dkdv_diff,
                         "dq_max_rel_vs_first": dq_max}
    finally:
        lt._ALLOC = torch.empty
    return out


VARIANTS = [(1, 2)]  # (dQ buffers, stages)


def timing_fns(name: str, grid, variant_checks: dict) -> dict:
    """Callables: forward, split backward, fused backward, and the fused backward's pieces."""
    import linfusion.kernels.local_triton as lt
    from linfusion.kernels.local_bwd_gluon import launch_fused_gluon, scale_into

    L = TEXT + grid[0] * grid[1]
    q, k, v, do = (_randn(L, s) for s in range(4))
    fns = {f"{name}/fwd": lambda: _attn("split")(q, k, v, grid),
           f"{name}/fwd_rowmajor": lambda: _attn("split", False)(q, k, v, grid)}
    for bwd in ("split", "fused_gluon"):
        for order, suffix in ((True, ""), (False, "_rowmajor")):
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            o = _attn(bwd, order)(*inputs, grid)
            fns[f"{name}/bwd_{bwd}{suffix}"] = lambda o=o, inputs=inputs: torch.autograd.grad(o, inputs, do,
                                                                                             retain_graph=True)
    # pieces of the fused backward
    layout, _ = lt._prepare(q, k, v, grid, WINDOW, TEXT, "tile", TILE, "fused_gluon", tile_order=True)
    o, lse = lt._forward(q, k, v, layout, TEXT, True)
    setup = lt._BackwardSetup.of(q, layout, TEXT, True)
    delta = lt._stats(1, H, L, layout, 0.0, q.device)
    lt._launch_delta(setup, o, do, delta, tile_copy=False)
    acc = torch.zeros((H * L, D), dtype=torch.float32, device="cuda")
    dk, dv, dq = (torch.empty(1, L, H, D, dtype=q.dtype, device="cuda").transpose(1, 2) for _ in range(3))
    fns[f"{name}/piece_delta"] = lambda: lt._launch_delta(setup, o, do, delta, tile_copy=False)
    fns[f"{name}/piece_zero"] = lambda: acc.zero_()
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    split = torch.autograd.grad(_attn("split")(*inputs, grid), inputs, do)
    for bufs, stages in VARIANTS:
        def kernel(bufs=bufs, stages=stages):
            launch_fused_gluon(q, k, v, do, lse, delta, acc, dk, dv, layout, TEXT, setup.sl, setup.qk_scale,
                               setup.sm_scale, dq_bufs=bufs, stages=stages)

        tag = f"writer1_bufs{bufs}_stages{stages}"
        try:
            acc.zero_()
            dk.fill_(float("nan"))
            dv.fill_(float("nan"))
            kernel()
            scale_into(acc, dq, setup.sm_scale)
            variant_checks[f"{name}/{tag}"] = [_rel(a, b) for a, b in zip((dq, dk, dv), split)]
            fns[f"{name}/piece_kernel_{tag}"] = kernel
        except Exception:  # noqa: BLE001
            variant_checks[f"{name}/{tag}"] = traceback.format_exc()[-1500:]
        print(name, tag, variant_checks[f"{name}/{tag}"], flush=True)
    fns[f"{name}/piece_convert"] = lambda: scale_into(acc, dq, setup.sm_scale)
    return fns


def measure(cases, repeats: int, stress: int, deadline_s: float) -> dict:
    start = time.time()
    res = {"env": environment(), "notes": [], "checks": {}, "rounds": {}}
    for name in ["tiny", *cases]:
        for order in ("tile", "row"):
            key = f"{name}/{order}"
            try:
                res["checks"][key] = check_case(name, {**SMALL, **CASES}[name],
                                                stress if name != "flux-8k" else stress // 4, order == "tile")
            except Exception:  # noqa: BLE001
                res["notes"].append(f"check {key}: " + traceback.format_exc()[-2000:])
            print(key, res["checks"].get(key), flush=True)
    fns = {}
    for name in cases:
        try:
            fns.update(timing_fns(name, CASES[name], res.setdefault("variant_vs_split_rel", {})))
        except Exception:  # noqa: BLE001
            res["notes"].append(f"timing {name}: " + traceback.format_exc()[-2000:])
    med = res["median_ms"] = interleaved_rounds(fns, repeats, deadline_s, start, res)
    res["bwd_over_fwd"] = {}
    for name in cases:
        for suffix in ("", "_rowmajor"):
            if f"{name}/fwd{suffix}" in med:
                for bwd in ("split", "fused_gluon"):
                    if f"{name}/bwd_{bwd}{suffix}" in med:
                        res["bwd_over_fwd"][f"{name}/{bwd}{suffix}"] = (med[f"{name}/bwd_{bwd}{suffix}"]
                                                                        / med[f"{name}/fwd{suffix}"])
    print(json.dumps({"median_ms": med, "bwd_over_fwd": res["bwd_over_fwd"]}, indent=1), flush=True)
    return res


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text())
    ratios = res["bwd_over_fwd"]
    cases = [c for c in CASES if f"{c}/split" in ratios]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.2
    kinds = [("split", "split, tile order"), ("fused_gluon", "fused_gluon, tile order"),
             ("split_rowmajor", "split, row-major"), ("fused_gluon_rowmajor", "fused_gluon, row-major")]
    for i, (key, label) in enumerate(kinds):
        ax.bar([j + (i - 1.5) * width for j in range(len(cases))], [ratios.get(f"{c}/{key}", 0) for c in cases],
               width, label=label)
    ax.axhline(3.0, color="red", ls="--", lw=1, label="target 3×")
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("backward / forward")
    ax.set_title("FLUX tile window (8x16 tiles, ±2x±1 tiles, 512 text tokens), bf16", fontsize=9)
    ax.legend(fontsize=7)
    env = res["env"]
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gluon_fused_bwd.json")
    ap.add_argument("--cases", nargs="*", default=[c for c in CASES if c != "flux-1k"], choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stress", type=int, default=40)
    ap.add_argument("--deadline", type=float, default=300.0, help="stop starting timing rounds after this many s")
    ap.add_argument("--plot", type=Path, help="only plot this result file")
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    res = measure(args.cases, args.repeats, args.stress, args.deadline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    plot(args.out)


if __name__ == "__main__":
    main()
