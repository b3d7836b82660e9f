"""Benchmark: Triton local (window) attention vs dense SDPA and FlexAttention on one GPU.

Run on a CUDA GPU::

    python benchmarks/kernels_local.py --out benchmarks/results/kernels_local.json [--sweep | --sweep-only]

``run_local_cases(rows)`` appends one dict per measurement (the merged
``benchmarks/kernels.py`` calls it)::

    {"case", "op": "local"|"dense", "variant", "impl", "pass": "fwd"|"bwd", "shape", "ms",
     "tflops", "tbps", ...extras}

impl: "triton" (row-major tokens, the default API), "triton_tiled" (tokens already in tile
order), "flex" (torch FlexAttention, compiled, on the same tile-ordered tokens with the same
mask) for op "local"; "cudnn" (SDPA forced to cuDNN) and "sdpa_default" for op "dense".

Shapes (B × H × L × D, bf16; L = text + image tokens):

* ``flux-{1,2,4,8}k``: 1 × 24 × (512 + (res/16)²) × 128, grid (res/16)², text 512.
* ``sdxl-4k``: 2 × 10 × 16384 × 64, grid 128² (the shape the linear benchmark uses), no text.
* ``sd15-2k``: 2 × 8 × 65536 × 40, grid 256², no text.
* ``wan-480p``: 1 × 12 × 32760 × 128, grid 21 × 30 × 52 (3D), no text.

Variants (2D): ``circle-r16`` (exact disc of radius 16 tokens) and ``tile-8x16-r2x1`` (tile window:
±2 tile rows × ±1 tile column = 40 × 48 keys, 1,920 keys). 3D: ``circle-r2x8x8`` and
``tile-2x8x8-r1x1x1`` (±1 tile in every dimension, 3,456 keys). Circles on row-major tokens run on
the kernel's own tile, as the API does without a tile (``local_configs.circle_tile``: 8×8 / 1×8×8
at head dims 64 to 128; record key ``kernel_tile``); tile-ordered tokens (``triton_tiled``) and
FlexAttention use the variant's tile order (8×16 / 2×8×8).

Effective TFLOP/s count useful work only: fwd 4·B·H·D·Σ_queries(visible keys), bwd 2.5×
that (FlashAttention convention); dense: L² pairs. TB/s: q, k, v read + o written once (fwd),
q, k, v, o, dO read + dq, dk, dv written (bwd). Timing: ``triton.testing.do_bench`` median
after warm-up (it flushes L2 between calls); calls slower than 20 ms: median of 2–3 CUDA-event
timed calls. Setup: the per-resolution layout (``get_layout``, cache cleared) vs FlexAttention's
``create_block_mask(..., _compile=True)``.

Block-config sweep (``--sweep``: before the cases, which then run with the best configs;
``--sweep-only``: nothing else): at flux-4k (``--sweep-case``: another 2D case, e.g. sdxl-4k for head
dim 64, or the sweep-only pixart-4k, 1×16×65536×72), both 2D variants, the block configs of each kernel
kind (``local_configs.set_config_override``) listed in ``SWEEP_CONFIGS``: "fwd" (8 configs; Triton's automatic warp
specialization of the window loop was tried in the 9th session and gave nothing, NOTES_local.md),
"dkdv" (BM query chunk ∈ {16, 32, 64} × BN key block ∈ {64, 128} × 4/8 warps × 2/3 stages) and
"dq" (BM query block ∈ {64, 128} × BN key chunk ∈ {32, 64, 128} × warps × stages); on request
(``--sweep-kinds dkdv_fused``) the dK/dV kernel of ``backward="fused_dq"``; ``--sweep-configs JSON``
replaces a kind's list (e.g. the tensor-core circle test on and off, ``{"mask_dot": true}``). A "fwd"
config times the forward; a "dkdv" or "dq" config the whole backward with only that kernel
overridden, a "dkdv_fused" config the whole fused backward. Each record (JSON ``sweep``) holds the pass's time with the default configs measured
at the start of the same call (``default_ms``, ``speedup``) and ``max_rel_err`` = max |a − b| /
max |b| of its outputs / gradients against the default configs'; ``ok`` iff it ran, is finite and
max_rel_err < 2e-2. Configs are swept backward kernels first (``--sweep-kinds`` picks kinds) and skipped once ``--sweep-deadline``
seconds (default 240) have passed. ``sweep_best``: the fastest ok config per kind and variant;
``sweep_best_overall``: per kind, the least total time over the variants (ok in both).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flex_baseline import flex_mask_mod  # noqa: E402
from timing import SLOW_MS, bench_ms, environment  # noqa: E402,F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CASES = [
    # name, B, H, D, grid, text_len
    ("flux-1k", 1, 24, 128, (64, 64), 512),
    ("flux-2k", 1, 24, 128, (128, 128), 512),
    ("flux-4k", 1, 24, 128, (256, 256), 512),
    ("flux-8k", 1, 24, 128, (512, 512), 512),
    ("sdxl-4k", 2, 10, 64, (128, 128), 0),
    ("sd15-2k", 2, 8, 40, (256, 256), 0),
    ("wan-480p", 1, 12, 128, (21, 30, 52), 0),
]
VARIANTS_2D = [("circle-r16", "circle", 16, (8, 16)), ("tile-8x16-r2x1", "tile", 16, (8, 16))]
VARIANTS_3D = [("circle-r2x8x8", "circle", (2, 8, 8), (2, 8, 8)), ("tile-2x8x8-r1x1x1", "tile", (2, 8, 8), (2, 8, 8))]
FLEX_CASES = ("flux-2k", "flux-4k")  # FlexAttention compiles + builds masks for seconds per shape
FLEX_BWD_CASES = ("flux-4k",)
FUSED_DQ_CASES = ("flux-4k", "flux-8k")  # both backward variants timed too (impls triton_split, triton_fused_dq)
TILED_CASES = ("flux-1k", "flux-2k", "flux-4k", "flux-8k")  # tokens in tile order (their backward: fused_gluon)
DENSE_BWD_MAX_L = 70000


def visible_pairs(grid, window, shape, tile, text_len) -> int:
    """Σ over queries of visible keys (text rows see all L keys), counted exactly."""
    from linfusion.kernels.local_layout import get_layout
    from linfusion.kernels.local_reference import normalize_window, tile_radius

    n = math.prod(grid)
    L = n + text_len
    total = text_len * L + n * text_len
    if shape == "tile":
        radius = tile_radius(normalize_window(window, len(grid)), tile, grid)
        prod = 1
        for g, t, r in zip(grid, tile, radius):
            nt = -(-g // t)
            sizes = [min(t, g - c * t) for c in range(nt)]
            prod *= sum(sizes[c] * sizes[c2] for c in range(nt) for c2 in range(nt) if abs(c - c2) <= r)
        return total + prod
    layout = get_layout(grid, window, "circle", tile, "cpu")
    table = layout.table.view(layout.cap0 + 2, layout.cap1 + 2)
    g0, g1, g2 = layout.grid
    for d0 in range(-layout.cap0, layout.cap0 + 1):
        for d1 in range(-layout.cap1, layout.cap1 + 1):
            m = int(table[abs(d0), abs(d1)])
            if m < 0:
                continue
            w = sum(g2 - abs(d2) for d2 in range(-m, m + 1))
            total += (g0 - abs(d0)) * (g1 - abs(d1)) * w
    return total


def row(case, op, variant, impl, pss, shape, ms, flops, nbytes, **extra):
    return {
        "case": case, "op": op, "variant": variant, "impl": impl, "pass": pss,
        "shape": "x".join(str(s) for s in shape), "ms": ms,
        "tflops": flops / (ms * 1e-3) / 1e12, "tbps": nbytes / (ms * 1e-3) / 1e12, **extra,
    }


def make_qkv(B, H, L, D, seed=0, requires_grad=False, device="cuda", dtype=torch.bfloat16):
    """Random q, k, v of shape (B, H, L, D)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = [torch.randn(B, H, L, D, device=device, generator=gen, dtype=dtype) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in out]


def run_local_cases(out_rows: list[dict], cases=None, flex_cases=FLEX_CASES, dense: bool = True,
                    tiled_cases=TILED_CASES, fused_dq_cases=FUSED_DQ_CASES, log=print, on_case_done=None) -> None:
    """Time every case: Triton local fwd/bwd (both variants), dense SDPA and FlexAttention baselines.

    ``cases``: names to run, in that order (default: all, in CASES order).
    """
    from linfusion.kernels.local_configs import circle_tile
    from linfusion.kernels.local_layout import clear_layout_cache, get_layout, to_tile_order
    from linfusion.kernels.local_triton import local_attention_tiled, local_attention_triton

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    by_name = {c[0]: c for c in CASES}
    for name, B, H, D, grid, text in [by_name[c] for c in cases] if cases else CASES:
        L = text + math.prod(grid)
        shape = (B, H, L, D)
        tbytes = B * H * L * D * 2
        fwd_bytes, bwd_bytes = 4 * tbytes, 8 * tbytes
        q, k, v = make_qkv(B, H, L, D, requires_grad=True)
        do = torch.randn_like(q)
        variants = VARIANTS_2D if len(grid) == 2 else VARIANTS_3D
        for vname, vshape, window, tile in variants:
            pairs = visible_pairs(grid, window, vshape, tile, text)
            fl_f, fl_b = 4 * B * H * D * pairs, 10 * B * H * D * pairs
            # circles on row-major tokens run on the kernel's own tile (the API default, tile=None);
            # tile-ordered tokens and FlexAttention keep the variant's tile order
            kernel_tile = (circle_tile(len(grid), q.dtype, D) if vshape == "circle" else None) or tile
            extra = {"keys_per_query": pairs / L, "grid": list(grid), "text_len": text, "tile": list(tile),
                     "kernel_tile": list(kernel_tile)}
            # per-resolution setup: layout (cache cleared) — what a new resolution costs
            clear_layout_cache()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            get_layout(grid, window, vshape, kernel_tile, q.device)
            torch.cuda.synchronize()
            setup_ms = (time.perf_counter() - t0) * 1e3
            impls = {"triton": (local_attention_triton, (q, k, v))}  # backward="auto"
            if fused_dq_cases and name in fused_dq_cases:  # both backward variants, whichever "auto" picks
                for variant in ("split", "fused_dq"):
                    impls[f"triton_{variant}"] = (functools.partial(local_attention_triton, backward=variant), (q, k, v))
            tiled = bool(tiled_cases) and name in tiled_cases
            if tiled:
                qt, kt, vt = (to_tile_order(t.detach(), grid, tile, text).requires_grad_() for t in (q, k, v))
                impls["triton_tiled"] = (local_attention_tiled, (qt, kt, vt))
            for impl_name, (fn, args) in impls.items():
                t_start = time.time()
                impl_tile = tile if impl_name == "triton_tiled" else kernel_tile
                try:
                    def fwd(fn=fn, args=args, impl_tile=impl_tile):
                        return fn(*(a.detach() for a in args), grid, window, text, vshape, impl_tile)
                    fwd()
                    torch.cuda.synchronize()
                    ms_f = bench_ms(fwd)
                    out = fn(*args, grid, window, text, vshape, impl_tile)
                    def bwd(out=out, args=args, do=do):  # defaults: the names are del'd later
                        return torch.autograd.grad(out, args, do, retain_graph=True)
                    bwd()
                    torch.cuda.synchronize()
                    ms_b = bench_ms(bwd)
                    del out
                except Exception as exc:  # noqa: BLE001
                    log(f"{name} {vname} {impl_name}: FAILED {type(exc).__name__}: {str(exc)[:400]}")
                    continue
                out_rows.append(row(name, "local", vname, impl_name, "fwd", shape, ms_f, fl_f, fwd_bytes,
                                    setup_ms=setup_ms, **extra))
                out_rows.append(row(name, "local", vname, impl_name, "bwd", shape, ms_b, fl_b, bwd_bytes, **extra))
                log(f"{name:9s} {vname:18s} {impl_name:13s} fwd {ms_f:8.3f} ms {fl_f / ms_f / 1e9:6.0f} TF/s"
                    f"  bwd {ms_b:8.3f} ms {fl_b / ms_b / 1e9:6.0f} TF/s  bwd/fwd {ms_b / ms_f:4.2f}"
                    f"  setup {setup_ms:5.2f} ms  [{time.time() - t_start:.1f}s]")
            if tiled:
                del qt, kt, vt
            if flex_cases and name in flex_cases:
                run_flex(out_rows, name, B, H, D, grid, window, vshape, tile, text, vname, fl_f, fl_b,
                         fwd_bytes, bwd_bytes, extra, bwd=name in FLEX_BWD_CASES and vshape == "tile", log=log)
            torch.cuda.empty_cache()
        if dense:
            run_dense(out_rows, name, q, k, v, do, fwd_bytes, bwd_bytes, log=log)
        del q, k, v, do
        torch.cuda.empty_cache()
        if on_case_done is not None:
            on_case_done(out_rows)


def run_flex(out_rows, name, B, H, D, grid, window, vshape, tile, text, vname, fl_f, fl_b, fwd_bytes, bwd_bytes,
             extra, bwd, log=print):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()  # a fresh static compile per shape (dynamic shapes break the mask_mod)
    L = text + math.prod(grid)
    shape = (B, H, L, D)
    t_start = time.time()
    try:
        mask_mod = flex_mask_mod(grid, window, vshape, tile, text, "cuda")
        builds = []
        for _ in range(2):  # first build includes compiling the mask function
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            bm = create_block_mask(mask_mod, None, None, L, L, device="cuda", _compile=True)
            torch.cuda.synchronize()
            builds.append((time.perf_counter() - t0) * 1e3)
        flex = torch.compile(flex_attention, dynamic=False)
        q, k, v = make_qkv(B, H, L, D, seed=1, requires_grad=True)

        def fwd(q=q, k=k, v=v, bm=bm):  # defaults: the names are del'd later
            return flex(q.detach(), k.detach(), v.detach(), block_mask=bm)
        fwd()
        torch.cuda.synchronize()
        ms_f = bench_ms(fwd)
        out_rows.append(row(name, "local", vname, "flex", "fwd", shape, ms_f, fl_f, fwd_bytes,
                            mask_build_ms=builds[1], mask_build_first_ms=builds[0], **extra))
        msg = f"{name:9s} {vname:18s} flex          fwd {ms_f:8.3f} ms {fl_f / ms_f / 1e9:6.0f} TF/s"
        if bwd:
            do = torch.randn_like(q)
            out = flex(q, k, v, block_mask=bm)

            def bwd_fn(q=q, k=k, v=v):
                return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
            bwd_fn()
            torch.cuda.synchronize()
            ms_b = bench_ms(bwd_fn)
            out_rows.append(row(name, "local", vname, "flex", "bwd", shape, ms_b, fl_b, bwd_bytes, **extra))
            msg += f"  bwd {ms_b:8.3f} ms {fl_b / ms_b / 1e9:6.0f} TF/s"
            del out, do
        log(msg + f"  mask build {builds[0]:.0f} / {builds[1]:.0f} ms  [{time.time() - t_start:.1f}s]")
        del q, k, v, bm
    except Exception as exc:  # noqa: BLE001
        log(f"{name} {vname} flex: FAILED {type(exc).__name__}: {str(exc)[:400]}")


def run_dense(out_rows, name, q, k, v, do, fwd_bytes, bwd_bytes, log=print):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, L, D = q.shape
    fl_f, fl_b = 4 * B * H * L * L * D, 10 * B * H * L * L * D
    for impl_name in ("cudnn", "sdpa_default"):
        if impl_name == "sdpa_default" and L > 70000:
            log(f"{name} dense {impl_name}: skipped (> 2 s a call)")
            continue

        def sdpa(q, k, v, _impl=impl_name):
            if _impl == "cudnn":
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v)

        t_start = time.time()
        try:
            def fwd():
                return sdpa(q.detach(), k.detach(), v.detach())
            fwd()
            torch.cuda.synchronize()
            ms_f = bench_ms(fwd)
            out_rows.append(row(name, "dense", "-", impl_name, "fwd", tuple(q.shape), ms_f, fl_f, fwd_bytes))
            msg = f"{name:9s} dense {impl_name:12s} fwd {ms_f:9.3f} ms {fl_f / ms_f / 1e9:6.0f} TF/s"
            if impl_name == "cudnn" and L <= DENSE_BWD_MAX_L:
                out = sdpa(q, k, v)

                def bwd():
                    return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
                bwd()
                ms_b = bench_ms(bwd)
                out_rows.append(row(name, "dense", "-", impl_name, "bwd", tuple(q.shape), ms_b, fl_b, bwd_bytes))
                msg += f"  bwd {ms_b:9.3f} ms"
                del out
            log(msg + f"  [{time.time() - t_start:.1f}s]")
        except Exception as exc:  # noqa: BLE001
            log(f"{name} dense {impl_name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- block-config sweep


def _config_grid(**axes) -> list[dict]:
    """Every combination of the given axes (name -> values), the last axis varying fastest."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


SWEEP_CASE = "flux-4k"
# sweep-only cases (not in the benchmark): PixArt-Σ at 4096² (16 heads of 72 = 1152; no joint text)
SWEEP_EXTRA_CASES = [("pixart-4k", 1, 16, 72, (256, 256), 0)]
# overrides per kernel kind (local_configs.set_config_override); keys left out keep their default
SWEEP_CONFIGS = {
    "fwd": [{"BN": 128, "num_stages": 2}, {"BN": 64, "num_warps": 8, "num_stages": 3}, {"BN": 128, "num_stages": 3},
            {"BN": 128, "num_stages": 4}, {"BN": 64, "num_stages": 4}, {"BN": 64, "num_warps": 4, "num_stages": 3},
            # one warpgroup on 64-query blocks (for small head dims, where the 128-row blocks' softmax dominates)
            {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 3}, {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3}],
    # key block BN × query chunks BM. No combination is invalid a priori (all blocks are powers of two
    # ≤ the 128-token tile); one that exceeds shared memory is recorded as failed, a wrong one as not ok.
    "dkdv": _config_grid(BM=(16, 32, 64), BN=(64, 128), num_warps=(4, 8), num_stages=(2, 3)),
    # query block BM × key chunks BN
    "dq": _config_grid(BM=(64, 128), BN=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3)),
    # the dK/dV kernel of backward="fused_dq" (timed as that whole backward): larger key blocks BN
    # mean fewer fp32 atomic adds per query row. The 11th session's first sweep (BM 32/64 × BN 64/128
    # × 4/8 warps, 2 stages, kernels_local_sweep_dkdv_fused.json) found 128-key blocks on 8 warps
    # best by far (4 warps spill the 128-key accumulators); this grid explores around them.
    "dkdv_fused": _config_grid(BM=(16, 32, 64, 128), BN=(128,), num_warps=(8,), num_stages=(2, 3)),
}
SWEEP_ORDER = ("dkdv_fused", "dkdv", "dq", "fwd")  # the backward kernels are the target: the deadline cuts fwd first
DEFAULT_SWEEP_KINDS = ("dkdv", "dq", "fwd")  # the default backward's kernels and the forward
SWEEP_PASS = {"fwd": "fwd", "dkdv": "bwd", "dq": "bwd", "dkdv_fused": "bwd_fused"}
SWEEP_TOL = 2e-2  # max_rel_err below which a config counts as correct (bf16 outputs)
SWEEP_KEYS = ("case", "variant", "kernel", "pass", "config", "effective", "is_default", "status", "ok", "ms",
              "default_ms", "speedup", "max_rel_err", "first_call_s", "error")


def max_rel_err(outs, refs) -> float:
    """max over the output pairs of max|a − b| / (max|b| + 1e-6); NaN if an ``a`` holds a NaN or inf."""
    errs = []
    for a, b in zip(outs, refs, strict=True):
        a, b = a.detach().float(), b.detach().float()
        if not bool(torch.isfinite(a).all()):
            return float("nan")
        errs.append(float((a - b).abs().max() / (b.abs().max() + 1e-6)))
    return max(errs)


def _error_text(exc: BaseException, limit: int = 300) -> str:
    """The exception's type and message, truncated to ``limit`` characters (Triton errors are long)."""
    return f"{type(exc).__name__}: {str(exc)[:limit]}"


def _first_call(fn, sync):
    """fn() once (compiles on a new config), synchronised: (its outputs, seconds)."""
    t0 = time.perf_counter()
    outs = fn()
    sync()
    return outs, time.perf_counter() - t0


class _SweepVariant:
    """One window variant of the sweep case: the timed callables (forward, and the full backward of
    one forward output kept for the whole sweep), the default-config reference, the layout."""

    def __init__(self, q, k, v, do, grid, window, text, shape, tile, bench, sync):
        from linfusion.kernels.local_triton import _prepare, local_attention_triton

        def fwd():
            return (local_attention_triton(q.detach(), k.detach(), v.detach(), grid, window, text, shape, tile),)

        def backward_pass(variant: str):
            graph = []  # the forward output whose backward every call runs (made by the first call)

            def bwd():
                if not graph:
                    graph.append(local_attention_triton(q, k, v, grid, window, text, shape, tile, backward=variant))
                return torch.autograd.grad(graph[0], (q, k, v), do, retain_graph=True)
            return bwd

        self.q, self.sync, self.bench = q, sync, bench
        self.layout, _ = _prepare(q, k, v, grid, window, text, shape, tile)
        self.fns = {"fwd": fwd, "bwd": backward_pass("split"), "bwd_fused": backward_pass("fused_dq")}
        # pass -> {"outs", "ms", "error"} with the default configs, measured on first use (no
        # override is set then: _run_config sets its override after asking)
        self._refs: dict[str, dict] = {}

    def reference(self, pss: str) -> dict:
        """Outputs and time of pass ``pss`` with the default configs; an error is kept, not raised."""
        if pss not in self._refs:
            ref = {"outs": None, "ms": float("nan"), "error": None}
            try:
                ref["outs"] = _first_call(self.fns[pss], self.sync)[0]
                ref["ms"] = self.bench(self.fns[pss])
            except Exception as exc:  # noqa: BLE001
                ref["error"] = _error_text(exc)
            self._refs[pss] = ref
        return self._refs[pss]

    def effective(self, kind: str) -> dict:
        """The launch config of ``kind`` under the current overrides, blocks clamped to the tile."""
        from linfusion.kernels.local_triton import _blocks, _mask_flags, _pow2

        bm, bn, cfg = _blocks(kind, self.q, max(16, _pow2(self.q.shape[-1])), self.layout)
        return {"BM": bm, "BN": bn, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                **_mask_flags(cfg, self.layout)}


def _run_config(state: _SweepVariant, kind: str, cfg: dict, bench) -> dict:
    """One config of one kernel kind, the other kinds at their defaults: first call (compile), error
    against the default config's outputs (fwd) or gradients (bwd), time of the whole pass."""
    from linfusion.kernels.local_configs import set_config_override

    pss = SWEEP_PASS[kind]
    ref = state.reference(pss)
    rec = {"effective": None, "is_default": None, "status": "failed", "ok": False, "ms": float("nan"),
           "default_ms": ref["ms"], "speedup": float("nan"), "max_rel_err": float("nan"), "first_call_s": None,
           "error": ref["error"] and f"default config: {ref['error']}"}
    default_effective = state.effective(kind)
    set_config_override(kind, cfg)
    try:
        rec["effective"] = state.effective(kind)
        rec["is_default"] = rec["effective"] == default_effective
        outs, rec["first_call_s"] = _first_call(state.fns[pss], state.sync)
        if ref["outs"] is not None:
            rec["max_rel_err"] = max_rel_err(outs, ref["outs"])
        del outs
        rec["ms"] = float(bench(state.fns[pss]))
        rec["speedup"] = rec["default_ms"] / rec["ms"] if rec["ms"] > 0 else float("nan")
        rec["ok"] = rec["max_rel_err"] < SWEEP_TOL  # False for NaN (non-finite outputs, no reference)
        rec["status"] = "ok" if rec["ok"] else "wrong"
    except Exception as exc:  # noqa: BLE001
        rec["error"] = _error_text(exc)
    finally:
        set_config_override(kind, None)
    return rec


def sweep(case=None, variants=VARIANTS_2D, configs=None, bench=bench_ms, deadline_s: float = 240.0,
          device: str = "cuda", log=print) -> list[dict]:
    """Block-config sweep of the Triton local kernels, one record per (kernel kind, config, variant).

    case: ``(name, B, H, D, grid, text_len)`` (default: flux-4k of CASES); variants: like VARIANTS_2D;
    configs: ``{kind: [override, ...]}`` for kinds "fwd", "dkdv", "dq" (default SWEEP_CONFIGS);
    bench: ``bench(fn) -> ms``. "fwd" configs time the forward; "dkdv" / "dq" configs time the
    whole backward with only that kernel's config overridden. Every record carries the default
    configs' time of the same pass measured at the start (``default_ms``) and the error against
    their outputs; ``ok``: no exception, finite, ``max_rel_err`` < SWEEP_TOL. Configs not started
    within ``deadline_s`` of the call are recorded as skipped. Order: kind (SWEEP_ORDER), config,
    variant, so a cut sweep has measured the same configs in every variant.
    """
    name, B, H, D, grid, text = case or next(c for c in CASES if c[0] == SWEEP_CASE)
    configs = SWEEP_CONFIGS if configs is None else configs
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    t0 = time.monotonic()
    q, k, v = make_qkv(B, H, text + math.prod(grid), D, requires_grad=True, device=device)
    do = torch.randn_like(q)
    states: dict[str, _SweepVariant] = {}
    records = []
    for kind in [k_ for k_ in SWEEP_ORDER if k_ in configs]:
        for cfg in configs[kind]:
            for vname, vshape, window, tile in variants:
                rec = {"case": name, "variant": vname, "kernel": kind, "pass": SWEEP_PASS[kind], "config": cfg}
                if time.monotonic() - t0 >= deadline_s:
                    records.append({**dict.fromkeys(SWEEP_KEYS), **rec, "status": "skipped", "ok": False,
                                    "ms": float("nan")})
                    continue
                if vname not in states:
                    states[vname] = _SweepVariant(q, k, v, do, grid, window, text, vshape, tile, bench, sync)
                rec.update(_run_config(states[vname], kind, cfg, bench))
                records.append(rec)
                log(f"sweep {name} {vname:16s} {kind:4s} {rec['ms']:8.3f} ms (default {rec['default_ms']:8.3f}, "
                    f"x{rec['speedup']:.2f}) err {rec['max_rel_err']:.1e} {rec['status']:6s} "
                    f"[{time.monotonic() - t0:5.0f}s] {cfg}" + (f"  {rec['error']}" if rec["error"] else ""))
    skipped = sum(r["status"] == "skipped" for r in records)
    if skipped:
        log(f"sweep: deadline {deadline_s:.0f} s reached, {skipped} of {len(records)} configs skipped")
    return records


def best_configs(records: list[dict]) -> dict:
    """Per kind and variant, the fastest ``ok`` config: {kind: {variant: {config, effective, ms,
    default_ms, speedup, max_rel_err}}}."""
    best: dict = {}
    for r in records:
        if r["ok"] and r["ms"] == r["ms"]:
            cur = best.setdefault(r["kernel"], {}).get(r["variant"])
            if cur is None or r["ms"] < cur["ms"]:
                best[r["kernel"]][r["variant"]] = {key: r[key] for key in (
                    "config", "effective", "ms", "default_ms", "speedup", "max_rel_err")}
    return best


def best_overall(records: list[dict]) -> dict:
    """Per kind, the config with the least total time over the variants, among the configs that are
    ``ok`` in every variant swept for that kind: {kind: config}."""
    out = {}
    for kind in SWEEP_ORDER:
        rows = [r for r in records if r["kernel"] == kind and r["status"] != "skipped"]
        variants = {r["variant"] for r in rows}
        totals: dict[str, list] = {}
        for r in rows:
            entry = totals.setdefault(json.dumps(r["config"], sort_keys=True), [0.0, set()])
            if r["ok"] and r["ms"] == r["ms"]:
                entry[0] += r["ms"]
                entry[1].add(r["variant"])
        eligible = {key: t for key, (t, seen) in totals.items() if seen == variants}
        if eligible:
            out[kind] = json.loads(min(eligible, key=eligible.get))
    return out


def print_sweep_summary(best: dict, log=print) -> None:
    """One line per kind and variant: the best ok config and its speedup over the default configs."""
    log("\nsweep best (ok configs only):")
    for kind in SWEEP_ORDER:
        for vname, b in best.get(kind, {}).items():
            log(f"  {kind:4s} {vname:16s} {b['ms']:8.3f} ms vs default {b['default_ms']:8.3f} ms "
                f"(x{b['speedup']:.2f}, {SWEEP_PASS[kind]})  {b['effective']}  override {b['config']}")


def summarize(rows: list[dict]) -> dict:
    """Per case and variant: Triton ms and TF/s, speedups over cuDNN dense and FlexAttention."""
    def find(case, op, impl, pss, variant=None):
        for r in rows:
            if (r["case"], r["op"], r["impl"], r["pass"]) == (case, op, impl, pss) and (
                variant is None or r["variant"] == variant
            ):
                return r
        return None

    table, crossover = {}, {}
    for name, *_ in CASES:
        for r in rows:
            if r["case"] != name or r["op"] != "local" or r["impl"] != "triton":
                continue
            cud = find(name, "dense", "cudnn", r["pass"])
            flex = find(name, "local", "flex", r["pass"], r["variant"])
            tiled = find(name, "local", "triton_tiled", r["pass"], r["variant"])
            e = table.setdefault(f"{name} {r['variant']}", {})
            e[r["pass"]] = {
                "ms": r["ms"], "tflops": r["tflops"],
                "tiled_ms": tiled["ms"] if tiled else None,
                "speedup_vs_cudnn": cud["ms"] / r["ms"] if cud else None,
                "speedup_vs_flex": flex["ms"] / r["ms"] if flex else None,
                "setup_ms": r.get("setup_ms"),
                "flex_mask_build_ms": flex.get("mask_build_ms") if flex else None,
            }
            if r["pass"] == "fwd" and cud and cud["ms"] > r["ms"] and r["variant"] not in crossover:
                crossover[r["variant"]] = name
    for e in table.values():
        if "fwd" in e and "bwd" in e:
            e["bwd_over_fwd"] = e["bwd"]["ms"] / e["fwd"]["ms"]
    return {"cases": table, "crossover_fwd_beats_cudnn": crossover}


def print_table(summary, log=print):
    def fmt(x, f="{:.2f}x"):
        return "-" if x is None else f.format(x)

    log("\n| case variant | pass | triton ms | TF/s | tiled ms | vs cuDNN | vs flex | setup ms | flex mask ms |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, e in summary["cases"].items():
        for pss in ("fwd", "bwd"):
            x = e.get(pss)
            if x:
                log(f"| {key} | {pss} | {x['ms']:.3f} | {x['tflops']:.0f} | {fmt(x['tiled_ms'], '{:.3f}')} | "
                    f"{fmt(x['speedup_vs_cudnn'])} | {fmt(x['speedup_vs_flex'])} | {fmt(x['setup_ms'], '{:.2f}')} | "
                    f"{fmt(x['flex_mask_build_ms'], '{:.0f}')} |")
    log(f"crossover (smallest case where local fwd beats cuDNN dense): {summary['crossover_fwd_beats_cudnn']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernels_local.json")
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--flex", nargs="*", default=list(FLEX_CASES), help="cases with FlexAttention baselines")
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--tiled", nargs="*", default=list(TILED_CASES), help="cases timed on tile-ordered tokens too")
    parser.add_argument("--fused-dq", nargs="*", default=list(FUSED_DQ_CASES),
                        help="cases whose backward is also timed with each explicit variant (impls triton_split, triton_fused_dq)")
    parser.add_argument("--sweep", action="store_true",
                        help="sweep block configs (at --sweep-case) first, then run the cases with the best ones")
    parser.add_argument("--sweep-only", action="store_true", help="run only the block-config sweep")
    parser.add_argument("--sweep-kinds", nargs="+", choices=SWEEP_ORDER, default=list(DEFAULT_SWEEP_KINDS),
                        help="kernel kinds to sweep (default: dkdv, dq, fwd; dkdv_fused: the dK/dV kernel of "
                             "backward='fused_dq')")
    sweep_cases = [c for c in CASES + SWEEP_EXTRA_CASES if len(c[4]) == 2]
    parser.add_argument("--sweep-case", default=SWEEP_CASE, choices=[c[0] for c in sweep_cases],
                        help="the 2D case the sweep times (default flux-4k; sdxl-4k / sd15-2k / pixart-4k for head "
                             "dims 64 / 40 / 72)")
    parser.add_argument("--sweep-deadline", type=float, default=240.0,
                        help="seconds after which the sweep skips its remaining configs")
    parser.add_argument("--sweep-configs", type=json.loads, default=None,
                        help='JSON {kind: [override, ...]} replacing SWEEP_CONFIGS for the kinds it names, e.g. '
                             '\'{"fwd": [{"mask_dot": true, "BN": 64}], "dq": [{"mask_dot": false}]}\' (keys: BM, BN, '
                             'num_warps, num_stages, mask_dot)')
    args = parser.parse_args(argv)
    rows: list[dict] = []
    result = {"env": environment()}
    t0 = time.time()

    def dump(rows_now):
        result["rows"] = rows_now
        result["summary"] = summarize(rows_now)
        result["wall_s"] = time.time() - t0
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.sweep or args.sweep_only:
        result["sweep"] = sweep(case=next(c for c in sweep_cases if c[0] == args.sweep_case),
                                configs={kind: (args.sweep_configs or {}).get(kind, SWEEP_CONFIGS[kind])
                                         for kind in args.sweep_kinds},
                                deadline_s=args.sweep_deadline)
        result["sweep_best"] = best_configs(result["sweep"])
        result["sweep_best_overall"] = best_overall(result["sweep"])
        result["sweep_wall_s"] = time.time() - t0
        print_sweep_summary(result["sweep_best"])
        print("best over both variants:", result["sweep_best_overall"])
        dump(rows)
        if args.sweep_only:
            return
        from linfusion.kernels.local_configs import set_config_override

        for kind, cfg in result["sweep_best_overall"].items():
            set_config_override(kind, cfg)
        result["config_used"] = result["sweep_best_overall"]
        print("configs used for the cases:", result["config_used"])
    run_local_cases(rows, args.cases, flex_cases=args.flex, dense=not args.no_dense, tiled_cases=args.tiled, fused_dq_cases=args.fused_dq,
                    on_case_done=dump)
    dump(rows)
    print_table(result["summary"])


if __name__ == "__main__":
    main()
