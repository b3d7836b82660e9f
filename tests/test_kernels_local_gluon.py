"""The Gluon fused tile-window backward (``kernels.local_bwd_gluon``, ``backward="fused_gluon"``).

On the CPU (CI): the 2D TMA views of q, k, v, dO address every element where the kernel reads it,
every call the kernel cannot serve raises naming why, and the kernel compiles for sm_90 with the
structure it was designed with (a TMA reduction for dQ, register reallocation between the
partitions, no local-memory traffic in the generated PTX). On an sm_90 GPU: forward-pass gradients
of the fused backward against the float64 reference, outputs poisoned first.
"""

from __future__ import annotations

import re

import pytest
import torch

from linfusion.kernels import local_bwd_gluon as G
from linfusion.kernels.local_layout import from_tile_order, get_layout
from linfusion.kernels.local_reference import local_attention_reference
from linfusion.kernels.local_triton import local_attention_tiled

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU")
needs_gluon = pytest.mark.skipif(not G.HAVE_GLUON, reason="this Triton has no Gluon")


def _heads_first(B, H, L, D):
    return torch.randn(B, H, L, D)


def _token_major(B, H, L, D):
    return torch.randn(B, L, H, D).transpose(1, 2)


def _heads_outermost(B, H, L, D):
    return torch.randn(H, B, L, D).transpose(0, 1)


def _padded_rows(B, H, L, D):
    """Token rows with unused room after the heads (stride H·D + 16)."""
    return torch.randn(B, L, H * D + 16)[..., : H * D].view(B, L, H, D).transpose(1, 2)


@pytest.mark.parametrize("make", [_heads_first, _token_major, _heads_outermost, _padded_rows])
@pytest.mark.parametrize("B, H, L, D", [(1, 3, 40, 16), (2, 2, 24, 8)])
def test_row_view_addresses_every_element(make, B, H, L, D):
    t = make(B, H, L, D)
    view, rb, rh, ch = G._row_view(t)
    for b in range(B):
        for h in range(H):
            rows = view[b * rb + h * rh: b * rb + h * rh + L, h * ch: h * ch + D]
            assert torch.equal(rows, t[b, h])


def test_row_view_refuses_what_one_matrix_cannot_describe():
    assert G._row_view(torch.randn(2, 3, 4, 8).transpose(2, 3)) is None  # last dim not contiguous
    assert G._row_view(torch.randn(2, 8, 4, 3).permute(0, 3, 1, 2)) is None  # heads strided by 1


def _args(grid=(32, 80), text=128, D=128, dtype=torch.bfloat16, B=1, H=2):
    L = text + grid[0] * grid[1]
    return [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(shape="circle", tile=(8, 16)), "circle"),
        (dict(tile=(8, 8)), "tiles of 64 tokens"),
        (dict(text=100), "text length 100"),
        (dict(D=64), "head dim 64"),
        (dict(dtype=torch.float32), "float32"),
        (dict(), "not a Hopper"),  # everything else servable: the CPU is refused
    ],
)
def test_refusals_name_the_reason(monkeypatch, kwargs, needle):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors reach the checks (no launch comes first)
    if not G.HAVE_GLUON:
        needle = "no Gluon"
    shape, tile = kwargs.pop("shape", "tile"), kwargs.pop("tile", (8, 16))
    text = kwargs.get("text", 128)
    q, k, v = _args(**kwargs)
    with pytest.raises(ValueError, match=needle):
        local_attention_tiled(q, k, v, (32, 80), 16, text, shape, tile, backward="fused_gluon")


def test_row_major_tokens_are_refused():
    layout = get_layout((32, 80), 16, "tile", (8, 16))
    q = _args()[0]
    why = G.fused_gluon_unsupported(q, layout, 128, tile_order=False)
    assert why is not None and ("row-major" in why or "Gluon" in why)


def _compile_for_sm90(monkeypatch):
    """The kernel compiled for sm_90 without a GPU: Triton's launcher asked only to compile
    (``warmup``) under a driver that reports an sm_90 target."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

    monkeypatch.setattr(driver, "_active", Sm90())
    compiled = {}

    class Launcher:
        def __init__(self, grid):
            self.grid = grid

        def __call__(self, *args, **kwargs):
            compiled["kernel"] = G.fused_bwd_kernel.warmup(*args, grid=self.grid, **kwargs)

    monkeypatch.setattr(type(G.fused_bwd_kernel), "__getitem__", lambda self, grid: Launcher(grid))
    grid, text, H = (32, 80), 128, 2
    layout = get_layout(grid, 16, "tile", (8, 16))
    L = text + grid[0] * grid[1]
    q = torch.zeros(1, L, H, 128, dtype=torch.bfloat16).transpose(1, 2)
    stats = torch.zeros(1, H, L + 64)
    G.launch_fused_gluon(q, q, q, q, stats, stats, torch.zeros(H * L, 128), q, q, layout, text, L + 64, 0.1, 0.1)
    return compiled["kernel"]


@needs_gluon
def test_compiles_for_sm90_with_its_design(monkeypatch):
    try:
        kernel = _compile_for_sm90(monkeypatch)
    except (RuntimeError, FileNotFoundError) as exc:  # no ptxas in this Triton install
        if "ptxas" in str(exc).lower():
            pytest.skip(f"cannot assemble for sm_90 here: {exc}")
        raise
    ptx = kernel.asm["ptx"]
    assert "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add" in ptx  # dQ by a TMA reduction
    assert re.search(r"setmaxnreg\.inc\S*\s+2[34]\d", ptx)  # consumers grow to 232-240 registers
    assert ptx.count("wgmma.mma_async") >= 5  # the five products are tensor-core ones
    assert "ld.local" not in ptx and "st.local" not in ptx
    assert kernel.metadata.shared <= 227 * 1024


# ---------------------------------------------------------------------------------------------
# sm_90: gradients against the float64 reference (outputs poisoned: unwritten elements fail)


def _nan_alloc(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@needs_hopper
@needs_gluon
@pytest.mark.parametrize(
    "grid, tile, window, text_len, batch, heads, dtype, token_major",
    [
        ((32, 80), (8, 16), 16, 128, 1, 2, torch.bfloat16, True),  # 4 x 5 tiles, clipped windows
        ((48, 48), (8, 16), (9, 20), 0, 2, 3, torch.float16, False),  # no text, per-dimension radii
        ((16, 128), (16, 8), 5, 256, 2, 1, torch.bfloat16, False),  # tall tiles
        ((4, 16, 32), (2, 8, 8), (2, 8, 8), 128, 1, 2, torch.bfloat16, True),  # video
    ],
)
def test_fused_gluon_matches_float64_reference(monkeypatch, grid, tile, window, text_len, batch, heads, dtype,
                                                token_major):
    import linfusion.kernels.local_triton as lt

    monkeypatch.setattr(lt, "_ALLOC", _nan_alloc)
    L = text_len + torch.Size(grid).numel()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand():
        shape = (batch, L, heads, 128) if token_major else (batch, heads, L, 128)
        t = torch.randn(shape, generator=gen, device="cuda").to(dtype)
        return t.transpose(1, 2) if token_major else t

    q, k, v, do = rand(), rand(), rand(), rand()
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = local_attention_tiled(*inputs, grid, window, text_len, "tile", tile, backward="fused_gluon")
    grads = torch.autograd.grad(out, inputs, do)

    def row_major(t):
        return from_tile_order(t.double(), grid, tile, text_len)

    ref_in = [row_major(t).requires_grad_() for t in (q, k, v)]
    ref = local_attention_reference(*ref_in, grid, window, text_len, "tile", tile)
    ref_grads = torch.autograd.grad(ref, ref_in, row_major(do))
    tol = 1.2e-2 if dtype == torch.bfloat16 else 2e-3
    for name, g, r in zip("qkv", grads, ref_grads):
        g = row_major(g)
        assert torch.isfinite(g).all(), f"d{name} has unwritten or non-finite elements"
        rel = ((g - r).norm() / r.norm()).item()
        assert rel < tol, f"d{name} relative error {rel:.2e}"
    # the split backward, same inputs, agrees as closely as two bf16/fp16 results can
    inputs2 = [t.detach().requires_grad_() for t in (q, k, v)]
    out2 = local_attention_tiled(*inputs2, grid, window, text_len, "tile", tile, backward="split")
    split = torch.autograd.grad(out2, inputs2, do)
    for g, s in zip(grads, split):
        assert ((g.float() - s.float()).norm() / s.float().norm()).item() < tol


@pytest.mark.parametrize("B, H, L, dtype", [(1, 3, 64, torch.bfloat16), (2, 2, 48, torch.float16)])
def test_scale_into_writes_every_strided_element(monkeypatch, B, H, L, dtype):
    """The dQ accumulator's scale-and-round pass (Triton; the interpreter on the CPU) fills a
    token-major (B, L, H, D) result seen heads-first, every element (to one 16-bit rounding step:
    the interpreter's conversion truncates where the GPU rounds to nearest)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    D = 128
    acc = torch.randn(B * H * L, D, device="cuda" if torch.cuda.is_available() else "cpu")
    out = torch.full((B, L, H, D), float("nan"), dtype=dtype, device=acc.device).transpose(1, 2)
    G.scale_into(acc, out, 0.125)
    assert torch.isfinite(out).all()
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(out.float(), acc.view(B, H, L, D) * 0.125, rtol=ulp, atol=1e-6)
