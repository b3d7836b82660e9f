"""Probe: FA3's fused attention backward (5 matmuls, dQ added by atomics) in Gluon with explicit warp
specialisation, on dense shapes, against the split loops of ``ws_probe.py``.

Triton 3.6's automatic Hopper warp specialisation cannot build this kernel (``ws_probe.py``: the dQ
share's dot sums over the keys the consumers split). Here the partitions are explicit
(``gl.warp_specialize``), on blocks of 128 keys:

* ``fused_bwd_kernel`` ("lockstep"): the default partition, two consumer warpgroups (8 warps) in
  lockstep, runs every matmul of a block pair (Sᵀ, dPᵀ, dV, dK and the dQ share dS·K, dS through
  shared memory); a one-warp producer brings Q, dO, LSE and Δ of each query chunk by TMA into a ring
  of mbarrier-tracked stages; the dQ share is added with relaxed atomics by the consumers or, with
  ``DQ_WRITER``, by a one-warp writer fed through a shared-memory ring.
* ``fused_bwd_halves_kernel`` ("halves"): the two consumer warpgroups as independent partitions, 64
  keys each (their own dK/dV, their own dQ partial, summed by the writer), so that they drift out of
  phase as two programs on an SM do.

    python benchmarks/gluon_fused_probe.py --out gluon_fused.json --dq-writer 0 1 --halves 240:24 232:48

Same shapes and unscaled gradients as ``ws_probe.py`` (B·H 24, L 16,384, head dim 128, bf16). 24th
session on the H200 (``results/gluon_fused_24th.json``): the lockstep kernel was right at its first
run (errors as the split loops'); 28.5 ms with the atomics in the consumers, 24.97 ms with the
writer, 20.98 ms once LSE and Δ also came by TMA, against the split loops' 20.8 unspecialised and
17.85 with Triton's specialised dK/dV. The halves kernel compiles for sm_90 without spills in its
consumer loop (366 instructions at 240 registers) but has NOT been run on a GPU yet: the session's
device time ran out.
"""

import argparse
import json

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.testing import do_bench

# the TMA load's name in Triton 3.6; later releases call it async_load (same arguments)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _producer(q_desc, do_desc, lse_desc, dl_desc, q_smem, do_smem, lse_smem, dl_smem, ready, empty, row_q0, n_chunks,
              BM: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
    """Q, dO, LSE and Δ of query chunk i (rows row_q0 + i·BM..) into stage i % STAGES once its
    consumers have released it (``empty``); ``ready`` completes when all four have arrived."""
    for i in range(n_chunks):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # the first round passes at once
        mbarrier.expect(ready.index(s), 2 * BM * D * 2 + 2 * BM * 4)
        _tma_load(q_desc, [row_q0 + i * BM, 0], ready.index(s), q_smem.index(s))
        _tma_load(do_desc, [row_q0 + i * BM, 0], ready.index(s), do_smem.index(s))
        _tma_load(lse_desc, [row_q0 + i * BM], ready.index(s), lse_smem.index(s))
        _tma_load(dl_desc, [row_q0 + i * BM], ready.index(s), dl_smem.index(s))


@gluon.jit
def _dq_writer(dq_smem, dq_ready, dq_empty, dq_ptr, row_q0, n_chunks, BM: gl.constexpr, D: gl.constexpr,
               DQ_STAGES: gl.constexpr, SLICE: gl.constexpr):
    """One warp: adds each chunk's dQ share (fp32 [BM, D] in shared memory, stage i % DQ_STAGES) into
    ``dq_ptr`` with relaxed vector atomics, SLICE rows at a time, then releases the stage."""
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, 1], [1, 0])
    rows = gl.arange(0, SLICE, layout=gl.SliceLayout(1, layout))
    cols = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, layout)), 0)
    for i in range(n_chunks):
        s = i % DQ_STAGES
        mbarrier.wait(dq_ready.index(s), (i // DQ_STAGES) & 1)
        for r in gl.static_range(BM // SLICE):
            vals = dq_smem.index(s).slice(r * SLICE, SLICE, dim=0).load(layout)
            ptrs = dq_ptr + gl.expand_dims(row_q0 + i * BM + r * SLICE + rows, 1) * D + cols
            gl.atomic_add(ptrs, vals, sem="relaxed")
        mbarrier.arrive(dq_empty.index(s), count=1)


@gluon.jit
def _consumer(k_smem, v_smem, q_smem, do_smem, ds_smem, ready, empty, dq_smem, dq_ready, dq_empty, lse_smem, dl_smem,
              dq_ptr, row_q0, n_chunks, qk_scale, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
              STAGES: gl.constexpr, DQ_STAGES: gl.constexpr, DQ_WRITER: gl.constexpr, num_warps: gl.constexpr):
    """dK, dV [BN, D] of the program's keys over every query chunk, and each chunk's dQ share added
    into ``dq_ptr`` (fp32 [rows, D]); returns dK, dV (unscaled, fp32)."""
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
    dq_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, dq_layout))
    dq_cols = gl.arange(0, D, layout=gl.SliceLayout(0, dq_layout))
    for i in range(n_chunks):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        # (zero accumulators made where used: hoisted out of the loop they would hold 64 registers)
        st = warpgroup_mma(k_smem, q_smem.index(s).permute((1, 0)), gl.zeros([BN, BM], gl.float32, st_layout),
                           use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_smem, do_smem.index(s).permute((1, 0)), gl.zeros([BN, BM], gl.float32, st_layout),
                            use_acc=False, is_async=True)
        st, dpt = warpgroup_mma_wait(0, deps=(st, dpt))
        lse = lse_smem.index(s).load(cols_st)
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        dv = warpgroup_mma(gl.convert_layout(pt.to(gl.bfloat16), a_layout, assert_trivial=True), do_smem.index(s), dv, is_async=True)
        dst = (pt * (dpt - gl.expand_dims(dl_smem.index(s).load(cols_st), 0))).to(gl.bfloat16)
        dk = warpgroup_mma(gl.convert_layout(dst, a_layout, assert_trivial=True), q_smem.index(s), dk, is_async=True)
        ds_smem.store(dst)  # dS for the dQ share: transposed through shared memory
        fence_async_shared()
        gl.thread_barrier()
        dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, gl.zeros([BM, D], gl.float32, dq_layout), use_acc=False,
                           is_async=True)
        dv, dk, dq = warpgroup_mma_wait(0, deps=(dv, dk, dq))
        mbarrier.arrive(empty.index(s), count=1)  # Q, dO of this stage are read
        if DQ_WRITER:  # hand the share to the writer warp through shared memory
            s2 = i % DQ_STAGES
            mbarrier.wait(dq_empty.index(s2), ((i // DQ_STAGES) & 1) ^ 1)
            dq_smem.index(s2).store(dq)
            gl.thread_barrier()
            mbarrier.arrive(dq_ready.index(s2), count=1)
        else:
            rows = row_q0 + i * BM + dq_rows
            gl.atomic_add(dq_ptr + gl.expand_dims(rows, 1) * D + gl.expand_dims(dq_cols, 0), dq, sem="relaxed")
    return dk, dv


@gluon.jit
def fused_bwd_kernel(q_desc, do_desc, k_desc, v_desc, lse_desc, dl_desc, dq_ptr, dk_ptr, dv_ptr, L, qk_scale,
                     BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                     PRODUCER_REGS: gl.constexpr, DQ_WRITER: gl.constexpr, WRITER_REGS: gl.constexpr,
                     num_warps: gl.constexpr):
    """Program (key block, batch·head): keys pid·BN.. of row bh over all its L queries (dense)."""
    pid = gl.program_id(0)
    bh = gl.program_id(1)
    row_k0 = bh * L + pid * BN
    row_q0 = bh * L
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, D], smem)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, D], smem)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, D], smem)
    do_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, D], smem)
    ds_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, BM],
                                        gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
    stats: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], stats)
    dl_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], stats)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    DQ_STAGES: gl.constexpr = 2
    dq_smem = gl.allocate_shared_memory(gl.float32, [DQ_STAGES, BM, D],
                                        gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0]))
    dq_ready = gl.allocate_shared_memory(gl.int64, [DQ_STAGES, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [DQ_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    for s in gl.static_range(DQ_STAGES):
        mbarrier.init(dq_ready.index(s), count=1)
        mbarrier.init(dq_empty.index(s), count=1)
    mbarrier.expect(kv_bar, 2 * BN * D * 2)
    _tma_load(k_desc, [row_k0, 0], kv_bar, k_smem)
    _tma_load(v_desc, [row_k0, 0], kv_bar, v_smem)
    mbarrier.wait(kv_bar, 0)
    n_chunks = L // BM
    if DQ_WRITER:
        dk, dv = gl.warp_specialize([
            (_consumer, (k_smem, v_smem, q_smem, do_smem, ds_smem, ready, empty, dq_smem, dq_ready, dq_empty,
                         lse_smem, dl_smem, dq_ptr, row_q0, n_chunks, qk_scale, BM, BN, D, STAGES, DQ_STAGES,
                         DQ_WRITER, num_warps)),
            (_producer, (q_desc, do_desc, lse_desc, dl_desc, q_smem, do_smem, lse_smem, dl_smem, ready, empty, row_q0,
                         n_chunks, BM, D, STAGES)),
            (_dq_writer, (dq_smem, dq_ready, dq_empty, dq_ptr, row_q0, n_chunks, BM, D, DQ_STAGES, 8)),
        ], [1, 1], [PRODUCER_REGS, WRITER_REGS])
    else:
        dk, dv = gl.warp_specialize([
            (_consumer, (k_smem, v_smem, q_smem, do_smem, ds_smem, ready, empty, dq_smem, dq_ready, dq_empty,
                         lse_smem, dl_smem, dq_ptr, row_q0, n_chunks, qk_scale, BM, BN, D, STAGES, DQ_STAGES,
                         DQ_WRITER, num_warps)),
            (_producer, (q_desc, do_desc, lse_desc, dl_desc, q_smem, do_smem, lse_smem, dl_smem, ready, empty, row_q0,
                         n_chunks, BM, D, STAGES)),
        ], [1], [PRODUCER_REGS])
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    rows = row_k0 + gl.arange(0, BN, layout=gl.SliceLayout(1, out_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, out_layout))
    offs = gl.expand_dims(rows, 1) * D + gl.expand_dims(cols, 0)
    gl.store(dk_ptr + offs, gl.convert_layout(dk, out_layout).to(gl.bfloat16))
    gl.store(dv_ptr + offs, gl.convert_layout(dv, out_layout).to(gl.bfloat16))


@gluon.jit
def _half_consumer(HALF: gl.constexpr, k_smem, v_smem, q_smem, do_smem, ds_smem, ready, empty, dq_smem, dq_ready,
                   dq_empty, lse_smem, dl_smem, dk_ptr, dv_ptr, row_k0, n_chunks, qk_scale, BM: gl.constexpr,
                   HN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
    """One warpgroup on keys HALF·HN.. of the block, independent of the other half's (so the two drift
    out of phase and fill each other's gaps, like two programs on an SM): dK, dV of its keys, stored
    at the end, and per chunk its dQ partial over its keys, handed to the writer in its own slot."""
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    dqh_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, D // 2, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    cols_st: gl.constexpr = gl.SliceLayout(0, st_layout)
    k_h = k_smem.slice(HALF * HN, HN, dim=0)
    v_h = v_smem.slice(HALF * HN, HN, dim=0)
    ds_h = ds_smem.index(HALF)
    dk = gl.zeros([HN, D], gl.float32, acc_layout)
    dv = gl.zeros([HN, D], gl.float32, acc_layout)
    for i in range(n_chunks):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        st = warpgroup_mma(k_h, q_smem.index(s).permute((1, 0)), gl.zeros([HN, BM], gl.float32, st_layout),
                           use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_h, do_smem.index(s).permute((1, 0)), gl.zeros([HN, BM], gl.float32, st_layout),
                            use_acc=False, is_async=True)
        st, dpt = warpgroup_mma_wait(0, deps=(st, dpt))
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse_smem.index(s).load(cols_st), 0))
        dv = warpgroup_mma(gl.convert_layout(pt.to(gl.bfloat16), a_layout, assert_trivial=True), do_smem.index(s), dv,
                           is_async=True)
        dst = (pt * (dpt - gl.expand_dims(dl_smem.index(s).load(cols_st), 0))).to(gl.bfloat16)
        dk = warpgroup_mma(gl.convert_layout(dst, a_layout, assert_trivial=True), q_smem.index(s), dk, is_async=True)
        ds_h.store(dst)
        fence_async_shared()
        gl.thread_barrier()
        dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
        mbarrier.arrive(empty.index(s), count=1)  # (the stage's barrier counts both halves)
        mbarrier.wait(dq_empty.index(HALF), (i & 1) ^ 1)
        # the dQ partial in two column halves (32 registers each, not 64: fewer in-flight accumulators)
        for c in gl.static_range(2):
            dq = warpgroup_mma(ds_h.permute((1, 0)), k_h.slice(c * (D // 2), D // 2, dim=1),
                               gl.zeros([BM, D // 2], gl.float32, dqh_layout), use_acc=False, is_async=True)
            dq = warpgroup_mma_wait(0, deps=(dq,))
            dq_smem.index(HALF).slice(c * (D // 2), D // 2, dim=1).store(dq)
        gl.thread_barrier()
        mbarrier.arrive(dq_ready.index(HALF), count=1)
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    rows = row_k0 + HALF * HN + gl.arange(0, HN, layout=gl.SliceLayout(1, out_layout))
    offs = gl.expand_dims(rows, 1) * D + gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, out_layout)), 0)
    gl.store(dk_ptr + offs, gl.convert_layout(dk, out_layout).to(gl.bfloat16))
    gl.store(dv_ptr + offs, gl.convert_layout(dv, out_layout).to(gl.bfloat16))


@gluon.jit
def _dq_writer_halves(dq_smem, dq_ready, dq_empty, dq_ptr, row_q0, n_chunks, BM: gl.constexpr, D: gl.constexpr,
                      SLICE: gl.constexpr):
    """One warp: per chunk, the two halves' dQ partials summed and added into ``dq_ptr`` by atomics."""
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, 1], [1, 0])
    rows = gl.arange(0, SLICE, layout=gl.SliceLayout(1, layout))
    cols = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, layout)), 0)
    for i in range(n_chunks):
        mbarrier.wait(dq_ready.index(0), i & 1)
        mbarrier.wait(dq_ready.index(1), i & 1)
        for r in gl.static_range(BM // SLICE):
            vals = dq_smem.index(0).slice(r * SLICE, SLICE, dim=0).load(layout)
            vals += dq_smem.index(1).slice(r * SLICE, SLICE, dim=0).load(layout)
            ptrs = dq_ptr + gl.expand_dims(row_q0 + i * BM + r * SLICE + rows, 1) * D + cols
            gl.atomic_add(ptrs, vals, sem="relaxed")
        mbarrier.arrive(dq_empty.index(0), count=1)
        mbarrier.arrive(dq_empty.index(1), count=1)


@gluon.jit
def fused_bwd_halves_kernel(q_desc, do_desc, k_desc, v_desc, lse_desc, dl_desc, dq_ptr, dk_ptr, dv_ptr, L, qk_scale,
                            BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                            CONSUMER_REGS: gl.constexpr, WRITER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """``fused_bwd_kernel`` with the two consumer warpgroups as independent partitions (the default
    one and a worker), each on half the block's keys."""
    HN: gl.constexpr = BN // 2
    pid = gl.program_id(0)
    bh = gl.program_id(1)
    row_k0 = bh * L + pid * BN
    row_q0 = bh * L
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, D], smem)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, D], smem)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, D], smem)
    do_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, D], smem)
    ds_smem = gl.allocate_shared_memory(gl.bfloat16, [2, HN, BM], smem)
    stats: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], stats)
    dl_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], stats)
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, BM, D],
                                        gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0]))
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    dq_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    for s in gl.static_range(2):
        mbarrier.init(dq_ready.index(s), count=1)
        mbarrier.init(dq_empty.index(s), count=1)
    mbarrier.expect(kv_bar, 2 * BN * D * 2)
    _tma_load(k_desc, [row_k0, 0], kv_bar, k_smem)
    _tma_load(v_desc, [row_k0, 0], kv_bar, v_smem)
    mbarrier.wait(kv_bar, 0)
    n_chunks = L // BM
    gl.warp_specialize([
        (_half_consumer, (0, k_smem, v_smem, q_smem, do_smem, ds_smem, ready, empty, dq_smem, dq_ready, dq_empty,
                          lse_smem, dl_smem, dk_ptr, dv_ptr, row_k0, n_chunks, qk_scale, BM, HN, D, STAGES)),
        (_half_consumer, (1, k_smem, v_smem, q_smem, do_smem, ds_smem, ready, empty, dq_smem, dq_ready, dq_empty,
                          lse_smem, dl_smem, dk_ptr, dv_ptr, row_k0, n_chunks, qk_scale, BM, HN, D, STAGES)),
        (_producer, (q_desc, do_desc, lse_desc, dl_desc, q_smem, do_smem, lse_smem, dl_smem, ready, empty, row_q0,
                     n_chunks, BM, D, STAGES)),
        (_dq_writer_halves, (dq_smem, dq_ready, dq_empty, dq_ptr, row_q0, n_chunks, BM, D, 8)),
    ], [4, 1, 1], [CONSUMER_REGS, 24, WRITER_REGS])


def descriptors(tensors, block_rows: int, D: int):
    """Gluon TMA descriptors of [rows, D] bf16 tensors, boxes of ``block_rows`` rows."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [block_rows, D], layout) for t in tensors]


def stats_descriptors(tensors, block: int):
    """Gluon TMA descriptors of flat fp32 [rows] statistics, runs of ``block`` values."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    return [TensorDescriptor(t, list(t.shape), [1], [block], layout) for t in tensors]


def run(BH: int, L: int, D: int, check: bool, stages: int = 2, producer_regs: int = 24, dq_writer: bool = False,
        writer_regs: int = 24, halves: bool = False, consumer_regs: int = 240) -> dict:
    """Gradients against ``ws_probe.reference`` (``check``) or the median time of one launch."""
    import ws_probe

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(BH, L, D, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = D ** -0.5
    if check:
        dq_r, dk_r, dv_r, lse, delta = ws_probe.reference(q, k, v, do, scale)
    else:
        lse = torch.randn(BH, L, device="cuda") + 10.0
        delta = torch.randn(BH, L, device="cuda")
    lse2 = (lse * 1.4426950408889634).contiguous()
    flat = [t.reshape(BH * L, D) for t in (q, do, k, v)]
    qd, dod = descriptors(flat[:2], 64, D)
    kd, vd = descriptors(flat[2:], 128, D)
    dq = torch.zeros(BH * L, D, device="cuda")
    dk, dv = torch.full_like(flat[0], float("nan")), torch.full_like(flat[0], float("nan"))

    def fn_halves():
        dq.zero_()
        stats = stats_descriptors((lse2.reshape(-1), delta.reshape(-1)), 64)
        fused_bwd_halves_kernel[(L // 128, BH)](qd, dod, kd, vd, *stats, dq, dk, dv, L, scale * 1.4426950408889634, BM=64, BN=128, D=D,
                                                STAGES=stages, CONSUMER_REGS=consumer_regs, WRITER_REGS=writer_regs,
                                                num_warps=4)

    def fn_lockstep():
        dq.zero_()
        fused_bwd_kernel[(L // 128, BH)](qd, dod, kd, vd, *stats_descriptors((lse2.reshape(-1), delta.reshape(-1)), 64),
                                         dq, dk, dv, L,
                                         scale * 1.4426950408889634, BM=64, BN=128, D=D, STAGES=stages,
                                         PRODUCER_REGS=producer_regs, DQ_WRITER=dq_writer, WRITER_REGS=writer_regs,
                                         num_warps=8)

    fn = fn_halves if halves else fn_lockstep
    fn()
    torch.cuda.synchronize()
    rec = {"BH": BH, "L": L, "kernel": "halves" if halves else "lockstep", "stages": stages,
           "producer_regs": producer_regs, "dq_writer": dq_writer or halves, "writer_regs": writer_regs}
    if halves:
        rec["consumer_regs"] = consumer_regs
    if check:
        pairs = ((dk.view(BH, L, D), dk_r), (dv.view(BH, L, D), dv_r), (dq.view(BH, L, D), dq_r))
        rec["rel_err"] = [float((a.float() - b).norm() / b.norm()) for a, b in pairs]
    else:
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        rec["ms"], rec["tflops"] = ms, 5 * 2 * BH * L * L * D / ms / 1e9
    return rec


def main(argv=None) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", default=[2])
    parser.add_argument("--dq-writer", type=int, nargs="+", default=[0, 1], help="0: atomics in the consumers")
    parser.add_argument("--halves", nargs="*", default=[], metavar="CONSUMER_REGS:WRITER_REGS",
                        help="also the independent-halves kernel with these register splits (e.g. 240:24 232:48)")
    args = parser.parse_args(argv)
    out = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "cuda": torch.version.cuda}, "records": []}
    for stages, writer in ((st, bool(w)) for st in args.stages for w in args.dq_writer):
        for check in (True, False):
            rec = run(2, 1024, 128, True, stages, dq_writer=writer) if check else \
                run(24, 16384, 128, False, stages, dq_writer=writer)
            print(rec, flush=True)
            out["records"].append(rec)
            Path(args.out).write_text(json.dumps(out, indent=1))
    for split in args.halves:
        cregs, wregs = (int(x) for x in split.split(":"))
        for check in (True, False):
            shape = (2, 1024, 128) if check else (24, 16384, 128)
            rec = run(*shape, check, args.stages[0], writer_regs=wregs, halves=True, consumer_regs=cregs)
            print(rec, flush=True)
            out["records"].append(rec)
            Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
