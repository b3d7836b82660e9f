"""The Gluon (Hopper) forward of local attention (``linfusion.kernels.local_gluon``): against the
float64 reference and the Triton forward on an sm_90 GPU, and, without one, compiled for sm_90 to
check that the scores of the next chunk really overlap the softmax (issued asynchronously before
it, waited for after it)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9

CASES = [
    # id, B, H, D, grid, window, text_len, shape, tile, dtype, memory layout
    ("circle-8x8-text-partial", 1, 2, 128, (45, 70), 16, 77, "circle", (8, 8), torch.bfloat16, "bhld"),
    ("circle-8x8-b2-d64-fp16-strided", 2, 3, 64, (40, 56), 9, 0, "circle", (8, 8), torch.float16, "blhd"),
    ("3d-circle-1x8x8", 1, 2, 128, (5, 20, 26), (2, 8, 8), 0, "circle", (1, 8, 8), torch.bfloat16, "bhld"),
    ("tile-8x16-text", 1, 2, 128, (40, 72), 16, 512, "tile", (8, 16), torch.bfloat16, "bhld"),
    ("circle-8x16-d64-text", 2, 2, 64, (33, 50), 12, 30, "circle", (8, 16), torch.bfloat16, "blhd"),
    ("3d-tile-1x8x8-fp16", 1, 2, 64, (3, 17, 24), (1, 8, 8), 10, "tile", (1, 8, 8), torch.float16, "bhld"),
]


@pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_gluon_forward_matches_reference_and_triton(case, monkeypatch):
    """Output against float64 (relative L2 < 1e-2) and the LSE the backward reads against the Triton
    forward's, on NaN-poisoned buffers: partial edge tiles, text lengths that do not divide the
    block, CFG-sized batches, heads-interleaved (strided) inputs, 2D and 3D, circles and tiles."""
    from linfusion.kernels import local_configs, local_gluon, local_triton
    from linfusion.kernels.local_reference import local_attention_reference

    _, B, H, D, grid, window, text_len, shape, tile, dtype, memory = case
    monkeypatch.setattr(local_triton, "_ALLOC",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    gen = torch.Generator(device="cuda").manual_seed(11)
    L = text_len + math.prod(grid)
    if memory == "blhd":
        q, k, v = (torch.randn(B, L, H, D, generator=gen, device="cuda").to(dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, L, D, generator=gen, device="cuda").to(dtype) for _ in range(3))
    layout, _ = local_triton._prepare(q, k, v, grid, window, text_len, shape, tile)
    assert local_triton._gluon_reason(q, k, v, layout, False) is None
    launched = []
    original = local_gluon.gluon_forward
    monkeypatch.setattr(local_gluon, "gluon_forward", lambda *a: launched.append(1) or original(*a))
    runs = {}
    for use in (True, False):
        local_configs.set_config_override("fwd", {"gluon": use})
        try:
            runs[use] = local_triton._forward(q, k, v, layout, text_len, False)
        finally:
            local_configs.set_config_override("fwd", None)
    assert launched == [1]
    out, lse = runs[True]
    ref = local_attention_reference(q.double(), k.double(), v.double(), grid, window, text_len, shape, tile)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 1e-2, err
    assert float((out.double() - runs[False][0].double()).abs().max()) < 2e-2
    assert torch.allclose(lse, runs[False][1], rtol=0, atol=1e-3)


def test_gluon_reasons_name_what_is_not_served():
    """Launches the Gluon forward does not serve say why (and then run the Triton forward)."""
    from linfusion.kernels.local_gluon import gluon_forward_reason
    from linfusion.kernels.local_layout import get_layout

    q = torch.zeros(1, 1, 8, 128, dtype=torch.bfloat16)
    layout = get_layout((16, 16), 4, "circle", (8, 8))
    assert "Hopper" in gluon_forward_reason(q, layout, False)
    if ON_HOPPER:
        cuda = q.cuda()
        assert gluon_forward_reason(cuda, layout, False) is None
        assert "tile-ordered" in gluon_forward_reason(cuda, layout, True)
        assert "head dim" in gluon_forward_reason(cuda[..., :80], layout, False)
        assert "dtype" in gluon_forward_reason(cuda.float(), layout, False)
        assert "tile" in gluon_forward_reason(cuda, get_layout((16, 16), 4, "circle", (4, 8)), False)
        assert "table" in gluon_forward_reason(cuda, get_layout((16, 16), (2.5, 6.0), "circle", (8, 8)), False)


_SM90_COMPILE = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon import language as gl
from linfusion.kernels import local_gluon as lg

kern = lg._gluon_fwd_kernel
for D, BLOCK, T1, T2, MODE, IS3D in ((128, 64, 8, 8, 2, False), (128, 128, 8, 16, 0, False), (64, 64, 8, 8, 2, True)):
    cx = dict(D=D, BLOCK=BLOCK, T1=T1, T2=T2, MASK_MODE=MODE, IS_3D=IS3D, MASK_DOT=MODE == 2 and BLOCK == 64,
              num_warps=BLOCK // 16)
    sig = {}
    for n in kern.arg_names:
        rank = 4 if n.endswith("_ROWS") else 5
        layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=rank)
        sig[n] = ("constexpr" if n in cx
                  else f"tensordesc<bf16[1,1,{BLOCK},{D}],{layout!r}>" if n.endswith("_ROWS")
                  else f"tensordesc<bf16[1,1,{BLOCK // T2},{T2},{D}],{layout!r}>" if n.endswith("_GRID")
                  else "*bf16" if n == "O" else "*fp32" if n == "LSE"
                  else "fp32" if n in ("W0", "W1", "W2", "WT", "qk_scale") else "i32")
    src = GluonASTSource(kern, sig, constexprs={(kern.arg_names.index(k),): v for k, v in cx.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": BLOCK // 16})
    ttgir = compiled.asm["ttgir"]
    loop = ttgir[ttgir.index("scf.for"):]
    # in the loop: the next chunk's scores issued without a wait before the softmax's exp2
    first_dot, first_exp = loop.find("isAsync = true"), loop.find("math.exp2")
    overlap = 0 <= first_dot < first_exp and loop.count("isAsync = true") >= 2
    tma = "async_tma_copy_global_to_local" in ttgir
    print(D, BLOCK, "OK" if overlap and tma else f"overlap={overlap} tma={tma}", compiled.metadata.shared)
"""


def test_gluon_forward_compiles_for_sm90_with_overlapped_mmas():
    """Compile-only (no GPU needed): every served kind of launch (circle on 8×8 tiles at head dim
    128, tile window on 8×16 tiles, 3D circle at head dim 64) compiles for sm_90 with TMA loads and
    the next chunk's scores issued before this chunk's softmax; the 64-token kernels fit two
    programs per SM."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr:
        pytest.skip(f"no usable ptxas for sm_90 here: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.split()[2] == "OK" for line in lines), proc.stdout
    shared = {(int(line.split()[0]), int(line.split()[1])): int(line.split()[3]) for line in lines}
    assert shared[(128, 64)] <= 113 * 1024  # two programs per SM (228 KB)
