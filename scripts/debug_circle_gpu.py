"""GPU-only diagnosis of the Triton circle-window divergence (issue #3): prints, per case, the
forward/backward relative errors against a float64 reference and a map of the wrong query tokens."""

from __future__ import annotations

import math

import torch

from linfusion.kernels.local_reference import local_attention_reference
from linfusion.kernels.local_triton import local_attention_triton

CASES = [  # grid, window, text_len, tile, dtype
    ((13, 21), 5, 0, (8, 8), torch.float32),
    ((13, 21), 5.0001, 0, (8, 8), torch.float32),   # non-integer radius: table mode
    ((13, 21), (5, 6), 0, (8, 8), torch.float32),
    ((13, 21), 3, 0, (8, 8), torch.float32),
    ((13, 21), 5, 0, (4, 8), torch.float32),
    ((16, 24), 5, 0, (8, 8), torch.float32),        # grid divisible by the tile
    ((9, 13), 5, 6, (4, 8), torch.float32),
    ((11, 17), (2.5, 6.0), 3, (4, 8), torch.float32),  # passes on the GPU (control)
    ((13, 21), 5, 0, (8, 8), torch.bfloat16),
]

for grid, window, text, tile, dtype in CASES:
    torch.manual_seed(0)
    L = text + math.prod(grid)
    q, k, v = (torch.randn(1, 1, L, 64, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    try:
        out = local_attention_triton(q, k, v, grid, window, text, "circle", tile)
    except Exception as exc:  # noqa: BLE001
        print(grid, window, text, tile, dtype, "ERROR", exc)
        continue
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = local_attention_reference(q64, k64, v64, grid, window, text, "circle", tile)
    g = torch.randn_like(ref)
    gs = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    rs = torch.autograd.grad(ref, (q64, k64, v64), g)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    errs = {"out": rel(out, ref), **{n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), gs, rs)}}
    print(grid, window, text, tile, str(dtype)[6:], {n: f"{e:.2e}" for n, e in errs.items()})
    bad = ((out.double() - ref).abs().amax(-1)[0, 0] > 1e-2)
    if bad.any():
        img = bad[text:].reshape(grid).cpu()
        print("  wrong text queries:", int(bad[:text].sum()), " wrong image queries map:")
        for row in img:
            print("   ", "".join("X" if b else "." for b in row.tolist()))
