"""Communication volume per layer and per step, computed (what :mod:`.comm` would count).

Bytes *sent by one rank*, with the same conventions as :class:`~linfusion.parallel.comm.CommStats`:
ring all-reduce 2(W-1)/W of the buffer, all-gather (W-1) x the rank's piece, halo exactly.
"""

from __future__ import annotations

import math

from ..kernels.local_reference import default_tile, tile_radius
from .split import choose_split


def layer_bytes(
    method: str,
    grid: tuple[int, ...],
    world: int,
    *,
    heads: int,
    head_dim: int,
    text: int = 0,
    batch: int = 1,
    act_bytes: int = 2,
    window: float = 16,
    shape: str = "circle",
    tile: tuple[int, ...] | None = None,
    rank: int | None = None,
) -> dict[str, float]:
    """Bytes one rank sends for one attention layer (interior rank by default: two halo neighbours).

    ``method``: "linear", "local" or "dense". Text-query softmax statistics are fp32.
    """
    if world == 1:
        return {}
    ring = 2 * (world - 1) / world
    out: dict[str, float] = {}
    if text and method != "dense":  # text queries: max (B,H,T) then sums (B,H,T,D+1), fp32 (dense: gathered K/V)
        out["text_softmax"] = ring * batch * heads * text * (head_dim + 2) * 4
    if method == "linear":
        out["linear_state"] = ring * batch * heads * (head_dim * head_dim + head_dim) * 4
        return out
    units = tuple(tile or default_tile(len(grid))) if (method == "local" and shape == "tile") else None
    split = choose_split(grid, world, units)
    rank = world // 2 if rank is None else rank
    row = math.prod(grid) // grid[split.axis]  # tokens per unit row of the split axis
    kv_row = 2 * batch * heads * head_dim * act_bytes * row
    if method == "dense":
        largest = max(split.tokens(r) for r in range(world))
        out["dense_kv"] = (world - 1) * 2 * batch * heads * head_dim * act_bytes * largest
        return out
    radii = (float(window),) * len(grid)
    if shape == "tile":
        t = tuple(tile or default_tile(len(grid)))
        reach = tile_radius(radii, t, grid)[split.axis] * t[split.axis]
    else:
        reach = math.floor(window)
    start, stop = split.bounds[rank]
    sent = 0
    for peer in range(world):
        if peer == rank:
            continue
        s, e = split.bounds[peer]
        for lo, hi in ((max(0, s - reach), s), (e, min(grid[split.axis], e + reach))):
            sent += max(0, min(hi, stop) - max(lo, start))
    out["halo"] = sent * kv_row
    return out


def output_gather_bytes(grid: tuple[int, ...], world: int, channels: int, batch: int = 1, act_bytes: int = 2) -> float:
    """The final all-gather of the denoiser's output tokens, once per step."""
    if world == 1:
        return 0.0
    split = choose_split(grid, world)
    largest = max(split.tokens(r) for r in range(world))
    return (world - 1) * batch * largest * channels * act_bytes


#: FLUX.1-dev transformer: 19 double + 38 single blocks, 24 heads of 128, T5 text 512, 64 output channels
FLUX_DEV = dict(layers=57, heads=24, head_dim=128, text=512, out_channels=64)


def flux_step_bytes(pixels: int, world: int, method: str, window: float = 16, shape: str = "circle") -> dict[str, float]:
    """Per-step bytes one rank sends for a FLUX.1-dev-size transformer at ``pixels``² (bf16)."""
    grid = (pixels // 16, pixels // 16)  # VAE /8, then 2x2 packing
    per_layer = layer_bytes(method, grid, world, heads=FLUX_DEV["heads"], head_dim=FLUX_DEV["head_dim"],
                            text=FLUX_DEV["text"], window=window, shape=shape)
    per_step = {k: v * FLUX_DEV["layers"] for k, v in per_layer.items()}
    per_step["gather_output"] = output_gather_bytes(grid, world, FLUX_DEV["out_channels"])
    return {"per_layer": sum(per_layer.values()), "per_step": sum(per_step.values()), **per_step}
