"""FlashAttention-4's block-sparse kernels against our Triton kernel on FLUX tile windows, one run.

Cases flux-2k/4k/8k (1×24 heads×(512 + (res/16)²)×128, bf16, tile window 8×16 tiles ±2 rows ×
±1 column, tokens in tile order, heads-interleaved memory): forward and backward of
``local_attention_tiled`` (Triton, the library's default split backward; the 32nd session's
first run used ``split_ws``, refused on GPUs since) and of ``local_attention_fa4`` (FA4
through ``linfusion.kernels.local_fa4``), in interleaved rounds; relative errors of both against
float32 on two heads; and dense context at L = 16,384: FA4 and cuDNN, forward and backward.

    python benchmarks/fa4_blocksparse.py --out fa4.json       # on the GPU, flash-attn-4 installed
    python benchmarks/fa4_blocksparse.py --plot benchmarks/results/fa4_blocksparse_32nd.json
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
from timing import environment, interleaved_rounds  # noqa: E402

H, D, TILE, WINDOW, TEXT = 24, 128, (8, 16), 16, 512
CASES = {"flux-2k": (128, 128), "flux-4k": (256, 256), "flux-8k": (512, 512)}


def _randn(L: int, seed: int) -> torch.Tensor:
    """(1, H, L, D) bf16: a heads-first view of token-major memory."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(1, L, H, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def local_case(name: str, grid, res: dict) -> dict:
    """Forward/backward callables of both implementations at one size (tokens taken as tile-ordered)."""
    from linfusion.kernels.local_fa4 import local_attention_fa4
    from linfusion.kernels.local_triton import local_attention_tiled

    L = TEXT + grid[0] * grid[1]
    q, k, v, do = (_randn(L, s) for s in range(4))
    impls = {
        "triton": lambda *t: local_attention_tiled(*t, grid, WINDOW, TEXT, "tile", TILE),
        "fa4": lambda *t: local_attention_fa4(*t, grid, WINDOW, TEXT, "tile", TILE, tile_order=True),
    }
    fns, results = {}, {}
    for impl, fn in impls.items():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        t0 = time.time()
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, do, retain_graph=True)
        torch.cuda.synchronize()
        res["notes"].append(f"{name} {impl}: first forward + backward {time.time() - t0:.1f} s (compiles included)")
        results[impl] = (out, grads)
        fns[f"{name}/{impl}/fwd"] = lambda fn=fn: fn(q, k, v)
        fns[f"{name}/{impl}/bwd"] = lambda out=out, inputs=inputs: torch.autograd.grad(out, inputs, do, retain_graph=True)
    (o_t, g_t), (o_f, g_f) = results["triton"], results["fa4"]
    res["fa4_vs_triton_rel"][name] = {"o": _rel(o_f, o_t), **{n: _rel(a, b) for n, a, b in zip("qkv", g_f, g_t)}}
    if name == "flux-4k":
        res["vs_fp32_rel"] = fp32_check(grid, q, k, v, do, results)
    res["pairs"][name] = pairs(grid)
    return fns


def pairs(grid) -> int:
    """Useful (query, key) pairs per head of the tile window with text, from the block lists."""
    from linfusion.kernels.local_fa4 import tile_window_blocks
    from linfusion.kernels.local_layout import get_layout

    layout = get_layout(grid, WINDOW, "tile", TILE)
    return int(tile_window_blocks(layout.n_tiles, layout.radius, TEXT).sum()) * 128 * 128


def fp32_check(grid, q, k, v, do, results) -> dict:
    """Relative errors of both implementations against the float32 reference on two heads."""
    from linfusion.kernels.local_layout import from_tile_order
    from linfusion.kernels.local_reference import local_attention_reference

    def row_major(t):
        return from_tile_order(t[:, :2].float(), grid, TILE, TEXT)

    ref_in = [row_major(t).requires_grad_() for t in (q, k, v)]
    ref = local_attention_reference(*ref_in, grid, WINDOW, TEXT, "tile", TILE)
    ref_all = (ref, *torch.autograd.grad(ref, ref_in, row_major(do)))
    return {impl: [_rel(row_major(a), b) for a, b in zip((o, *g), ref_all)] for impl, (o, g) in results.items()}


def dense_context(notes: list) -> dict:
    """FA4 and cuDNN dense attention at L = 16,384, forward and backward."""
    import torch.nn.functional as F
    from flash_attn.cute.interface import flash_attn_func
    from torch.nn.attention import SDPBackend, sdpa_kernel

    L = 16384
    q, k, v, do = (_randn(L, 10 + s) for s in range(4))
    fns = {}
    try:
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]

        def fa4(*t):
            out = flash_attn_func(*(x.transpose(1, 2) for x in t))
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

        out = fa4(*inputs)
        fns["dense-16k/fa4/fwd"] = lambda: fa4(q, k, v)
        fns["dense-16k/fa4/bwd"] = lambda: torch.autograd.grad(out, inputs, do, retain_graph=True)
        inputs_c = [t.detach().requires_grad_() for t in (q, k, v)]

        def cudnn(*t):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(*t)

        out_c = cudnn(*inputs_c)
        fns["dense-16k/cudnn/fwd"] = lambda: cudnn(q, k, v)
        fns["dense-16k/cudnn/bwd"] = lambda: torch.autograd.grad(out_c, inputs_c, do, retain_graph=True)
    except Exception:  # noqa: BLE001
        notes.append("dense context: " + traceback.format_exc()[-1500:])
    return fns


def measure(cases, repeats: int, deadline_s: float) -> dict:
    import flash_attn

    start = time.time()
    res = {"env": environment(), "notes": [], "rounds": {}, "fa4_vs_triton_rel": {}, "pairs": {}}
    res["env"]["flash_attn_4"] = getattr(flash_attn, "__version__", None)
    fns = {}
    for name in cases:
        fns.update(local_case(name, CASES[name], res))
    fns.update(dense_context(res["notes"]))
    med = res["median_ms"] = interleaved_rounds(fns, repeats, deadline_s, start, res)
    res["bwd_over_fwd"] = {k[:-4]: med[k] / med[k[:-4] + "/fwd"] for k in med if k.endswith("/bwd")}
    res["fa4_bwd_over_triton_fwd"] = {c: med[f"{c}/fa4/bwd"] / med[f"{c}/triton/fwd"] for c in cases}
    res["useful_tflops"] = {}
    for key, ms in med.items():
        case = key.split("/")[0]
        n_pairs = res["pairs"].get(case, 16384 * 16384)
        res["useful_tflops"][key] = (10 if key.endswith("bwd") else 4) * H * D * n_pairs / ms / 1e9
    return res


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text())
    med = res["median_ms"]
    cases = [c for c in CASES if f"{c}/triton/fwd" in med]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.2
    for i, (impl, p) in enumerate([("triton", "fwd"), ("fa4", "fwd"), ("triton", "bwd"), ("fa4", "bwd")]):
        axes[0].bar([j + (i - 1.5) * width for j in range(len(cases))], [med[f"{c}/{impl}/{p}"] for c in cases],
                    width, label=f"{impl} {p}", color=["tab:blue", "tab:orange"][impl == "fa4"],
                    alpha=1.0 if p == "bwd" else 0.5)
    axes[0].set_xticks(range(len(cases)), cases)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms (log)")
    axes[0].set_title("FLUX tile window, tile order")
    axes[0].legend(fontsize=7)
    keys = [k for k in res["bwd_over_fwd"]]
    axes[1].barh(keys, [res["bwd_over_fwd"][k] for k in keys],
                 color=["tab:orange" if "/fa4" in k else "tab:gray" if "cudnn" in k else "tab:blue" for k in keys])
    axes[1].axvline(3.0, color="red", ls="--", lw=1, label="target 3×")
    axes[1].set_xlabel("backward / forward")
    axes[1].tick_params(axis="y", labelsize=7)
    axes[1].legend(fontsize=7)
    env = res["env"]
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, flash-attn-4 {env.get('flash_attn_4')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "fa4_blocksparse.json")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=400.0, help="stop starting timing rounds after this many s")
    ap.add_argument("--plot", type=Path, help="only plot this result file")
    args = ap.parse_args(argv)
    if args.plot:
        return plot(args.plot)
    res = measure(args.cases, args.repeats, args.deadline)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "rounds"}, indent=1))
    plot(args.out)


if __name__ == "__main__":
    main()
