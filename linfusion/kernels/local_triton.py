"""Triton local (window) attention over ``[text | grid]`` tokens: forward and backward.

Same function as :func:`linfusion.kernels.local_reference.local_attention_reference`.

Design (sliding-tile style, STA / NATTEN-Hopper):

* Image tokens are processed in tiles (default 8×16 in 2D, 2×8×8 in 3D). A query block is
  (a slice of) one tile. Its key tiles form a box of ``2R_d + 1`` tiles per dimension
  (``R_d`` = tile radius), clipped to the grid, computed from the tile coordinates in the
  kernel: no N×N mask, no block-mask tensor. Tiles along the last dimension are contiguous in
  tile order, so the key loop walks ``rows × chunks`` of contiguous token ranges.
* Tokens may be in row-major order (default): the kernel computes each token's address from
  its tile coordinates, so no permutation is ever materialised. With ``tile_order=True`` the
  tokens are already in tile order (``local_layout.to_tile_order``) and the addresses are
  contiguous ranges.
* ``shape="tile"``: no per-token mask at all, only a column-validity bias on a range's last
  chunk. ``shape="circle"``: per chunk, if the farthest query–key pair of the two tile boxes
  is inside the window (scalar integer arithmetic, formula mode), every pair is and the chunk
  is treated like a tile chunk; otherwise (edge chunks, and always in table mode) the exact
  per-token mask ``Σ Δ_d² w_d ≤ w`` in fp32 integers (integer radii) or a lookup in the
  exact visibility table is combined with the key validity in one select; both equal the
  reference. Where the layout allows it (``local_layout.mask_dot_exact``) and the config asks for
  it (``local_configs._circle_dot_config``: the forward, dQ at head dim 128, and dK/dV there on
  64-token tiles), the formula runs
  on the tensor cores instead: one K=16 dot of small-integer fp16 features of the rows and the
  chunk's columns gives ``WT − Σ W_d Δ_d²`` exactly, and one compare per score replaces ~7 fp32
  operations (flux-4k circle forward 6.6 → 5.9 ms). The key loop holds no memory load besides
  the K/V (Q/dO) tiles: the first version
  read the shortcut from the table inside the loop, which Triton pipelines into shared-memory
  copies, and table mode runs its per-token gather unpipelined (``num_stages=1``). (The
  interior shortcut pays for radii well above the tile size; at r = 16 with 8×16 tiles even a
  tile's own diagonal is outside the circle.)
* Text keys are extra chunks of the same online softmax; text queries (≤ a few hundred rows)
  attend to every key in a dense loop. Their programs run first (longest first).
* Key traffic from L2 bounds the forwards on 64-token tiles (``benchmarks/NOTES_local.md``), so
  there (head dim 128, ``local_configs``) a program serves two query blocks from each loaded K/V
  chunk: two 64-row text blocks (``_text_pair_block``), or two neighbouring tiles of a row
  (``_image_pair_block``: the text keys and the key tiles both windows hold are loaded once).
* Backward: flash-attention backward over the same tile pairs with the LSE saved by the
  forward: one kernel for dK/dV (key tile, loop over query chunks, symmetric window), one for
  dQ. Softmax statistics are fp32; fp32 inputs use exact fp32 dots. ``backward="fused_dq"``
  drops the dQ kernel: the dK/dV kernel adds each block pair's dS·K into an fp32 dQ buffer (FA3's
  scheme: 5 matmuls per pair instead of 7, plus the reduction traffic), by TMA reductions on
  Hopper with row-major tokens, else by per-element atomics. ``backward="auto"`` (default) runs
  it where the H200 measured it faster (circles at head dims 128 and 64). Where measured faster
  (``local_configs._dot_order_config``) dP is issued right after the scores, before the
  exponentials, so that Triton's two waits per block pair come back to back.
* Instructions per window iteration matter (the loops issue about as many instructions as their
  tensor cores need cycles): a loop steps loop-carried chunk counters (``_next_chunk``) rather than
  dividing its iteration count by runtime box sizes, and the LSE and Δ buffers also hold a
  tile-major copy (``_stats``) that the dK/dV loop of either backward loads as one unmasked run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreter_enabled
from .local_configs import circle_tile, default_backward, dq_ws_config, local_config
from .local_dkdv_hopper import launch_dkdv_ws, launch_dq_ws, ws_dkdv_unsupported
from .local_bwd_gluon import fused_gluon_unsupported, launch_fused_gluon, scale_into
from .local_layout import (
    MASK_NONE,
    MASK_TABLE,
    LocalLayout,
    from_tile_order,
    get_layout,
    to_tile_order,
)
from .local_reference import validate_local_args

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128

__all__ = [
    "local_attention_triton",
    "local_attention_tiled",
    "to_tile_order",
    "from_tile_order",
    "get_layout",
]


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _tile_tokens(c0, c1, c2, idx, G0, G1, G2, TEXT,
                 T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, TILE_ORDER: tl.constexpr):
    """Tokens ``idx`` (row-major index inside the full-size tile c; constexpr tile sizes make the
    divisions shifts): grid coordinates, validity (partial edge tiles), memory positions."""
    a2 = idx % T2
    a1 = (idx // T2) % T1
    a0 = idx // (T1 * T2)
    p0 = c0 * T0 + a0
    p1 = c1 * T1 + a1
    p2 = c2 * T2 + a2
    valid = (idx < T0 * T1 * T2) & (p0 < G0) & (p1 < G1) & (p2 < G2)
    if TILE_ORDER:  # compact tile order: partial edge tiles have extents s_d < T_d
        s0 = tl.minimum(G0 - c0 * T0, T0)
        s1 = tl.minimum(G1 - c1 * T1, T1)
        s2 = tl.minimum(G2 - c2 * T2, T2)
        pos = TEXT + c0 * T0 * G1 * G2 + s0 * (c1 * T1 * G2 + s1 * c2 * T2) + (a0 * s1 + a1) * s2 + a2
    else:
        pos = TEXT + (p0 * G1 + p1) * G2 + p2
    return p0, p1, p2, pos, valid


@triton.jit
def _tile_block(rem, SUB, N1, N2, G0, G1, G2, TEXT, BLOCK: tl.constexpr,
                T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, TILE_ORDER: tl.constexpr):
    """Block ``rem`` (= tile * SUB + slice) of the image: its tile and its tokens."""
    tile_id = rem // SUB
    sb = rem - tile_id * SUB
    c2 = tile_id % N2
    tmp = tile_id // N2
    c1 = tmp % N1
    c0 = tmp // N1
    p0, p1, p2, pos, valid = _tile_tokens(c0, c1, c2, sb * BLOCK + tl.arange(0, BLOCK), G0, G1, G2, TEXT,
                                          T0, T1, T2, TILE_ORDER)
    return c0, c1, c2, p0, p1, p2, pos, valid


@triton.jit
def _window_setup(c0, c1, c2, R0, R1, R2, N0, N1, N2, CPT: tl.constexpr):
    """Box of key tiles around tile c, clipped to the grid: rows (c0', c1') × tiles j, CPT chunks each."""
    lo0 = tl.maximum(c0 - R0, 0)
    hi0 = tl.minimum(c0 + R0, N0 - 1)
    lo1 = tl.maximum(c1 - R1, 0)
    hi1 = tl.minimum(c1 + R1, N1 - 1)
    lo2 = tl.maximum(c2 - R2, 0)
    hi2 = tl.minimum(c2 + R2, N2 - 1)
    nr1 = hi1 - lo1 + 1
    nj = hi2 - lo2 + 1
    n_iter = (hi0 - lo0 + 1) * nr1 * nj * CPT
    return lo0, lo1, lo2, nr1, nj, n_iter


@triton.jit
def _chunk(kc0, kc1, j, sc, G0, G1, G2, TEXT,
           BLOCK: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, TILE_ORDER: tl.constexpr,
           WHOLE: tl.constexpr):
    """Window chunk ``sc`` (a BLOCK-token slice) of key tile (kc0, kc1, j): its tokens, and whether it
    is whole (no grid edge cuts its tile, no slice past the tile's end: no validity mask needed).
    WHOLE: every chunk of the launch is (``_whole_chunks``), so ``full`` is a compile-time True and
    the callers' validity masks vanish from the compiled loop.

    Pure integer arithmetic: no memory loads, so nothing in the key loop but the K/V (Q/dO) tiles
    themselves is a candidate for software pipelining."""
    p0, p1, p2, pos, valid = _tile_tokens(kc0, kc1, j, sc * BLOCK + tl.arange(0, BLOCK), G0, G1, G2, TEXT,
                                          T0, T1, T2, TILE_ORDER)
    if WHOLE:
        full = True
    else:
        full = ((kc0 + 1) * T0 <= G0) & ((kc1 + 1) * T1 <= G1) & ((j + 1) * T2 <= G2) & ((sc + 1) * BLOCK <= T0 * T1 * T2)
    return pos, valid, p0, p1, p2, full


@triton.jit
def _chunk_at(it, lo0, lo1, lo2, nr1, nj, CPT: tl.constexpr):
    """Window chunk ``it`` as ``_next_chunk`` would reach it (tile (kc0, kc1, j), slice sc), by integer
    division of the iteration count (DIV_CHUNKS)."""
    sc = it % CPT
    t = it // CPT
    r = t // nj
    return lo0 + r // nr1, lo1 + r % nr1, lo2 + t % nj, sc


@triton.jit
def _next_chunk(kc0, kc1, j, sc, lo1, lo2, nr1, nj, CPT: tl.constexpr):
    """The window chunk after slice ``sc`` of key tile (kc0, kc1, j) in the loops' order: the CPT
    slices of a tile, the ``nj`` tiles of a row from lo2, the ``nr1`` rows of a plane from lo1,
    then the next plane. Loop-carried counters and selects: deriving the chunk from the iteration
    count took two divisions by runtime box sizes per iteration (~50 instructions on sm_90;
    ``_chunk_at``, which the dK/dV kernel keeps where the H200 measured it faster: DIV_CHUNKS)."""
    if CPT > 1:
        sc = sc + 1
        next_tile = sc == CPT
        sc = tl.where(next_tile, 0, sc)
        j = tl.where(next_tile, j + 1, j)
    else:
        j = j + 1
    next_row = j == lo2 + nj
    j = tl.where(next_row, lo2, j)
    kc1 = tl.where(next_row, kc1 + 1, kc1)
    next_plane = kc1 == lo1 + nr1
    kc1 = tl.where(next_plane, lo1, kc1)
    kc0 = tl.where(next_plane, kc0 + 1, kc0)
    return kc0, kc1, j, sc


@triton.jit
def _load_tokens(x_base, y_base, sxn, syn, pos, valid, offs_d, dmask):
    """Two [len(pos), D_PAD] tiles of the tokens ``pos`` by per-token pointers (token strides sxn,
    syn), zeros where not ``valid`` and in the padded head dims."""
    mask = valid[:, None] & dmask[None, :]
    x = tl.load(x_base + pos[:, None] * sxn + offs_d[None, :], mask=mask, other=0.0)
    y = tl.load(y_base + pos[:, None] * syn + offs_d[None, :], mask=mask, other=0.0)
    return x, y


@triton.jit
def _load_rows(X_ROWS, Y_ROWS, x_base, y_base, sxn, syn, b, h, start, pos, valid, offs_d, dmask,
               BLOCK: tl.constexpr, D_PAD: tl.constexpr, TMA_LOADS: tl.constexpr):
    """Two [BLOCK, D_PAD] tiles (K and V, or Q and dO) of the contiguous tokens ``pos`` = start.. of
    head (b, h). TMA_LOADS: one TMA load each (``X_ROWS``/``Y_ROWS``: [B, H, L, D], box
    [1, 1, BLOCK, D_PAD]); rows past the valid ones arrive as other tokens (zeros past L), which the
    callers mask. Else per-token pointers from ``x_base``/``y_base`` (token strides sxn, syn), zeros
    where not ``valid``."""
    if TMA_LOADS:
        x = tl.reshape(X_ROWS.load([b, h, start, 0]), [BLOCK, D_PAD])
        y = tl.reshape(Y_ROWS.load([b, h, start, 0]), [BLOCK, D_PAD])
    else:
        x, y = _load_tokens(x_base, y_base, sxn, syn, pos, valid, offs_d, dmask)
    return x, y


@triton.jit
def _load_chunk(X_GRID, Y_GRID, x_base, y_base, sxn, syn, b, h, sc, kc0, kc1, kc2, G1, pos, valid, offs_d, dmask,
                BLOCK: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
                D_PAD: tl.constexpr, TMA_LOADS: tl.constexpr, TILE_ORDER: tl.constexpr):
    """Two [BLOCK, D_PAD] tiles of window chunk ``sc`` of tile kc (tokens ``pos``).
    TMA_LOADS: one TMA load each (``X_GRID``/``Y_GRID``: the grid [B, H, G0·G1, G2, D], box
    [1, 1, BLOCK/T2, T2, D_PAD]): the chunk is BLOCK/T2 whole rows of one tile plane, so the box starts
    at its first token, column kc2·T2; rows past a partial tile's edge arrive as other tokens or
    zeros, which the callers mask. With TILE_ORDER (whole tiles only) the descriptors are the
    tile-ordered image [B, H, N0·N1, N2·TV, D], box [1, 1, 1, BLOCK, D_PAD]: the chunk is one run of
    its tile (``_load_descriptors``). Else per-token pointers, zeros where not ``valid``."""
    if TMA_LOADS and TILE_ORDER:
        col = kc2 * (T0 * T1 * T2) + sc * BLOCK
        x = tl.reshape(X_GRID.load([b, h, kc0 * (G1 // T1) + kc1, col, 0]), [BLOCK, D_PAD])
        y = tl.reshape(Y_GRID.load([b, h, kc0 * (G1 // T1) + kc1, col, 0]), [BLOCK, D_PAD])
    elif TMA_LOADS:
        first = sc * BLOCK
        row = (kc0 * T0 + first // (T1 * T2)) * G1 + kc1 * T1 + (first // T2) % T1
        x = tl.reshape(X_GRID.load([b, h, row, kc2 * T2, 0]), [BLOCK, D_PAD])
        y = tl.reshape(Y_GRID.load([b, h, row, kc2 * T2, 0]), [BLOCK, D_PAD])
    else:
        x, y = _load_tokens(x_base, y_base, sxn, syn, pos, valid, offs_d, dmask)
    return x, y


@triton.jit
def _tiles_all_visible(c0, c1, c2, kc0, kc1, kc2, W0, W1, W2, WT,
                       T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
                       MASK_MODE: tl.constexpr, IS_3D: tl.constexpr):
    """Scalar: is every token pair of tiles c and kc inside the window? Then the chunk needs no
    window mask (only edge tiles of a circle pay for masking). True iff the farthest pair of the
    two tile boxes is visible (visibility is monotone in each |Δ_d|). Formula mode only, by
    integer arithmetic (no memory load in the key loop); table mode always masks."""
    if MASK_MODE == 2:
        m1 = (tl.abs(kc1 - c1) * T1 + T1 - 1).to(tl.float32)
        m2 = (tl.abs(kc2 - c2) * T2 + T2 - 1).to(tl.float32)
        total = m1 * m1 * W1 + m2 * m2 * W2
        if IS_3D:
            m0 = (tl.abs(kc0 - c0) * T0 + T0 - 1).to(tl.float32)
            total += m0 * m0 * W0
        return total <= WT
    else:
        return False


@triton.jit
def _window_mask(rp0, rp1, rp2, cp0, cp1, cp2, TAB, CAP0, CAP1, W0, W1, W2, WT,
                 MASK_MODE: tl.constexpr, IS_3D: tl.constexpr):
    """[rows, cols] visibility between row tokens and column tokens (symmetric in the roles).

    MASK_MODE 2: integer weights and integer Δ, so every product and partial sum below 2**24 is
    exact in fp32 (with or without FMA contraction) and anything larger is > WT (< 2**23) after
    rounding too: the test cannot depend on the compiler's contraction choices."""
    if MASK_MODE == 2:
        d1 = cp1.to(tl.float32)[None, :] - rp1.to(tl.float32)[:, None]
        d2 = cp2.to(tl.float32)[None, :] - rp2.to(tl.float32)[:, None]
        s = d1 * d1 * W1 + d2 * d2 * W2
        if IS_3D:
            d0 = cp0.to(tl.float32)[None, :] - rp0.to(tl.float32)[:, None]
            s += d0 * d0 * W0
        vis = s <= WT
    else:
        d1 = tl.abs(cp1[None, :] - rp1[:, None])
        d2 = tl.abs(cp2[None, :] - rp2[:, None])
        idx = tl.minimum(d1, CAP1 + 1)
        if IS_3D:
            d0 = tl.abs(cp0[None, :] - rp0[:, None])
            idx += tl.minimum(d0, CAP0 + 1) * (CAP1 + 2)
        vis = d2 <= tl.load(TAB + idx)
    return vis


@triton.jit
def _row_features(rp0, rp1, rp2, c0, c1, c2, W0, W1, W2, WT,
                  T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, IS_3D: tl.constexpr):
    """[rows, 16] fp16 row side of the tensor-core circle test (MASK_DOT): with ``_col_features``,
    ``rowF @ colF = WT − Σ_d W_d (c_d − r_d)²``, ≥ 0 exactly for visible pairs. Coordinates r, c
    are relative to the program's own tile origin (a tile pair's: its first tile's,
    ``mask_dot_pair``), so every feature is a small integer. Pairs (row, column): (WT, 1) and per
    dimension (W_d, −c_d²), (2 W_d r_d, c_d), (−W_d r_d², 1); ``local_layout.mask_dot_exact``
    checks that every value is exact in fp16 and every partial sum below 2**24 (exact in the fp32
    accumulator) before MASK_DOT is allowed."""
    r1 = (rp1 - c1 * T1).to(tl.float32)[:, None]
    r2 = (rp2 - c2 * T2).to(tl.float32)[:, None]
    f = tl.arange(0, 16)[None, :]
    rf = tl.where(f == 0, WT, 0.0)
    rf = tl.where(f == 1, W1, rf)
    rf = tl.where(f == 2, (2.0 * W1) * r1, rf)
    rf = tl.where(f == 3, -W1 * r1 * r1, rf)
    rf = tl.where(f == 4, W2, rf)
    rf = tl.where(f == 5, (2.0 * W2) * r2, rf)
    rf = tl.where(f == 6, -W2 * r2 * r2, rf)
    if IS_3D:
        r0 = (rp0 - c0 * T0).to(tl.float32)[:, None]
        rf = tl.where(f == 7, W0, rf)
        rf = tl.where(f == 8, (2.0 * W0) * r0, rf)
        rf = tl.where(f == 9, -W0 * r0 * r0, rf)
    return rf.to(tl.float16)


@triton.jit
def _col_features(cp0, cp1, cp2, c0, c1, c2,
                  T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, IS_3D: tl.constexpr):
    """[16, cols] fp16 column side of the tensor-core circle test (see ``_row_features``)."""
    x1 = (cp1 - c1 * T1).to(tl.float32)[None, :]
    x2 = (cp2 - c2 * T2).to(tl.float32)[None, :]
    f = tl.arange(0, 16)[:, None]
    cf = tl.where((f == 0) | (f == 3) | (f == 6) | (f == 9), 1.0, 0.0)
    cf = tl.where(f == 1, -x1 * x1, cf)
    cf = tl.where(f == 2, x1, cf)
    cf = tl.where(f == 4, -x2 * x2, cf)
    cf = tl.where(f == 5, x2, cf)
    if IS_3D:
        x0 = (cp0 - c0 * T0).to(tl.float32)[None, :]
        cf = tl.where(f == 7, -x0 * x0, cf)
        cf = tl.where(f == 8, x0, cf)
    return cf.to(tl.float16)


@triton.jit
def _feature_mask(x, fill, full, cvalid, rf, cf):
    """``x`` with ``fill`` where the tensor-core circle test ``rf @ cf`` is negative (the pair is
    outside the window) or the column invalid (unless ``full``)."""
    x = tl.where(tl.dot(rf, cf, out_dtype=tl.float32) >= 0.0, x, fill)
    if not full:
        x = tl.where(cvalid[None, :], x, fill)
    return x


@triton.jit
def _mask_chunk(x, fill, full, cvalid, rp0, rp1, rp2, cp0, cp1, cp2, c0, c1, c2, oc0, oc1, oc2,
                rf, TAB, CAP0, CAP1, W0, W1, W2, WT,
                T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
                MASK_MODE: tl.constexpr, IS_3D: tl.constexpr, MASK_DOT: tl.constexpr):
    """``x`` [rows, cols] (scores or probabilities) of one window chunk with invisible pairs set to
    ``fill``. Rows are the program's own tokens (tile c, coordinates rp), columns the chunk's
    (tile oc, coordinates cp, validity ``cvalid``; ``full``: no invalid column). Tile windows and
    interior chunks of a circle need only the validity; edge chunks of a circle the window too,
    with MASK_DOT by one K=16 tensor-core dot of exact integer features (``_row_features`` ``rf``,
    ``_col_features``) and one compare per score, else by the formula (~7 fp32 operations per
    score) or the table."""
    window = False
    if MASK_MODE != 0:
        window = not _tiles_all_visible(c0, c1, c2, oc0, oc1, oc2, W0, W1, W2, WT, T0, T1, T2, MASK_MODE, IS_3D)
    if window:
        if MASK_DOT:
            x = _feature_mask(x, fill, full, cvalid, rf, _col_features(cp0, cp1, cp2, c0, c1, c2, T0, T1, T2, IS_3D))
        else:
            vis = _window_mask(rp0, rp1, rp2, cp0, cp1, cp2, TAB, CAP0, CAP1, W0, W1, W2, WT, MASK_MODE, IS_3D)
            x = tl.where(vis & cvalid[None, :], x, fill)
    elif not full:
        x = tl.where(cvalid[None, :], x, fill)
    return x


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (CPU interpreter with bf16 only) works around the
    interpreter multiplying the raw bits of bf16 operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax update with raw scores ``qk`` (masked entries -inf); the running max ``m_i``
    is kept unscaled so that scale and shift are one FMA per score."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2((m_i - m_new) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - (m_new * qk_scale)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, DOT_PREC, UPCAST)
    return acc, m_new, l_i


# ----------------------------------------------------------------------------- program layout

# resolution-dependent integers are not specialised: a new resolution must not recompile
_NO_SPEC = ["H", "L", "SL", "TEXT", "n_text_progs", "NTB", "n_img_per_bh", "SUB", "G0", "G1", "G2",
            "N0", "N1", "N2", "R0", "R1", "R2", "CAP0", "CAP1"]


@triton.jit
def _own_block(pid, n_text_progs, NTB, n_img_per_bh, SUB, N1, N2, G0, G1, G2, TEXT, L,
               BLOCK: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
               TILE_ORDER: tl.constexpr):
    """The rows a program owns. Programs [0, n_text_progs) own BLOCK text tokens (and see every
    token, ``dense_end = L``); the others own (a slice of) one image tile (``dense_end = TEXT``).
    Computed without branches so that each kernel has a single key loop."""
    is_text = pid < n_text_progs
    pid_img = tl.maximum(pid - n_text_progs, 0)
    bh_img = pid_img // n_img_per_bh
    c0, c1, c2, p0, p1, p2, pos, valid = _tile_block(pid_img - bh_img * n_img_per_bh, SUB, N1, N2, G0, G1, G2,
                                                     TEXT, BLOCK, T0, T1, T2, TILE_ORDER)
    bh_txt = pid // NTB
    tpos = (pid - bh_txt * NTB) * BLOCK + tl.arange(0, BLOCK)
    bh = tl.where(is_text, bh_txt, bh_img)
    pos = tl.where(is_text, tpos, pos)
    valid = tl.where(is_text, tpos < TEXT, valid)
    dense_end = tl.where(is_text, L, TEXT)
    return is_text, bh, c0, c1, c2, p0, p1, p2, pos, valid, dense_end


@triton.jit
def _first_slot(SL, N0, N1, N2, TTP: tl.constexpr):
    """Index of the first tile-major slot in a (b, h) row of the LSE / Δ buffers (``_stats_row``: L
    rounded up to 16), derived from the row stride SL at run time: the compiler cannot see that it
    is a multiple of 16, so the pointer path keeps loading a run in 4-byte pieces (vectorised, the
    split dK/dV kernel's loop made ptxas serialise its wgmmas, C7515, and ran 10% slower at head
    dim 96 on the H200)."""
    return SL - N0 * N1 * N2 * TTP


@triton.jit
def _tile_slot(tile_id, first, slot0, TTP: tl.constexpr):
    """Index, within a (b, h) row of the LSE / Δ buffers (``_stats``), of the tile-major copy of token
    ``first`` (its index inside tile ``tile_id``, row-major tile numbering): ``slot0 + tile_id · TTP
    + first`` (``_first_slot``); 16-byte aligned where ``first`` is a multiple of 4, as a TMA box's
    start must be."""
    return slot0 + tile_id * TTP + first


@triton.jit
def _tile_slots(tile_id, first, slot0, BLOCK: tl.constexpr, TTP: tl.constexpr):
    """[BLOCK] ``_tile_slot`` indices of tokens ``first ..`` of tile ``tile_id``."""
    return _tile_slot(tile_id, first, slot0, TTP) + tl.arange(0, BLOCK)


@triton.jit
def _own_tile_slots(pid, n_text_progs, n_img_per_bh, SUB, slot0, BLOCK: tl.constexpr, TTP: tl.constexpr):
    """``_tile_slots`` of an image program's own rows (slice ``rem % SUB`` of tile ``rem // SUB``;
    meaningless for text programs: callers mask them)."""
    rem = tl.maximum(pid - n_text_progs, 0) % n_img_per_bh
    tile_id = rem // SUB
    return _tile_slots(tile_id, (rem - tile_id * SUB) * BLOCK, slot0, BLOCK, TTP)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _softmax_init(BM: tl.constexpr, D_PAD: tl.constexpr):
    """Online-softmax state of BM query rows: running max, running sum, output accumulator."""
    return tl.full([BM], -1.0e30, tl.float32), tl.zeros([BM], tl.float32), tl.zeros([BM, D_PAD], tl.float32)


@triton.jit
def _partial_chunk(start, end, BLOCK: tl.constexpr, DENSE_WHOLE: tl.constexpr):
    """Whether the dense chunk of BLOCK tokens from ``start`` runs past ``end``; a compile-time False
    with DENSE_WHOLE (``_dense_whole``: the launch's dense ends are multiples of BLOCK), so the
    callers' masks vanish from the compiled loop."""
    if DENSE_WHOLE:
        partial = False
    else:
        partial = start + BLOCK > end
    return partial


@triton.jit
def _dense_scores(q, k, kvalid, partial, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Scores q·kᵀ of a chunk of contiguous keys; -inf past the last key when the chunk is ``partial``."""
    s = _dot(q, tl.trans(k), None, DOT_PREC, UPCAST)
    if partial:
        s = tl.where(kvalid[None, :], s, float("-inf"))
    return s


@triton.jit
def _store_rows(O, LSE, o_base, bh, SL, pos, valid, son, offs_d, dmask, acc, m_i, l_i, qk_scale, tslot, TEXT,
                TILE: tl.constexpr):
    """Normalise and store one query block's output rows and their LSE (base 2 of the scaled scores;
    row stride SL). TILE: for image rows (positions from TEXT on) the LSE's tile-major copy too, at
    ``tslot`` (``_tile_slots``)."""
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_base + pos[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=valid[:, None] & dmask[None, :])
    lse = m_i * qk_scale + tl.math.log2(l_safe)
    tl.store(LSE + bh.to(tl.int64) * SL + pos, lse, mask=valid)
    if TILE:
        tl.store(LSE + bh.to(tl.int64) * SL + tslot, lse, mask=valid & (pos >= TEXT))


@triton.jit
def _dense_pair_loop(q1, q2, acc1, m1, l1, acc2, m2, l2, end, K_ROWS, V_ROWS, k_base, v_base, skn, svn, b, h,
                     qk_scale, offs_d, dmask, BN: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                     UPCAST: tl.constexpr, TMA_LOADS: tl.constexpr, DENSE_WHOLE: tl.constexpr):
    """Keys 0..end (contiguous: the text, or every token) for two query blocks ``q1``, ``q2`` that
    share each loaded K/V chunk: both online-softmax states, updated."""
    for kstart in range(0, end, BN):
        kpos = kstart + tl.arange(0, BN)
        kvalid = kpos < end
        k, v = _load_rows(K_ROWS, V_ROWS, k_base, v_base, skn, svn, b, h, kstart, kpos, kvalid, offs_d, dmask,
                          BN, D_PAD, TMA_LOADS)
        partial = _partial_chunk(kstart, end, BN, DENSE_WHOLE)
        s1 = _dense_scores(q1, k, kvalid, partial, DOT_PREC, UPCAST)
        s2 = _dense_scores(q2, k, kvalid, partial, DOT_PREC, UPCAST)
        acc1, m1, l1 = _softmax_step(acc1, m1, l1, s1, v, qk_scale, DOT_PREC, UPCAST)
        acc2, m2, l2 = _softmax_step(acc2, m2, l2, s2, v, qk_scale, DOT_PREC, UPCAST)
    return acc1, m1, l1, acc2, m2, l2


@triton.jit
def _text_pair_block(Q, O, LSE, K_ROWS, V_ROWS, q_base, k_base, v_base, o_base, sqn, skn, svn, son,
                     b, h, bh, start, L, SL, TEXT, qk_scale, offs_d, dmask,
                     BM: tl.constexpr, BN: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                     UPCAST: tl.constexpr, TMA_LOADS: tl.constexpr, DENSE_WHOLE: tl.constexpr):
    """Text rows start.. start + 2·BM (every key), as two BM-row halves that share each loaded
    K/V chunk: half the key traffic of two BM-row programs."""
    pos1 = start + tl.arange(0, BM)
    pos2 = pos1 + BM
    valid1 = pos1 < TEXT
    valid2 = pos2 < TEXT
    q1 = tl.load(q_base + pos1[:, None] * sqn + offs_d[None, :], mask=valid1[:, None] & dmask[None, :], other=0.0)
    q2 = tl.load(q_base + pos2[:, None] * sqn + offs_d[None, :], mask=valid2[:, None] & dmask[None, :], other=0.0)
    m1, l1, acc1 = _softmax_init(BM, D_PAD)
    m2, l2, acc2 = _softmax_init(BM, D_PAD)
    acc1, m1, l1, acc2, m2, l2 = _dense_pair_loop(q1, q2, acc1, m1, l1, acc2, m2, l2, L, K_ROWS, V_ROWS, k_base, v_base,
                                                  skn, svn, b, h, qk_scale, offs_d, dmask, BN, D_PAD, DOT_PREC, UPCAST,
                                                  TMA_LOADS, DENSE_WHOLE)
    _store_rows(O, LSE, o_base, bh, SL, pos1, valid1, son, offs_d, dmask, acc1, m1, l1, qk_scale, 0, TEXT, False)
    _store_rows(O, LSE, o_base, bh, SL, pos2, valid2, son, offs_d, dmask, acc2, m2, l2, qk_scale, 0, TEXT, False)


@triton.jit
def _window_scores(q, k, full, kvalid, rp0, rp1, rp2, kp0, kp1, kp2, c0, c1, c2, kc0, kc1, kc2,
                   rf, TAB, CAP0, CAP1, W0, W1, W2, WT,
                   T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, MASK_MODE: tl.constexpr,
                   IS_3D: tl.constexpr, MASK_DOT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Scores q·kᵀ of one window chunk, -inf where the pair is outside the window or the key invalid
    (query tile c, key tile kc; see ``_mask_chunk``)."""
    s = _dot(q, tl.trans(k), None, DOT_PREC, UPCAST)
    return _mask_chunk(s, float("-inf"), full, kvalid, rp0, rp1, rp2, kp0, kp1, kp2, c0, c1, c2, kc0, kc1, kc2,
                       rf, TAB, CAP0, CAP1, W0, W1, W2, WT, T0, T1, T2, MASK_MODE, IS_3D, MASK_DOT)



@triton.jit
def _window_loop(q, acc, m_i, l_i, rf, rp0, rp1, rp2, c0, c1, c2, lo0, lo1, lo2, nr1, nj, n_iter,
                 K_GRID, V_GRID, k_base, v_base, skn, svn, b, h, G0, G1, G2, TEXT, TAB, CAP0, CAP1,
                 W0, W1, W2, WT, qk_scale, offs_d, dmask,
                 BN: tl.constexpr, D_PAD: tl.constexpr, CPT: tl.constexpr, WHOLE: tl.constexpr,
                 T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, MASK_MODE: tl.constexpr, IS_3D: tl.constexpr,
                 TILE_ORDER: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, WIN_STAGES: tl.constexpr,
                 MASK_DOT: tl.constexpr, TMA_LOADS: tl.constexpr):
    """The first ``n_iter`` chunks of the key-tile box (rows from lo0, lo1; ``nj`` columns from lo2;
    ``_chunk``) for the query block ``q`` of tile c (row coordinates rp, features rf): its online-softmax
    state, updated."""
    kc0, kc1, kc2, sc = lo0, lo1, lo2, lo0 * 0  # the first chunk (_next_chunk)
    for it in tl.range(0, n_iter, num_stages=WIN_STAGES):
        kpos, kvalid, kp0, kp1, kp2, full = _chunk(
            kc0, kc1, kc2, sc, G0, G1, G2, TEXT, BN, T0, T1, T2, TILE_ORDER, WHOLE)
        k, v = _load_chunk(K_GRID, V_GRID, k_base, v_base, skn, svn, b, h, sc, kc0, kc1, kc2, G1, kpos, kvalid,
                           offs_d, dmask, BN, T0, T1, T2, D_PAD, TMA_LOADS, TILE_ORDER)
        s = _window_scores(q, k, full, kvalid, rp0, rp1, rp2, kp0, kp1, kp2, c0, c1, c2, kc0, kc1, kc2, rf, TAB,
                           CAP0, CAP1, W0, W1, W2, WT, T0, T1, T2, MASK_MODE, IS_3D, MASK_DOT, DOT_PREC, UPCAST)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, qk_scale, DOT_PREC, UPCAST)
        kc0, kc1, kc2, sc = _next_chunk(kc0, kc1, kc2, sc, lo1, lo2, nr1, nj, CPT)
    return acc, m_i, l_i


@triton.jit
def _pair_scores(q, k, full, kvalid, rp0, rp1, rp2, kp0, kp1, kp2, c0, c1, c2, kc0, kc1, kc2, rf, cf, TAB, CAP0, CAP1,
                 W0, W1, W2, WT, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, MASK_MODE: tl.constexpr,
                 IS_3D: tl.constexpr, MASK_DOT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``_window_scores`` of one half of a tile pair (its tile c). With MASK_DOT the tensor-core
    circle test runs on the given column features ``cf``, computed once per chunk for both halves
    (``rf`` and ``cf`` share the first tile's origin)."""
    if MASK_DOT:
        s = _dot(q, tl.trans(k), None, DOT_PREC, UPCAST)
        if not _tiles_all_visible(c0, c1, c2, kc0, kc1, kc2, W0, W1, W2, WT, T0, T1, T2, MASK_MODE, IS_3D):
            s = _feature_mask(s, float("-inf"), full, kvalid, rf, cf)
        elif not full:
            s = tl.where(kvalid[None, :], s, float("-inf"))
    else:
        s = _window_scores(q, k, full, kvalid, rp0, rp1, rp2, kp0, kp1, kp2, c0, c1, c2, kc0, kc1, kc2, rf, TAB,
                           CAP0, CAP1, W0, W1, W2, WT, T0, T1, T2, MASK_MODE, IS_3D, MASK_DOT, DOT_PREC, UPCAST)
    return s


@triton.jit
def _image_pair_block(Q, O, LSE, TAB, K_ROWS, V_ROWS, K_GRID, V_GRID, q_base, k_base, v_base, o_base,
                      sqn, skn, svn, son, b, h, bh, rem, L, SL, TEXT,
                      G0, G1, G2, N0, N1, N2, R0, R1, R2, CAP0, CAP1, W0, W1, W2, WT, qk_scale, offs_d, dmask,
                      BM: tl.constexpr, BN: tl.constexpr, D_PAD: tl.constexpr,
                      T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, CPT: tl.constexpr, WHOLE: tl.constexpr,
                      MASK_MODE: tl.constexpr, IS_3D: tl.constexpr, TILE_ORDER: tl.constexpr,
                      DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, WIN_STAGES: tl.constexpr,
                      MASK_DOT: tl.constexpr, TMA_LOADS: tl.constexpr, TTP: tl.constexpr, DENSE_WHOLE: tl.constexpr):
    """Two neighbouring query tiles, (c0, c1, c2) and (c0, c1, c2 + 1) with c2 even (pair ``rem`` of
    head bh; BM = the tile volume), as two halves that share each loaded K/V chunk: the text keys
    and the key tiles both windows hold (every column but one per half: 2R₂ of 2R₂ + 1), so a pair
    loads 2R₂ + 2 columns of key tiles where two programs load 4R₂ + 2. The columns only one half
    sees (c2 − R₂ for the first, c2 + 1 + R₂ for the second) follow in their own loops. (A
    second half past the grid's last tile column would hold invalid rows, computed and never stored:
    ``_image_pairs`` pairs even column counts only.)"""
    np2 = (N2 + 1) // 2
    c2 = 2 * (rem % np2)
    c1 = (rem // np2) % N1
    c0 = rem // (np2 * N1)
    idx = tl.arange(0, BM)
    ap0, ap1, ap2, apos, avalid = _tile_tokens(c0, c1, c2, idx, G0, G1, G2, TEXT, T0, T1, T2, TILE_ORDER)
    bp0, bp1, bp2, bpos, bvalid = _tile_tokens(c0, c1, c2 + 1, idx, G0, G1, G2, TEXT, T0, T1, T2, TILE_ORDER)
    qa = tl.load(q_base + apos[:, None] * sqn + offs_d[None, :], mask=avalid[:, None] & dmask[None, :], other=0.0)
    qb = tl.load(q_base + bpos[:, None] * sqn + offs_d[None, :], mask=bvalid[:, None] & dmask[None, :], other=0.0)
    ma, la, acca = _softmax_init(BM, D_PAD)
    mb, lb, accb = _softmax_init(BM, D_PAD)
    rf = 0
    rf_b = 0
    if MASK_DOT:  # relative to the first tile's origin (the layout's ``mask_dot_pair``: exact)
        rf = _row_features(ap0, ap1, ap2, c0, c1, c2, W0, W1, W2, WT, T0, T1, T2, IS_3D)
        rf_b = _row_features(bp0, bp1, bp2, c0, c1, c2, W0, W1, W2, WT, T0, T1, T2, IS_3D)
    # 1) the text keys
    acca, ma, la, accb, mb, lb = _dense_pair_loop(qa, qb, acca, ma, la, accb, mb, lb, TEXT, K_ROWS, V_ROWS, k_base,
                                                  v_base, skn, svn, b, h, qk_scale, offs_d, dmask, BN, D_PAD,
                                                  DOT_PREC, UPCAST, TMA_LOADS, DENSE_WHOLE)
    # 2) the key-tile columns of both windows, c2 + 1 − R₂ .. c2 + R₂ (clipped to the grid)
    lo0, lo1, lo2, nr1, nj, n_win = _window_setup(c0, c1, c2, R0, R1, R2, N0, N1, N2, CPT)
    n_rows_chunks = n_win // nj  # key-tile rows × chunks per tile
    lo2 = tl.maximum(c2 + 1 - R2, 0)
    nj = tl.minimum(c2 + R2, N2 - 1) - lo2 + 1
    kc0, kc1, kc2, sc = lo0, lo1, lo2, lo0 * 0  # the first chunk (_next_chunk)
    for it in tl.range(0, n_rows_chunks * nj, num_stages=WIN_STAGES):
        kpos, kvalid, kp0, kp1, kp2, full = _chunk(
            kc0, kc1, kc2, sc, G0, G1, G2, TEXT, BN, T0, T1, T2, TILE_ORDER, WHOLE)
        k, v = _load_chunk(K_GRID, V_GRID, k_base, v_base, skn, svn, b, h, sc, kc0, kc1, kc2, G1, kpos, kvalid,
                           offs_d, dmask, BN, T0, T1, T2, D_PAD, TMA_LOADS, TILE_ORDER)
        cf = 0
        if MASK_DOT:  # one set of column features for both halves
            cf = _col_features(kp0, kp1, kp2, c0, c1, c2, T0, T1, T2, IS_3D)
        sa = _pair_scores(qa, k, full, kvalid, ap0, ap1, ap2, kp0, kp1, kp2, c0, c1, c2, kc0, kc1, kc2, rf, cf, TAB,
                          CAP0, CAP1, W0, W1, W2, WT, T0, T1, T2, MASK_MODE, IS_3D, MASK_DOT, DOT_PREC, UPCAST)
        acca, ma, la = _softmax_step(acca, ma, la, sa, v, qk_scale, DOT_PREC, UPCAST)
        sb = _pair_scores(qb, k, full, kvalid, bp0, bp1, bp2, kp0, kp1, kp2, c0, c1, c2 + 1, kc0, kc1, kc2, rf_b, cf,
                          TAB, CAP0, CAP1, W0, W1, W2, WT, T0, T1, T2, MASK_MODE, IS_3D, MASK_DOT, DOT_PREC, UPCAST)
        accb, mb, lb = _softmax_step(accb, mb, lb, sb, v, qk_scale, DOT_PREC, UPCAST)
        kc0, kc1, kc2, sc = _next_chunk(kc0, kc1, kc2, sc, lo1, lo2, nr1, nj, CPT)
    # 3) the column only the first half sees, then the one only the second half sees
    acca, ma, la = _window_loop(qa, acca, ma, la, rf, ap0, ap1, ap2, c0, c1, c2, lo0, lo1, c2 - R2, nr1, 1,
                                tl.where(c2 - R2 >= 0, n_rows_chunks, 0), K_GRID, V_GRID, k_base, v_base, skn, svn,
                                b, h, G0, G1, G2, TEXT, TAB, CAP0, CAP1, W0, W1, W2, WT, qk_scale, offs_d, dmask,
                                BN, D_PAD, CPT, WHOLE, T0, T1, T2, MASK_MODE, IS_3D, TILE_ORDER, DOT_PREC, UPCAST,
                                WIN_STAGES, MASK_DOT, TMA_LOADS)
    accb, mb, lb = _window_loop(qb, accb, mb, lb, rf, bp0, bp1, bp2, c0, c1, c2 + 1, lo0, lo1, c2 + 1 + R2, nr1, 1,
                                tl.where(c2 + 1 + R2 < N2, n_rows_chunks, 0), K_GRID, V_GRID, k_base, v_base, skn,
                                svn, b, h, G0, G1, G2, TEXT, TAB, CAP0, CAP1, W0, W1, W2, WT, qk_scale, offs_d, dmask,
                                BN, D_PAD, CPT, WHOLE, T0, T1, T2, MASK_MODE, IS_3D, TILE_ORDER, DOT_PREC, UPCAST,
                                WIN_STAGES, MASK_DOT, TMA_LOADS)
    tslot = _tile_slots((c0 * N1 + c1) * N2 + c2, 0, _first_slot(SL, N0, N1, N2, TTP), BM, TTP)  # the second's follow
    _store_rows(O, LSE, o_base, bh, SL, apos, avalid, son, offs_d, dmask, acca, ma, la, qk_scale, tslot, TEXT, True)
    _store_rows(O, LSE, o_base, bh, SL, bpos, bvalid, son, offs_d, dmask, accb, mb, lb, qk_scale, tslot + TTP, TEXT,
                True)


@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_kernel(
    Q, K, V, O, LSE, TAB, K_ROWS, V_ROWS, K_GRID, V_GRID,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, L, SL, TEXT, n_text_progs, NTB, n_img_per_bh, SUB,
    G0, G1, G2, N0, N1, N2, R0, R1, R2, CAP0, CAP1,
    W0, W1, W2, WT, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, CPT: tl.constexpr, WHOLE: tl.constexpr,
    MASK_MODE: tl.constexpr, IS_3D: tl.constexpr, TILE_ORDER: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, WIN_STAGES: tl.constexpr, MASK_DOT: tl.constexpr, TMA_LOADS: tl.constexpr,
    TEXT_PAIR: tl.constexpr, IMG_PAIR: tl.constexpr, TTP: tl.constexpr, DENSE_WHOLE: tl.constexpr,
):
    """One query block (BM text rows, or a slice of a query tile) against its keys, BN at a time.

    TMA_LOADS: K and V chunks arrive by TMA loads (``_load_rows``,
    ``_load_chunk``) through the descriptors K_ROWS / V_ROWS and K_GRID / V_GRID
    (``_load_descriptors``) instead of per-token address arithmetic. Rows past a partial tile's
    edge load other tokens or zeros; the chunk's validity mask removes them as it does on the
    pointer path.

    TEXT_PAIR: a text program owns 2·BM rows (``_text_pair_block``; NTB counts such pairs).
    IMG_PAIR: an image program owns two neighbouring tiles (``_image_pair_block``; BM = the tile
    volume, n_img_per_bh counts such pairs).

    WHOLE / DENSE_WHOLE: no window / dense chunk of the launch is partial (``_whole_chunks``,
    ``_dense_whole``): the loops compile without validity masks (as in the dQ and dK/dV kernels)."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < HEAD_DIM
    if IMG_PAIR:
        if pid >= n_text_progs:
            pid_img = pid - n_text_progs
            bh = pid_img // n_img_per_bh
            b = bh // H
            h = bh - b * H
            _image_pair_block(Q, O, LSE, TAB, K_ROWS, V_ROWS, K_GRID, V_GRID,
                              Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh,
                              K + b.to(tl.int64) * skb + h.to(tl.int64) * skh,
                              V + b.to(tl.int64) * svb + h.to(tl.int64) * svh,
                              O + b.to(tl.int64) * sob + h.to(tl.int64) * soh,
                              sqn, skn, svn, son, b, h, bh, pid_img - bh * n_img_per_bh, L, SL, TEXT,
                              G0, G1, G2, N0, N1, N2, R0, R1, R2, CAP0, CAP1, W0, W1, W2, WT, qk_scale, offs_d, dmask,
                              BM, BN, D_PAD, T0, T1, T2, CPT, WHOLE, MASK_MODE, IS_3D, TILE_ORDER, DOT_PREC, UPCAST,
                              WIN_STAGES, MASK_DOT, TMA_LOADS, TTP, DENSE_WHOLE)
            return
    is_text, bh, c0, c1, c2, qp0, qp1, qp2, qpos, qvalid, dense_end = _own_block(
        pid, n_text_progs, NTB, n_img_per_bh, SUB, N1, N2, G0, G1, G2, TEXT, L, BM, T0, T1, T2, TILE_ORDER)
    b = bh // H
    h = bh - b * H
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    o_base = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    if TEXT_PAIR:
        if is_text:
            _text_pair_block(Q, O, LSE, K_ROWS, V_ROWS, Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, k_base, v_base,
                             o_base, sqn, skn, svn, son, b, h, bh, (pid - bh * NTB) * (2 * BM), L, SL, TEXT, qk_scale,
                             offs_d, dmask, BM, BN, D_PAD, DOT_PREC, UPCAST, TMA_LOADS, DENSE_WHOLE)
            return
    qmask = qvalid[:, None] & dmask[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qpos[:, None] * sqn + offs_d[None, :],
                mask=qmask, other=0.0)
    m_i, l_i, acc = _softmax_init(BM, D_PAD)
    rf = 0
    if MASK_DOT:
        rf = _row_features(qp0, qp1, qp2, c0, c1, c2, W0, W1, W2, WT, T0, T1, T2, IS_3D)
    # 1) dense keys: the text keys (image queries) or every key (text queries)
    for start in range(0, dense_end, BN):
        kpos = start + tl.arange(0, BN)
        kvalid = kpos < dense_end
        k, v = _load_rows(K_ROWS, V_ROWS, k_base, v_base, skn, svn, b, h, start, kpos, kvalid, offs_d, dmask,
                          BN, D_PAD, TMA_LOADS)
        s = _dense_scores(q, k, kvalid, _partial_chunk(start, dense_end, BN, DENSE_WHOLE), DOT_PREC, UPCAST)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, qk_scale, DOT_PREC, UPCAST)
    # 2) the window: key tiles around the query tile (none for text queries)
    lo0, lo1, lo2, nr1, nj, n_win = _window_setup(c0, c1, c2, R0, R1, R2, N0, N1, N2, CPT)
    acc, m_i, l_i = _window_loop(q, acc, m_i, l_i, rf, qp0, qp1, qp2, c0, c1, c2, lo0, lo1, lo2, nr1, nj,
                                 tl.where(is_text, 0, n_win), K_GRID, V_GRID, k_base, v_base, skn, svn, b, h,
                                 G0, G1, G2, TEXT, TAB, CAP0, CAP1, W0, W1, W2, WT, qk_scale, offs_d, dmask,
                                 BN, D_PAD, CPT, WHOLE, T0, T1, T2, MASK_MODE, IS_3D, TILE_ORDER, DOT_PREC, UPCAST,
                                 WIN_STAGES, MASK_DOT, TMA_LOADS)
    _store_rows(O, LSE, o_base, bh, SL, qpos, qvalid, son, offs_d, dmask, acc, m_i, l_i, qk_scale,
                _own_tile_slots(pid, n_text_progs, n_img_per_bh, SUB, _first_slot(SL, N0, N1, N2, TTP), BM, TTP),
                TEXT, True)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=_NO_SPEC[:_NO_SPEC.index("N2") + 1])
def _delta_kernel(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, H, L, SL, TEXT, n_text_progs, NTB, n_img_per_bh, SUB,
                  G0, G1, G2, N0, N1, N2, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                  T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, TILE_ORDER: tl.constexpr, TTP: tl.constexpr,
                  TILE_COPY: tl.constexpr):
    """Δ = rowsum(dO ∘ O), stored in token order. TILE_COPY (the fused backward, which has no dQ
    kernel to do it): a program owns the rows of ``_own_block`` (grid: one axis, as the dQ kernel's)
    and also stores the image rows' Δ in their tile-major slots (``_stats``: the dK/dV kernel's
    window loop reads them). Else BLOCK contiguous rows of one (b, h) (grid: row blocks × B·H):
    whole runs of memory (PixArt's 144-byte rows of head dim 72: split backward 7.64 ms against 7.77
    with tile blocks, 23rd session, ``benchmarks/results/ab_delta_pixart_23rd.json``)."""
    offs_d = tl.arange(0, D_PAD)
    if TILE_COPY:
        pid = tl.program_id(0)
        _, bh, _, _, _, _, _, _, rows, valid, _ = _own_block(
            pid, n_text_progs, NTB, n_img_per_bh, SUB, N1, N2, G0, G1, G2, TEXT, L, BLOCK, T0, T1, T2, TILE_ORDER)
    else:
        bh = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = rows < L
    b = bh // H
    h = bh - b * H
    mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None] * son + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + rows[:, None] * sdn + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    delta_bh = DELTA + bh.to(tl.int64) * SL
    tl.store(delta_bh + rows, delta, mask=valid)
    if TILE_COPY:
        slots = _own_tile_slots(pid, n_text_progs, n_img_per_bh, SUB, _first_slot(SL, N0, N1, N2, TTP), BLOCK, TTP)
        tl.store(delta_bh + slots, delta, mask=valid & (rows >= TEXT))  # image rows


@triton.jit
def _dq_share(dsT, k, sm_scale, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One block pair's share of dQ, (dSᵀ)ᵀ K · scale: [BM, D_PAD] fp32 (fused-dQ backward). Invalid
    key rows hold k = 0 and invalid query rows dS = 0, so both add nothing."""
    return _dot(tl.trans(dsT).to(k.dtype), k, None, DOT_PREC, UPCAST) * sm_scale


@triton.jit
def _early_dp(a, b, like, EARLY: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a·bᵀ (dP = dO Vᵀ in dQ, dPᵀ = V dOᵀ in dK/dV) issued right after the scores ``like`` when
    EARLY: Triton waits for it at once, right after the scores' wait, so the exponentials, the mask
    and dS run as one stretch. Else zeros of its shape, a placeholder that ``_late_dp`` (or
    ``_dv_and_dpT``) replaces: dead code once compiled."""
    if EARLY:
        dp = _dot(a, tl.trans(b), None, DOT_PREC, UPCAST)
    else:
        dp = tl.zeros_like(like)
    return dp


@triton.jit
def _late_dp(a, b, dp, EARLY: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a·bᵀ where ``_early_dp`` did not issue it (after the exponentials), else ``dp`` as it is."""
    if not EARLY:
        dp = _dot(a, tl.trans(b), None, DOT_PREC, UPCAST)
    return dp


@triton.jit
def _dv_and_dpT(pT, v, do, dv, dpT, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, DPT_ORDER: tl.constexpr):
    """dV += Pᵀ dO and dPᵀ = V dOᵀ of one block pair. Triton waits for a dot that is not a loop
    accumulator right after issuing it, and that wait covers every dot issued before. DPT_ORDER 0:
    the dV dot, then dPᵀ (whose wait covers both); 1: dPᵀ first, so the dV dot runs while dSᵀ is
    computed; 2: dPᵀ was issued right after Sᵀ (``_early_dp``: no wait between the exponentials
    and dSᵀ), so the dV dot runs while dSᵀ is computed."""
    if DPT_ORDER == 1:
        dpT = _dot(v, tl.trans(do), None, DOT_PREC, UPCAST)
        dv = _dot(pT.to(do.dtype), do, dv, DOT_PREC, UPCAST)
    elif DPT_ORDER == 2:
        dv = _dot(pT.to(do.dtype), do, dv, DOT_PREC, UPCAST)
    else:
        dv = _dot(pT.to(do.dtype), do, dv, DOT_PREC, UPCAST)
        dpT = _dot(v, tl.trans(do), None, DOT_PREC, UPCAST)
    return dv, dpT


@triton.jit
def _query_stats(LSE_ROWS, DELTA_ROWS, lse_row, delta_row, bh, first, cols, valid, BM: tl.constexpr,
                 BY_TMA: tl.constexpr, MASKED: tl.constexpr):
    """[BM] LSE and Δ of a query chunk (dK/dV): with BY_TMA the run of BM values from column ``first``
    of row ``bh`` (``LSE_ROWS`` / ``DELTA_ROWS``, ``_stats_descriptors``), else columns ``cols`` of
    ``lse_row`` / ``delta_row`` by pointers; MASKED: invalid rows read LSE +inf and Δ 0, so their P
    and dS are 0."""
    if BY_TMA:
        lse = tl.reshape(LSE_ROWS.load([bh, first]), [BM])
        delta = tl.reshape(DELTA_ROWS.load([bh, first]), [BM])
    elif MASKED:
        lse = tl.load(lse_row + cols, mask=valid, other=float("inf"))
        delta = tl.load(delta_row + cols, mask=valid, other=0.0)
    else:
        lse = tl.load(lse_row + cols)
        delta = tl.load(delta_row + cols)
    return lse, delta


@triton.jit(do_not_specialize=_NO_SPEC)
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, DQ_ROWS, DQ_GRID, TAB, Q_ROWS, DO_ROWS, Q_GRID, DO_GRID, LSE_ROWS, DELTA_ROWS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
    H, L, SL, TEXT, n_text_progs, NTB, n_img_per_bh, SUB,
    G0, G1, G2, N0, N1, N2, R0, R1, R2, CAP0, CAP1,
    W0, W1, W2, WT, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, CPT: tl.constexpr, WHOLE: tl.constexpr,
    MASK_MODE: tl.constexpr, IS_3D: tl.constexpr, TILE_ORDER: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, WIN_STAGES: tl.constexpr, MASK_DOT: tl.constexpr,
    FUSE_DQ: tl.constexpr, DQ_TMA: tl.constexpr, TMA_LOADS: tl.constexpr, DPT_ORDER: tl.constexpr,
    DIV_CHUNKS: tl.constexpr, TTP: tl.constexpr, STATS_TMA: tl.constexpr, DENSE_WHOLE: tl.constexpr,
):
    """One key block (BN text keys, or a slice of a key tile); loops over the query chunks (BM)
    that see it: text keys are seen by every query, image keys by the text queries and by the
    window (symmetric) around their tile.

    FUSE_DQ: also add this block's share of dQ (dS·K · scale) into DQ, an fp32 [B·H, L, D_PAD]
    buffer in the inputs' token order: by per-element atomics, or with DQ_TMA (row-major tokens
    only) by TMA reductions, issued asynchronously by the TMA unit, through the descriptors
    DQ_ROWS ([B·H, L, D_PAD], box [1, BM, D_PAD]: the dense loop's contiguous query rows) and
    DQ_GRID (the grid after the text, [B·H, G0, G1, G2, D_PAD], box [1, 1, BM/T2, T2, D_PAD]: a
    window chunk is BM/T2 full rows of its tile).

    TMA_LOADS: Q and dO chunks arrive by TMA loads, as K and V do in the forward.

    DIV_CHUNKS: the window loop derives each chunk from the iteration count (``_chunk_at``) instead of
    stepping loop-carried counters (``_next_chunk``).

    The window loop loads its query chunks' LSE and Δ from their tile-major copies (``_stats``:
    written by the forward and by the dQ kernel or ``_delta_kernel``, the slots of invalid tokens
    hold LSE +inf and Δ 0) as one contiguous, unmasked run: no per-token validity predicates.

    STATS_TMA (with TMA_LOADS): those runs, and the dense loop's where its chunks are
    whole (DENSE_WHOLE), arrive by TMA loads too (``LSE_ROWS`` / ``DELTA_ROWS``: [B·H, SL], box [1, BM],
    ``_stats_descriptors``). Loaded by pointers, Triton 3.6 issued each thread's 16 values of
    each as separate 4-byte ``cp.async`` copies with their 64-bit addresses, and spilled.

    WHOLE / DENSE_WHOLE: no window / dense chunk of the launch is partial (``_whole_chunks``,
    ``_dense_whole``), so the loops compile without validity masks."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < HEAD_DIM
    is_text, bh, c0, c1, c2, kp0, kp1, kp2, kpos, kvalid, dense_end = _own_block(
        pid, n_text_progs, NTB, n_img_per_bh, SUB, N1, N2, G0, G1, G2, TEXT, L, BN, T0, T1, T2, TILE_ORDER)
    b = bh // H
    h = bh - b * H
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    dq_bh = DQ + bh.to(tl.int64) * L * D_PAD
    LSE_bh = LSE + bh.to(tl.int64) * SL
    DELTA_bh = DELTA + bh.to(tl.int64) * SL
    slot0 = _first_slot(SL, N0, N1, N2, TTP)
    kmask = kvalid[:, None] & dmask[None, :]
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + kpos[:, None] * skn + offs_d[None, :],
                mask=kmask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + kpos[:, None] * svn + offs_d[None, :],
                mask=kmask, other=0.0)
    dk = tl.zeros([BN, D_PAD], tl.float32)
    dv = tl.zeros([BN, D_PAD], tl.float32)
    rf = 0
    if MASK_DOT:
        rf = _row_features(kp0, kp1, kp2, c0, c1, c2, W0, W1, W2, WT, T0, T1, T2, IS_3D)
    # 1) dense queries: the text queries (image keys) or every query (text keys)
    for start in range(0, dense_end, BM):
        qpos = start + tl.arange(0, BM)
        qvalid = qpos < dense_end
        lmask = qvalid[:, None] & dmask[None, :]
        # with TMA, rows past dense_end hold other tokens or zeros: their LSE loads as +inf (P = 0)
        q, do = _load_rows(Q_ROWS, DO_ROWS, q_base, do_base, sqn, sdn, b, h, start, qpos, qvalid, offs_d, dmask,
                           BM, D_PAD, TMA_LOADS)
        # whole chunks by TMA (every row valid); else rows past dense_end read LSE +inf, Δ 0
        lse, delta = _query_stats(LSE_ROWS, DELTA_ROWS, LSE_bh, DELTA_bh, bh, start, qpos, qvalid, BM,
                                  STATS_TMA and DENSE_WHOLE, True)
        qkT = _dot(k, tl.trans(q), None, DOT_PREC, UPCAST)
        dpT = _early_dp(v, do, qkT, DPT_ORDER == 2, DOT_PREC, UPCAST)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        dv, dpT = _dv_and_dpT(pT, v, do, dv, dpT, DOT_PREC, UPCAST, DPT_ORDER)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, DOT_PREC, UPCAST)
        if FUSE_DQ:
            share = _dq_share(dsT, k, sm_scale, DOT_PREC, UPCAST)
            if DQ_TMA:
                DQ_ROWS.atomic_add([bh, start, 0], tl.reshape(share, [1, BM, D_PAD]))
            else:
                tl.atomic_add(dq_bh + qpos[:, None] * D_PAD + offs_d[None, :], share, mask=lmask, sem="relaxed")
    # 2) the window (symmetric): query tiles around the key tile (none for text keys)
    lo0, lo1, lo2, nr1, nj, n_win = _window_setup(c0, c1, c2, R0, R1, R2, N0, N1, N2, CPT)
    n_win = tl.where(is_text, 0, n_win)
    qc0, qc1, qc2, sc = lo0, lo1, lo2, lo0 * 0  # the first chunk (_next_chunk)
    for it in tl.range(0, n_win, num_stages=WIN_STAGES):
        if DIV_CHUNKS:
            qc0, qc1, qc2, sc = _chunk_at(it, lo0, lo1, lo2, nr1, nj, CPT)
        qpos, qvalid, qp0, qp1, qp2, full = _chunk(
            qc0, qc1, qc2, sc, G0, G1, G2, TEXT, BM, T0, T1, T2, TILE_ORDER, WHOLE)
        lmask = qvalid[:, None] & dmask[None, :]
        q, do = _load_chunk(Q_GRID, DO_GRID, q_base, do_base, sqn, sdn, b, h, sc, qc0, qc1, qc2, G1, qpos, qvalid,
                            offs_d, dmask, BM, T0, T1, T2, D_PAD, TMA_LOADS, TILE_ORDER)
        # the chunk's tile-major run: unmasked (invalid tokens' slots hold +inf / 0)
        first = _tile_slot((qc0 * N1 + qc1) * N2 + qc2, sc * BM, slot0, TTP)
        lse, delta = _query_stats(LSE_ROWS, DELTA_ROWS, LSE_bh, DELTA_bh, bh, first,
                                  first + tl.arange(0, BM), qvalid, BM, STATS_TMA, False)
        qkT = _dot(k, tl.trans(q), None, DOT_PREC, UPCAST)
        dpT = _early_dp(v, do, qkT, DPT_ORDER == 2, DOT_PREC, UPCAST)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        # invalid queries need no validity mask (their LSE loads as +inf, so pT is already 0): full=True
        pT = _mask_chunk(pT, 0.0, True, qvalid, kp0, kp1, kp2, qp0, qp1, qp2, c0, c1, c2, qc0, qc1, qc2,
                         rf, TAB, CAP0, CAP1, W0, W1, W2, WT, T0, T1, T2, MASK_MODE, IS_3D, MASK_DOT)
        dv, dpT = _dv_and_dpT(pT, v, do, dv, dpT, DOT_PREC, UPCAST, DPT_ORDER)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, DOT_PREC, UPCAST)
        if FUSE_DQ:
            share = _dq_share(dsT, k, sm_scale, DOT_PREC, UPCAST)
            if DQ_TMA:  # the chunk's first token: full tile rows, so the box starts at column qc2·T2
                first = sc * BM
                DQ_GRID.atomic_add([bh, qc0 * T0 + first // (T1 * T2), qc1 * T1 + (first // T2) % T1, qc2 * T2, 0],
                                   tl.reshape(share, [1, 1, BM // T2, T2, D_PAD]))
            else:
                tl.atomic_add(dq_bh + qpos[:, None] * D_PAD + offs_d[None, :], share, mask=lmask, sem="relaxed")
        if not DIV_CHUNKS:
            qc0, qc1, qc2, sc = _next_chunk(qc0, qc1, qc2, sc, lo1, lo2, nr1, nj, CPT)
    g_off = b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + kpos[:, None] * sgn + offs_d[None, :]
    tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, TAB, K_ROWS, V_ROWS, K_GRID, V_GRID,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdb, sdh, sdn, sgb, sgh, sgn,
    H, L, SL, TEXT, n_text_progs, NTB, n_img_per_bh, SUB,
    G0, G1, G2, N0, N1, N2, R0, R1, R2, CAP0, CAP1,
    W0, W1, W2, WT, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, CPT: tl.constexpr, WHOLE: tl.constexpr,
    MASK_MODE: tl.constexpr, IS_3D: tl.constexpr, TILE_ORDER: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, WIN_STAGES: tl.constexpr, MASK_DOT: tl.constexpr, TMA_LOADS: tl.constexpr,
    DELTA_HERE: tl.constexpr, DP_EARLY: tl.constexpr, MASK_SCORES: tl.constexpr, TTP: tl.constexpr,
    DENSE_WHOLE: tl.constexpr,
):
    """dQ of one query block: the forward's loop with P recomputed from the saved LSE (and, with
    TMA_LOADS, the forward's TMA loads of K and V).

    DELTA_HERE: the program also computes its rows' Δ = rowsum(dO ∘ O) and stores it in DELTA for
    the dK/dV kernel launched after it (every row belongs to one program), instead of reading the
    Δ of a separate pass (``_delta_kernel``). Either way an image program stores its rows' Δ in
    the tile-major copy too (``_stats``: the dK/dV kernel's window loop reads it).

    DP_EARLY: dP is issued right after the scores (``_early_dp``).
    MASK_SCORES: the window mask sets the scores to -inf before the exponentials instead of P to 0
    after them (the same P), so a circle's tensor-core test and its wait come right after the
    scores' and dP's. (In dK/dV the H200 measured that order slower: 20th session.)"""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < HEAD_DIM
    is_text, bh, c0, c1, c2, qp0, qp1, qp2, qpos, qvalid, dense_end = _own_block(
        pid, n_text_progs, NTB, n_img_per_bh, SUB, N1, N2, G0, G1, G2, TEXT, L, BM, T0, T1, T2, TILE_ORDER)
    b = bh // H
    h = bh - b * H
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    qmask = qvalid[:, None] & dmask[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qpos[:, None] * sqn + offs_d[None, :],
                mask=qmask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + qpos[:, None] * sdn + offs_d[None, :],
                 mask=qmask, other=0.0)
    if DELTA_HERE:
        o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + qpos[:, None] * son + offs_d[None, :],
                    mask=qmask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh.to(tl.int64) * SL + qpos, delta, mask=qvalid)
    else:
        delta = tl.load(DELTA + bh.to(tl.int64) * SL + qpos, mask=qvalid, other=0.0)
    slot0 = _first_slot(SL, N0, N1, N2, TTP)
    tl.store(DELTA + bh.to(tl.int64) * SL + _own_tile_slots(pid, n_text_progs, n_img_per_bh, SUB, slot0, BM, TTP), delta,
             mask=qvalid & (qpos >= TEXT))  # image rows
    lse = tl.load(LSE + bh.to(tl.int64) * SL + qpos, mask=qvalid, other=0.0)
    dq = tl.zeros([BM, D_PAD], tl.float32)
    rf = 0
    if MASK_DOT:
        rf = _row_features(qp0, qp1, qp2, c0, c1, c2, W0, W1, W2, WT, T0, T1, T2, IS_3D)
    # 1) dense keys
    for start in range(0, dense_end, BN):
        kpos = start + tl.arange(0, BN)
        kvalid = kpos < dense_end
        k, v = _load_rows(K_ROWS, V_ROWS, k_base, v_base, skn, svn, b, h, start, kpos, kvalid, offs_d, dmask,
                          BN, D_PAD, TMA_LOADS)
        qk = _dot(q, tl.trans(k), None, DOT_PREC, UPCAST)
        dp = _early_dp(do, v, qk, DP_EARLY, DOT_PREC, UPCAST)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if _partial_chunk(start, dense_end, BN, DENSE_WHOLE):
            p = tl.where(kvalid[None, :], p, 0.0)
        dp = _late_dp(do, v, dp, DP_EARLY, DOT_PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC, UPCAST)
    # 2) the window
    lo0, lo1, lo2, nr1, nj, n_win = _window_setup(c0, c1, c2, R0, R1, R2, N0, N1, N2, CPT)
    n_win = tl.where(is_text, 0, n_win)
    kc0, kc1, kc2, sc = lo0, lo1, lo2, lo0 * 0  # the first chunk (_next_chunk)
    for it in tl.range(0, n_win, num_stages=WIN_STAGES):
        kpos, kvalid, kp0, kp1, kp2, full = _chunk(
            kc0, kc1, kc2, sc, G0, G1, G2, TEXT, BN, T0, T1, T2, TILE_ORDER, WHOLE)
        k, v = _load_chunk(K_GRID, V_GRID, k_base, v_base, skn, svn, b, h, sc, kc0, kc1, kc2, G1, kpos, kvalid,
                           offs_d, dmask, BN, T0, T1, T2, D_PAD, TMA_LOADS, TILE_ORDER)
        qk = _dot(q, tl.trans(k), None, DOT_PREC, UPCAST)
        dp = _early_dp(do, v, qk, DP_EARLY, DOT_PREC, UPCAST)
        if MASK_SCORES:
            qk = _mask_chunk(qk, float("-inf"), full, kvalid, qp0, qp1, qp2, kp0, kp1, kp2, c0, c1, c2, kc0, kc1, kc2,
                             rf, TAB, CAP0, CAP1, W0, W1, W2, WT, T0, T1, T2, MASK_MODE, IS_3D, MASK_DOT)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if not MASK_SCORES:
            p = _mask_chunk(p, 0.0, full, kvalid, qp0, qp1, qp2, kp0, kp1, kp2, c0, c1, c2, kc0, kc1, kc2,
                            rf, TAB, CAP0, CAP1, W0, W1, W2, WT, T0, T1, T2, MASK_MODE, IS_3D, MASK_DOT)
        dp = _late_dp(do, v, dp, DP_EARLY, DOT_PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC, UPCAST)
        kc0, kc1, kc2, sc = _next_chunk(kc0, kc1, kc2, sc, lo1, lo2, nr1, nj, CPT)
    tl.store(DQ + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + qpos[:, None] * sgn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)


# ----------------------------------------------------------------------------- host side


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# every output buffer is allocated here; tests replace it with a NaN-filling allocator
_ALLOC = torch.empty


def _new(shape, dtype, device) -> torch.Tensor:
    return _ALLOC(shape, dtype=dtype, device=device)


def _stats_row(layout: LocalLayout, L: int) -> tuple[int, int]:
    """(SL, TTP) of the LSE and Δ buffers (``_stats``): a (b, h) row holds the L tokens' values in
    token order, then one slot of TTP values per image tile, tile-major (TTP ≥ every block's span
    of a tile: the tile volume rounded up to a power of two, at least 16) from column L rounded up
    to 16 on, so that SL and every slot start are multiples of 16 values (``_tile_slot``; TMA
    loads of a run need 16-byte aligned rows and starts)."""
    ttp = max(16, _pow2(layout.tile_volume))
    return -(-L // 16) * 16 + layout.num_tiles * ttp, ttp


def _stats(B: int, H: int, L: int, layout: LocalLayout, fill: float, device) -> torch.Tensor:
    """(B, H, SL) fp32: the LSE (``fill`` +inf) or Δ (0) of every token, in token order (columns
    < L), and their tile-major copies, whose slots of tokens past the grid's edge keep ``fill``: the
    dK/dV kernel's window loop loads a query chunk's values as one unmasked run."""
    sl, _ = _stats_row(layout, L)
    stats = _new((B, H, sl), torch.float32, device)
    stats[..., L:] = fill  # (the columns between L and the first slot are never read)
    return stats


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"local_attention_triton expects q, k, v of one shape (B, H, L, D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"local_attention_triton supports float16, bfloat16 and float32 (all three alike); got "
            f"{q.dtype}, {k.dtype}, {v.dtype}. Use backend='torch' for other dtypes."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda":
        if not (q.device.type == "cpu" and triton_interpreter_enabled()):
            raise RuntimeError(
                f"local_attention_triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                f"got {q.device}. Use backend='torch'."
            )
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported by the Triton local kernel (1..{MAX_HEAD_DIM}); "
                         "use backend='torch'")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[2] * max(t.stride(2), 1) >= 2**31:
            raise ValueError(f"{name}: token offsets overflow int32 (L={t.shape[2]}, stride {t.stride(2)})")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _blocks(kind: str, q: torch.Tensor, d_pad: int, layout: LocalLayout):
    """(BM, BN, config): blocks no larger than the tile (rounded up to a power of two)."""
    cfg = local_config(kind, q.dtype, d_pad, layout.tile_volume, head_dim=q.shape[-1], circle_dot=layout.mask_dot,
                       window_mask=layout.mask_mode != MASK_NONE)
    cap = max(16, _pow2(layout.tile_volume))
    return min(cfg["BM"], cap), min(cfg["BN"], cap), cfg


def _tile_constexprs(layout: LocalLayout, window_block: int) -> dict:
    """The tile's constexprs of a launch whose window loops walk chunks of ``window_block`` tokens:
    T0..T2, CPT (chunks per tile) and WHOLE (``_whole_chunks``)."""
    t0, t1, t2 = layout.tile
    return {"T0": t0, "T1": t1, "T2": t2, "CPT": -(-layout.tile_volume // window_block),
            "WHOLE": _whole_chunks(layout, window_block)}


def _whole_chunks(layout: LocalLayout, block: int) -> bool:
    """Every window chunk of ``block`` tokens is whole: the tiles divide the grid (no partial edge
    tile) and the block divides the tile volume (no slice past a tile's end). Then no chunk needs
    a validity mask, and the kernels compile without one (on the H200 a tile window's dQ loop
    carried ~150 instructions per iteration of per-token validity arithmetic and selects)."""
    return all(g % t == 0 for g, t in zip(layout.grid, layout.tile)) and layout.tile_volume % block == 0


def _launch_options(cfg: dict) -> dict:
    """Triton launch options of a config: warps, pipeline stages and, where set, a register cap
    (``maxnreg``: fewer registers per thread let more programs share an SM)."""
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg.get("maxnreg"):
        opts["maxnreg"] = cfg["maxnreg"]
    return opts


def _dense_whole(text_len: int, L: int, block: int) -> bool:
    """DENSE_WHOLE of a launch whose dense loops walk ``block``-token chunks: both dense ends (the
    text for image rows, every token for text rows) are multiples of ``block``, so no dense chunk
    needs a mask (``_partial_chunk``). (A config may turn it off, ``"dense_whole"``.)"""
    return text_len % block == 0 and L % block == 0


def _kernel_args(layout: LocalLayout):
    g0, g1, g2 = layout.grid
    t0, t1, t2 = layout.tile
    n0, n1, n2 = layout.n_tiles
    r0, r1, r2 = layout.radius
    w0, w1, w2, wt = layout.weights
    return [g0, g1, g2, n0, n1, n2, r0, r1, r2, layout.cap0, layout.cap1, w0, w1, w2, wt]


def _mask_flags(cfg: dict, layout: LocalLayout) -> dict:
    """MASK_DOT of a launch: the config asks for the tensor-core circle test and the layout allows it."""
    return {"MASK_DOT": bool(cfg.get("mask_dot", False)) and layout.mask_dot}


def _table(layout: LocalLayout, device) -> torch.Tensor:
    if layout.table is not None:
        return layout.table
    return torch.zeros(1, dtype=torch.int32, device=device)  # unused placeholder


def _window_stages(layout: LocalLayout):
    """``num_stages`` of the window loop: None (the launch's) except in table mode, whose per-token
    table gather the software pipeliner would otherwise turn into BM×BN 4-byte ``cp.async`` copies
    into multi-buffered shared memory (≈ 224 KB at 128×128 blocks, and a conditional-use
    pattern of the kind the pipeliner has mis-scheduled before). The gather is served from L1."""
    return 1 if layout.mask_mode == MASK_TABLE else None


def _strides(t: torch.Tensor):
    return [t.stride(0), t.stride(1), t.stride(2)]


def _forward(q, k, v, layout: LocalLayout, text_len: int, tile_order: bool):
    B, H, L, D = q.shape
    d_pad = max(16, _pow2(D))
    BM, BN, cfg = _blocks("fwd", q, d_pad, layout)
    # token-major memory seen heads-first: the processors' (B, H, L, D) -> (B, L, H·D) is then free
    o = _new((B, L, H, D), q.dtype, q.device).transpose(1, 2)
    lse = _stats(B, H, L, layout, float("inf"), q.device)
    sl, ttp = _stats_row(layout, L)
    sub = -(-layout.tile_volume // BM)
    text_pair = bool(cfg.get("text_pair", False))
    img_pair = _image_pairs(cfg, layout, sub)
    ntb = -(-text_len // (2 * BM if text_pair else BM))
    ntb_arg = max(ntb, 1)  # divisor in the kernel even without text
    n_text_progs = ntb * B * H
    n_img = layout.num_tiles // 2 if img_pair else layout.num_tiles * sub  # pairs: an even tile-column count
    grid = (n_text_progs + n_img * B * H,)
    tma_loads, descriptors = _tma_loads(cfg, (k, v), text_len, layout, BN, tile_order)
    _fwd_kernel[grid](
        q, k, v, o, lse, _table(layout, q.device), *descriptors,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, L, sl, text_len, n_text_progs, ntb_arg, n_img, sub,
        *_kernel_args(layout), LOG2E / math.sqrt(D),
        HEAD_DIM=D, D_PAD=d_pad, BM=BM, BN=BN, **_tile_constexprs(layout, BN),
        MASK_MODE=layout.mask_mode, IS_3D=layout.ndim == 3,
        TILE_ORDER=tile_order, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.device.type != "cuda" and q.dtype == torch.bfloat16,
        WIN_STAGES=_window_stages(layout), **_mask_flags(cfg, layout), TMA_LOADS=tma_loads,
        TEXT_PAIR=text_pair, IMG_PAIR=img_pair, TTP=ttp, DENSE_WHOLE=_dense_whole(text_len, L, BN),
        **_launch_options(cfg),
    )
    return o, lse


def _image_pairs(cfg: dict, layout: LocalLayout, sub: int) -> bool:
    """IMG_PAIR of a forward launch: the config asks for it (``"img_pair"``), a query block is a
    whole tile (``sub == 1``), the tile columns pair up (an even count: with an odd one the last
    program's second half is wasted work, Wan 480p's 7 columns 1.489 -> 1.556 ms on the H200), and
    a tensor-core circle test stays exact with the pair's shared feature origin (``mask_dot_pair``)."""
    exact = layout.mask_dot_pair or not _mask_flags(cfg, layout)["MASK_DOT"]
    return bool(cfg.get("img_pair", False)) and sub == 1 and layout.n_tiles[2] % 2 == 0 and exact


def _chunk_is_box(layout: LocalLayout, block: int) -> bool:
    """Every window chunk of ``block`` tokens is whole rows of one tile plane (block/T2 rows of T2
    tokens, powers of two: Triton's block shapes), so one box of the grid."""
    _, t1, t2 = layout.tile
    rows = block // t2
    return block % t2 == 0 and rows <= t1 and t1 % rows == 0 and _pow2(rows) == rows and _pow2(t2) == t2


def _chunk_is_run(layout: LocalLayout, block: int) -> bool:
    """On tile-ordered tokens, every window chunk of ``block`` tokens is one contiguous run of one
    tile: whole tiles only (a partial edge tile is stored compacted) and ``block`` dividing the
    tile volume."""
    whole = all(g % t == 0 for g, t in zip(layout.grid, layout.tile))
    return whole and block <= layout.tile_volume and layout.tile_volume % block == 0


def _tma_loads_allowed(cfg: dict, tensors, layout: LocalLayout, block: int, tile_order: bool) -> bool:
    """A kernel loads the ``tensors`` its loops walk (K, V; or Q, dO) by TMA: the config asks for
    it (``"tma_loads"``), every window chunk of ``block`` tokens is one box (row-major tokens) or one
    run (tile order, ``_chunk_is_run``), and the launch is compiled for Hopper or later with 16-bit inputs whose strides and base
    addresses are 16-byte aligned (TMA's rules), or runs in the CPU interpreter (the tests)."""
    chunk_ok = _chunk_is_run(layout, block) if tile_order else _chunk_is_box(layout, block)
    if not (cfg.get("tma_loads", False) and chunk_ok):
        return False
    first = tensors[0]
    if first.device.type == "cpu":  # the interpreter runs descriptor loads as masked gathers
        return triton_interpreter_enabled()
    aligned = all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:3])
                  for t in tensors)
    return (aligned and first.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(first.device)[0] >= 9)


def _tma_loads(cfg: dict, tensors, text_len: int, layout: LocalLayout, block: int, tile_order: bool):
    """(TMA_LOADS, its four descriptor arguments) of a launch: ``_load_descriptors`` where
    ``_tma_loads_allowed``, else None placeholders (the kernel's pointer path)."""
    if not _tma_loads_allowed(cfg, tensors, layout, block, tile_order):
        return False, (None,) * 4
    return True, _load_descriptors(tensors, text_len, layout, block, tile_order)


def _load_descriptors(tensors, text_len: int, layout: LocalLayout, block: int, tile_order: bool = False) -> list:
    """TMA load descriptors of each (B, H, L, D) tensor: first its rows [B, H, L, D] (box
    [1, 1, block, D_PAD]), then its grid after the text [B, H, G0·G1, G2, D] (box
    [1, 1, block/T2, T2, D_PAD]), or for tile-ordered tokens its tiles [B, H, N0·N1, N2·TV, D]
    (box [1, 1, 1, block, D_PAD]). Padded head-dim columns arrive as zeros."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, L, D = tensors[0].shape
    d_pad = max(16, _pow2(D))
    g0, g1, g2 = layout.grid
    t2 = layout.tile[2]
    rows, grids = [], []
    for t in tensors:
        sb, sh, sn, _ = t.stride()
        rows.append(TensorDescriptor(t, [B, H, L, D], [sb, sh, sn, 1], [1, 1, block, d_pad]))
        if tile_order:
            n0, n1, n2 = layout.n_tiles
            run = n2 * layout.tile_volume
            grids.append(TensorDescriptor(t[:, :, text_len:], [B, H, n0 * n1, run, D], [sb, sh, run * sn, sn, 1],
                                          [1, 1, 1, block, d_pad]))
        else:
            grids.append(TensorDescriptor(t[:, :, text_len:], [B, H, g0 * g1, g2, D], [sb, sh, g2 * sn, sn, 1],
                                          [1, 1, block // t2, t2, d_pad]))
    return rows + grids


def _stats_tma_allowed(cfg: dict, tma_loads: bool, block_m: int) -> bool:
    """The dK/dV kernel loads its LSE and Δ runs by TMA: where Q and dO come so, unless the config
    says ``"stats_tma": False``, and only in runs of at least 32 values (128-byte boxes). With 16
    (64-byte boxes) Triton 3.6 compiled a misaligned shared-memory read at padded head dims (72, 80,
    96; H200, 27th session: compute-sanitizer, "misaligned shared address" at the stats load); no
    default config uses such small blocks."""
    return tma_loads and bool(cfg.get("stats_tma", True)) and block_m >= 32


def _stats_descriptors(stats, block: int) -> list:
    """TMA load descriptors of (B, H, SL) fp32 stats buffers (``_stats``: LSE, Δ) as [B·H, SL] rows,
    box [1, block]: one run of ``block`` values (token order, or a tile-major slot)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return [TensorDescriptor(t, [t.shape[0] * t.shape[1], t.shape[2]], [t.shape[2], 1], [1, block]) for t in stats]


def _dq_tma_allowed(cfg: dict, layout: LocalLayout, block_m: int, device: torch.device, tile_order: bool) -> bool:
    """The fused backward adds dQ by TMA reductions: the config asks for it (``"dq_tma"``), the
    device is a compiled Hopper-or-later GPU, the tokens are row-major (a partial edge tile in tile
    order is compact, not a box), and every window chunk of queries is whole rows of one tile plane
    (BM/T2 rows of T2 tokens, powers of two: Triton's block shapes), so one TMA box of the grid."""
    return (
        bool(cfg.get("dq_tma", False))
        and not tile_order
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] >= 9
        and _chunk_is_box(layout, block_m)
    )


def _fused_uses_tma(q: torch.Tensor, layout: LocalLayout, tile_order: bool) -> bool:
    """Whether ``backward="fused_dq"`` adds dQ by TMA reductions for these inputs (its "dkdv_fused"
    launch config and blocks, ``_dq_tma_allowed``)."""
    block_m, _, cfg = _blocks("dkdv_fused", q, max(16, _pow2(q.shape[-1])), layout)
    return _dq_tma_allowed(cfg, layout, block_m, q.device, tile_order)


def _dq_descriptors(acc: torch.Tensor, text_len: int, layout: LocalLayout, block_m: int):
    """TMA descriptors of the fused backward's fp32 dQ accumulator ``acc`` [B·H, L, D_PAD] (row-major
    tokens): its rows [B·H, L, D_PAD] and its grid after the text [B·H, G0, G1, G2, D_PAD]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bh, length, d_pad = acc.shape
    g0, g1, g2 = layout.grid
    t2 = layout.tile[2]
    rows = TensorDescriptor(acc, [bh, length, d_pad], [length * d_pad, d_pad, 1], [1, block_m, d_pad])
    grid = TensorDescriptor(acc[:, text_len:], [bh, g0, g1, g2, d_pad],
                            [length * d_pad, g1 * g2 * d_pad, g2 * d_pad, d_pad, 1],
                            [1, 1, block_m // t2, t2, d_pad])
    return rows, grid


#: backward variants: "split" (a dK/dV kernel, then a dQ kernel that recomputes P and dP: 7 matmuls
#: per block pair), "fused_dq" (the dK/dV kernel also adds dQ into an fp32 buffer, by TMA reductions
#: or per-element atomics: 5 matmuls, plus the reduction traffic; FA3's scheme), "split_ws" ("split"
#: with the warp-specialised Hopper dK/dV kernel of ``local_dkdv_hopper``: tile windows on
#: tile-ordered tokens only, see ``ws_dkdv_unsupported``; with ``set_config_override("dq_ws", ...)``
#: its dQ kernel is warp-specialised too; refused on GPUs since the 32nd session), "fused_gluon" (one
#: fused Hopper kernel in Gluon, ``local_bwd_gluon``: 5 matmuls, dQ by TMA reductions from a writer
#: warp; tile windows of 128-token tiles at head dim 128, either token order) or "auto" (the default,
#: chosen when the backward runs: "fused_gluon" where it can serve the call, else
#: ``local_configs.default_backward``: "split").
BACKWARDS = ("auto", "split", "fused_dq", "split_ws", "fused_gluon")


def _program_counts(layout: LocalLayout, text_len: int, n_heads: int, block: int) -> tuple[int, int, int, int]:
    """Programs of a backward launch whose programs own ``block`` rows (``_own_block``): the text
    programs (all heads), text blocks per head (at least 1: a divisor in the kernel), image programs
    per head, and the slices ``sub`` of one tile."""
    sub = -(-layout.tile_volume // block)
    ntb = -(-text_len // block)
    return ntb * n_heads, max(ntb, 1), layout.num_tiles * sub, sub


def _dpt_order(cfg: dict) -> int:
    """DPT_ORDER of a dK/dV launch (``_dv_and_dpT``): 2 with the config key ``"dpt_early"``, 1 with
    ``"dpt_first"``, else 0."""
    return 2 if cfg.get("dpt_early", False) else 1 if cfg.get("dpt_first", False) else 0


@dataclass(frozen=True)
class _BackwardSetup:
    """What every launch of one backward shares: the layout, the text length, the token order, the
    LSE / Δ row geometry (``_stats_row``), the window table, the softmax scales and the constexprs
    that depend only on these and the inputs."""

    layout: LocalLayout
    text_len: int
    tile_order: bool
    sl: int
    ttp: int
    table: torch.Tensor
    qk_scale: float
    sm_scale: float
    constexprs: dict

    @staticmethod
    def of(q: torch.Tensor, layout: LocalLayout, text_len: int, tile_order: bool) -> "_BackwardSetup":
        D = q.shape[-1]
        sl, ttp = _stats_row(layout, q.shape[2])
        constexprs = dict(
            HEAD_DIM=D, D_PAD=max(16, _pow2(D)), MASK_MODE=layout.mask_mode, IS_3D=layout.ndim == 3,
            TILE_ORDER=tile_order, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST=q.device.type != "cuda" and q.dtype == torch.bfloat16, WIN_STAGES=_window_stages(layout),
        )
        return _BackwardSetup(layout, text_len, tile_order, sl, ttp, _table(layout, q.device),
                              LOG2E / math.sqrt(D), 1.0 / math.sqrt(D), constexprs)


def _launch_delta(setup: _BackwardSetup, o, do, delta, tile_copy: bool) -> None:
    """Δ = rowsum(dO ∘ O) of every row in token order, and with ``tile_copy`` tile-major too
    (``_delta_kernel``)."""
    B, H, L, D = o.shape
    layout = setup.layout
    block = min(64, max(16, _pow2(layout.tile_volume))) if tile_copy else 64
    n_text_progs, ntb_arg, n_img, sub = _program_counts(layout, setup.text_len, B * H, block)
    t0, t1, t2 = layout.tile
    grid = (n_text_progs + n_img * B * H,) if tile_copy else (triton.cdiv(L, block), B * H)
    _delta_kernel[grid](
        o, do, delta, *_strides(o), *_strides(do), H, L, setup.sl, setup.text_len, n_text_progs, ntb_arg, n_img,
        sub, *_kernel_args(layout)[:6], HEAD_DIM=D, D_PAD=setup.constexprs["D_PAD"], BLOCK=block, T0=t0, T1=t1,
        T2=t2, TILE_ORDER=setup.tile_order, TTP=setup.ttp, TILE_COPY=tile_copy,
    )


def _launch_dq(setup: _BackwardSetup, q, k, v, o, do, lse, delta, dq, delta_here: bool) -> None:
    """The dQ kernel; ``delta_here``: it computes Δ itself (DELTA_HERE)."""
    B, H, L, D = q.shape
    layout, text_len = setup.layout, setup.text_len
    BM, BN, cfg = _blocks("dq", q, setup.constexprs["D_PAD"], layout)
    n_text_progs, ntb_arg, n_img, sub = _program_counts(layout, text_len, B * H, BM)
    tma_loads, descriptors = _tma_loads(cfg, (k, v), text_len, layout, BN, setup.tile_order)
    _dq_kernel[(n_text_progs + n_img * B * H,)](
        q, k, v, o, do, lse, delta, dq, setup.table, *descriptors,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), *_strides(dq),
        H, L, setup.sl, text_len, n_text_progs, ntb_arg, n_img, sub,
        *_kernel_args(layout), setup.qk_scale, setup.sm_scale,
        BM=BM, BN=BN, **_tile_constexprs(layout, BN), **_launch_options(cfg),
        TMA_LOADS=tma_loads, DELTA_HERE=delta_here, DP_EARLY=bool(cfg.get("dp_early", False)),
        MASK_SCORES=bool(cfg.get("mask_scores", False)), TTP=setup.ttp, DENSE_WHOLE=_dense_whole(text_len, L, BN),
        **_mask_flags(cfg, layout), **setup.constexprs,
    )


def _launch_dkdv(setup: _BackwardSetup, q, k, v, do, lse, delta, dk, dv, dq_acc=None) -> None:
    """The dK/dV kernel; with ``dq_acc`` (the fused backward's fp32 [B·H, L, D_PAD] dQ accumulator,
    zeroed) it adds dQ as it goes (FUSE_DQ)."""
    B, H, L, D = q.shape
    layout, text_len = setup.layout, setup.text_len
    fused = dq_acc is not None
    BM, BN, cfg = _blocks("dkdv_fused" if fused else "dkdv", q, setup.constexprs["D_PAD"], layout)
    n_text_progs, ntb_arg, n_img, sub = _program_counts(layout, text_len, B * H, BN)
    dq_tma = fused and _dq_tma_allowed(cfg, layout, BM, q.device, setup.tile_order)  # as _fused_uses_tma decides
    dq_rows, dq_grid = _dq_descriptors(dq_acc, text_len, layout, BM) if dq_tma else (None, None)
    tma_loads, descriptors = _tma_loads(cfg, (q, do), text_len, layout, BM, setup.tile_order)
    stats_tma = _stats_tma_allowed(cfg, tma_loads, BM)
    stats_rows = _stats_descriptors((lse, delta), BM) if stats_tma else (None, None)
    _dkdv_kernel[(n_text_progs + n_img * B * H,)](
        q, k, v, do, lse, delta, dk, dv, dq_acc if fused else dk,  # (DQ: a placeholder when not fused)
        dq_rows, dq_grid, setup.table, *descriptors, *stats_rows,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
        H, L, setup.sl, text_len, n_text_progs, ntb_arg, n_img, sub,
        *_kernel_args(layout), setup.qk_scale, setup.sm_scale,
        BM=BM, BN=BN, **_tile_constexprs(layout, BM), **_launch_options(cfg),
        FUSE_DQ=fused, DQ_TMA=dq_tma, TMA_LOADS=tma_loads, DPT_ORDER=_dpt_order(cfg),
        DIV_CHUNKS=bool(cfg.get("div_chunks", False)), TTP=setup.ttp, STATS_TMA=stats_tma,
        DENSE_WHOLE=_dense_whole(text_len, L, BM) and bool(cfg.get("dense_whole", True)),
        **_mask_flags(cfg, layout), **setup.constexprs,
    )


def _backward(do, q, k, v, o, lse, layout: LocalLayout, text_len: int, tile_order: bool, backward: str = "split"):
    """dq, dk, dv of one local attention (the variants: :data:`BACKWARDS`)."""
    B, H, L, D = q.shape
    do = _last_dim_contiguous(do)
    setup = _BackwardSetup.of(q, layout, text_len, tile_order)
    delta = _stats(B, H, L, layout, 0.0, q.device)
    dq, dk, dv = (_new((B, L, H, D), q.dtype, q.device).transpose(1, 2) for _ in range(3))  # token-major
    if backward in ("split", "split_ws"):
        ws = backward == "split_ws"
        if ws:
            _require_ws(q, (k, v, do, dk, dv), layout, text_len, tile_order)
        ws_dq = dq_ws_config() if ws else None  # the WS dQ kernel only where asked for (no faster: ws_dq_29th.json)
        if ws_dq is not None:
            _launch_delta(setup, o, do, delta, tile_copy=False)  # (Δ reduced inside stops Triton's WS)
            launch_dq_ws(q, k, v, do, lse, delta, dq, layout, text_len, setup.sl, setup.qk_scale, setup.sm_scale,
                         **ws_dq)
        else:
            # Δ inside the dQ kernel where its rows load whole (D a power of two): 19th session
            # (benchmarks/results/ab_delta_dq_19th.json), the dQ kernel's extra O loads against the
            # separate pass: flux-4k circle -0.08 ms, Wan 720p -0.07, sdxl-4k -0.01; at PixArt's head
            # dim 72 (masked 144-byte rows) +0.05 ms, so the separate pass stays there
            delta_in_dq = D == setup.constexprs["D_PAD"]
            if not delta_in_dq:
                _launch_delta(setup, o, do, delta, tile_copy=False)  # (the dQ kernel stores the tile-major copy)
            _launch_dq(setup, q, k, v, o, do, lse, delta, dq, delta_here=delta_in_dq)
        if ws:
            launch_dkdv_ws(q, k, v, do, lse, delta, dk, dv, layout, text_len, setup.sl, setup.qk_scale,
                           setup.sm_scale)
        else:
            _launch_dkdv(setup, q, k, v, do, lse, delta, dk, dv)
    elif backward == "fused_gluon":
        # on row-major tokens the kernel reads image rows' LSE / Δ from their tile-major copies
        _launch_delta(setup, o, do, delta, tile_copy=not tile_order)
        dq_acc = torch.zeros((B * H * L, D), dtype=torch.float32, device=q.device)  # rows in tile order
        launch_fused_gluon(q, k, v, do, lse, delta, dq_acc, dk, dv, layout, text_len, setup.sl, setup.qk_scale,
                           setup.sm_scale, tile_order=tile_order)
        scale_into(dq_acc, dq, setup.sm_scale, None if tile_order else layout, text_len)
    elif backward == "fused_dq":
        _launch_delta(setup, o, do, delta, tile_copy=True)
        dq_acc = torch.zeros((B * H, L, setup.constexprs["D_PAD"]), dtype=torch.float32, device=q.device)
        _launch_dkdv(setup, q, k, v, do, lse, delta, dk, dv, dq_acc=dq_acc)
        dq.copy_(dq_acc.view(B, H, L, -1)[..., :D])
    return dq, dk, dv


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, text_len, tile_order, backward):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, layout, text_len, tile_order)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.text_len, ctx.tile_order, ctx.backward = layout, text_len, tile_order, backward
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        variant = ctx.backward
        if variant == "auto":
            variant = _auto_backward(q, ctx.layout, ctx.text_len, ctx.tile_order)
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.layout, ctx.text_len, ctx.tile_order, variant)
        return dq, dk, dv, None, None, None, None


def _prepare(q, k, v, grid, window, text_len, shape, tile, backward: str = "auto",
             tile_order: bool = False) -> tuple[LocalLayout, str]:
    """The layout of the arguments (validated) and the backward variant asked for ("auto" is
    resolved by the backward pass itself, so inference never pays for the choice). A circle on
    row-major tokens without a tile runs on the kernel's own tile (``local_configs.circle_tile``);
    tile-ordered tokens keep the tile their order was made with."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    _check_inputs(q, k, v)
    if tile is None and shape == "circle" and not tile_order:
        tile = circle_tile(len(tuple(grid)), q.dtype, q.shape[-1])
    grid, radii, tile = validate_local_args(grid, window, int(text_len), shape, tile, q.shape[2])
    layout = get_layout(grid, radii, shape, tile, q.device)
    if backward == "split_ws":
        _require_ws(q, (k, v), layout, int(text_len), tile_order)
    if backward == "fused_gluon":
        why = fused_gluon_unsupported(q, layout, int(text_len), tile_order)
        if why is not None:
            raise ValueError(f'backward="fused_gluon" cannot serve this call: {why}. It needs a tile window '
                             '(shape="tile") of whole 128-token tiles, text length a multiple of 128, head dim '
                             '128, fp16/bf16, on an sm_90 GPU; use "split" or "auto".')
    return layout, backward


#: set to "1" to run backward="split_ws" on a GPU anyway (to investigate it): refused otherwise
UNSAFE_SPLIT_WS_ENV = "LINFUSION_UNSAFE_SPLIT_WS"


def _require_ws(q, tensors, layout: LocalLayout, text_len: int, tile_order: bool) -> None:
    if q.device.type == "cuda" and os.environ.get(UNSAFE_SPLIT_WS_ENV) != "1":
        raise RuntimeError(
            'backward="split_ws" is refused on GPUs: on the H200 its warp-specialised kernels (Triton 3.6\'s '
            "automatic warp specialisation) left 128-key blocks of dK/dV non-finite in 7% (FLUX 2K), 31% (4K) "
            "and 58% (8K) of backward calls (32nd session, benchmarks/results/ws_stress_32nd.json; the split "
            'backward: none in 900). Use backward="auto" or "split"; set '
            f"{UNSAFE_SPLIT_WS_ENV}=1 only to investigate the kernel."
        )
    why = ws_dkdv_unsupported(q, tensors, layout, text_len, tile_order)
    if why is not None:
        raise ValueError(f'backward="split_ws" cannot serve this call: {why}. It needs a tile window on '
                         'tile-ordered tokens (local_attention_tiled), whole 128-token tiles, text length a '
                         'multiple of 128, head dim 128, fp16/bf16, on an sm_90 GPU; use "split" or "auto".')


def _auto_backward(q: torch.Tensor, layout: LocalLayout, text_len: int = 0, tile_order: bool = False) -> str:
    """The variant ``backward="auto"`` runs: the Gluon fused backward wherever it can serve the call
    (tile windows of 128-token tiles on either token order, head dim 128, fp16/bf16, sm_90:
    :func:`local_bwd_gluon.fused_gluon_unsupported`; 33rd session, H200, FLUX 1K–8K
    ``benchmarks/results/gluon_fused_bwd_33rd.json``), else ``local_configs.default_backward``.
    From the 27th to the 32nd session it took "split_ws" wherever that kernel could serve, until the
    H200 showed its warp-specialised dK/dV kernel leaving 128-key blocks of dK/dV non-finite in 7–58%
    of FLUX backward calls (``benchmarks/results/ws_stress_32nd.json``); see :func:`_require_ws`."""
    default = default_backward(layout.shape, q.dtype, q.shape[-1], layout.tile_volume)
    if default == "split" and fused_gluon_unsupported(q, layout, text_len, tile_order) is None:
        return "fused_gluon"
    return default


def local_attention_tiled(q, k, v, grid, window, text_len: int = 0, shape: str = "circle", tile=None,
                          backward: str = "auto"):
    """Local attention on tokens already in tile order (see ``local_layout.to_tile_order``).

    Same arguments and result as :func:`local_attention_triton`, with q, k, v and the output in
    tile order (text first). Keeping tokens in tile order across layers makes every key range
    of the kernel one contiguous run of memory.
    """
    layout, backward = _prepare(q, k, v, grid, window, text_len, shape, tile, backward, tile_order=True)
    return _LocalAttention.apply(q, k, v, layout, int(text_len), True, backward)


def local_attention_triton(q, k, v, grid, window, text_len: int = 0, shape: str = "circle", tile=None,
                           tile_order: bool = False, backward: str = "auto"):
    """Local window attention (Triton), equal to ``local_attention_reference``.

    Args:
        q, k, v: (B, H, L, D), L = text_len + prod(grid); fp16, bf16 or fp32; D ≤ 128; any strides
            with a contiguous last dimension (e.g. a (B, L, H, D) tensor transposed).
        grid: (H, W) or (T, H, W).
        window: radius or per-dimension radii.
        text_len: leading text tokens (global: seen by and seeing every token).
        shape: "circle" (exact ellipse) or "tile" (tile-aligned window).
        tile: tile size per dimension (default (8, 16) / (2, 8, 8); a circle on row-major tokens
            runs on the kernel's own tile when none is given, ``local_configs.circle_tile``: the
            window is exact whatever the tile).
        tile_order: tokens are in tile order (``to_tile_order``) rather than row-major.
        backward: "auto" (default), "split", "fused_dq" or "split_ws" (see :data:`BACKWARDS`).

    Returns:
        (B, H, L, D) in q's dtype (a heads-first view of token-major memory), in the same token
        order as the inputs.
    """
    layout, backward = _prepare(q, k, v, grid, window, text_len, shape, tile, backward, tile_order=bool(tile_order))
    return _LocalAttention.apply(q, k, v, layout, int(text_len), bool(tile_order), backward)
