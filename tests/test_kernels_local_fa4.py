"""The optional FlashAttention-4 backend of tile-window local attention (``kernels.local_fa4``).

On the CPU (CI): the block lists FA4 is given equal the reference mask, token for token, and every
call it cannot serve raises naming why. On a Hopper/Blackwell GPU with ``flash-attn-4`` installed:
forward and input gradients against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from linfusion.config import PatchConfig
from linfusion.kernels import linear_attention, local_attention
from linfusion.kernels.local_fa4 import (
    _block_lists,
    fa4_is_installed,
    local_attention_fa4,
    tile_window_blocks,
    why_fa4_cannot_serve,
)
from linfusion.kernels.local_layout import from_tile_order, get_layout, tile_order_index, to_tile_order
from linfusion.kernels.local_reference import local_attention_mask, local_attention_reference

ON_FA4_GPU = (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)
              and fa4_is_installed())
needs_fa4_gpu = pytest.mark.skipif(not ON_FA4_GPU, reason="needs a Hopper/Blackwell GPU and flash-attn-4")


def _tile_order_mask(grid, window, text_len, tile) -> torch.Tensor:
    """The reference (L, L) mask with rows and columns in tile order."""
    mask = local_attention_mask(grid, window, text_len, "tile", tile)
    slot = tile_order_index(grid, tile)
    token_of_slot = text_len + torch.argsort(slot)
    order = torch.cat([torch.arange(text_len), token_of_slot])
    return mask[order][:, order]


@pytest.mark.parametrize(
    "grid, tile, window, text_len",
    [
        ((16, 64), (8, 16), 16, 0),
        ((24, 48), (8, 16), 16, 128),  # non-square, 3 x 3 tiles
        ((32, 32), (8, 16), (9, 20), 256),  # per-dimension radii
        ((16, 32), (16, 8), 5, 128),  # tall tiles
        ((4, 16, 32), (2, 8, 8), (2, 8, 8), 128),  # video
        ((6, 8, 16), (2, 8, 8), (3, 12, 4), 0),
    ],
)
def test_block_lists_equal_reference_mask(grid, tile, window, text_len):
    layout = get_layout(grid, window, "tile", tile)
    blocks = tile_window_blocks(layout.n_tiles, layout.radius, text_len)
    tokens = blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)
    ref = _tile_order_mask(grid, window, text_len, tile)
    assert tokens.shape == ref.shape
    assert torch.equal(tokens, ref)
    assert 0 < blocks.float().mean() < 1 or text_len == 0  # the window is neither empty nor everything


def test_block_lists_are_ascending_counted_and_padded():
    blocks = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    counts, index = _block_lists(blocks, "cpu")
    assert counts.shape == (1, 1, 4) and index.shape == (1, 1, 4, 4)
    assert counts.flatten().tolist() == [3, 1, 4, 1]
    assert index[0, 0].tolist() == [[0, 2, 3, 0], [2, 0, 0, 0], [0, 1, 2, 3], [1, 0, 0, 0]]
    assert counts.dtype == index.dtype == torch.int32


def _qkv(shape, dtype=torch.bfloat16, device="cpu"):
    return [torch.randn(shape, dtype=dtype, device=device) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs, dtype, needle",
    [
        ({"shape": "circle"}, torch.bfloat16, "tile windows only"),
        ({}, torch.float32, "float16 and bfloat16"),
        ({}, torch.bfloat16, "CUDA device"),
    ],
)
def test_refusals_name_the_reason(kwargs, dtype, needle):
    q, k, v = _qkv((1, 2, 128 + 16 * 32, 64), dtype)
    args = {"shape": "tile", **kwargs}
    reason = why_fa4_cannot_serve(q, (16, 32), (8, 16), args["shape"], 128)
    assert reason is not None and needle in reason
    with pytest.raises(RuntimeError, match="FA4 backend cannot serve.*" + needle):
        local_attention(q, k, v, (16, 32), 16, 128, backend="fa4", **args)


def test_geometry_refusals(monkeypatch):
    """Tiles of other sizes, partial edge tiles and text not in whole blocks are refused (checked as
    if on a Hopper GPU with FA4 installed)."""
    from linfusion.kernels import local_fa4

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(local_fa4, "fa4_is_installed", lambda: True)
    q = torch.empty(1, 2, 8, 64, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    assert why_fa4_cannot_serve(q, (16, 32), (8, 16), "tile", 128) is None
    assert "128 tokens" in why_fa4_cannot_serve(q, (16, 32), (8, 8), "tile", 128)
    assert "must divide the grid" in why_fa4_cannot_serve(q, (20, 32), (8, 16), "tile", 128)
    assert "multiple of 128" in why_fa4_cannot_serve(q, (16, 32), (8, 16), "tile", 77)
    q40 = torch.empty(1, 2, 8, 40, dtype=torch.bfloat16, device="meta")
    assert "head dim 40" in why_fa4_cannot_serve(q40, (16, 32), (8, 16), "tile", 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "Hopper or Blackwell" in why_fa4_cannot_serve(q, (16, 32), (8, 16), "tile", 128)


def test_fa4_is_local_only():
    with pytest.raises(ValueError, match="local attention only"):
        linear_attention(*_qkv((1, 2, 16, 8), torch.float32), backend="fa4")
    with pytest.raises(ValueError, match='method="local"'):
        PatchConfig(method="linear", backend="fa4")
    with pytest.raises(ValueError, match="tile windows only"):
        PatchConfig(method="local", backend="fa4")  # the default shape is the circle
    assert PatchConfig(method="local", shape="tile", backend="fa4").backend == "fa4"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_fa4_gpu
@pytest.mark.parametrize(
    "grid, tile, window, text_len, batch, heads, head_dim, dtype, tile_order",
    [
        ((16, 32), (8, 16), 16, 128, 2, 3, 128, torch.bfloat16, False),  # CFG-sized batch, row-major tokens
        ((24, 48), (8, 16), (9, 20), 256, 1, 2, 64, torch.float16, True),
        ((32, 16), (16, 8), 8, 0, 2, 2, 96, torch.bfloat16, False),
        ((4, 16, 16), (2, 8, 8), (2, 8, 8), 128, 1, 2, 128, torch.bfloat16, False),  # video
        ((16, 32), (8, 16), 16, 128, 1, 2, 128, torch.float16, False),
    ],
)
def test_fa4_matches_float64_reference(grid, tile, window, text_len, batch, heads, head_dim, dtype, tile_order):
    torch.manual_seed(0)
    L = text_len + torch.Size(grid).numel()
    # heads-first views of token-major memory, as a diffusers processor hands them over
    q, k, v, do = (torch.randn(batch, L, heads, head_dim, device="cuda").to(dtype).transpose(1, 2) for _ in range(4))
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = local_attention_reference(*ref_in, grid, window, text_len, "tile", tile)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    if tile_order:
        ordered = [to_tile_order(t, grid, tile, text_len) for t in (*inputs, do)]
        out = local_attention_fa4(*ordered[:3], grid, window, text_len, "tile", tile, tile_order=True)
        grads = torch.autograd.grad(out, inputs, ordered[3])
        out = from_tile_order(out, grid, tile, text_len)
    else:
        out = local_attention(*inputs, grid, window, text_len, "tile", tile, backend="fa4")
        grads = torch.autograd.grad(out, inputs, do)
    errs = {"out": _rel(out, ref), **{n: _rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}
    assert out.dtype == dtype and out.shape == q.shape
    assert all(e < 1e-2 for e in errs.values()), errs
