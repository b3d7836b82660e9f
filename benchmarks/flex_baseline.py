"""FlexAttention as the local-window baseline, on the same tile-ordered tokens as LinFusion's kernel.

Used by ``kernels_local.py`` (kernel level) and ``e2e.py`` (``local_flex_tiled`` rows). The mask
reads precomputed integer coordinates per token (a table lookup and a few integer operations per
element), and tokens are in tile order, so most key blocks are either fully visible or fully
masked: the strongest FlexAttention setup we know for these windows. CLEAR's own row-major mask is
the ``local_flex`` route of ``e2e.py``.
"""

from __future__ import annotations

import functools
import time

import torch


def flex_mask_mod(grid, window, shape, tile, text_len, device):
    """FlexAttention ``mask_mod`` over tile-ordered tokens ``[text | image]``, equal to the reference's mask.

    grid: (H, W) or (T, H, W); window: radius or radii; shape: "circle" or "tile"; tile: the tile
    size per grid dimension; text_len: text tokens before the image tokens (always visible)."""
    from linfusion.kernels.local_layout import get_layout, tile_order_index
    from linfusion.kernels.local_reference import grid_coordinates

    layout = get_layout(grid, window, shape, tile, "cpu")
    coords = grid_coordinates(grid)
    index = tile_order_index(grid, tile)
    tcoords = torch.empty_like(coords)
    tcoords[index] = coords
    if len(grid) == 2:
        tcoords = torch.cat([torch.zeros_like(tcoords[:, :1]), tcoords], 1)
    pad = torch.zeros(text_len, 3, dtype=tcoords.dtype)
    c = torch.cat([pad, tcoords]).to(torch.int32).to(device)
    c0, c1, c2 = c[:, 0].contiguous(), c[:, 1].contiguous(), c[:, 2].contiguous()
    T = text_len
    if shape == "tile":
        t0, t1, t2 = layout.tile
        r0, r1, r2 = layout.radius
        tc0, tc1, tc2 = c0 // t0, c1 // t1, c2 // t2  # tile coordinates, precomputed

        def window_mod(q, kv):
            return (((tc0[q] - tc0[kv]).abs() <= r0) & ((tc1[q] - tc1[kv]).abs() <= r1)
                    & ((tc2[q] - tc2[kv]).abs() <= r2))
    else:
        if layout.mask_mode != 2:
            raise ValueError(f"the FlexAttention baseline takes integer circle radii, got window {window!r}")
        w0, w1, w2, wt = (int(x) for x in layout.weights)

        def window_mod(q, kv):
            d0, d1, d2 = c0[q] - c0[kv], c1[q] - c1[kv], c2[q] - c2[kv]
            return d0 * d0 * w0 + d1 * d1 * w1 + d2 * d2 * w2 <= wt

    def mask_mod(b, h, q, kv):
        return (q < T) | (kv < T) | window_mod(q, kv)

    return mask_mod


#: seconds spent building block masks since the last reset (a mask is built once per shape)
STATS = {"mask_build_s": 0.0}


@functools.lru_cache(maxsize=8)
def tiled_block_mask(grid: tuple[int, ...], window, shape: str, tile: tuple[int, ...], text_len: int, device: str):
    """The block mask of :func:`flex_mask_mod`, built once per shape (compiled on GPUs)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seq_len = text_len + int(torch.tensor(grid).prod())
    t0 = time.perf_counter()
    mask = create_block_mask(flex_mask_mod(grid, window, shape, tile, text_len, device), None, None, seq_len,
                             seq_len, device=device, _compile=device != "cpu")
    STATS["mask_build_s"] += time.perf_counter() - t0
    return mask


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_local_attention_tiled(q, k, v, grid, window, text_len: int = 0, shape: str = "circle", tile=None,
                               backend=None):
    """Drop-in for ``linfusion.kernels.local_attention``: q, k, v (B, H, text_len + Π grid, D) in
    row-major token order -> output of the same shape. Tokens go to tile order and back around
    FlexAttention (both gathers are part of the measured time, as they would be for a user)."""
    from torch.nn.attention.flex_attention import flex_attention

    from linfusion.kernels.local_layout import from_tile_order, to_tile_order
    from linfusion.kernels.local_reference import default_tile, normalize_window

    grid = tuple(int(g) for g in grid)
    tile = tuple(tile) if tile else default_tile(len(grid))
    radii = normalize_window(window, len(grid))
    mask = tiled_block_mask(grid, radii, shape, tile, text_len, q.device.type)
    q, k, v = (to_tile_order(x, grid, tile, text_len) for x in (q, k, v))
    fn = flex_attention if q.device.type == "cpu" else _compiled_flex()
    out = fn(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=mask)
    return from_tile_order(out, grid, tile, text_len)
