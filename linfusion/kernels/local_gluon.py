"""Hopper forward of the local (window) attention in Gluon: FA3's in-warpgroup overlap.

Same function as the Triton forward (:mod:`local_triton`) for the launches it accepts
(:func:`gluon_forward_reason`): H100/H200 (sm_90), fp16/bf16, head dim 64 or 128, row-major
tokens, circles in formula mode or tile windows, on 2D tiles (T1, T2) or 3D tiles (1, T1, T2) of
64 or 128 tokens (one query block = one tile = one key chunk).

Why Gluon: Triton 3.6 waits for each ``tl.dot`` that is not a loop's accumulator right after
issuing it, so the scores of chunk i+1 can never be computed while chunk i's softmax runs. Here
the asynchronous warpgroup MMAs are explicit (FlashAttention-3's intra-warpgroup pipelining):

    iteration c:  issue S(c+1) = Q K(c+1)ᵀ          (tensor cores)
                  softmax of S(c), window mask       (ALUs, overlapping S(c+1))
                  wait for O += P(c−1) V(c−1); rescale O
                  issue O += P(c) V(c)               (overlaps the next iteration's softmax)
                  wait for S(c+1)

K and V arrive by TMA into two-stage rings (mbarrier-tracked): K(c+2) is requested as soon as
S(c) is done, V(c+1) as soon as P(c−1) V(c−1) is. Text keys are the first chunks of the same
loop (row boxes of the [B, H, L, D] tensors); window chunks are whole key tiles (boxes of the
grid view [B, H, G0·G1, G2, D]). Text query blocks (every key) are programs of the same launch,
placed first.
"""

from __future__ import annotations

import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .local_layout import MASK_FORMULA, MASK_NONE, LocalLayout

LOG2E = 1.4426950408889634
# Gluon is experimental: Triton 3.6 (the H200 here) names the TMA load async_copy_global_to_shared,
# later releases async_load (same arguments: descriptor, coordinates, barrier, destination)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _same(x):
    return x


# an asynchronous MMA's result is a token type in later releases: the loop-carried accumulator starts as one
_mma_init = getattr(hopper, "warpgroup_mma_init", None) or _same


@gluon.jit
def _tile_coords(i, c0, c1, c2, G1, G2, T1: gl.constexpr, T2: gl.constexpr):
    """Grid coordinates and validity of tokens ``i`` (row-major inside tile c of 1×T1×T2 tokens)."""
    p1 = c1 * T1 + i // T2
    p2 = c2 * T2 + i % T2
    return c0 + 0 * i, p1, p2, (p1 < G1) & (p2 < G2)


@gluon.jit
def _issue_chunk(rows_desc, grid_desc, bar, dst, c, n_dense, b, h, lo0, lo1, lo2, nr1, nj, G1,
                 BLOCK: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr, D: gl.constexpr, NBYTES: gl.constexpr):
    """TMA load of chunk ``c`` of the key loop into ``dst`` ([BLOCK, D] shared memory), arriving on
    ``bar``: the dense keys' rows c·BLOCK.. for c < n_dense, else window key tile c − n_dense."""
    mbarrier.expect(bar, NBYTES)
    if c < n_dense:
        _tma_load(rows_desc, [b, h, c * BLOCK, 0], bar, dst.reshape([1, 1, BLOCK, D]))
    else:
        w = c - n_dense
        kc2 = lo2 + w % nj
        r = w // nj
        kc0 = lo0 + r // nr1
        kc1 = lo1 + r % nr1
        _tma_load(grid_desc, [b, h, kc0 * G1 + kc1 * T1, kc2 * T2, 0], bar,
                                        dst.reshape([1, 1, BLOCK // T2, T2, D]))


@gluon.jit
def _window_tile(c, n_dense, lo0, lo1, lo2, nr1, nj):
    """Key tile (kc0, kc1, kc2) of window chunk c (c ≥ n_dense)."""
    w = c - n_dense
    kc2 = lo2 + w % nj
    r = w // nj
    return lo0 + r // nr1, lo1 + r % nr1, kc2


@gluon.jit
def _mask_scores(s, mval, c, n_dense, dense_end, lo0, lo1, lo2, nr1, nj, c0, c1, c2, qp0, qp1, qp2, cols,
                 G0, G1, G2, W0, W1, W2, WT,
                 BLOCK: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr,
                 MASK_MODE: gl.constexpr, IS_3D: gl.constexpr, MASK_DOT: gl.constexpr):
    """Scores ``s`` [BLOCK, BLOCK] of chunk c with invisible pairs at −inf: dense chunks past
    ``dense_end``; window chunks' invalid keys (partial tiles) and, for a circle, pairs outside it,
    unless the whole tile pair is inside: with MASK_DOT by ``mval`` ≥ 0 (the tensor-core test,
    ``WT − Σ W_d Δ_d²`` exactly, see ``local_triton._row_features``), else by the formula in fp32
    (integer Δ and weights: exact, as the reference)."""
    if c < n_dense:
        if (c + 1) * BLOCK > dense_end:
            kpos = c * BLOCK + cols
            s = gl.where(gl.expand_dims(kpos < dense_end, 0), s, float("-inf"))
    else:
        kc0, kc1, kc2 = _window_tile(c, n_dense, lo0, lo1, lo2, nr1, nj)
        full = ((kc1 + 1) * T1 <= G1) & ((kc2 + 1) * T2 <= G2)
        inside = True
        if MASK_MODE == 2:  # farthest pair of the two tile boxes inside the circle: every pair is
            m1 = (gl.abs(kc1 - c1) * T1 + T1 - 1).to(gl.float32)
            m2 = (gl.abs(kc2 - c2) * T2 + T2 - 1).to(gl.float32)
            far = m1 * m1 * W1 + m2 * m2 * W2
            if IS_3D:
                m0 = gl.abs(kc0 - c0).to(gl.float32)
                far += m0 * m0 * W0
            inside = far <= WT
        if not inside and MASK_DOT:
            kp0, kp1, kp2, kvalid = _tile_coords(cols, kc0, kc1, kc2, G1, G2, T1, T2)
            s = gl.where((mval >= 0.0) & gl.expand_dims(kvalid, 0), s, float("-inf"))
        elif not inside:
            kp0, kp1, kp2, kvalid = _tile_coords(cols, kc0, kc1, kc2, G1, G2, T1, T2)
            d1 = gl.expand_dims(kp1.to(gl.float32), 0) - gl.expand_dims(qp1.to(gl.float32), 1)
            d2 = gl.expand_dims(kp2.to(gl.float32), 0) - gl.expand_dims(qp2.to(gl.float32), 1)
            dist = d1 * d1 * W1 + d2 * d2 * W2
            if IS_3D:
                d0 = gl.expand_dims(kp0.to(gl.float32), 0) - gl.expand_dims(qp0.to(gl.float32), 1)
                dist += d0 * d0 * W0
            s = gl.where((dist <= WT) & gl.expand_dims(kvalid, 0), s, float("-inf"))
        elif not full:
            kp0, kp1, kp2, kvalid = _tile_coords(cols, kc0, kc1, kc2, G1, G2, T1, T2)
            s = gl.where(gl.expand_dims(kvalid, 0), s, float("-inf"))
    return s


@gluon.jit
def _row_features(c0, c1, c2, G1, G2, W0, W1, W2, WT, layout: gl.constexpr,
                  BLOCK: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr, IS_3D: gl.constexpr):
    """[BLOCK, 16] fp16 row side of the tensor-core circle test for the program's own tile
    (coordinates relative to its origin; the same features as ``local_triton._row_features``)."""
    i = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, layout))
    r1 = gl.expand_dims((i // T2).to(gl.float32), 1)
    r2 = gl.expand_dims((i % T2).to(gl.float32), 1)
    f = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, layout)), 0)
    rf = gl.where(f == 0, WT, 0.0 * r1)
    rf = gl.where(f == 1, W1, rf)
    rf = gl.where(f == 2, (2.0 * W1) * r1, rf)
    rf = gl.where(f == 3, -W1 * r1 * r1, rf)
    rf = gl.where(f == 4, W2, rf)
    rf = gl.where(f == 5, (2.0 * W2) * r2, rf)
    rf = gl.where(f == 6, -W2 * r2 * r2, rf)
    if IS_3D:  # tiles are one frame deep: the row's frame offset is 0
        rf = gl.where(f == 7, W0, rf)
    return rf.to(gl.float16)


@gluon.jit
def _col_features(kc0, kc1, kc2, c0, c1, c2, layout: gl.constexpr,
                  BLOCK: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr, IS_3D: gl.constexpr):
    """[16, BLOCK] fp16 column side for key tile kc, relative to the program's tile origin c."""
    j = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, layout))
    x1 = gl.expand_dims(((kc1 - c1) * T1 + j // T2).to(gl.float32), 0)
    x2 = gl.expand_dims(((kc2 - c2) * T2 + j % T2).to(gl.float32), 0)
    f = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(1, layout)), 1)
    cf = gl.where((f == 0) | (f == 3) | (f == 6), 1.0, 0.0 * x1)
    cf = gl.where(f == 1, -x1 * x1, cf)
    cf = gl.where(f == 2, x1, cf)
    cf = gl.where(f == 4, -x2 * x2, cf)
    cf = gl.where(f == 5, x2, cf)
    if IS_3D:
        x0 = (kc0 - c0).to(gl.float32)
        cf = gl.where(f == 7, -x0 * x0 + 0.0 * x1, cf)
    return cf.to(gl.float16)


@gluon.jit
def _circle_test(rf, cf_smem, zero, c, n_dense, lo0, lo1, lo2, nr1, nj, c0, c1, c2, feat_layout: gl.constexpr,
                 BLOCK: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr, IS_3D: gl.constexpr,
                 MASK_DOT: gl.constexpr):
    """MASK_DOT: issue the tensor-core circle test of window chunk c (its column features into
    ``cf_smem``, whose previous reader has completed) and return the asynchronous result; else
    ``zero`` (unused). Dense chunks get a meaningless test, which their mask ignores."""
    if MASK_DOT:
        kc0, kc1, kc2 = _window_tile(c, n_dense, lo0, lo1, lo2, nr1, nj)
        cf_smem.store(_col_features(kc0, kc1, kc2, c0, c1, c2, feat_layout, BLOCK, T1, T2, IS_3D))
        fence_async_shared()
        return warpgroup_mma(rf, cf_smem, zero, use_acc=False, is_async=True)
    return _mma_init(zero)


@gluon.jit
def _gluon_fwd_kernel(
    Q_ROWS, Q_GRID, K_ROWS, K_GRID, V_ROWS, V_GRID, O, LSE,
    sob, soh, son,
    H, L, TEXT, n_text_progs, NTB, n_img_per_bh,
    G0, G1, G2, N0, N1, N2, R0, R1, R2,
    W0, W1, W2, WT, qk_scale,
    D: gl.constexpr, BLOCK: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr,
    MASK_MODE: gl.constexpr, IS_3D: gl.constexpr, MASK_DOT: gl.constexpr, num_warps: gl.constexpr,
):
    """One query block (BLOCK text rows, or one image tile) against its keys, BLOCK at a time."""
    dtype: gl.constexpr = K_ROWS.dtype
    NBYTES: gl.constexpr = BLOCK * D * 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    # ---- which rows this program owns (text programs first)
    pid = gl.program_id(0)
    is_text = pid < n_text_progs
    pid_img = gl.maximum(pid - n_text_progs, 0)
    bh_img = pid_img // n_img_per_bh
    tile_id = pid_img - bh_img * n_img_per_bh
    c2 = tile_id % N2
    c1 = (tile_id // N2) % N1
    c0 = tile_id // (N1 * N2)
    bh_txt = pid // NTB
    tstart = (pid - bh_txt * NTB) * BLOCK
    bh = gl.where(is_text, bh_txt, bh_img)
    b = bh // H
    h = bh - b * H
    dense_end = gl.where(is_text, L, TEXT)
    n_dense = (dense_end + BLOCK - 1) // BLOCK
    lo0 = gl.maximum(c0 - R0, 0)
    lo1 = gl.maximum(c1 - R1, 0)
    lo2 = gl.maximum(c2 - R2, 0)
    nr1 = gl.minimum(c1 + R1, N1 - 1) - lo1 + 1
    nj = gl.minimum(c2 + R2, N2 - 1) - lo2 + 1
    n_win = (gl.minimum(c0 + R0, N0 - 1) - lo0 + 1) * nr1 * nj
    n_win = gl.where(is_text, 0, n_win)
    n_total = n_dense + n_win

    # ---- shared memory: Q, two-stage K and V rings, their barriers
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK, D], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, D], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, D], smem_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(2):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)

    mbarrier.expect(q_bar, NBYTES)
    if is_text:
        _tma_load(Q_ROWS, [b, h, tstart, 0], q_bar, q_smem.reshape([1, 1, BLOCK, D]))
    else:
        _tma_load(Q_GRID, [b, h, c0 * G1 + c1 * T1, c2 * T2, 0], q_bar,
                                        q_smem.reshape([1, 1, BLOCK // T2, T2, D]))
    _issue_chunk(K_ROWS, K_GRID, k_bar.index(0), k_smem.index(0), 0, n_dense, b, h, lo0, lo1, lo2, nr1, nj, G1,
                 BLOCK, T1, T2, D, NBYTES)
    if n_total > 1:
        _issue_chunk(K_ROWS, K_GRID, k_bar.index(1), k_smem.index(1), 1, n_dense, b, h, lo0, lo1, lo2, nr1, nj, G1,
                     BLOCK, T1, T2, D, NBYTES)
    _issue_chunk(V_ROWS, V_GRID, v_bar.index(0), v_smem.index(0), 0, n_dense, b, h, lo0, lo1, lo2, nr1, nj, G1,
                 BLOCK, T1, T2, D, NBYTES)

    # ---- own query coordinates (rows of the score tile)
    i_s = gl.arange(0, BLOCK, layout=rows_s)
    qp0, qp1, qp2, _ = _tile_coords(i_s, c0, c1, c2, G1, G2, T1, T2)
    cols = gl.arange(0, BLOCK, layout=cols_s)

    # the tensor-core circle test: row features in registers, each chunk's column features in shared memory
    feat_layout: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [num_warps, 1], [1, 0])
    rf = _row_features(c0, c1, c2, G1, G2, W0, W1, W2, WT, feat_layout, BLOCK, T1, T2, IS_3D)
    rf = gl.convert_layout(rf, gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    cf_smem = gl.allocate_shared_memory(gl.float16, [16, BLOCK],
                                        gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))

    s_zero = gl.zeros([BLOCK, BLOCK], gl.float32, s_layout)
    acc = _mma_init(gl.zeros([BLOCK, D], gl.float32, o_layout))
    m_i = gl.full([BLOCK], -1.0e30, gl.float32, rows_s)
    l_i = gl.zeros([BLOCK], gl.float32, rows_s)

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s_cur = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    m_cur = _circle_test(rf, cf_smem, s_zero, 0, n_dense, lo0, lo1, lo2, nr1, nj, c0, c1, c2, feat_layout,
                         BLOCK, T1, T2, IS_3D, MASK_DOT)
    if MASK_DOT:
        s_cur, m_cur = warpgroup_mma_wait(0, deps=(s_cur, m_cur))
    else:
        s_cur = warpgroup_mma_wait(0, deps=(s_cur,))
        m_cur = s_zero
    for c in range(n_total):
        stage = c % 2
        # K(c+2) into the stage S(c) has finished reading
        if c + 2 < n_total:
            _issue_chunk(K_ROWS, K_GRID, k_bar.index(stage), k_smem.index(stage), c + 2, n_dense, b, h,
                         lo0, lo1, lo2, nr1, nj, G1, BLOCK, T1, T2, D, NBYTES)
        # S(c+1) and its circle test on the tensor cores while this chunk's softmax runs (the last
        # iteration recomputes chunk c's)
        nxt = gl.minimum(c + 1, n_total - 1)
        m_next = _circle_test(rf, cf_smem, s_zero, nxt, n_dense, lo0, lo1, lo2, nr1, nj, c0, c1, c2, feat_layout,
                              BLOCK, T1, T2, IS_3D, MASK_DOT)
        mbarrier.wait(k_bar.index(nxt % 2), (nxt // 2) & 1)
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt % 2).permute((1, 0)), s_zero, use_acc=False, is_async=True)

        s = _mask_scores(s_cur, m_cur, c, n_dense, dense_end, lo0, lo1, lo2, nr1, nj, c0, c1, c2, qp0, qp1, qp2,
                         cols, G0, G1, G2, W0, W1, W2, WT, BLOCK, T1, T2, MASK_MODE, IS_3D, MASK_DOT)
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2((m_i - m_new) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new * qk_scale, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new

        # O += P(c−1) V(c−1), S(c+1) and its test done: rescale O, free V's other stage. (One wait for
        # all of them keeps every wait within one iteration's commit groups: ptxas serialises every
        # wgmma when a result is read after a wait that may leave an earlier iteration's group pending)
        if MASK_DOT:
            acc, s_next, m_next = warpgroup_mma_wait(0, deps=(acc, s_next, m_next))
        else:
            acc, s_next = warpgroup_mma_wait(0, deps=(acc, s_next))
            m_next = s_zero
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
        if c + 1 < n_total:
            _issue_chunk(V_ROWS, V_GRID, v_bar.index(1 - stage), v_smem.index(1 - stage), c + 1, n_dense, b, h,
                         lo0, lo1, lo2, nr1, nj, G1, BLOCK, T1, T2, D, NBYTES)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_bar.index(stage), (c // 2) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
        s_cur = s_next
        m_cur = m_next
    acc = warpgroup_mma_wait(0, deps=(acc,))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(2):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))

    # ---- epilogue: normalise, store O and the LSE (base 2 of the scaled scores)
    l_safe = gl.where(l_i > 0.0, l_i, 1.0)
    out = (acc / gl.expand_dims(gl.convert_layout(l_safe, rows_o), 1)).to(dtype)
    # 16-byte stores along the head dim (the MMA layout would write 4 bytes per thread)
    TPW_N: gl.constexpr = D // 8
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [num_warps, 1], [1, 0])
    rows_st: gl.constexpr = gl.SliceLayout(1, store_layout)
    cols_st: gl.constexpr = gl.SliceLayout(0, store_layout)
    out = gl.convert_layout(out, store_layout)
    i_o = gl.arange(0, BLOCK, layout=rows_st)
    op0, op1, op2, ovalid = _tile_coords(i_o, c0, c1, c2, G1, G2, T1, T2)
    opos = gl.where(is_text, tstart + i_o, TEXT + (op0 * G1 + op1) * G2 + op2)
    ovalid = gl.where(is_text, tstart + i_o < TEXT, ovalid)
    d_o = gl.arange(0, D, layout=cols_st)
    o_ptrs = O + b.to(gl.int64) * sob + h.to(gl.int64) * soh + gl.expand_dims(opos, 1) * son + gl.expand_dims(d_o, 0)
    gl.store(o_ptrs, out, mask=gl.expand_dims(ovalid, 1))
    _, _, _, svalid = _tile_coords(i_s, c0, c1, c2, G1, G2, T1, T2)
    spos = gl.where(is_text, tstart + i_s, TEXT + (qp0 * G1 + qp1) * G2 + qp2)
    svalid = gl.where(is_text, tstart + i_s < TEXT, svalid)
    gl.store(LSE + bh.to(gl.int64) * L + spos, m_i * qk_scale + gl.log2(l_safe), mask=svalid)


# ----------------------------------------------------------------------------- host side


def gluon_forward_reason(q: torch.Tensor, layout: LocalLayout, tile_order: bool) -> str | None:
    """None when :func:`gluon_forward` serves this launch, else why not."""
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not a Hopper (sm_90) GPU"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (fp16/bf16 only)"
    if q.shape[-1] not in (64, 128):
        return f"head dim {q.shape[-1]} (64 or 128 only)"
    if tile_order:
        return "tile-ordered tokens (row-major only)"
    t0, t1, t2 = layout.tile
    if t0 != 1 or layout.tile_volume not in (64, 128) or t2 not in (8, 16):
        return f"tile {layout.tile} (1×T1×T2 of 64 or 128 tokens, T2 8 or 16)"
    if layout.mask_mode not in (MASK_NONE, MASK_FORMULA):
        return "a window the integer formula cannot test (table mode)"
    return None


def _descriptors(t: torch.Tensor, text_len: int, layout: LocalLayout, block: int):
    """Gluon TMA descriptors of a (B, H, L, D) tensor: its rows (box [1, 1, block, D]) and its grid
    after the text [B, H, G0·G1, G2, D] (box [1, 1, block/T2, T2, D])."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, L, D = t.shape
    g0, g1, g2 = layout.grid
    t2 = layout.tile[2]
    sb, sh, sn, _ = t.stride()
    rows = TensorDescriptor(t, [B, H, L, D], [sb, sh, sn, 1], [1, 1, block, D],
                            gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4))
    grid = TensorDescriptor(t[:, :, text_len:], [B, H, g0 * g1, g2, D], [sb, sh, g2 * sn, sn, 1],
                            [1, 1, block // t2, t2, D],
                            gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=5))
    return rows, grid


def gluon_forward(q, k, v, layout: LocalLayout, text_len: int, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill ``o`` (B, H, L, D) and ``lse`` (B, H, L) fp32 (base 2 of the scaled scores) with the
    local attention of q, k, v ((B, H, L, D), last dim contiguous, 16-byte aligned strides)."""
    B, H, L, D = q.shape
    block = layout.tile_volume
    ntb = -(-text_len // block)
    n_text_progs = ntb * B * H
    g0, g1, g2 = layout.grid
    n0, n1, n2 = layout.n_tiles
    r0, r1, r2 = layout.radius
    w0, w1, w2, wt = layout.weights
    descs = [d for t in (q, k, v) for d in _descriptors(t, text_len, layout, block)]
    _gluon_fwd_kernel[(n_text_progs + layout.num_tiles * B * H,)](
        *descs, o, lse, o.stride(0), o.stride(1), o.stride(2),
        H, L, text_len, n_text_progs, max(ntb, 1), layout.num_tiles,
        g0, g1, g2, n0, n1, n2, r0, r1, r2, w0, w1, w2, wt, LOG2E / math.sqrt(D),
        D=D, BLOCK=block, T1=layout.tile[1], T2=layout.tile[2], MASK_MODE=layout.mask_mode,
        IS_3D=layout.ndim == 3, MASK_DOT=layout.mask_dot and block == 64, num_warps=block // 16,
    )
