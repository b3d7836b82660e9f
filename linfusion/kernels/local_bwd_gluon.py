"""Fused tile-window backward for Hopper, written in Gluon (Triton's explicit-layout dialect).

One kernel computes dK, dV *and* dQ of a tile-window local attention (``shape="tile"``), with five
matrix products per block pair instead of the split backward's seven:

* one program per 128-key tile (text-key tiles first, their loops being the longest) keeps its
  dK and dV in registers and walks every 64-query chunk that sees it: the text queries, then the
  query tiles of the symmetric window box around its tile (``local_dkdv_hopper``'s arithmetic);
* a one-warp producer partition brings each chunk's Q, dO, LSE and Δ by TMA into a two-stage ring
  guarded by mbarriers (on row-major tokens image tiles and chunks are 5D boxes of the grid and
  their LSE / Δ come from the tile-major copies the forward writes);
* the two consumer warpgroups (the default partition, 64 keys each) compute Sᵀ = K·Qᵀ and
  dPᵀ = V·dOᵀ, Pᵀ and dSᵀ, then dV += Pᵀ·dO and dK += dSᵀ·Q with the probabilities as register
  operands, and the chunk's dQ share dS·K through shared memory;
* a one-warp writer adds the dQ share to an fp32 accumulator (rows in tile order) by a TMA
  *reduction* (``cp.reduce.async.bulk.tensor``): the TMA unit adds the tile in L2 while the warps go
  on; :func:`scale_into` then scales it into the result, putting rows back in row-major order.

This is FlashAttention-3's design. The 10th–30th sessions' versions (Triton, and Gluon with a
per-thread-atomics writer) lost to the split loops (``benchmarks/NOTES_local.md``); this one wins:
on the H200, FLUX 1K–8K, its backward is 2.59–2.76× its forward against the split backward's
3.15–3.44× (33rd session, ``benchmarks/results/gluon_fused_bwd_33rd.json``).

Serves what :func:`fused_gluon_unsupported` accepts: a CUDA sm_90 device, fp16 / bf16, head dim 128,
tile windows of 128-token tiles covering the grid, text a multiple of 128, either token order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # Gluon ships with Triton ≥ 3.5; the library imports without it (CPU-only installs)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    # built and measured with Triton 3.6 (the H200's), compiled with 3.9 in CI: older Gluon differs
    HAVE_GLUON = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 6)
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BN = 128  # keys per program: one tile
BM = 64  # queries per chunk
HEAD_DIM = 128
STAGES = 2
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

if HAVE_GLUON:
    from triton._C.libtriton import ir as _ir
    from triton.experimental.gluon.language._core import builtin as _builtin

    # Triton 3.6's names; later releases call them async_load and barrier (same arguments)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

    if hasattr(tma, "async_atomic_add"):  # Triton ≥ 3.7 names the TMA reduction
        _tma_reduce_add = tma.async_atomic_add
    else:

        @_builtin
        def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
            """Add the shared-memory tile ``src`` into the global box at ``coord`` by a TMA
            reduction (Triton 3.6's Gluon builder has the op but no Python name for it)."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)

    # (the walk's arithmetic repeats ``local_dkdv_hopper._query_chunk_row`` / ``_window_box``: Gluon
    # compiles calls to plain Triton functions, but not once TRITON_INTERPRET=1 has made them
    # interpreter objects, as in the CPU test runs that compile this kernel for sm_90)
    @gluon.jit
    def _chunk_row(i, n_dense, TEXT, lo0, lo1, lo2, n12, n2, N1, N2, BM: gl.constexpr, TV: gl.constexpr):
        """First token (tile order, within a (b, h)) of query chunk ``i`` of a program: dense
        chunks ``i · BM`` for ``i < n_dense``, then ``TV / BM`` chunks per tile of the window box
        whose first tile is (lo0, lo1, lo2), n12 tiles per plane, n2 per row."""
        SUBQ: gl.constexpr = TV // BM
        j = gl.maximum(i - n_dense, 0)
        t = j // SUBQ
        sub = j - t * SUBQ
        a = t // n12
        rem = t - a * n12
        c = rem // n2
        tile = ((lo0 + a) * N1 + lo1 + c) * N2 + lo2 + (rem - c * n2)
        return gl.where(i < n_dense, i * BM, TEXT + tile * TV + sub * BM)

    @gluon.jit
    def _load_rows(q_desc, do_desc, lse_desc, dl_desc, q_dst, do_dst, lse_dst, dl_dst, bar, q_row, q_col, do_row,
                   do_col, stat):
        """TMA loads of one chunk of contiguous token rows (Q, dO boxes [BM, D]; LSE, Δ runs)."""
        _tma_load(q_desc, [q_row, q_col], bar, q_dst)
        _tma_load(do_desc, [do_row, do_col], bar, do_dst)
        _tma_load(lse_desc, [stat], bar, lse_dst)
        _tma_load(dl_desc, [stat], bar, dl_dst)

    @gluon.jit
    def _producer(q_desc, do_desc, q_gdesc, do_gdesc, lse_desc, dl_desc, q_smem, do_smem, lse_smem, dl_smem, ready,
                  empty, q_row0, q_col, do_row0, do_col, q_go, q_gc, do_go, do_gc, stat0, slot0, n_dense, n_iter, TEXT,
                  lo0, lo1, lo2, n12, n2, N1, N2, BM: gl.constexpr, D: gl.constexpr, TV: gl.constexpr,
                  STAGES: gl.constexpr, ROW_MAJOR: gl.constexpr, T0: gl.constexpr, T1: gl.constexpr,
                  T2: gl.constexpr, CB0: gl.constexpr, CB1: gl.constexpr, CB2: gl.constexpr):
        """One warp: Q, dO, LSE, Δ of query chunk i into stage i % STAGES once the consumers have
        released it (``empty``); ``ready`` completes when all four have landed. ROW_MAJOR: image
        chunks (tile-order position ≥ TEXT) come as [CB0, CB1, CB2] boxes of the row-major grid
        (``q_gdesc``, ``do_gdesc``) and their LSE / Δ from the tile-major slots from ``slot0`` on."""
        for i in range(n_iter):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # the first round passes at once
            row = _chunk_row(i, n_dense, TEXT, lo0, lo1, lo2, n12, n2, N1, N2, BM, TV)
            mbarrier.expect(ready.index(s), 2 * BM * D * q_desc.dtype.primitive_bitwidth // 8 + 2 * BM * 4)
            if ROW_MAJOR:
                if row < TEXT:
                    _load_rows(q_desc, do_desc, lse_desc, dl_desc, q_smem.index(s), do_smem.index(s),
                               lse_smem.index(s), dl_smem.index(s), ready.index(s), q_row0 + row, q_col,
                               do_row0 + row, do_col, stat0 + row)
                else:
                    j = row - TEXT
                    tile = j // TV
                    sub = (j - tile * TV) // BM
                    y0, y1, y2 = _chunk_origin(tile, sub, N1, N2, T0, T1, T2, CB0, CB1, CB2)
                    _tma_load(q_gdesc, [q_go, y0, y1, y2, q_gc], ready.index(s),
                              q_smem.index(s).reshape([1, CB0, CB1, CB2, D]))
                    _tma_load(do_gdesc, [do_go, y0, y1, y2, do_gc], ready.index(s),
                              do_smem.index(s).reshape([1, CB0, CB1, CB2, D]))
                    stat = stat0 + slot0 + tile * TV + sub * BM
                    _tma_load(lse_desc, [stat], ready.index(s), lse_smem.index(s))
                    _tma_load(dl_desc, [stat], ready.index(s), dl_smem.index(s))
            else:
                _load_rows(q_desc, do_desc, lse_desc, dl_desc, q_smem.index(s), do_smem.index(s), lse_smem.index(s),
                           dl_smem.index(s), ready.index(s), q_row0 + row, q_col, do_row0 + row, do_col, stat0 + row)

    @gluon.jit
    def _chunk_origin(tile, sub, N1, N2, T0: gl.constexpr, T1: gl.constexpr, T2: gl.constexpr,
                      CB0: gl.constexpr, CB1: gl.constexpr, CB2: gl.constexpr):
        """Grid coordinates of the first token of query chunk ``sub`` of tile ``tile`` (row-major
        tile numbering over an N0 × N1 × N2 tile grid): a tile splits into chunks of CB0 × CB1 × CB2
        along its first dimension that the chunk does not span whole."""
        SPLIT0: gl.constexpr = CB0 < T0
        SPLIT1: gl.constexpr = (CB0 == T0) and (CB1 < T1)
        SPLIT2: gl.constexpr = (CB0 == T0) and (CB1 == T1)
        y0 = (tile // (N1 * N2)) * T0 + sub * CB0 * SPLIT0
        y1 = ((tile // N2) % N1) * T1 + sub * CB1 * SPLIT1
        y2 = (tile % N2) * T2 + sub * CB2 * SPLIT2
        return y0, y1, y2

    @gluon.jit
    def _dq_writer(dq_desc, dq_smem, dq_full, dq_empty, dq_row0, n_dense, n_iter, TEXT, lo0, lo1, lo2, n12, n2, N1,
                   N2, BM: gl.constexpr, TV: gl.constexpr, DQ_BUFS: gl.constexpr):
        """One warp: adds each chunk's dQ share (fp32 [BM, D] in shared memory, buffer i % DQ_BUFS)
        into the accumulator by a TMA reduction, and frees the buffer once the reduction has read it."""
        for i in range(n_iter):
            b = i % DQ_BUFS
            mbarrier.wait(dq_full.index(b), (i // DQ_BUFS) & 1)
            row = _chunk_row(i, n_dense, TEXT, lo0, lo1, lo2, n12, n2, N1, N2, BM, TV)
            _tma_reduce_add(dq_desc, [dq_row0 + row, 0], dq_smem.index(b))
            tma.store_wait(0)
            mbarrier.arrive(dq_empty.index(b), count=1)

    @gluon.jit
    def _consumer(k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, lse_smem, dl_smem, ready, empty, dq_full,
                  dq_empty, n_iter, qk_scale, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                  STAGES: gl.constexpr, DQ_BUFS: gl.constexpr, num_warps: gl.constexpr):
        """Two warpgroups in lockstep (64 keys each): dK, dV [BN, D] of the program's keys over all
        its query chunks (returned unscaled, fp32); each chunk's dQ share [BM, D] goes to the writer
        warp through ``dq_smem`` (buffer i % DQ_BUFS, ``dq_full`` / ``dq_empty``)."""
        dtype: gl.constexpr = q_smem.dtype
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, BM, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, D, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                            instr_shape=[16, D // (num_warps // 4), 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        cols_st: gl.constexpr = gl.SliceLayout(0, st_layout)
        dk = gl.zeros([BN, D], gl.float32, acc_layout)
        dv = gl.zeros([BN, D], gl.float32, acc_layout)
        for i in range(n_iter):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            st = warpgroup_mma(k_smem, q_smem.index(s).permute((1, 0)), gl.zeros([BN, BM], gl.float32, st_layout),
                               use_acc=False, is_async=True)
            dpt = warpgroup_mma(v_smem, do_smem.index(s).permute((1, 0)), gl.zeros([BN, BM], gl.float32, st_layout),
                                use_acc=False, is_async=True)
            st = warpgroup_mma_wait(1, deps=(st,))  # Sᵀ done, dPᵀ still running
            pt = gl.exp2(st * qk_scale - gl.expand_dims(lse_smem.index(s).load(cols_st), 0))
            dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout, assert_trivial=True), do_smem.index(s), dv,
                               is_async=True)
            dpt = warpgroup_mma_wait(1, deps=(dpt,))  # dPᵀ done, dV running
            dst = (pt * (dpt - gl.expand_dims(dl_smem.index(s).load(cols_st), 0))).to(dtype)
            ds = ds_smem.index(i % 2)  # two buffers: the other warpgroup may still read the last one
            ds.store(dst)
            fence_async_shared()
            _cta_barrier()
            dq = warpgroup_mma(ds.permute((1, 0)), k_smem, gl.zeros([BM, D], gl.float32, dq_layout), use_acc=False,
                               is_async=True)
            dk = warpgroup_mma(gl.convert_layout(dst, a_layout, assert_trivial=True), q_smem.index(s), dk,
                               is_async=True)
            dv, dq = warpgroup_mma_wait(1, deps=(dv, dq))  # dK still running
            b = i % DQ_BUFS  # hand the share to the writer warp
            mbarrier.wait(dq_empty.index(b), ((i // DQ_BUFS) & 1) ^ 1)
            dq_smem.index(b).store(dq)
            fence_async_shared()
            _cta_barrier()
            mbarrier.arrive(dq_full.index(b), count=1)
            dk = warpgroup_mma_wait(0, deps=(dk,))
            _cta_barrier()  # both warpgroups are done with this stage's Q and dO
            mbarrier.arrive(empty.index(s), count=1)
        return dk, dv

    @gluon.jit
    def fused_bwd_kernel(q_desc, k_desc, v_desc, do_desc, q_gdesc, k_gdesc, v_gdesc, do_gdesc, lse_desc, dl_desc,
                         dq_desc, DK, DV, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, do_rb, do_rh, do_ch,
                         q_gb, q_gh, q_gc, k_gb, k_gh, k_gc, do_gb, do_gh, do_gc,
                         sgb, sgh, sgn, H, L, SL, TEXT, n_text_progs, NTB, n_tiles,
                         N0, N1, N2, R0, R1, R2, G1, G2, qk_scale, sm_scale,
                         BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, TV: gl.constexpr,
                         STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr, DQ_BUFS: gl.constexpr,
                         ROW_MAJOR: gl.constexpr, T0: gl.constexpr, T1: gl.constexpr,
                         T2: gl.constexpr, CB0: gl.constexpr, CB1: gl.constexpr, CB2: gl.constexpr,
                         num_warps: gl.constexpr):
        """Program ``pid``: BN text keys (``pid < n_text_progs``, NTB blocks per (b, h)) or one image
        tile of one (b, h). Row coordinates of a (b, h) in the 2D TMA views of q, k / v, dO:
        ``b · *_rb + h · *_rh`` and column ``h · *_ch``. ROW_MAJOR (tokens row-major, the grid
        G0 × G1 × G2): image tiles and chunks come as boxes of the 5D views [outer, G0, G1, G2, C]
        (``*_gdesc``) at outer ``b · *_gb + h · *_gh`` and column ``h · *_gc``; the dQ accumulator
        stays in tile order either way (:func:`scale_into` puts the rows in place). DK, DV
        (B, H, L, D) by strides."""
        pid = gl.program_id(0)
        is_text = pid < n_text_progs
        pid_img = gl.maximum(pid - n_text_progs, 0)
        bh = gl.where(is_text, pid // NTB, pid_img // n_tiles)
        tile = pid_img - (pid_img // n_tiles) * n_tiles
        key_row = gl.where(is_text, (pid - (pid // NTB) * NTB) * BN, TEXT + tile * TV)
        b = bh // H
        h = bh - b * H
        # the window box of query tiles around this key tile (the window is symmetric), clipped
        c0 = tile // (N1 * N2)
        c1 = (tile // N2) % N1
        c2 = tile % N2
        lo0 = gl.maximum(c0 - R0, 0)
        lo1 = gl.maximum(c1 - R1, 0)
        lo2 = gl.maximum(c2 - R2, 0)
        n2 = gl.minimum(c2 + R2, N2 - 1) - lo2 + 1
        n12 = (gl.minimum(c1 + R1, N1 - 1) - lo1 + 1) * n2
        n_box = (gl.minimum(c0 + R0, N0 - 1) - lo0 + 1) * n12
        n_dense = gl.where(is_text, L // BM, TEXT // BM)
        n_iter = n_dense + gl.where(is_text, 0, n_box * (TV // BM))

        dtype: gl.constexpr = q_desc.dtype
        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        k_smem = gl.allocate_shared_memory(dtype, [BN, D], smem)
        v_smem = gl.allocate_shared_memory(dtype, [BN, D], smem)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, D], smem)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, D], smem)
        ds_smem = gl.allocate_shared_memory(dtype, [2, BN, BM], smem)
        dq_smem = gl.allocate_shared_memory(gl.float32, [DQ_BUFS, BM, D], dq_desc.layout)
        stats: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], stats)
        dl_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], stats)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        dq_full = gl.allocate_shared_memory(gl.int64, [DQ_BUFS, 1], mbarrier.MBarrierLayout())
        dq_empty = gl.allocate_shared_memory(gl.int64, [DQ_BUFS, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for s in gl.static_range(DQ_BUFS):
            mbarrier.init(dq_full.index(s), count=1)
            mbarrier.init(dq_empty.index(s), count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        mbarrier.expect(kv_bar, 2 * BN * D * dtype.primitive_bitwidth // 8)
        if ROW_MAJOR:
            if is_text:
                _tma_load(k_desc, [b * k_rb + h * k_rh + key_row, h * k_ch], kv_bar, k_smem)
                _tma_load(v_desc, [b * k_rb + h * k_rh + key_row, h * k_ch], kv_bar, v_smem)
            else:
                box = [b * k_gb + h * k_gh, c0 * T0, c1 * T1, c2 * T2, h * k_gc]
                _tma_load(k_gdesc, box, kv_bar, k_smem.reshape([1, T0, T1, T2, D]))
                _tma_load(v_gdesc, box, kv_bar, v_smem.reshape([1, T0, T1, T2, D]))
        else:
            _tma_load(k_desc, [b * k_rb + h * k_rh + key_row, h * k_ch], kv_bar, k_smem)
            _tma_load(v_desc, [b * k_rb + h * k_rh + key_row, h * k_ch], kv_bar, v_smem)
        mbarrier.wait(kv_bar, 0)
        dk, dv = gl.warp_specialize([
            (_consumer, (k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, lse_smem, dl_smem, ready, empty,
                         dq_full, dq_empty, n_iter, qk_scale, BM, BN, D, STAGES, DQ_BUFS, num_warps)),
            (_producer, (q_desc, do_desc, q_gdesc, do_gdesc, lse_desc, dl_desc, q_smem, do_smem, lse_smem,
                         dl_smem, ready, empty, b * q_rb + h * q_rh, h * q_ch, b * do_rb + h * do_rh, h * do_ch,
                         b * q_gb + h * q_gh, h * q_gc, b * do_gb + h * do_gh, h * do_gc, bh * SL,
                         SL - n_tiles * TV, n_dense, n_iter, TEXT, lo0, lo1, lo2, n12, n2, N1, N2, BM, D, TV,
                         STAGES, ROW_MAJOR, T0, T1, T2, CB0, CB1, CB2)),
            (_dq_writer, (dq_desc, dq_smem, dq_full, dq_empty, bh * L, n_dense, n_iter, TEXT, lo0, lo1, lo2,
                          n12, n2, N1, N2, BM, TV, DQ_BUFS)),
        ], [1, 1], [PRODUCER_REGS, PRODUCER_REGS])
        # dK, dV straight from the accumulators' layout (an epilogue: no shared memory left for a shuffle)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, D, 16])
        r = gl.arange(0, BN, layout=gl.SliceLayout(1, acc_layout))
        if ROW_MAJOR:  # the tile's tokens, row-major within the tile, at their grid positions
            y0 = c0 * T0 + r // (T1 * T2)
            y1 = c1 * T1 + (r // T2) % T1
            y2 = c2 * T2 + r % T2
            rows = gl.where(is_text, key_row + r, TEXT + (y0 * G1 + y1) * G2 + y2)
        else:
            rows = key_row + r
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, acc_layout))
        offs = gl.expand_dims(rows.to(gl.int64) * sgn, 1) + gl.expand_dims(cols, 0)
        base = b.to(gl.int64) * sgb + h.to(gl.int64) * sgh
        gl.store(DK + base + offs, (dk * sm_scale).to(DK.dtype.element_ty))
        gl.store(DV + base + offs, dv.to(DV.dtype.element_ty))


@triton.jit
def _scale_store_kernel(ACC, OUT, so_b, so_h, so_n, H, L, TEXT, N1, N2, G1, G2, scale, D: tl.constexpr,
                        ROWS: tl.constexpr, ROW_MAJOR: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr,
                        T2: tl.constexpr):
    """OUT[b, h, t, :] = scale · ACC[(b·H + h)·L + t, :] for ROWS rows (rows of one (b, h): L is a
    multiple of ROWS), rounded to OUT's dtype: the fp32 dQ accumulator to the strided result.
    ROW_MAJOR: the accumulator's rows are in tile order (tiles T0 × T1 × T2, N1 × N2 per plane of
    the tile grid), OUT's tokens row-major over the G0 × G1 × G2 grid after TEXT text tokens."""
    pid = tl.program_id(0)
    r0 = pid * ROWS
    bh = r0 // L
    t = r0 - bh * L + tl.arange(0, ROWS)
    if ROW_MAJOR:
        TV: tl.constexpr = T0 * T1 * T2
        j = tl.maximum(t - TEXT, 0)
        tile = j // TV
        r = j - tile * TV
        y0 = (tile // (N1 * N2)) * T0 + r // (T1 * T2)
        y1 = ((tile // N2) % N1) * T1 + (r // T2) % T1
        y2 = (tile % N2) * T2 + r % T2
        t = tl.where(t < TEXT, t, TEXT + (y0 * G1 + y1) * G2 + y2)
    b = bh // H
    h = bh - b * H
    cols = tl.arange(0, D)
    acc = tl.load(ACC + (r0 + tl.arange(0, ROWS)).to(tl.int64)[:, None] * D + cols[None, :])
    base = b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    tl.store(OUT + base + t.to(tl.int64)[:, None] * so_n + cols[None, :], (acc * scale).to(OUT.dtype.element_ty))


def scale_into(acc: torch.Tensor, out: torch.Tensor, scale: float, layout=None, text_len: int = 0) -> None:
    """``out`` ((B, H, L, D), any strides with a contiguous last dimension) = ``scale`` · ``acc``
    (fp32 (B·H·L, D)), in one pass: ``torch.mul(..., out=)`` into the strided 16-bit view took 0.73 ms
    at FLUX 4K on the H200 (33rd session), several times what its bytes need. With ``layout``:
    ``acc``'s rows are in tile order, ``out``'s tokens row-major (``launch_fused_gluon`` on row-major
    tokens)."""
    B, H, L, D = out.shape
    rows = 32 if L % 32 == 0 else 16 if L % 16 == 0 else 1
    t0, t1, t2 = layout.tile if layout is not None else (1, 1, 1)
    _, g1, g2 = layout.grid if layout is not None else (1, 1, 1)
    _, n1, n2 = layout.n_tiles if layout is not None else (1, 1, 1)
    _scale_store_kernel[(B * H * L // rows,)](acc, out, *out.stride()[:3], H, L, text_len, n1, n2, g1, g2, scale,
                                             D=D, ROWS=rows, ROW_MAJOR=layout is not None, T0=t0, T1=t1, T2=t2)


def _row_view(t: torch.Tensor):
    """(2D view, rows per batch, rows per head, columns per head) of a (B, H, L, D) tensor whose
    tokens are rows of one 2D strided matrix: heads-first memory (``[B·H·L, D]``) or token-major
    with heads side by side (``[B·L, H·D]``). None where neither describes it."""
    B, H, L, D = t.shape
    sb, sh, sn, sd = t.stride()
    if sd != 1:
        return None
    if sh % sn == 0 and sb % sn == 0 and sn >= D:  # heads (and batches) are row offsets
        rows = (B - 1) * (sb // sn) + (H - 1) * (sh // sn) + L
        return t.as_strided((rows, D), (sn, 1)), sb // sn, sh // sn, 0
    if sh == D and sb % sn == 0 and sn >= H * D:  # heads side by side in a token's row
        rows = (B - 1) * (sb // sn) + L
        return t.as_strided((rows, H * D), (sn, 1)), sb // sn, 0, D
    return None


def _grid_view(t: torch.Tensor, text_len: int, grid):
    """(5D view [outer, G0, G1, G2, C] of the image tokens, outer index per batch, per head, column
    per head) of a (B, H, L, D) tensor with row-major tokens, for TMA boxes of grid tiles: token-major
    memory with heads side by side (outer = batch, column h·D) or heads-first memory whose batches
    and heads at one stride (outer = b·H + h or h·B + b). None where neither describes it."""
    B, H, L, D = t.shape
    sb, sh, sn, sd = t.stride()
    g0, g1, g2 = grid
    inner = [g1 * g2 * sn, g2 * sn, sn, 1]
    offset = t.storage_offset() + text_len * sn
    if sd != 1:
        return None
    if sh == D and sn >= H * D:
        return t.as_strided((B, g0, g1, g2, H * D), (sb, *inner), offset), 1, 0, D
    if sh % sn == 0 and sh >= L * sn:  # heads-first: (b, h) -> one outer index of one stride
        for stride, ob, oh in ((sh, H, 1), (sb, 1, B)):
            if (B == 1 or sb == ob * stride) and (H == 1 or sh == oh * stride):
                return t.as_strided((B * H, g0, g1, g2, D), (stride, *inner), offset), ob, oh, 0
    return None


def _chunk_box(tile) -> tuple[int, int, int]:
    """The [CB0, CB1, CB2] box of a BM-query chunk: the tile halved (BN = 2 · BM) along its first
    dimension longer than 1."""
    t0, t1, t2 = tile
    if t0 > 1:
        return t0 // 2, t1, t2
    if t1 > 1:
        return 1, t1 // 2, t2
    return 1, 1, t2 // 2


def fused_gluon_unsupported(q: torch.Tensor, layout, text_len: int, tile_order: bool) -> str | None:
    """Why :func:`launch_fused_gluon` cannot serve this backward (None: it can)."""
    if not HAVE_GLUON:
        return f"this Triton ({triton.__version__}) has no Gluon of 3.6 or later"
    if layout.shape != "tile":
        return "the window is a circle (its edge tiles need per-token masks)"
    if layout.tile_volume != BN or any(g % t for g, t in zip(layout.grid, layout.tile)):
        return f"tiles of {layout.tile_volume} tokens or a grid not a multiple of the tile (needs {BN}, whole tiles)"
    if text_len % BN:
        return f"text length {text_len} is not a multiple of {BN}"
    if q.shape[-1] != HEAD_DIM or q.dtype not in SUPPORTED_DTYPES:
        return f"head dim {q.shape[-1]} / {q.dtype} (needs {HEAD_DIM}, fp16 or bf16)"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "not a Hopper (sm_90) GPU"
    return None


def _descriptor(t: torch.Tensor, block, layout):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), layout)


def launch_fused_gluon(q, k, v, do, lse, delta, dq_acc, dk, dv, layout, text_len: int, sl: int,
                       qk_scale: float, sm_scale: float, producer_regs: int = 40, dq_bufs: int = 1,
                       stages: int = STAGES, tile_order: bool = True) -> None:
    """dK, dV (written into ``dk``, ``dv``, (B, H, L, D) views sharing one stride set) and the
    unscaled dQ added into ``dq_acc`` (fp32 (B·H·L, D), rows in tile order, zeroed by the caller)
    of a tile-window local attention on tile-ordered (``tile_order``) or row-major tokens; ``lse``
    (log2 units) and ``delta`` the (B, H, sl) statistics rows (token-order columns, and on row-major
    tokens the image rows' tile-major copies too). The caller checks
    :func:`fused_gluon_unsupported`. The other options are variants timed on the H200
    (``benchmarks/gluon_fused_bwd.py``, 33rd session): the defaults, one dQ buffer and two stages,
    were fastest (flux-4k kernel 10.87 ms; 11.19 with two dQ buffers, 12.42 with three stages; the
    reduction issued by the consumers themselves instead of a writer warp: 11.54, removed)."""
    B, H, L, D = q.shape

    def describe(tensors):  # 2D row views and, on row-major tokens, 5D grid views
        rows = [_row_view(t) for t in tensors]
        grids = [_grid_view(t, text_len, layout.grid) for t in tensors] if not tile_order else None
        return rows, grids

    views, gviews = describe([q, k, v, do])
    k_v_apart = views[1][1:] != views[2][1:] or (gviews is not None and gviews[1][1:] != gviews[2][1:])
    if k_v_apart or any(vw is None for vw in views + (gviews or [])):
        # (k and v share their coordinates in the kernel; other strides are copied to heads-first)
        views, gviews = describe([t.contiguous() for t in (q, k, v, do)])
    (qv, q_rb, q_rh, q_ch), (kv, k_rb, k_rh, k_ch), (vv, _, _, _), (dov, do_rb, do_rh, do_ch) = views
    cb = _chunk_box(layout.tile)
    smem = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    stats = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    acc_layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    n0, n1, n2 = layout.n_tiles
    r0, r1, r2 = layout.radius
    ntb = text_len // BN
    n_text_progs = ntb * B * H
    n_tiles = n0 * n1 * n2
    row_descs = [_descriptor(qv, (BM, D), smem), _descriptor(kv, (BN, D), smem), _descriptor(vv, (BN, D), smem),
                 _descriptor(dov, (BM, D), smem)]
    if tile_order:  # every chunk is rows: the 2D descriptors stand in for the unused grid ones
        grid_descs, grid_coords = row_descs, (0,) * 9
    else:
        (qg, q_gb, q_gh, q_gc), (kg, k_gb, k_gh, k_gc), (vg, _, _, _), (dog, do_gb, do_gh, do_gc) = gviews
        g5 = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=5)
        grid_descs = [_descriptor(qg, (1, *cb, D), g5), _descriptor(kg, (1, *layout.tile, D), g5),
                      _descriptor(vg, (1, *layout.tile, D), g5), _descriptor(dog, (1, *cb, D), g5)]
        grid_coords = (q_gb, q_gh, q_gc, k_gb, k_gh, k_gc, do_gb, do_gh, do_gc)
    fused_bwd_kernel[(n_text_progs + n_tiles * B * H,)](
        *row_descs, *grid_descs, _descriptor(lse.reshape(-1), (BM,), stats),
        _descriptor(delta.reshape(-1), (BM,), stats), _descriptor(dq_acc, (BM, D), acc_layout), dk, dv,
        q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, do_rb, do_rh, do_ch, *grid_coords, *dk.stride()[:3],
        H, L, sl, text_len, n_text_progs, max(ntb, 1), n_tiles, n0, n1, n2, r0, r1, r2,
        layout.grid[1], layout.grid[2], qk_scale, sm_scale,
        BM=BM, BN=BN, D=D, TV=BN, STAGES=stages, PRODUCER_REGS=producer_regs, DQ_BUFS=dq_bufs,
        ROW_MAJOR=not tile_order, T0=layout.tile[0], T1=layout.tile[1], T2=layout.tile[2],
        CB0=cb[0], CB1=cb[1], CB2=cb[2], num_warps=8,
    )
