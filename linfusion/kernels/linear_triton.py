"""Fused Triton bidirectional linear attention, forward and backward.

Computes exactly ``linear_reference.linear_attention_reference``::

    S = (1/N) Σ_j k_jᵀ v_j        (Dk × Dv, fp32)
    z = (1/N) Σ_j k_j             (Dk, fp32)
    O_i = (q_i S) / (q_i · z + eps)

Forward, three launches:

1. ``_state_partial_kernel``: grid (token chunks, state tiles, B·H). Each program sums
   ``k_jᵀ v_j`` and ``k_j`` over one chunk of keys into fp32 registers and writes a
   partial state. Splitting N over chunks keeps the whole GPU busy when B·H is small.
2. ``_state_reduce_kernel``: sums the partial states in a fixed order (deterministic,
   no atomics) and multiplies by 1/N in fp32.
3. ``_apply_kernel``: grid (query chunks, B·H). Each program loads the state once,
   casts it to the input dtype for the tensor cores, and streams its queries:
   ``num = q S`` (fp32 accumulate), ``den = q·z + eps`` (fp32), ``O = num / den``.

Backward (gradients of q, k, v), three launches:

A. ``_bwd_q_kernel``: per query tile, recompute ``num`` and ``den`` (no O is saved),
   ``dq = (dO Sᵀ)/den + dden z`` with ``dden = -(dO·num)/den²``, and accumulate
   partial ``dS = Σ qᵀ (dO/den)`` and ``dz = Σ dden q`` in fp32.
B. ``_state_reduce_kernel`` again for ``dS/N`` and ``dz/N``.
C. ``_bwd_kv_kernel``: ``dk = v dSᵀ/N + dz/N``, ``dv = k dS/N``.

fp16 range: the 16-bit copies of S and dS/N that feed the tensor cores are divided by
a power of two (the per-(b, h) maximum rounded up), and the per-tile ``dO/den`` by
the tile's maximum, and the scale is multiplied back in fp32, so no intermediate
overflows fp16 whatever N is. bf16 has fp32's range and skips this; fp32 inputs use
IEEE fp32 dots (exact, slow; fp32 is for checking, not speed).

Head dims are padded to the next power of two ≥ 16 with masks (40 → 64, 72/80/96 →
128); Dk and Dv may differ (hedgehog: Dk = 2·Dv) and go up to 256. Any sequence
length works; Dv ≤ 128 (the state must fit in shared memory); q may have a different length M from the keys' N. Inputs need a unit
stride on the last dimension only (others are passed to the kernels).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreter_enabled
from .input_checks import check_linear_shapes
from .linear_configs import MAX_HEAD_DIM, MAX_HEAD_DIM_FP32, MAX_VALUE_DIM, LinearConfig, linear_config, padded_dim

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCE_ROWS = 16


# --------------------------------------------------------------------------- kernels


@triton.jit
def _pow2_ceil(x):
    """Smallest power of two ≥ x (x ≥ 0); 1 for x == 0."""
    return tl.where(x > 0, tl.exp2(tl.ceil(tl.log2(x))), 1.0)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST works around the CPU interpreter, whose
    tl.dot multiplies the raw bits of bf16 operands; on GPUs it is always False."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """x.to(dtype). INTERP_BF16 (CPU interpreter only, bf16) rounds to nearest even by
    hand: the interpreter's fp32 -> bf16 conversion truncates, unlike the GPU's."""
    if INTERP_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _state_partial_kernel(
    K, V, P, PZ,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, N, chunk_len, n_chunks,
    DK: tl.constexpr, DV: tl.constexpr, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_bh = tl.program_id(2)
    n_dv_blocks: tl.constexpr = DV_PAD // BLOCK_DV
    pid_k = pid_t // n_dv_blocks
    pid_v = pid_t % n_dv_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_dk = pid_k * BLOCK_DK + tl.arange(0, BLOCK_DK)
    offs_dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_dk = offs_dk < DK
    mask_dv = offs_dv < DV
    k_base = K + b * stride_kb * ALIGN + h * stride_kh * ALIGN
    v_base = V + b * stride_vb * ALIGN + h * stride_vh * ALIGN

    start = pid_c * chunk_len
    end = tl.minimum(start + chunk_len, N)
    acc = tl.zeros((BLOCK_DK, BLOCK_DV), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_DK,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        rows = offs_n.to(tl.int64)
        k = tl.load(
            k_base + rows[:, None] * stride_kn * ALIGN + offs_dk[None, :],
            mask=mask_n[:, None] & mask_dk[None, :], other=0.0,
        )
        v = tl.load(
            v_base + rows[:, None] * stride_vn * ALIGN + offs_dv[None, :],
            mask=mask_n[:, None] & mask_dv[None, :], other=0.0,
        )
        acc = _mma(tl.trans(k), v, acc, DOT_PRECISION, UPCAST)
        ksum += tl.sum(k.to(tl.float32), axis=0)

    part = pid_bh.to(tl.int64) * n_chunks + pid_c
    tl.store(P + (part * DK_PAD + offs_dk[:, None]) * DV_PAD + offs_dv[None, :], acc)
    if pid_v == 0:
        tl.store(PZ + part * DK_PAD + offs_dk, ksum)


@triton.jit
def _state_reduce_kernel(
    P, PZ, S, Z, MX, n_chunks, inv_n,
    ROWS: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, TRACK_MAX: tl.constexpr,
):
    """S[bh, rows] = inv_n · Σ_c P[bh, c, rows]; Z likewise; MX[bh, stripe] = max |S[bh, rows]|."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    offs_r = pid_r * ROWS + tl.arange(0, ROWS)
    offs_v = tl.arange(0, DV_PAD)
    acc = tl.zeros((ROWS, DV_PAD), dtype=tl.float32)
    zacc = tl.zeros((ROWS,), dtype=tl.float32)
    for c in range(n_chunks):
        part = pid_bh * n_chunks + c
        acc += tl.load(P + (part * DK_PAD + offs_r[:, None]) * DV_PAD + offs_v[None, :])
        zacc += tl.load(PZ + part * DK_PAD + offs_r)
    acc = acc * inv_n
    tl.store(S + (pid_bh * DK_PAD + offs_r[:, None]) * DV_PAD + offs_v[None, :], acc)
    tl.store(Z + pid_bh * DK_PAD + offs_r, zacc * inv_n)
    if TRACK_MAX:
        tl.store(MX + pid_bh * (DK_PAD // ROWS) + pid_r, tl.max(tl.max(tl.abs(acc), axis=1), axis=0))


@triton.jit
def _load_state(S, MX, pid_bh, offs_dk, offs_dv, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                ROWS: tl.constexpr, SCALE: tl.constexpr, dtype: tl.constexpr,
                INTERP_BF16: tl.constexpr):
    """Load rows ``offs_dk`` of an fp32 (DK_PAD × DV_PAD) state as ``dtype`` and its scale.

    With SCALE (fp16), the state is divided by a power of two ≥ its max |entry| (taken
    from the whole state, so every program and row block agrees) before the cast.
    """
    s = tl.load(S + (pid_bh * DK_PAD + offs_dk[:, None]) * DV_PAD + offs_dv[None, :])
    if SCALE:
        n_stripes: tl.constexpr = DK_PAD // ROWS
        mx = tl.max(tl.load(MX + pid_bh * n_stripes + tl.arange(0, n_stripes)), axis=0)
        scale = _pow2_ceil(mx)
        s = s / scale
    else:
        scale = 1.0
    return _cast(s, dtype, INTERP_BF16), scale


@triton.jit
def _apply_kernel(
    Q, S, Z, MX, O,
    stride_qb, stride_qh, stride_qm,
    stride_ob, stride_oh, stride_om,
    H, M, chunk_len, eps,
    DK: tl.constexpr, DV: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, ROWS: tl.constexpr,
    SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    dtype = O.dtype.element_ty

    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    mask_dk = offs_dk < DK
    mask_dv = offs_dv < DV
    s, scale = _load_state(S, MX, pid_bh, offs_dk, offs_dv, DK_PAD, DV_PAD, ROWS, SCALE, dtype, UPCAST)
    z = tl.load(Z + pid_bh * DK_PAD + offs_dk)
    q_base = Q + b * stride_qb * ALIGN + h * stride_qh * ALIGN
    o_base = O + b * stride_ob * ALIGN + h * stride_oh * ALIGN

    start = pid_c * chunk_len
    end = tl.minimum(start + chunk_len, M)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = offs_m.to(tl.int64)
        q = tl.load(
            q_base + rows[:, None] * stride_qm * ALIGN + offs_dk[None, :],
            mask=mask_m[:, None] & mask_dk[None, :], other=0.0,
        )
        num = _mma(q, s, None, DOT_PRECISION, UPCAST)
        den = tl.sum(q.to(tl.float32) * z[None, :], axis=1) + eps
        out = num * (scale / den)[:, None]
        tl.store(
            o_base + rows[:, None] * stride_om * ALIGN + offs_dv[None, :],
            _cast(out, dtype, UPCAST), mask=mask_m[:, None] & mask_dv[None, :],
        )


@triton.jit
def _bwd_q_kernel(
    Q, DO, S, Z, MX, DQ, P, PZ,
    stride_qb, stride_qh, stride_qm,
    stride_gb, stride_gh, stride_gm,
    stride_dqb, stride_dqh, stride_dqm,
    H, M, chunk_len, n_chunks, eps,
    DK: tl.constexpr, DV: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    ROWS: tl.constexpr, SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dq for this program's Dk block, partial dS = Σ qᵀ(dO/den) and dz = Σ dden·q.

    ``num`` and ``den`` need the whole Dk, so with several Dk blocks (Dk > 128) each
    program reads all of q and writes only its own block of dq, dS and dz.
    """
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    dtype = Q.dtype.element_ty
    SPLIT: tl.constexpr = BLOCK_DK < DK_PAD

    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    offs_own = pid_k * BLOCK_DK + tl.arange(0, BLOCK_DK)
    mask_dk = offs_dk < DK
    mask_dv = offs_dv < DV
    mask_own = offs_own < DK
    s, scale = _load_state(S, MX, pid_bh, offs_dk, offs_dv, DK_PAD, DV_PAD, ROWS, SCALE, dtype, UPCAST)
    z = tl.load(Z + pid_bh * DK_PAD + offs_dk)
    if SPLIT:
        s_own, _ = _load_state(S, MX, pid_bh, offs_own, offs_dv, DK_PAD, DV_PAD, ROWS, SCALE, dtype, UPCAST)
        z_own = tl.load(Z + pid_bh * DK_PAD + offs_own)
    else:
        s_own = s
        z_own = z
    q_base = Q + b * stride_qb * ALIGN + h * stride_qh * ALIGN
    g_base = DO + b * stride_gb * ALIGN + h * stride_gh * ALIGN
    dq_base = DQ + b * stride_dqb * ALIGN + h * stride_dqh * ALIGN

    ds_acc = tl.zeros((BLOCK_DK, DV_PAD), dtype=tl.float32)
    dz_acc = tl.zeros((BLOCK_DK,), dtype=tl.float32)
    start = pid_c * chunk_len
    end = tl.minimum(start + chunk_len, M)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = offs_m.to(tl.int64)
        q = tl.load(
            q_base + rows[:, None] * stride_qm * ALIGN + offs_dk[None, :],
            mask=mask_m[:, None] & mask_dk[None, :], other=0.0,
        )
        g = tl.load(
            g_base + rows[:, None] * stride_gm * ALIGN + offs_dv[None, :],
            mask=mask_m[:, None] & mask_dv[None, :], other=0.0,
        )
        if SPLIT:
            q_own = tl.load(
                q_base + rows[:, None] * stride_qm * ALIGN + offs_own[None, :],
                mask=mask_m[:, None] & mask_own[None, :], other=0.0,
            )
        else:
            q_own = q
        num = _mma(q, s, None, DOT_PRECISION, UPCAST) * scale
        den = tl.sum(q.to(tl.float32) * z[None, :], axis=1) + eps
        w = 1.0 / den
        g32 = g.to(tl.float32)
        dden = -tl.sum(g32 * num, axis=1) * w * w
        dq = _mma(g, tl.trans(s_own), None, DOT_PRECISION, UPCAST) * (scale * w)[:, None]
        dq += dden[:, None] * z_own[None, :]
        tl.store(
            dq_base + rows[:, None] * stride_dqm * ALIGN + offs_own[None, :],
            _cast(dq, DQ.dtype.element_ty, UPCAST), mask=mask_m[:, None] & mask_own[None, :],
        )
        dz_acc += tl.sum(dden[:, None] * q_own.to(tl.float32), axis=0)
        dnum = g32 * w[:, None]
        if SCALE:
            tile_scale = _pow2_ceil(tl.max(tl.max(tl.abs(dnum), axis=1), axis=0))
            ds_acc += _mma(tl.trans(q_own), _cast(dnum / tile_scale, dtype, UPCAST), None, DOT_PRECISION, UPCAST) * tile_scale
        else:
            ds_acc = _mma(tl.trans(q_own), _cast(dnum, dtype, UPCAST), ds_acc, DOT_PRECISION, UPCAST)

    part = pid_bh * n_chunks + pid_c
    tl.store(P + (part * DK_PAD + offs_own[:, None]) * DV_PAD + offs_dv[None, :], ds_acc)
    tl.store(PZ + part * DK_PAD + offs_own, dz_acc)


@triton.jit
def _bwd_kv_kernel(
    K, V, DS, DZ, MX, DKO, DVO,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, N, chunk_len,
    DK: tl.constexpr, DV: tl.constexpr, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, ROWS: tl.constexpr,
    SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dk = v (dS/N)ᵀ + dz/N and dv = k (dS/N); DS and DZ already hold the 1/N."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    dtype = K.dtype.element_ty

    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    mask_dk = offs_dk < DK
    mask_dv = offs_dv < DV
    ds, scale = _load_state(DS, MX, pid_bh, offs_dk, offs_dv, DK_PAD, DV_PAD, ROWS, SCALE, dtype, UPCAST)
    dz = tl.load(DZ + pid_bh * DK_PAD + offs_dk)
    k_base = K + b * stride_kb * ALIGN + h * stride_kh * ALIGN
    v_base = V + b * stride_vb * ALIGN + h * stride_vh * ALIGN
    dk_base = DKO + b * stride_dkb * ALIGN + h * stride_dkh * ALIGN
    dv_base = DVO + b * stride_dvb * ALIGN + h * stride_dvh * ALIGN

    start = pid_c * chunk_len
    end = tl.minimum(start + chunk_len, N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        rows = offs_n.to(tl.int64)
        k = tl.load(
            k_base + rows[:, None] * stride_kn * ALIGN + offs_dk[None, :],
            mask=mask_n[:, None] & mask_dk[None, :], other=0.0,
        )
        v = tl.load(
            v_base + rows[:, None] * stride_vn * ALIGN + offs_dv[None, :],
            mask=mask_n[:, None] & mask_dv[None, :], other=0.0,
        )
        dk = _mma(v, tl.trans(ds), None, DOT_PRECISION, UPCAST) * scale + dz[None, :]
        dv = _mma(k, ds, None, DOT_PRECISION, UPCAST) * scale
        tl.store(
            dk_base + rows[:, None] * stride_dkn * ALIGN + offs_dk[None, :],
            _cast(dk, DKO.dtype.element_ty, UPCAST), mask=mask_n[:, None] & mask_dk[None, :],
        )
        tl.store(
            dv_base + rows[:, None] * stride_dvn * ALIGN + offs_dv[None, :],
            _cast(dv, DVO.dtype.element_ty, UPCAST), mask=mask_n[:, None] & mask_dv[None, :],
        )


# --------------------------------------------------------------------------- host side


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError/RuntimeError for anything the kernels cannot compute exactly."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernel supports fp16, bf16 and fp32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    check_linear_shapes("linear attention (Triton)", k, v, q)  # the references' shape rules
    dk, dv = q.shape[3], v.shape[3]
    if not (1 <= dk <= MAX_HEAD_DIM and 1 <= dv <= MAX_VALUE_DIM):
        raise ValueError(
            f"head dims must be Dk in [1, {MAX_HEAD_DIM}] and Dv in [1, {MAX_VALUE_DIM}], got Dk={dk}, Dv={dv}"
        )
    if q.dtype == torch.float32 and dk > MAX_HEAD_DIM_FP32:
        raise ValueError(
            f"fp32 inputs support Dk ≤ {MAX_HEAD_DIM_FP32} (got {dk}): an fp32 state of Dk > 128 rows does "
            "not fit shared memory; use bf16/fp16 inputs or backend='torch'"
        )
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu" and triton_interpreter_enabled():
        return
    raise RuntimeError(
        f"linear_attention_triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is imported); got device {q.device}"
    )


def _empty(shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Every output and workspace comes from here, so tests can poison them (fill with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _token_major(like: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, L, D) tensor shaped like ``like`` in token-major memory (gradients flowing
    back into (B, L, H·D) projections then need no copy)."""
    B, H, L, D = like.shape
    return _empty((B, L, H, D), like.device, like.dtype).transpose(1, 2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(align: int, *tensors: torch.Tensor) -> list[int]:
    """(B, H, L) strides of each tensor in units of ``align`` elements (the last stride is 1)."""
    return [st // align for t in tensors for st in t.stride()[:3]]


def _alignment(*tensors: torch.Tensor) -> int:
    """Elements per 16 bytes when every non-last stride is a multiple of it, else 1.

    The kernels multiply the strides they receive by this constexpr, which tells the
    compiler that every row starts 16-byte aligned, so it emits 16-byte vector loads and
    asynchronous copies even for head dims such as 40 (rows of 80 bytes).
    """
    align = 16 // tensors[0].element_size()
    for t in tensors:
        if any(st % align for st in t.stride()[:3]) or t.data_ptr() % 16:
            return 1
    return align


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """Dots on 16-bit inputs multiply exactly and accumulate in fp32 whatever this says;
    fp32 inputs get IEEE fp32 dots (FMA units: exact but slow; TF32 variants would need
    more shared memory than Hopper has for Dk = 256), so fp32 matches the reference to ~1e-6."""
    return "ieee"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _chunking(length: int, block: int, programs_per_chunk_set: int, target_programs: int) -> tuple[int, int]:
    """Split ``length`` tokens into chunks of whole blocks: (chunk_len, n_chunks).

    Aims at ``target_programs`` programs in total when each chunk spawns
    ``programs_per_chunk_set`` programs (B·H times the state tiles).
    """
    n_blocks = triton.cdiv(length, block)
    want = max(1, triton.cdiv(target_programs, programs_per_chunk_set))
    blocks_per_chunk = triton.cdiv(n_blocks, min(want, n_blocks))
    chunk_len = blocks_per_chunk * block
    return chunk_len, triton.cdiv(length, chunk_len)


def _get_config(q: torch.Tensor, dk_pad: int, dv_pad: int, config: LinearConfig | None) -> LinearConfig:
    if config is not None:
        return config
    return linear_config(dk_pad, dv_pad, q.element_size(), q.device.type != "cuda")


def _reduce(p, pz, bh, n_chunks, inv_n, dk_pad, dv_pad, track_max, device):
    s = _empty((bh, dk_pad, dv_pad), device, torch.float32)
    z = _empty((bh, dk_pad), device, torch.float32)
    mx = _empty((bh, dk_pad // REDUCE_ROWS), device, torch.float32) if track_max else s
    _state_reduce_kernel[(bh, dk_pad // REDUCE_ROWS)](
        p, pz, s, z, mx, n_chunks, inv_n,
        ROWS=REDUCE_ROWS, DK_PAD=dk_pad, DV_PAD=dv_pad, TRACK_MAX=track_max, num_warps=4,
    )
    return s, z, mx


def _state(k, v, cfg, dtype, inv_n):
    """Passes 1-2: padded fp32 state ``s`` (B·H, Dk_pad, Dv_pad) = inv_n · Σ kᵀv, ``z`` likewise,
    and (fp16 inputs) the per-stripe max |s| used by the apply pass to scale into fp16 range."""
    B, H, N, DK = k.shape
    DV = v.shape[3]
    dk_pad, dv_pad = padded_dim(DK), padded_dim(DV)
    bh = B * H
    target = cfg.programs_per_sm * _num_sms(k.device)
    upcast = k.device.type != "cuda" and dtype == torch.bfloat16
    align = _alignment(k, v)
    bdk, bdv = min(cfg.state_block_dk, dk_pad), min(cfg.state_block_dv, dv_pad)
    tiles = (dk_pad // bdk) * (dv_pad // bdv)
    chunk_len, n_chunks = _chunking(N, cfg.state_block_n, bh * tiles, target)
    p = _empty((bh, n_chunks, dk_pad, dv_pad), k.device, torch.float32)
    pz = _empty((bh, n_chunks, dk_pad), k.device, torch.float32)
    _state_partial_kernel[(n_chunks, tiles, bh)](
        k, v, p, pz, *_strides(align, k, v), H, N, chunk_len, n_chunks, DK=DK, DV=DV, ALIGN=align,
        BLOCK_N=cfg.state_block_n, BLOCK_DK=bdk, BLOCK_DV=bdv, DK_PAD=dk_pad, DV_PAD=dv_pad,
        DOT_PRECISION=_dot_precision(dtype, k.device), UPCAST=upcast, num_warps=cfg.state_warps,
        num_stages=cfg.state_stages,
    )
    return _reduce(p, pz, bh, n_chunks, inv_n, dk_pad, dv_pad, dtype == torch.float16, k.device)


def _apply(q, s, z, mx, eps, cfg, dv):
    """Pass 3: O = (q s) / (q·z + eps) for (B, H, M, Dk) queries and a padded fp32 state."""
    B, H, M, DK = q.shape
    dk_pad, dv_pad = s.shape[-2], s.shape[-1]
    bh = B * H
    # token-major memory, returned as a heads-first view: the processors' (B, H, M, D) -> (B, M, H·D)
    # step is then free instead of a full copy of the output
    o = _empty((B, M, H, dv), q.device, q.dtype).transpose(1, 2)
    if M > 0:
        align = _alignment(q, o)
        chunk_len, n_chunks = _chunking(M, cfg.apply_block_m, bh, cfg.programs_per_sm * _num_sms(q.device))
        _apply_kernel[(n_chunks, bh)](
            q, s, z, mx, o, *_strides(align, q, o), H, M, chunk_len, eps, DK=DK, DV=dv, ALIGN=align,
            BLOCK_M=cfg.apply_block_m, DK_PAD=dk_pad, DV_PAD=dv_pad, ROWS=REDUCE_ROWS,
            SCALE=q.dtype == torch.float16, DOT_PRECISION=_dot_precision(q.dtype, q.device),
            UPCAST=q.device.type != "cuda" and q.dtype == torch.bfloat16,
            num_warps=cfg.apply_warps, num_stages=cfg.apply_stages,
        )
    return o


def _forward(q, k, v, eps, config=None):
    dk_pad, dv_pad = padded_dim(q.shape[3]), padded_dim(v.shape[3])
    cfg = _get_config(q, dk_pad, dv_pad, config)
    s, z, mx = _state(k, v, cfg, q.dtype, 1.0 / k.shape[2])
    return _apply(q, s, z, mx, eps, cfg, v.shape[3]), s, z, mx


def _backward(q, k, v, s, z, mx, do, eps, config=None):
    B, H, M, DK = q.shape
    N, DV = k.shape[2], v.shape[3]
    dk_pad, dv_pad = padded_dim(DK), padded_dim(DV)
    cfg = _get_config(q, dk_pad, dv_pad, config)
    bh = B * H
    target = cfg.programs_per_sm * _num_sms(q.device)
    prec = _dot_precision(q.dtype, q.device)
    scale = q.dtype == torch.float16
    upcast = q.device.type != "cuda" and q.dtype == torch.bfloat16
    do = _last_dim_contiguous(do)

    # pass A: dq and partial dS, dz over query chunks
    dq = _token_major(q)
    bdk = min(cfg.bwdq_block_dk, dk_pad)
    k_blocks = dk_pad // bdk
    if M > 0:
        align = _alignment(q, do, dq)
        chunk_len, n_chunks = _chunking(M, cfg.bwdq_block_m, bh * k_blocks, target)
        p = _empty((bh, n_chunks, dk_pad, dv_pad), q.device, torch.float32)
        pz = _empty((bh, n_chunks, dk_pad), q.device, torch.float32)
        _bwd_q_kernel[(n_chunks, k_blocks, bh)](
            q, do, s, z, mx, dq, p, pz, *_strides(align, q, do, dq),
            H, M, chunk_len, n_chunks, eps, DK=DK, DV=DV, ALIGN=align,
            BLOCK_M=cfg.bwdq_block_m, BLOCK_DK=bdk, DK_PAD=dk_pad, DV_PAD=dv_pad, ROWS=REDUCE_ROWS,
            SCALE=scale, DOT_PRECISION=prec, UPCAST=upcast, num_warps=cfg.bwdq_warps, num_stages=cfg.bwdq_stages,
        )
    else:  # no queries: dS = 0, dz = 0
        n_chunks = 1
        p = torch.zeros(bh, 1, dk_pad, dv_pad, device=q.device, dtype=torch.float32)
        pz = torch.zeros(bh, 1, dk_pad, device=q.device, dtype=torch.float32)
    ds, dz, dmx = _reduce(p, pz, bh, n_chunks, 1.0 / N, dk_pad, dv_pad, scale, q.device)

    # pass B: dk, dv
    dk, dv = _token_major(k), _token_major(v)
    align = _alignment(k, v, dk, dv)
    chunk_len, n_chunks = _chunking(N, cfg.bwdkv_block_n, bh, target)
    _bwd_kv_kernel[(n_chunks, bh)](
        k, v, ds, dz, dmx, dk, dv, *_strides(align, k, v, dk, dv), H, N, chunk_len,
        DK=DK, DV=DV, ALIGN=align,
        BLOCK_N=cfg.bwdkv_block_n, DK_PAD=dk_pad, DV_PAD=dv_pad, ROWS=REDUCE_ROWS,
        SCALE=scale, DOT_PRECISION=prec, UPCAST=upcast, num_warps=cfg.bwdkv_warps, num_stages=cfg.bwdkv_stages,
    )
    return dq, dk, dv


class LinearAttentionTriton(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v and the fp32 state (not O; it is recomputed)."""

    @staticmethod
    def forward(ctx, q, k, v, eps, config=None):
        o, s, z, mx = _forward(q, k, v, eps, config)
        ctx.save_for_backward(q, k, v, s, z, mx)
        ctx.eps = eps
        ctx.config = config
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, s, z, mx = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, s, z, mx, do, ctx.eps, ctx.config)
        return dq, dk, dv, None, None


def linear_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6, config: LinearConfig | None = None
) -> torch.Tensor:
    """Mean-normalised bidirectional linear attention on the Triton kernels.

    Args:
        q: (B, H, M, Dk) non-negative feature-mapped queries (fp16, bf16 or fp32).
        k: (B, H, N, Dk) non-negative feature-mapped keys, N ≥ 1.
        v: (B, H, N, Dv) values. Dk ≤ 256 (≤ 128 in fp32), Dv ≤ 128.
        eps: added to the mean-normalised denominator.
        config: tile configuration (default: ``linear_configs.linear_config``).

    Returns:
        (B, H, M, Dv) in the input dtype; differentiable w.r.t. q, k and v.

    Raises:
        ValueError: unsupported dtype, rank, shapes or head dims.
        RuntimeError: tensors not on CUDA (and not on CPU under TRITON_INTERPRET=1).
    """
    _check_inputs(q, k, v)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return LinearAttentionTriton.apply(q, k, v, float(eps), config)


# ------------------------------------------------------------------ state / apply entry points
# For callers that combine states before applying them (context parallelism all-reduces the
# per-rank sums). Inference only: no autograd (the dispatch in ``kernels/__init__`` uses the
# reference whenever gradients are needed).


def linear_state_triton(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean state of one sequence on the Triton kernels (same as ``linear_attention_state``).

    Args:
        k: (B, H, N, Dk) non-negative feature-mapped keys, N ≥ 1.
        v: (B, H, N, Dv) values.

    Returns:
        kv (B, H, Dk, Dv) = (1/N) Σ_j k_jᵀ v_j and k_mean (B, H, Dk), both fp32.
    """
    _check_inputs(k[:, :, :0], k, v)
    k, v = (_last_dim_contiguous(t) for t in (k, v))
    B, H, N, DK = k.shape
    DV = v.shape[3]
    dk_pad, dv_pad = padded_dim(DK), padded_dim(DV)
    s, z, _ = _state(k, v, _get_config(k, dk_pad, dv_pad, None), k.dtype, 1.0 / N)
    return s.view(B, H, dk_pad, dv_pad)[..., :DK, :DV], z.view(B, H, dk_pad)[..., :DK]


def linear_apply_triton(q: torch.Tensor, kv: torch.Tensor, k_mean: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Apply a (combined) fp32 state to queries on the Triton kernel.

    Args:
        q: (B, H, M, Dk) non-negative feature-mapped queries (fp16, bf16 or fp32).
        kv: (B, H, Dk, Dv) mean state, k_mean: (B, H, Dk) mean key (any float dtype; used in fp32).

    Returns:
        (B, H, M, Dv) in q's dtype: (q kv) / (q · k_mean + eps).
    """
    B, H, M, DK = q.shape
    DV = kv.shape[-1]
    if kv.shape != (B, H, DK, DV) or k_mean.shape != (B, H, DK):
        raise ValueError(f"state shapes {tuple(kv.shape)}, {tuple(k_mean.shape)} do not match queries {tuple(q.shape)}")
    _check_inputs(q, q.new_empty(B, H, 1, DK), q.new_empty(B, H, 1, DV))
    q = _last_dim_contiguous(q)
    dk_pad, dv_pad = padded_dim(DK), padded_dim(DV)
    s = torch.zeros(B * H, dk_pad, dv_pad, device=q.device, dtype=torch.float32)
    s[:, :DK, :DV] = kv.reshape(B * H, DK, DV)
    z = torch.zeros(B * H, dk_pad, device=q.device, dtype=torch.float32)
    z[:, :DK] = k_mean.reshape(B * H, DK)
    # fp16: per-stripe max |s| (the apply kernel scales the state by a power of two ≥ the max)
    mx = s.abs().view(B * H, dk_pad // REDUCE_ROWS, REDUCE_ROWS * dv_pad).amax(-1) if q.dtype == torch.float16 else s
    return _apply(q, s, z, mx, float(eps), _get_config(q, dk_pad, dv_pad, None), DV)
