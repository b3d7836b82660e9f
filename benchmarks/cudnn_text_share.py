"""Could cuDNN serve the text part of a FLUX tile-window attention faster than our kernel?

The text part of ``local_attention`` at flux-4k (1×24 heads×(512 + 256²)×128, bf16, tile window 8×16,
±2 tile rows × ±1 tile column) is two dense sub-problems: A, the 512 text queries against all
66,048 keys, and B, the 65,536 image queries against the 512 text keys. This script times our
kernel with and without the text (forward and the ``split_ws`` backward, tile order: the
difference is the text's share) against cuDNN and FlashAttention-2 on A and B, in interleaved
rounds, and checks that cuDNN's backward can take an output and log-sum-exp computed elsewhere
(what a merged kernel would need). H200 result: ``results/cudnn_text_31st.json`` / ``.png``.

    python benchmarks/cudnn_text_share.py --out cudnn_text.json
    python benchmarks/cudnn_text_share.py --plot benchmarks/results/cudnn_text_31st.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback
from pathlib import Path

import torch

# this script times or probes backward="split_ws", which the library refuses on GPUs (32nd session)
os.environ.setdefault("LINFUSION_UNSAFE_SPLIT_WS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench_ms, environment  # noqa: E402

H, D, GRID, TILE, WINDOW = 24, 128, (256, 256), (8, 16), 16
SHAPES = {"A_textq_allk": (512, 66048), "B_imgq_textk": (65536, 512)}  # (queries, keys)


def _randn(L: int, heads: int, seed: int) -> torch.Tensor:
    """(1, heads, L, D) bf16, heads-interleaved memory (as a diffusers processor hands them over)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(1, L, heads, D, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)


def ours() -> dict:
    """Forward / split_ws backward callables of the tile window in tile order, with and without text."""
    from linfusion.kernels.local_layout import to_tile_order
    from linfusion.kernels.local_triton import local_attention_tiled

    fns = {}
    for text in (512, 0):
        q, k, v, do = (to_tile_order(_randn(text + 65536, H, s), GRID, TILE, text) for s in range(4))
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

        def fwd(q=q, k=k, v=v, text=text):
            return local_attention_tiled(q.detach(), k.detach(), v.detach(), GRID, WINDOW, text, "tile", TILE)

        out = local_attention_tiled(q, k, v, GRID, WINDOW, text, "tile", TILE, backward="split_ws")

        def bwd(out=out, q=q, k=k, v=v, do=do):
            return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

        fns[f"ours_fwd_text{text}"], fns[f"ours_bwd_text{text}"] = fwd, bwd
    return fns


def dense(notes: list) -> dict:
    """cuDNN and FlashAttention-2 forward / backward callables of the two text sub-problems."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fns = {}
    for name, (Lq, Lk) in SHAPES.items():
        q, k, v = (_randn(L, H, s).requires_grad_() for L, s in ((Lq, 10), (Lk, 11), (Lk, 12)))
        do = _randn(Lq, H, 13)
        for impl, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v)

                def fwd(q=q, k=k, v=v, backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())

                def bwd(out=out, q=q, k=k, v=v, do=do):
                    return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

                bwd()
                fns[f"{impl}_fwd_{name}"], fns[f"{impl}_bwd_{name}"] = fwd, bwd
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{name} {impl}: {type(exc).__name__} {str(exc)[:300]}")
    return fns


def external_stats_check() -> str:
    """cuDNN's backward fed an output and log-sum-exp from outside: errors against float32."""
    import torch.nn.functional as F

    q, k, v, do = _randn(512, 4, 20), _randn(4096, 4, 21), _randn(4096, 4, 22), _randn(512, 4, 23)
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, r[0], r[1], r[6], r[7], None, None, None, 512, 4096, 0.0, False)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(F.scaled_dot_product_attention(*ref_in), ref_in, do.float())
    errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(grads, ref)]
    return f"external-stats backward: rel errors {errs}; lse {r[1].dtype} {tuple(r[1].shape)} (natural log)"


def measure(repeats: int) -> dict:
    res = {"env": environment(), "notes": [], "rounds": {}}
    fns = {**ours(), **dense(res["notes"])}
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    for _ in range(repeats):  # interleaved rounds
        for name, fn in fns.items():
            res["rounds"].setdefault(name, []).append(bench_ms(fn))
    med = res["median_ms"] = {k: statistics.median(v) for k, v in res["rounds"].items()}
    res["useful_tflops"] = {k: (10 if "_bwd_" in k else 4) * H * D * Lq * Lk / ms / 1e9
                            for k, ms in med.items() for n, (Lq, Lk) in SHAPES.items() if k.endswith(n)}
    res["text_share_ours_ms"] = {p: med[f"ours_{p}_text512"] - med[f"ours_{p}_text0"] for p in ("fwd", "bwd")}
    res["text_share_cudnn_ms"] = {p: sum(med.get(f"cudnn_{p}_{n}", float("nan")) for n in SHAPES)
                                  for p in ("fwd", "bwd")}
    try:
        res["notes"].append(external_stats_check())
    except Exception:  # noqa: BLE001
        res["notes"].append("external-stats backward: " + traceback.format_exc()[-1500:])
    return res


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text())
    med = res["median_ms"]
    labels = ["ours: text share\n(with - without text)", "cuDNN: A + B", "FlashAttention-2: A + B"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, p in zip(axes, ("fwd", "bwd")):
        vals = [med[f"ours_{p}_text512"] - med[f"ours_{p}_text0"],
                *(sum(med[f"{impl}_{p}_{n}"] for n in SHAPES) for impl in ("cudnn", "flash"))]
        ax.bar(labels, vals, color=["tab:green", "tab:blue", "tab:grey"])
        ax.set_title(f"{p}: text part of flux-4k tile window")
        ax.set_ylabel("ms")
        ax.tick_params(axis="x", labelsize=7)
    env = res["env"]
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "cudnn_text_31st.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--plot", type=Path, help="only plot this result file")
    args = ap.parse_args(argv)
    if args.plot:
        return plot(args.plot)
    res = measure(args.repeats)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "rounds"}, indent=1))
    plot(args.out)


if __name__ == "__main__":
    main()
