"""Probe of Triton's Hopper warp specialization on an attention backward's two loops.

FA3's backward overlaps its matmuls with loads and dQ reductions by splitting each program into a
producer warp and two consumer warpgroups with register reallocation (``setmaxnreg``). Triton 3.6 has
a pass for this on sm_90 (``add_hopper_warpspec``): a loop marked ``tl.range(..., warp_specialize=True)``
in a kernel compiled with ``num_warps=4`` and no runtime ``else`` branch becomes a producer and two
consumers (the dots' M dimension split between them). This script times dense dK/dV and dQ loops
(bf16, head dim 128; the local kernels' window loop minus its tile arithmetic) with and without it,
after checking each variant's gradients against a PyTorch reference.

One variant per process, so a hang or a launch fault cannot take the others with it:

    for i in 0 1 2 3 4 5 6; do timeout -k 5 45 python benchmarks/ws_probe.py $i; done

24th session (Triton 3.6.0, H200; ``results/ws_probe_24th.json``). Every variant compiles for sm_90
with ``ttg.warp_specialize`` and ``setmaxnreg`` (consumers 232 registers). With host descriptors
(``TensorDescriptor``) the dK/dV loops hang and the dQ loops fault (``unspecified launch failure``);
with on-device descriptors (``DEVICE_DESC``) but pointer stores, half of each block's rows are never
written; with on-device descriptors for the loads *and* the stores (``STORE_DESC``) the results are
right and the dK/dV loop runs at 648 TFLOP/s against 492-500 unspecialised (1.30x; dQ: 650 against
641-648, no gain). Compiling the local kernels' dK/dV this way failed on three further rules of the
pass: tensors split between the consumers (K, V, dK, dV) must be plain 2D descriptor loads and
stores (a reshaped 5D box, as a key tile of row-major tokens needs, crashes the data partitioning:
"Unexpected op" / "unsupported op type"), and one specialised loop per kernel (two: a dominance
assertion). See ``NOTES_local.md``, 24th session.
"""

import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from triton.testing import do_bench


@triton.jit
def _descriptors(q, do, k, v, lse, dl, n_rows, BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr,
                 STATS_PTR: tl.constexpr):
    """On-device descriptors of the [BH·L, D] operands (boxes of BQ query / BK key rows) and, unless
    STATS_PTR, of the [BH·L] statistics (boxes of BQ); the arguments are their pointers."""
    q = tl.make_tensor_descriptor(q, [n_rows, D], [D, 1], [BQ, D])
    do = tl.make_tensor_descriptor(do, [n_rows, D], [D, 1], [BQ, D])
    k = tl.make_tensor_descriptor(k, [n_rows, D], [D, 1], [BK, D])
    v = tl.make_tensor_descriptor(v, [n_rows, D], [D, 1], [BK, D])
    if not STATS_PTR:
        lse = tl.make_tensor_descriptor(lse, [n_rows], [1], [BQ])
        dl = tl.make_tensor_descriptor(dl, [n_rows], [1], [BQ])
    return q, do, k, v, lse, dl


@triton.jit
def _stats(lse, dl, start, BQ: tl.constexpr, STATS_PTR: tl.constexpr):
    """[BQ] LSE and Δ of rows start.., by pointers or by their descriptors."""
    if STATS_PTR:
        lse_run, dl_run = tl.load(lse + start + tl.arange(0, BQ)), tl.load(dl + start + tl.arange(0, BQ))
    else:  # (an early return would still compile this branch for pointers)
        lse_run, dl_run = lse.load([start]), dl.load([start])
    return lse_run, dl_run


@triton.jit
def _dkdv_pair(k, v, q, do, lse, dl, dk, dv, qk_scale):
    """One block pair of the dK/dV loop: dV += Pᵀ dO, dK += dSᵀ Q (unscaled); also dSᵀ in Q's dtype."""
    pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
    dpt = tl.dot(v, tl.trans(do))
    dv = tl.dot(pt.to(do.dtype), do, dv)
    dst = (pt * (dpt - dl[None, :])).to(q.dtype)
    dk = tl.dot(dst, q, dk)
    return dk, dv, dst


@triton.jit
def dkdv_probe(q_desc, do_desc, k_desc, v_desc, lse_desc, dl_desc, dk_ptr, dv_ptr, n_chunks, qk_scale, L_, n_rows,
               BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr, STATS_PTR: tl.constexpr,
               DEVICE_DESC: tl.constexpr, STORE_DESC: tl.constexpr = False):
    """dK, dV of BN keys (program 0) of one (batch·head) row (program 1) over all its queries, BM at a time.
    Tensors are [BH·L, D] (descriptors) and [BH·L] (LSE in log2 units, Δ; descriptors, or pointers with
    STATS_PTR); dK, dV written as bf16. With DEVICE_DESC the inputs are pointers and the kernel makes
    its descriptors (Hopper warp specialization partitions data only with on-device descriptors)."""
    if DEVICE_DESC:
        q_desc, do_desc, k_desc, v_desc, lse_desc, dl_desc = _descriptors(q_desc, do_desc, k_desc, v_desc, lse_desc,
                                                                          dl_desc, n_rows, BM, BN, D, STATS_PTR)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    row0 = bh * L_ + pid * BN
    k = k_desc.load([row0, 0])
    v = v_desc.load([row0, 0])
    dk = tl.zeros([BN, D], dtype=tl.float32)
    dv = tl.zeros([BN, D], dtype=tl.float32)
    for i in tl.range(0, n_chunks, warp_specialize=WS):
        m0 = bh * L_ + i * BM
        q = q_desc.load([m0, 0])
        do = do_desc.load([m0, 0])
        lse, dl = _stats(lse_desc, dl_desc, m0, BM, STATS_PTR)
        dk, dv, _ = _dkdv_pair(k, v, q, do, lse, dl, dk, dv, qk_scale)
    if STORE_DESC:  # (on-device descriptors only)
        tl.make_tensor_descriptor(dk_ptr, [n_rows, D], [D, 1], [BN, D]).store([row0, 0], dk.to(tl.bfloat16))
        tl.make_tensor_descriptor(dv_ptr, [n_rows, D], [D, 1], [BN, D]).store([row0, 0], dv.to(tl.bfloat16))
    else:
        offs = (row0 + tl.arange(0, BN))[:, None] * D + tl.arange(0, D)[None, :]
        tl.store(dk_ptr + offs, dk.to(tl.bfloat16))
        tl.store(dv_ptr + offs, dv.to(tl.bfloat16))


@triton.jit
def dq_probe(q_desc, do_desc, k_desc, v_desc, lse_ptr, dl_ptr, dq_ptr, n_chunks, qk_scale, L_, n_rows,
             BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr, DEVICE_DESC: tl.constexpr,
             STATS_PTR: tl.constexpr = False, STORE_DESC: tl.constexpr = False):
    """dQ of BM query rows (program 0) of one (batch·head) row (program 1) over all its keys, BN at a time."""
    if DEVICE_DESC:
        q_desc, do_desc, k_desc, v_desc, lse_ptr, dl_ptr = _descriptors(q_desc, do_desc, k_desc, v_desc, lse_ptr,
                                                                        dl_ptr, n_rows, BM, BN, D, STATS_PTR)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    row0 = bh * L_ + pid * BM
    q = q_desc.load([row0, 0])
    do = do_desc.load([row0, 0])
    rows = row0 + tl.arange(0, BM)
    lse, dl = _stats(lse_ptr, dl_ptr, row0, BM, STATS_PTR)
    dq = tl.zeros([BM, D], dtype=tl.float32)
    for i in tl.range(0, n_chunks, warp_specialize=WS):
        n0 = bh * L_ + i * BN
        k = k_desc.load([n0, 0])
        v = v_desc.load([n0, 0])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - dl[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    if STORE_DESC:
        tl.make_tensor_descriptor(dq_ptr, [n_rows, D], [D, 1], [BM, D]).store([row0, 0], dq.to(tl.bfloat16))
    else:
        offs = rows[:, None] * D + tl.arange(0, D)[None, :]
        tl.store(dq_ptr + offs, dq.to(tl.bfloat16))


@triton.jit
def fused_probe(q_desc, do_desc, k_desc, v_desc, lse_desc, dl_desc, dk_ptr, dv_ptr, dq_ptr, n_chunks, qk_scale, L_,
                n_rows, sm_scale, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr):
    """``dkdv_probe`` (on-device descriptors throughout) that also adds each block pair's dQ share
    (dS·K · scale, fp32) into ``dq_ptr`` [BH·L, D] by TMA reductions: FA3's 5-matmul backward."""
    q_desc, do_desc, k_desc, v_desc, lse_desc, dl_desc = _descriptors(q_desc, do_desc, k_desc, v_desc, lse_desc,
                                                                      dl_desc, n_rows, BM, BN, D, False)
    dq_desc = tl.make_tensor_descriptor(dq_ptr, [n_rows, D], [D, 1], [BM, D])
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    row0 = bh * L_ + pid * BN
    k = k_desc.load([row0, 0])
    v = v_desc.load([row0, 0])
    dk = tl.zeros([BN, D], dtype=tl.float32)
    dv = tl.zeros([BN, D], dtype=tl.float32)
    for i in tl.range(0, n_chunks, warp_specialize=WS):
        m0 = bh * L_ + i * BM
        q = q_desc.load([m0, 0])
        do = do_desc.load([m0, 0])
        lse, dl = _stats(lse_desc, dl_desc, m0, BM, False)
        dk, dv, dst = _dkdv_pair(k, v, q, do, lse, dl, dk, dv, qk_scale)
        dq_desc.atomic_add([m0, 0], tl.dot(tl.trans(dst), k) * sm_scale)
    tl.make_tensor_descriptor(dk_ptr, [n_rows, D], [D, 1], [BN, D]).store([row0, 0], dk.to(tl.bfloat16))
    tl.make_tensor_descriptor(dv_ptr, [n_rows, D], [D, 1], [BN, D]).store([row0, 0], dv.to(tl.bfloat16))


def reference(q, k, v, do, scale):
    """dq, dk, dv, LSE (natural log) and Δ of dense softmax attention, in fp32."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    p = torch.softmax(s, -1)
    o = p @ v.float()
    dof = do.float()
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ v.float().transpose(-1, -2)
    delta = (dof * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    return ds @ k.float(), ds.transpose(-1, -2) @ q.float(), dv, torch.logsumexp(s, -1), delta[..., 0]


def run(BH, L, D, variants, check):
    """Per variant: with ``check`` the gradients' relative error against :func:`reference` (outputs
    NaN-poisoned first), else the median time and TFLOP/s of the loop's matmuls."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(BH, L, D, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = D ** -0.5
    if check:
        dq_r, dk_r, dv_r, lse, delta = reference(q, k, v, do, scale)
    else:
        lse = torch.randn(BH, L, device="cuda") + 10.0  # timing only: any finite stats
        delta = torch.randn(BH, L, device="cuda")
    lse2 = (lse * 1.4426950408889634).contiguous()  # log2 domain
    qk_scale = scale * 1.4426950408889634
    flat = lambda t: t.reshape(-1, D)  # noqa: E731
    out = []
    for kind, ws, bm, bn, nw, ns, sp, dev, *rest in variants:
        store_desc = bool(rest and rest[0])
        fields = {"kind": kind, "ws": ws, "BM": bm, "BN": bn, "num_warps": nw, "num_stages": ns, "stats_ptr": sp,
                  "device_desc": dev, "store_desc": store_desc}
        try:
            def d2(t, b):  # a [BH·L, D] operand: its pointer, or a host descriptor of [b, D] boxes
                return flat(t) if dev else TensorDescriptor(flat(t), [BH * L, D], [D, 1], [b, D])

            def d1(t, b):  # a [BH·L] statistic
                return t.reshape(-1) if dev else TensorDescriptor(t.reshape(-1), [BH * L], [1], [b])

            opts = dict(BM=bm, BN=bn, D=D, WS=ws, DEVICE_DESC=dev, STATS_PTR=sp, STORE_DESC=store_desc, num_warps=nw,
                        num_stages=ns)
            if kind == "dkdv":
                dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
                stats = (lse2, delta.contiguous()) if sp else (d1(lse2, bm), d1(delta.contiguous(), bm))
                args = (d2(q, bm), d2(do, bm), d2(k, bn), d2(v, bn), *stats, dk, dv, L // bm, qk_scale, L, BH * L)
                fn = lambda: dkdv_probe[(L // bn, BH)](*args, **opts)  # noqa: E731
                flops = 4 * 2 * BH * L * L * D
            elif kind == "fused":
                dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
                dq = torch.zeros(BH, L, D, device="cuda")  # the fp32 accumulator of the TMA reductions
                args = (flat(q), flat(do), flat(k), flat(v), lse2.reshape(-1), delta.reshape(-1), dk, dv, dq, L // bm,
                        qk_scale, L, BH * L, 1.0)  # unscaled gradients, as the other probes and the reference

                def fn():
                    dq.zero_()
                    fused_probe[(L // bn, BH)](*args, BM=bm, BN=bn, D=D, WS=ws, num_warps=nw, num_stages=ns)
                flops = 5 * 2 * BH * L * L * D
            else:
                dq = torch.full_like(q, float("nan"))
                stats = (lse2, delta.contiguous()) if sp else (d1(lse2, bm), d1(delta.contiguous(), bm))
                args = (d2(q, bm), d2(do, bm), d2(k, bn), d2(v, bn), *stats, dq, L // bn, qk_scale, L, BH * L)
                fn = lambda: dq_probe[(L // bm, BH)](*args, **opts)  # noqa: E731
                flops = 3 * 2 * BH * L * L * D
            fn()
            torch.cuda.synchronize()
            err = None
            if check:
                if kind == "dkdv":
                    pairs = ((dk, dk_r), (dv, dv_r))
                elif kind == "dq":
                    pairs = ((dq, dq_r),)
                else:
                    pairs = ((dk, dk_r), (dv, dv_r), (dq, dq_r))
                err = max(float((a.float() - b).norm() / b.norm()) for a, b in pairs)
                if err != err:  # NaN: which 64-row halves of each block stayed unwritten, and the error elsewhere
                    got = pairs[0][0].float().reshape(-1, 64, D)
                    fields["nan_halves"] = got.isnan().any(-1).any(-1).reshape(-1)[:8].tolist()
                    fields["nan_share"] = float(got.isnan().float().mean())
                    ok = ~got.isnan().any(-1).any(-1)
                    want = pairs[0][1].reshape(-1, 64, D)
                    fields["err_written"] = float((got[ok] - want[ok]).norm() / want[ok].norm()) if ok.any() else None
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median") if not check else None
            rec = {**fields, "BH": BH, "L": L, "ms": ms, "tflops": flops / ms / 1e9 if ms else None, "rel_err": err}
        except Exception as exc:  # noqa: BLE001
            rec = {**fields, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(rec, flush=True)
        out.append(rec)
    return out


VARIANTS = [  # kind, warp_specialize, BM, BN, num_warps, num_stages, stats by pointers, on-device descriptors[, stores too]
    ("dkdv", False, 64, 64, 4, 2, False, False),   # 0: the shipped split dK/dV blocks
    ("dkdv", False, 64, 128, 8, 2, False, False),  # 1
    ("dq", False, 128, 64, 8, 3, False, False),    # 2: the shipped dQ blocks
    ("dq", True, 128, 64, 4, 2, False, False),     # 3: producer + 2 consumer warpgroups of 64 query rows
    ("dkdv", True, 64, 128, 4, 2, True, False),    # 4: producer + 2 consumer warpgroups of 64 keys
    ("dkdv", True, 64, 128, 4, 3, True, False),    # 5
    ("dq", True, 128, 64, 4, 3, False, False),     # 6
    ("dkdv", True, 64, 128, 4, 2, False, False),   # 7: hung the H200 in the first call (stats by TMA)
    ("dkdv", True, 64, 128, 4, 2, True, True),     # 8: on-device descriptors
    ("dkdv", True, 64, 128, 4, 2, False, True),    # 9
    ("dq", True, 128, 64, 4, 2, False, True),      # 10
    ("dq", True, 128, 128, 4, 2, False, True),     # 11
    ("dkdv", False, 64, 64, 4, 2, False, True),    # 12: the unspecialized loops with on-device descriptors
    ("dq", False, 128, 64, 8, 3, False, True),     # 13
    ("dq", True, 128, 64, 4, 2, True, True, True),     # 14: + results stored by descriptors
    ("dq", True, 128, 64, 4, 2, False, True, True),    # 15
    ("dkdv", True, 64, 128, 4, 2, True, True, True),   # 16
    ("dkdv", True, 64, 128, 4, 2, False, True, True),  # 17
    ("fused", False, 64, 128, 8, 2, False, True, True),  # 18: dK/dV and dQ (TMA reductions), 5 matmuls
    ("fused", False, 64, 64, 4, 2, False, True, True),   # 19
    ("fused", True, 64, 128, 4, 2, False, True, True),   # 20: does not compile (Triton 3.6)
]

if __name__ == "__main__":
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    i = int(sys.argv[1])
    res = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "cuda": torch.version.cuda}, "variant": VARIANTS[i]}
    res["check"] = run(2, 1024, 128, VARIANTS[i:i + 1], check=True)
    res["time"] = run(24, 16384, 128, VARIANTS[i:i + 1], check=False)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), f"ws_probe_{i}.json"), "w"), indent=1)
