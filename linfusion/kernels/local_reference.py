"""Reference (plain PyTorch) local window attention over ``[text | grid]`` tokens.

Definition (every fast path must equal it):

* The first ``text_len`` tokens are text; the rest are an image (``grid=(H, W)``)
  or video (``grid=(T, H, W)``) token grid in row-major order.
* Text queries attend to every key.
* An image query at grid position ``p`` attends to every text key and to the image
  keys at positions ``p'`` inside its window:

  - ``shape="circle"``: ``Σ_d ((p'_d - p_d) / r_d)² ≤ 1`` (an ellipse/ellipsoid when
    the radii differ; ``r_d = inf`` means no limit along that dimension).
  - ``shape="tile"``: the grid is cut into tiles of ``tile=(t_1, ..., t_n)``
    tokens (edge tiles may be partial). With tile index ``c_d = p_d // t_d``, the
    key is visible when ``|c'_d - c_d| ≤ ceil(r_d / t_d)`` in every dimension.
    This is the smallest tile-aligned window that contains the box ``|Δ_d| ≤ r_d``
    (hence the circle) of *every* query in the tile, so a kernel can process whole
    (query tile, key tile) pairs without any per-token mask.

* Softmax scale ``1/sqrt(D)``; softmax in float32 (float64 stays float64).

The reference processes image queries in chunks, building each chunk's mask
arithmetically, so memory stays ``O(chunk · N)`` rather than ``O(N²)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F

from .input_checks import check_float_dtypes

DEFAULT_TILE_2D: tuple[int, int] = (8, 16)
DEFAULT_TILE_3D: tuple[int, int, int] = (2, 8, 8)
SHAPES = ("circle", "tile")


def normalize_window(window: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    """Expand an int/float radius to one radius per grid dimension and validate it."""
    radii = tuple(float(r) for r in window) if isinstance(window, Sequence) else (float(window),) * ndim
    if len(radii) != ndim:
        raise ValueError(f"window {window!r} has {len(radii)} radii but the grid has {ndim} dimensions")
    if any(not (r > 0) for r in radii):
        raise ValueError(f"window radii must be > 0 (got {window!r})")
    return radii


def default_tile(ndim: int) -> tuple[int, ...]:
    if ndim == 2:
        return DEFAULT_TILE_2D
    if ndim == 3:
        return DEFAULT_TILE_3D
    raise ValueError(f"grid must be 2D (H, W) or 3D (T, H, W), got {ndim} dimensions")


def tile_radius(radii: Sequence[float], tile: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """Window radius in whole tiles per dimension: ceil(r_d / t_d), capped by the grid."""
    out = []
    for r, t, g in zip(radii, tile, grid):
        n_tiles = -(-g // t)
        out.append(n_tiles if math.isinf(r) else min(math.ceil(r / t), n_tiles))
    return tuple(out)


def validate_local_args(
    grid: Sequence[int], window, text_len: int, shape: str, tile: Sequence[int] | None, seq_len: int
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[int, ...]]:
    """Check arguments; return (grid, radii, tile) as tuples. Raises ValueError naming the problem."""
    grid = tuple(int(g) for g in grid)
    if len(grid) not in (2, 3) or any(g <= 0 for g in grid):
        raise ValueError(f"grid must be (H, W) or (T, H, W) of positive sizes, got {grid}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if text_len < 0:
        raise ValueError(f"text_len must be >= 0, got {text_len}")
    if text_len + math.prod(grid) != seq_len:
        raise ValueError(
            f"sequence length {seq_len} != text_len {text_len} + grid tokens {math.prod(grid)} (grid {grid})"
        )
    radii = normalize_window(window, len(grid))
    tile = tuple(int(t) for t in (tile or default_tile(len(grid))))
    if len(tile) != len(grid) or any(t <= 0 for t in tile):
        raise ValueError(f"tile {tile} must give one positive size per grid dimension {grid}")
    return grid, radii, tile


def grid_coordinates(grid: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """(N, ndim) integer coordinates of a row-major grid."""
    axes = [torch.arange(g, device=device) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def circle_visibility(radii: Sequence[float], caps: Sequence[int]) -> torch.Tensor:
    """bool tensor of shape ``(cap_1 + 1, ..., cap_n + 1)``: is the offset ``|Δ|`` visible,
    ``Σ_d (Δ_d / r_d)² ≤ 1``. Decided on the CPU, once, and exactly where the radii allow it
    (integer arithmetic on the radii's exact fractions), otherwise in float64 with true
    division, so every device and every kernel table agree on boundary points such as
    (3, 4) at r = 5 or (5, 12) at r = 13."""
    finite = [(d, Fraction(r)) for d, r in enumerate(radii) if not math.isinf(r)]
    shape = [c + 1 for c in caps]
    total = math.prod(f.numerator**2 for _, f in finite)
    # Σ_d Δ_d² q_d² · (P / p_d²) ≤ P  with r_d = p_d / q_d and P = Π p_d²  (exact in int64?)
    terms = [(d, (f.denominator**2) * (total // f.numerator**2)) for d, f in finite]
    exact = all(w * caps[d] ** 2 * max(len(terms), 1) < 2**62 for d, w in terms) and total < 2**62
    acc = torch.zeros(shape, dtype=torch.int64 if exact else torch.float64)
    for d, weight in terms:
        view = [1] * len(caps)
        view[d] = -1
        delta = torch.arange(caps[d] + 1, dtype=acc.dtype)
        acc += (delta**2 * weight if exact else (delta / radii[d]) ** 2).view(view)
    return acc <= (total if exact else 1.0)


def window_mask(
    q_coords: torch.Tensor,
    k_coords: torch.Tensor,
    radii: Sequence[float],
    shape: str,
    tile: Sequence[int],
    grid: Sequence[int],
) -> torch.Tensor:
    """(Mq, Mk) boolean visibility between image query and image key coordinates."""
    if shape == "circle":
        # Look |Δ| up in the table of visible offsets (float64 on the CPU) instead of evaluating
        # the ellipse on the tensors' device: CUDA divides by a scalar as a multiplication by
        # its reciprocal, which moves exact boundary points such as (3, 4) at r = 5 outside.
        caps = tuple(g - 1 if math.isinf(r) else min(int(math.floor(r)), g - 1) for r, g in zip(radii, grid))
        table = circle_visibility(radii, caps).to(q_coords.device)
        index = torch.zeros(q_coords.shape[0], k_coords.shape[0], dtype=torch.long, device=q_coords.device)
        inside = torch.ones(index.shape, dtype=torch.bool, device=q_coords.device)
        for d, cap in enumerate(caps):
            delta = (k_coords[None, :, d] - q_coords[:, None, d]).abs()
            inside &= delta <= cap
            index = index * (cap + 1) + delta.clamp(max=cap)
        return inside & table.reshape(-1)[index]
    radius = tile_radius(radii, tile, grid)
    mask = torch.ones(q_coords.shape[0], k_coords.shape[0], dtype=torch.bool, device=q_coords.device)
    for d, (t, rt) in enumerate(zip(tile, radius)):
        mask &= (k_coords[None, :, d] // t - q_coords[:, None, d] // t).abs() <= rt
    return mask


def local_attention_mask(
    grid: Sequence[int],
    window,
    text_len: int = 0,
    shape: str = "circle",
    tile: Sequence[int] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Full (L, L) boolean mask of the definition above. O(L²): for tests and baselines only."""
    seq_len = text_len + math.prod(grid)
    grid, radii, tile = validate_local_args(grid, window, text_len, shape, tile, seq_len)
    coords = grid_coordinates(grid, device)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    mask[text_len:, text_len:] = window_mask(coords, coords, radii, shape, tile, grid)
    return mask


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    window,
    text_len: int = 0,
    shape: str = "circle",
    tile: Sequence[int] | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """Local attention by chunked masked softmax.

    Args:
        q, k, v: (B, H, L, D) with L = text_len + prod(grid); text tokens first.
        grid: (H, W) or (T, H, W) of the image/video tokens (row-major).
        window: radius (int/float) or one radius per grid dimension.
        text_len: number of leading text tokens (global).
        shape: "circle" or "tile" (see module docstring).
        tile: tile size per dimension for shape="tile" (default (8, 16) / (2, 8, 8)).
        query_chunk: image queries per chunk (default keeps the chunk mask ~16M entries).

    Returns:
        (B, H, L, D) in q's dtype.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"expected q, k, v of shape (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_float_dtypes("local_attention", q=q, k=k, v=v)
    seq_len = q.shape[2]
    grid, radii, tile = validate_local_args(grid, window, text_len, shape, tile, seq_len)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    n_img = seq_len - text_len
    outputs = []
    if text_len:
        outputs.append(F.scaled_dot_product_attention(qa[:, :, :text_len], ka, va))
    coords = grid_coordinates(grid, q.device)
    chunk = query_chunk or max(1, (1 << 24) // max(seq_len, 1))
    for start in range(0, n_img, chunk):
        stop = min(start + chunk, n_img)
        img_mask = window_mask(coords[start:stop], coords, radii, shape, tile, grid)
        text_mask = torch.ones(stop - start, text_len, dtype=torch.bool, device=q.device)
        mask = torch.cat([text_mask, img_mask], dim=1)
        q_chunk = qa[:, :, text_len + start : text_len + stop]
        outputs.append(F.scaled_dot_product_attention(q_chunk, ka, va, attn_mask=mask))
    return torch.cat(outputs, dim=2).to(q.dtype)
