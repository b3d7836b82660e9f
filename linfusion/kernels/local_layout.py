"""Tile-major token layout and the small per-resolution tables of the Triton local kernel.

Tile order (``to_tile_order``): text tokens first, unchanged; then the image/video grid cut
into tiles of ``tile`` tokens, tiles in row-major order of their tile coordinates, and the
tokens of each tile contiguous (row-major inside the tile). Edge tiles are partial and stay
*compact* (no padding), so the sequence length is unchanged and every position is still a
token: norms, MLPs and projections can run on tile-ordered tokens as they are.

Everything is closed form. For a grid ``(g0, g1, g2)`` (2D grids are ``(1, H, W)``), tile
``(t0, t1, t2)``, tile coordinates ``c`` and tile extents ``s_d = min(t_d, g_d - c_d t_d)``::

    offset(c) = c0 t0 g1 g2 + s0 (c1 t1 g2 + s1 c2 t2)        # first token of tile c
    index(p)  = offset(p // t) + (a0 s1 + a1) s2 + a2           # a = p % t

Tiles that share ``(c0, c1)`` (a "tile row") are consecutive, so a run of tiles along the
last dimension is one contiguous range of tokens; the kernel iterates over such ranges.

The per-resolution state (``LocalLayout``) is a handful of integers plus, for
``shape="circle"``, a table of at most a few thousand int32 entries giving, for each
``(|Δ0|, |Δ1|)``, the largest visible ``|Δ2|``. The table is computed in float64 exactly
as the reference computes its mask, so the kernel's mask is bit-for-bit the reference's; and
whether the kernel's tensor-core form of the circle test is exact here (``mask_dot_exact``).
Both are cached (``functools.lru_cache``) per (grid, radii, shape, tile, device).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .local_reference import circle_visibility, default_tile, normalize_window, tile_radius

MASK_NONE, MASK_TABLE, MASK_FORMULA = 0, 1, 2


def _as3(grid: Sequence[int], tile: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """2D (H, W) → (1, H, W); 3D unchanged."""
    grid, tile = tuple(int(g) for g in grid), tuple(int(t) for t in tile)
    if len(grid) == 2:
        return (1, *grid), (1, *tile)
    return grid, tile  # type: ignore[return-value]


def _canon_device(device: torch.device | str | None) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_tile(grid: Sequence[int], tile: Sequence[int] | None) -> tuple[int, ...]:
    tile = tuple(int(t) for t in (tile or default_tile(len(grid))))
    if len(tile) != len(grid) or any(t <= 0 for t in tile):
        raise ValueError(f"tile {tile} must give one positive size per grid dimension {tuple(grid)}")
    return tile


def tile_order_index(grid: Sequence[int], tile: Sequence[int] | None = None, device=None) -> torch.Tensor:
    """(N,) int64: the tile-order position of each row-major grid token (closed form)."""
    grid = tuple(int(g) for g in grid)
    tile = _resolve_tile(grid, tile)
    (g0, g1, g2), (t0, t1, t2) = _as3(grid, tile)
    p = torch.arange(g0 * g1 * g2, dtype=torch.int64, device=device)
    p0, p1, p2 = p // (g1 * g2), (p // g2) % g1, p % g2
    c0, c1, c2 = p0 // t0, p1 // t1, p2 // t2
    a0, a1, a2 = p0 % t0, p1 % t1, p2 % t2
    s0 = torch.clamp(g0 - c0 * t0, max=t0)
    s1 = torch.clamp(g1 - c1 * t1, max=t1)
    s2 = torch.clamp(g2 - c2 * t2, max=t2)
    offset = c0 * t0 * g1 * g2 + s0 * (c1 * t1 * g2 + s1 * c2 * t2)
    return offset + (a0 * s1 + a1) * s2 + a2


@functools.lru_cache(maxsize=32)
def _permutations(grid: tuple[int, ...], tile: tuple[int, ...], text_len: int, device: torch.device):
    """(to_tile, from_tile) int64 index tensors over the whole [text | grid] sequence."""
    index = tile_order_index(grid, tile)  # row-major position -> tile position
    n = index.numel()
    perm = torch.empty(n, dtype=torch.int64)
    perm[index] = torch.arange(n)  # tile position -> row-major position
    text = torch.arange(text_len, dtype=torch.int64)
    to_tile = torch.cat([text, perm + text_len]).to(device)
    from_tile = torch.cat([text, index + text_len]).to(device)
    return to_tile, from_tile


def _permute(x: torch.Tensor, grid, tile, text_len: int, dim: int, which: int) -> torch.Tensor:
    grid = tuple(int(g) for g in grid)
    tile = _resolve_tile(grid, tile)
    if x.shape[dim] != text_len + math.prod(grid):
        raise ValueError(
            f"dimension {dim} of x has {x.shape[dim]} tokens, expected text_len {text_len} + grid {grid} tokens"
        )
    index = _permutations(grid, tile, int(text_len), _canon_device(x.device))[which]
    return x.index_select(dim, index)


def to_tile_order(x: torch.Tensor, grid, tile=None, text_len: int = 0, dim: int = -2) -> torch.Tensor:
    """Reorder the tokens along ``dim`` from row-major grid order to tile order (text first, kept).

    The index tensors are cached per (grid, tile, text_len, device); a caller that keeps its
    tokens in tile order across layers pays this gather once, not per attention call.
    """
    return _permute(x, grid, tile, text_len, dim, 0)


def from_tile_order(x: torch.Tensor, grid, tile=None, text_len: int = 0, dim: int = -2) -> torch.Tensor:
    """Inverse of ``to_tile_order``."""
    return _permute(x, grid, tile, text_len, dim, 1)


@dataclass(frozen=True)
class LocalLayout:
    """Per-(grid, window, shape, tile, device) constants of the Triton local kernel."""

    grid: tuple[int, int, int]  # 2D grids are (1, H, W)
    tile: tuple[int, int, int]
    n_tiles: tuple[int, int, int]
    radius: tuple[int, int, int]  # key-tile radius per dim: the box of key tiles to visit
    ndim: int
    shape: str
    mask_mode: int  # MASK_NONE (tile), MASK_TABLE or MASK_FORMULA (circle)
    table: torch.Tensor | None  # int32 (cap0 + 2) x (cap1 + 2): max visible |Δ2|, -1 none
    cap0: int
    cap1: int
    weights: tuple[float, float, float, float]  # formula mode: Σ Δ_d² w_d ≤ w_total
    setup_ms: float
    # formula mode: the kernel's tensor-core circle test is exact here (``mask_dot_exact``), and for
    # the forward's pairs of neighbouring tiles, whose features share the first tile's origin
    mask_dot: bool = False
    mask_dot_pair: bool = False

    @property
    def tile_volume(self) -> int:
        return math.prod(self.tile)

    @property
    def num_tiles(self) -> int:
        return math.prod(self.n_tiles)


def _formula_weights(radii3, caps, visible: torch.Tensor) -> tuple[float, float, float, float] | None:
    """Integer weights w with Σ Δ_d² w_d ≤ w_total equal to ``visible`` and exact in fp32, else None."""
    finite = [r for r in radii3 if not math.isinf(r)]
    if any(r != int(r) for r in finite):
        return None
    sq = [1 if math.isinf(r) else int(r) ** 2 for r in radii3]
    total = math.prod(s for r, s in zip(radii3, sq) if not math.isinf(r))
    weights = [0 if math.isinf(r) else total // s for r, s in zip(radii3, sq)]
    g = math.gcd(total, *weights)
    total, weights = total // g, [w // g for w in weights]
    if total >= (1 << 23):
        return None
    d = [torch.arange(c + 1, dtype=torch.int64) ** 2 for c in caps]
    lhs = d[0].view(-1, 1, 1) * weights[0] + d[1].view(1, -1, 1) * weights[1] + d[2].view(1, 1, -1) * weights[2]
    if not torch.equal(lhs <= total, visible):
        return None
    return (float(weights[0]), float(weights[1]), float(weights[2]), float(total))


def _fp16_exact(values: torch.Tensor) -> bool:
    values = values.to(torch.float64)
    return bool((values.abs() <= 65504).all()) and torch.equal(values.half().double(), values)


def mask_dot_exact(weights, tile3, radius3, ndim: int, pair: bool = False) -> bool:
    """Whether the kernel's tensor-core circle test is exact for these formula weights and tiles.

    ``local_triton._row_features`` gives a row token ``r`` 16 fp16 features and
    ``_col_features`` a column token ``c`` 16 more, so that their dot (fp32 accumulation) is
    ``WT − Σ_d W_d (c_d − r_d)²``, ≥ 0 exactly for visible pairs. Coordinates are relative to the
    row's tile origin: ``0 ≤ r_d < T_d`` and ``−R_d T_d ≤ c_d < (R_d + 1) T_d`` (R_d: the key-tile
    radius of the window box). Pairs (row, column): (WT, 1); per dimension (W_d, −c_d²),
    (2 W_d r_d, c_d), (−W_d r_d², 1). Exact iff every row and column value is an integer exact in
    fp16 and the terms' magnitudes sum below 2**24 (then no partial sum rounds, in any order).

    ``pair``: for the forward's pairs of neighbouring tiles along the last dimension
    (``local_triton._image_pair_block``), whose features share the first tile's origin: there
    ``0 ≤ r_2 < 2 T_2`` and ``−R_2 T_2 ≤ c_2 < (R_2 + 2) T_2``."""
    *w, wt = weights
    dims = (0, 1, 2) if ndim == 3 else (1, 2)
    extra = {d: int(pair and d == 2) for d in dims}  # the pair's second tile, in tiles
    r = {d: torch.arange((1 + extra[d]) * tile3[d], dtype=torch.float64) for d in dims}
    c = {d: torch.arange(-radius3[d] * tile3[d], (radius3[d] + 1 + extra[d]) * tile3[d], dtype=torch.float64)
         for d in dims}
    rows = [torch.tensor([wt])] + [t for d in dims for t in (torch.tensor([w[d]]), 2 * w[d] * r[d], -w[d] * r[d] ** 2)]
    cols = [t for d in dims for t in (-c[d] ** 2, c[d])]
    bound = wt + sum(2 * w[d] * float(r[d].max() + c[d].abs().max()) ** 2 for d in dims)
    return all(_fp16_exact(t) for t in rows + cols) and bound < 2**24


@functools.lru_cache(maxsize=64)
def _build_layout(grid, radii, shape: str, tile, device: torch.device) -> LocalLayout:
    start = time.perf_counter()
    ndim = len(grid)
    grid3, tile3 = _as3(grid, tile)
    radii3 = (math.inf, *radii) if ndim == 2 else tuple(radii)
    n_tiles = tuple(-(-g // t) for g, t in zip(grid3, tile3))
    table, cap0, cap1, weights, mode = None, 0, 0, (0.0, 0.0, 0.0, 0.0), MASK_NONE
    mask_dot = mask_dot_pair = False
    if shape == "tile":
        rad = tile_radius(radii, tile, grid)
        radius = (0, *rad) if ndim == 2 else rad
        radius = tuple(min(r, n - 1) for r, n in zip(radius, n_tiles))
    else:
        # largest |Δ_d| that can be visible in each dimension (the grid caps it)
        caps = tuple(g - 1 if math.isinf(r) else min(int(math.floor(r)), g - 1) for r, g in zip(radii3, grid3))
        visible = circle_visibility(radii3, caps)
        max_last = visible.to(torch.int32).cumprod(-1).sum(-1) - 1  # (cap0+1, cap1+1), -1: none
        cap0, cap1 = caps[0], caps[1]
        full = torch.full((cap0 + 2, cap1 + 2), -1, dtype=torch.int32)
        full[: cap0 + 1, : cap1 + 1] = max_last
        table = full.reshape(-1).to(device)
        reach = (
            int((max_last[:, 0] >= 0).nonzero().max()),
            int((max_last[0, :] >= 0).nonzero().max()),
            int(max_last[0, 0]),
        )
        radius = tuple(min((rc + t - 1) // t, n - 1) for rc, t, n in zip(reach, tile3, n_tiles))
        formula = _formula_weights(radii3, caps, visible)
        if formula is not None:
            weights, mode = formula, MASK_FORMULA
            mask_dot = mask_dot_exact(weights, tile3, radius, ndim)
            mask_dot_pair = mask_dot_exact(weights, tile3, radius, ndim, pair=True)
        else:
            mode = MASK_TABLE
    return LocalLayout(
        grid=grid3,
        tile=tile3,
        n_tiles=n_tiles,  # type: ignore[arg-type]
        radius=radius,  # type: ignore[arg-type]
        ndim=ndim,
        shape=shape,
        mask_mode=mode,
        table=table,
        cap0=cap0,
        cap1=cap1,
        weights=weights,
        setup_ms=(time.perf_counter() - start) * 1e3,
        mask_dot=mask_dot,
        mask_dot_pair=mask_dot_pair,
    )


def get_layout(grid, window, shape: str = "circle", tile=None, device=None) -> LocalLayout:
    """The cached ``LocalLayout`` for this resolution and window (built on first use)."""
    grid = tuple(int(g) for g in grid)
    if len(grid) not in (2, 3) or any(g <= 0 for g in grid):
        raise ValueError(f"grid must be (H, W) or (T, H, W) of positive sizes, got {grid}")
    radii = normalize_window(window, len(grid))
    tile = _resolve_tile(grid, tile)
    if shape not in ("circle", "tile"):
        raise ValueError(f"shape must be 'circle' or 'tile', got {shape!r}")
    return _build_layout(grid, radii, shape, tile, _canon_device(device))


def layout_cache_info():
    """``functools`` cache statistics of the layout and permutation caches."""
    return {"layout": _build_layout.cache_info(), "permutation": _permutations.cache_info()}


def clear_layout_cache() -> None:
    _build_layout.cache_clear()
    _permutations.cache_clear()
