"""Tile-window local attention through FlashAttention-4's block-sparse kernels (optional backend).

FlashAttention-4 (``pip install flash-attn-4``, CuTe DSL; Hopper and Blackwell) runs attention over
a list of (query block, key block) pairs. A *tile* window on tile-ordered tokens is exactly such a
list: with 128-token tiles and a text length that is a multiple of 128, every 128-token query block
sees whole 128-token key blocks (the text blocks and the box of key tiles ``layout.radius`` around
its own tile), so no element mask is needed. This module builds those lists arithmetically from the
layout (cached per resolution) and hands them to FA4; our Triton kernel (``local_triton``) stays the
default and serves every other case (circles, partial edge tiles, other tile sizes, CPU).

Measured on an H200 (``benchmarks/results/fa4_blocksparse_split_32nd.json``, flux-4k, tile window
8×16, ±2 × ±1 tiles, 512 text tokens, bf16, same run): FA4 forward 4.31 ms / backward 11.46 ms
against the Triton kernel's 4.41 / 14.39 ms (split backward), the same gradients to bf16 rounding.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Sequence

import torch

from .local_layout import from_tile_order, get_layout, to_tile_order
from .local_reference import validate_local_args

BLOCK = 128  # FA4's sparse block (query and key) on Hopper; one tile of tokens
FA4_DTYPES = (torch.float16, torch.bfloat16)
# FA4's tuned head dims; on the H200 (32nd session) 64, 96 and 128 matched the float64 reference,
# head dim 40 did not (tests/test_kernels_local_fa4.py), so the others stay with the Triton kernel
FA4_HEAD_DIMS = (64, 96, 128)


def fa4_is_installed() -> bool:
    """True when FlashAttention-4's CuTe kernels can be imported (``pip install flash-attn-4``)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:  # (a flash_attn without the cute subpackage)
        return False


def why_fa4_cannot_serve(q: torch.Tensor, grid: Sequence[int], tile: Sequence[int], shape: str,
                         text_len: int) -> str | None:
    """None when the FA4 backend can serve this call, else the reason (one sentence)."""
    if shape != "tile":
        return f'it serves tile windows only (shape="tile"), got shape={shape!r}; circles need element masks'
    if q.dtype not in FA4_DTYPES:
        return f"it supports float16 and bfloat16, got {q.dtype}"
    if q.device.type != "cuda":
        return f"it needs a CUDA device, got {q.device}"
    major = torch.cuda.get_device_capability(q.device)[0]
    if major not in (9, 10):
        return f"its block-sparse kernels need Hopper or Blackwell (compute capability 9.x/10.x), got {major}.x"
    if q.shape[-1] not in FA4_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {FA4_HEAD_DIMS}"
    if math.prod(tile) != BLOCK:
        return f"its blocks are {BLOCK} tokens, so the tile must hold {BLOCK} tokens (e.g. (8, 16)), got {tuple(tile)}"
    if any(g % t for g, t in zip(grid, tile)):
        return f"the tile {tuple(tile)} must divide the grid {tuple(grid)} (no partial edge tiles)"
    if text_len % BLOCK:
        return f"text_len must be a multiple of {BLOCK}, got {text_len}"
    if not fa4_is_installed():
        return "FlashAttention-4 is not installed (pip install flash-attn-4)"
    return None


def tile_window_blocks(n_tiles: Sequence[int], tile_radius: Sequence[int], text_len: int) -> torch.Tensor:
    """(nb, nb) bool, nb = text_len / 128 + tiles: which 128-token key blocks each query block sees,
    tokens in tile order (text blocks first), for a layout's ``n_tiles`` and ``radius`` (3D, a 2D
    grid has one plane). With whole tiles, tile order numbers the tiles row-major over ``n_tiles``
    (``local_layout.tile_order_index``). Text blocks see and are seen by every block; a tile sees the
    tiles within ``tile_radius`` tiles along every dimension."""
    n0, n1, n2 = n_tiles
    tiles = torch.arange(n0 * n1 * n2)
    sees = torch.ones(len(tiles), len(tiles), dtype=torch.bool)
    for c, r in zip((tiles // (n1 * n2), (tiles // n2) % n1, tiles % n2), tile_radius):
        sees &= (c[:, None] - c[None, :]).abs() <= r
    nt = text_len // BLOCK
    blocks = torch.ones(nt + len(tiles), nt + len(tiles), dtype=torch.bool)
    blocks[nt:, nt:] = sees
    return blocks


def _block_lists(blocks: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (1, 1, rows) and ascending column indices (1, 1, rows, max count), int32, of a bool matrix."""
    counts = blocks.sum(1)
    rows, cols = blocks.nonzero(as_tuple=True)  # row-major: each row's columns ascending
    starts = torch.cumsum(counts, 0) - counts
    index = torch.zeros(blocks.shape[0], int(counts.max()), dtype=torch.int32)
    index[rows, torch.arange(len(rows)) - starts[rows]] = cols.to(torch.int32)
    return counts.to(torch.int32)[None, None].to(device), index[None, None].to(device)


@functools.lru_cache(maxsize=16)
def _sparse_tensors(n_tiles: tuple, tile_radius: tuple, text_len: int, device: torch.device):
    """FA4's forward (query block -> key blocks) and backward (key block -> query blocks) lists,
    built once per resolution and device."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    blocks = tile_window_blocks(n_tiles, tile_radius, text_len)

    def as_fa4(matrix):
        counts, index = _block_lists(matrix, device)
        # every listed block is whole ("full"): no partially masked ("mask") blocks
        return BlockSparseTensorsTorch(mask_block_cnt=torch.zeros_like(counts), mask_block_idx=torch.zeros_like(index[..., :1]),
                                       full_block_cnt=counts, full_block_idx=index, block_size=(BLOCK, BLOCK))

    return as_fa4(blocks), as_fa4(blocks.t().contiguous())


def local_attention_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Sequence[int], window,
                        text_len: int = 0, shape: str = "tile", tile: Sequence[int] | None = None,
                        tile_order: bool = False) -> torch.Tensor:
    """Tile-window local attention through FlashAttention-4 (autograd-aware), equal to
    ``local_attention_reference(..., shape="tile")``.

    Args:
        q, k, v: (B, H, L, D) fp16/bf16 on a Hopper/Blackwell GPU, L = text_len + prod(grid); heads-first
            views of token-major (B, L, H, D) memory need no copy.
        grid, window, text_len, tile: as ``local_attention`` (tile default (8, 16) / (2, 8, 8)).
        shape: must be "tile".
        tile_order: tokens already in tile order (``to_tile_order``); otherwise they are row-major and
            are reordered in and out (one gather per tensor).

    Returns:
        (B, H, L, D) in q's dtype, in the token order of the inputs.
    """
    grid, radii, tile = validate_local_args(grid, window, int(text_len), shape, tile, q.shape[2])
    reason = why_fa4_cannot_serve(q, grid, tile, shape, int(text_len))
    if reason is not None:
        raise RuntimeError(f"local attention: the FA4 backend cannot serve this call: {reason}. "
                           'Use backend="triton" (any window, any tile).')
    if k.shape != q.shape or v.shape != q.shape or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share shape and dtype; got {tuple(q.shape)} {q.dtype}, "
                         f"{tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    from flash_attn.cute.interface import flash_attn_func

    layout = get_layout(grid, radii, "tile", tile, q.device)
    fwd_lists, bwd_lists = _sparse_tensors(layout.n_tiles, layout.radius, int(text_len), q.device)
    if not tile_order:
        q, k, v = (to_tile_order(t, grid, tile, int(text_len)) for t in (q, k, v))
    # FA4 takes (B, L, H, D); a heads-first view of token-major memory transposes back for free
    out = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=q.shape[-1] ** -0.5,
                          block_sparse_tensors=fwd_lists, block_sparse_tensors_bwd=bwd_lists)
    out = (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
    return out if tile_order else from_tile_order(out, grid, tile, int(text_len))
