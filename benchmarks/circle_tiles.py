"""Circle windows on other kernel tiles: for ``shape="circle"`` the tile is only the kernel's
work unit (the window is exact whatever the tile), so a smaller query tile can visit fewer keys.

At r = 16, 8×16 query tiles with 8×16 key tiles visit 1,920 image keys per query; 8×8 with 8×8
visit 1,600 (the 5×5 key tiles whose nearest pair is within the radius), 4×16 with 4×16 1,728.
This script times the Triton circle kernel on those tiles with several block configs, forward
and backward, against the default tiles and against FlexAttention's circle on the same token
orders at block sizes 128 and 64, all in one process on one GPU::

    python benchmarks/circle_tiles.py --out circle_tiles.json [--cases flux-4k sdxl-4k] [--deadline 400]

Each record: case, tile, kind (fwd / split / fused_dq / flex_fwd / flex_bwd), config, ms, and
``max_rel_err`` = max |a − b| / max |b| of its outputs (fwd) or gradients (bwd) against the
default tile's with default configs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timing import bench_ms, cpu_ms, environment  # noqa: E402

from ab_local import CASES, WINDOWS  # noqa: E402  (the A/B tool's cases; its circle windows)

TILES = {"2d": [(8, 16), (8, 8), (4, 16)], "3d": [(2, 8, 8), (1, 8, 8), (2, 4, 8)]}
FWD_CONFIGS = [  # overrides of the "fwd" kind; {} = the defaults
    {},
    {"BN": 64, "num_warps": 4, "num_stages": 2},
    {"BN": 64, "num_warps": 4, "num_stages": 3},
    {"BN": 64, "num_warps": 4, "num_stages": 4},
    {"BN": 64, "num_warps": 4, "num_stages": 3, "mask_dot": False},
    {"BN": 64, "num_warps": 8, "num_stages": 3},
    {"BN": 32, "num_warps": 4, "num_stages": 4},
]
BWD_CONFIGS = [  # (variant, config kind, override)
    ("split", "dkdv", {}),
    ("fused_dq", "dkdv_fused", {}),
    ("fused_dq", "dkdv_fused", {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2, "dq_tma": True}),
    ("fused_dq", "dkdv_fused", {"BM": 32, "BN": 64, "num_warps": 4, "num_stages": 2, "dq_tma": True}),
    ("fused_dq", "dkdv_fused", {"BM": 64, "BN": 64, "num_warps": 8, "num_stages": 2, "dq_tma": True}),
]
FLEX = [((8, 16), 128), ((8, 8), 128), ((8, 8), 64)]  # (token tile order, block size)


def rel_err(outs, refs) -> float:
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
               for a, b in zip(outs, refs))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", default=["flux-4k", "sdxl-4k", "flux-2k", "wan-480p"],
                        choices=sorted(CASES))
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds; later records are skipped")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--no-bwd", action="store_true")
    args = parser.parse_args(argv)

    import linfusion.kernels.local_configs as cfg_mod
    import linfusion.kernels.local_triton as lt

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    timer = bench_ms if cuda else cpu_ms
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t_start = time.time()
    records: list[dict] = []

    def late() -> bool:
        return time.time() - t_start > args.deadline

    def dump():
        with open(args.out, "w") as f:
            json.dump({"env": environment(), "records": records}, f, indent=1)

    for case in args.cases:
        B, H, D, grid, text = CASES[case]
        window = WINDOWS["circle"][len(grid) == 3]
        tiles = TILES["3d" if len(grid) == 3 else "2d"]
        L = text + math.prod(grid)
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, L, D, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(4))

        def forward(layout):
            return lt._forward(q, k, v, layout, text, False)

        base = lt._prepare(q, k, v, grid, window, text, "circle", tiles[0])[0]
        o_ref, lse_ref = forward(base)
        g_ref = lt._backward(do, q, k, v, o_ref, lse_ref, base, text, False, lt._auto_backward(q, base))
        for tile in tiles:
            layout = lt._prepare(q, k, v, grid, window, text, "circle", tile)[0]
            for cfg in FWD_CONFIGS:
                if late():
                    break
                if cfg and tile == tiles[0] and cfg.get("BN") != 64:
                    continue  # the default tile keeps its swept blocks
                rec = {"case": case, "tile": list(tile), "kind": "fwd", "config": cfg}
                cfg_mod.set_config_override("fwd", cfg or None)
                try:
                    o = forward(layout)[0]
                    sync()
                    rec["max_rel_err"] = rel_err([o], [o_ref])
                    rec["ms"] = timer(lambda layout=layout: forward(layout))
                except Exception as exc:  # noqa: BLE001
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    cfg_mod.set_config_override("fwd", None)
                records.append(rec)
                print(json.dumps(rec), flush=True)
            if args.no_bwd:
                continue
            o, lse = forward(layout)
            for variant, kind, cfg in BWD_CONFIGS:
                if late():
                    break
                rec = {"case": case, "tile": list(tile), "kind": variant, "config": cfg}
                cfg_mod.set_config_override(kind, cfg or None)
                try:
                    rec["dq_tma"] = variant == "fused_dq" and lt._fused_uses_tma(q, layout, False)

                    def bwd(layout=layout, o=o, lse=lse, variant=variant):
                        return lt._backward(do, q, k, v, o, lse, layout, text, False, variant)
                    grads = bwd()
                    sync()
                    rec["max_rel_err"] = rel_err(grads, g_ref)
                    rec["ms"] = timer(bwd)
                except Exception as exc:  # noqa: BLE001
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    cfg_mod.set_config_override(kind, None)
                records.append(rec)
                print(json.dumps(rec), flush=True)
        dump()
        if args.no_flex or not cuda or case not in ("flux-4k", "flux-2k"):
            continue
        from flex_baseline import flex_mask_mod
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        from linfusion.kernels.local_layout import to_tile_order

        for tile, block in FLEX:
            if late():
                break
            torch._dynamo.reset()
            rec = {"case": case, "tile": list(tile), "kind": "flex", "config": {"block": block}}
            try:
                mask = create_block_mask(flex_mask_mod(grid, window, "circle", tile, text, device), None, None, L, L,
                                         device=device, BLOCK_SIZE=block, _compile=True)
                opts = {"BLOCK_M": block, "BLOCK_N": block} if block != 128 else None
                flex = torch.compile(flex_attention, dynamic=False)
                qt, kt, vt, dot = (to_tile_order(t, grid, tile, text) for t in (q, k, v, do))
                ot = flex(qt, kt, vt, block_mask=mask, kernel_options=opts)
                rec["max_rel_err"] = rel_err([ot], [to_tile_order(o_ref, grid, tile, text)])
                rec["fwd_ms"] = bench_ms(lambda: flex(qt, kt, vt, block_mask=mask, kernel_options=opts))
                if case == "flux-4k" and not args.no_bwd:
                    qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))
                    out = flex(qg, kg, vg, block_mask=mask, kernel_options=opts)

                    def fbwd(out=out, qg=qg, kg=kg, vg=vg, dot=dot):
                        return torch.autograd.grad(out, (qg, kg, vg), dot, retain_graph=True)
                    fbwd()
                    rec["bwd_ms"] = bench_ms(fbwd)
                    del out
            except Exception as exc:  # noqa: BLE001
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            records.append(rec)
            print(json.dumps(rec), flush=True)
        dump()
    dump()
    print(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
