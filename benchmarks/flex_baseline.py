"""FlexAttention as the local-window baseline, in two setups (drop-ins for ``local_attention``).

* :func:`flex_local_attention_tiled`: tokens in tile order, the mask reads precomputed integer
  coordinates per token (a table lookup and a few integer operations per element), so most key
  blocks are fully visible or fully masked: the strongest FlexAttention setup we know for these
  windows. ``kernels_local.py`` (kernel level) and ``e2e.py`` (``local_flex_tiled``) use it.
* :func:`flex_local_attention_rowmajor`: row-major tokens and coordinates computed in the mask
  (CLEAR's implementation); ``e2e.py``'s ``local_flex`` rows.

Block masks are built once per shape; :data:`STATS` adds up the build time.
"""

from __future__ import annotations

import functools
import math
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

    seq_len = text_len + math.prod(grid)
    t0 = time.perf_counter()
    mask = create_block_mask(flex_mask_mod(grid, window, shape, tile, text_len, device), None, None, seq_len,
                             seq_len, device=device, _compile=device != "cpu")
    STATS["mask_build_s"] += time.perf_counter() - t0
    return mask


@functools.lru_cache(maxsize=8)
def rowmajor_block_mask(grid: tuple[int, ...], radii: tuple[float, ...], text_len: int, device: str):
    """CLEAR-style block mask: row-major tokens, grid coordinates recomputed in the mask (ellipse ``radii``)."""
    from torch.nn.attention.flex_attention import create_block_mask

    dims = torch.tensor(grid, device=device)
    inv_r2 = torch.tensor([1.0 / (r * r) if math.isfinite(r) else 0.0 for r in radii], device=device)

    def coords(idx):
        out, rest = [], idx
        for d in reversed(range(len(grid))):
            out.append(rest % dims[d])
            rest = rest // dims[d]
        return out[::-1]

    def mask_mod(b, h, q_idx, kv_idx):
        qi, ki = q_idx - text_len, kv_idx - text_len
        dist = 0.0
        for d, (qc, kc) in enumerate(zip(coords(qi.clamp(min=0)), coords(ki.clamp(min=0)))):
            delta = (kc - qc).float()
            dist = dist + delta * delta * inv_r2[d]
        return (q_idx < text_len) | (kv_idx < text_len) | (dist <= 1.0)

    seq_len = text_len + math.prod(grid)
    t0 = time.perf_counter()
    mask = create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device, _compile=device != "cpu")
    STATS["mask_build_s"] += time.perf_counter() - t0
    return mask


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Every (model, resolution, layer) shape is its own compile (dynamic=False). Past dynamo's
    # default limit of 8, flex_attention silently falls back to eager, which materialises the
    # full score matrix (out of memory at PixArt 4096², 13x slower at SD3.5 1024²). A baseline
    # must never run that way: allow many shapes, and fail loudly if even that is exceeded.
    torch._dynamo.config.cache_size_limit = max(256, torch._dynamo.config.cache_size_limit)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, mask):
    """FlexAttention with ``mask``: eager on the CPU (tests), compiled elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention if q.device.type == "cpu" else _compiled_flex()
    return fn(q, k, v, block_mask=mask)


def flex_local_attention_rowmajor(q, k, v, grid, window, text_len: int = 0, shape: str = "circle", tile=None,
                                  backend=None):
    """Drop-in for ``linfusion.kernels.local_attention`` (circles only): q, k, v (B, H, text_len + Π grid, D)."""
    from linfusion.kernels.local_reference import normalize_window

    if shape != "circle":
        raise ValueError(f"the row-major FlexAttention route draws circles, got shape={shape!r}")
    mask = rowmajor_block_mask(tuple(int(g) for g in grid), normalize_window(window, len(grid)), text_len,
                               q.device.type)
    return _flex(q, k, v, mask)


def flex_local_attention_tiled(q, k, v, grid, window, text_len: int = 0, shape: str = "circle", tile=None,
                               backend=None):
    """Drop-in for ``linfusion.kernels.local_attention``: q, k, v (B, H, text_len + Π grid, D) in
    row-major token order -> output of the same shape. Tokens go to tile order and back around
    FlexAttention (both gathers are part of the measured time, as they would be for a user)."""
    from linfusion.kernels.local_layout import from_tile_order, to_tile_order
    from linfusion.kernels.local_reference import default_tile, normalize_window

    grid = tuple(int(g) for g in grid)
    tile = tuple(tile) if tile else default_tile(len(grid))
    radii = normalize_window(window, len(grid))
    mask = tiled_block_mask(grid, radii, shape, tile, text_len, q.device.type)
    q, k, v = (to_tile_order(x, grid, tile, text_len).contiguous() for x in (q, k, v))
    return from_tile_order(_flex(q, k, v, mask), grid, tile, text_len)
