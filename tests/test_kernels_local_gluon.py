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
from linfusion.kernels.local_layout import from_tile_order, get_layout, to_tile_order
from linfusion.kernels.local_reference import local_attention_reference
from linfusion.kernels.local_triton import local_attention_tiled, local_attention_triton

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


@pytest.mark.parametrize("make", [_heads_first, _token_major, _heads_outermost])
@pytest.mark.parametrize("grid, text", [((4, 8), 3), ((2, 4, 6), 0)])
def test_grid_view_addresses_every_image_token(make, grid, text):
    """The 5D view [outer, G0, G1, G2, C] of row-major image tokens (the TMA boxes of tiles and
    chunks on row-major tokens) holds token (b, h, text + flat(g)) at [b·ob + h·oh, g, h·ch:]."""
    B, H, D = 2, 3, 8
    L = text + torch.Size(grid).numel()
    t = make(B, H, L, D)
    view, ob, oh, ch = G._grid_view(t, text, (1, *grid) if len(grid) == 2 else grid)
    g = view.shape[1:4]
    for b in range(B):
        for h in range(H):
            img = view[b * ob + h * oh, ..., h * ch: h * ch + D].reshape(-1, D)
            assert img.shape[0] == g.numel()
            assert torch.equal(img, t[b, h, text:])


@pytest.mark.parametrize("tile, box", [((1, 8, 16), (1, 4, 16)), ((2, 8, 8), (1, 8, 8)), ((1, 16, 8), (1, 8, 8)),
                                       ((1, 1, 128), (1, 1, 64))])
def test_chunk_box_halves_the_tile_in_row_major_order(tile, box):
    """A 64-query chunk is the first or second half of its tile's tokens in their in-tile order."""
    assert G._chunk_box(tile) == box
    in_tile = torch.arange(128).view(tile)
    first = in_tile[: box[0], : box[1], : box[2]].reshape(-1)
    assert torch.equal(first, torch.arange(64))


def _compile_for_sm90(monkeypatch, tile_order=True):
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
    G.launch_fused_gluon(q, q, q, q, stats, stats, torch.zeros(H * L, 128), q, q, layout, text, L + 64, 0.1, 0.1,
                         tile_order=tile_order)
    return compiled["kernel"]


@needs_gluon
@pytest.mark.parametrize("tile_order", [True, False])
def test_compiles_for_sm90_with_its_design(monkeypatch, tile_order):
    try:
        kernel = _compile_for_sm90(monkeypatch, tile_order)
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
    assert ("cp.async.bulk.tensor.5d" in ptx) == (not tile_order)  # row-major tokens: boxes of the grid


# ---------------------------------------------------------------------------------------------
# sm_90: gradients against the float64 reference (outputs poisoned: unwritten elements fail)


def _nan_alloc(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@needs_hopper
@needs_gluon
@pytest.mark.parametrize("tile_order", [True, False], ids=["tile-order", "row-major"])
@pytest.mark.parametrize(
    "grid, tile, window, text_len, batch, heads, dtype, token_major",
    [
        ((32, 80), (8, 16), 16, 128, 1, 2, torch.bfloat16, True),  # 4 x 5 tiles, clipped windows
        ((48, 48), (8, 16), (9, 20), 0, 2, 3, torch.float16, False),  # no text, per-dimension radii
        ((16, 128), (16, 8), 5, 256, 2, 1, torch.bfloat16, False),  # tall tiles
        ((4, 16, 32), (2, 8, 8), (2, 8, 8), 128, 1, 2, torch.bfloat16, True),  # video
        ((32, 48), (8, 16), 16, 128, 2, 2, torch.bfloat16, True),  # batch 2, token-major
    ],
)
def test_fused_gluon_matches_float64_reference(monkeypatch, tile_order, grid, tile, window, text_len, batch, heads,
                                                dtype, token_major):
    import linfusion.kernels.local_triton as lt

    monkeypatch.setattr(lt, "_ALLOC", _nan_alloc)
    L = text_len + torch.Size(grid).numel()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand():
        shape = (batch, L, heads, 128) if token_major else (batch, heads, L, 128)
        t = torch.randn(shape, generator=gen, device="cuda").to(dtype)
        return t.transpose(1, 2) if token_major else t

    q, k, v, do = rand(), rand(), rand(), rand()

    def run(backward):
        if tile_order:
            inputs = [to_tile_order(t, grid, tile, text_len).detach().requires_grad_() for t in (q, k, v)]
            out = local_attention_tiled(*inputs, grid, window, text_len, "tile", tile, backward=backward)
            grads = torch.autograd.grad(out, inputs, to_tile_order(do, grid, tile, text_len))
            return [from_tile_order(g, grid, tile, text_len) for g in grads]
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = local_attention_triton(*inputs, grid, window, text_len, "tile", tile, backward=backward)
        return torch.autograd.grad(out, inputs, do)

    grads = run("fused_gluon")
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = local_attention_reference(*ref_in, grid, window, text_len, "tile", tile)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    tol = 1.2e-2 if dtype == torch.bfloat16 else 2e-3
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), f"d{name} has unwritten or non-finite elements"
        rel = ((g.double() - r).norm() / r.norm()).item()
        assert rel < tol, f"d{name} relative error {rel:.2e}"
    # the split backward, same inputs, agrees to the 16-bit rounding of the results
    split = run("split")
    for g, r in zip(grads, split):
        assert ((g.float() - r.float()).norm() / r.float().norm()).item() < tol / 4
