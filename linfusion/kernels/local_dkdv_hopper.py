"""Warp-specialised dK/dV kernel (Hopper) for tile windows on tile-ordered tokens.

Same function as the split backward's dK/dV kernel (``local_triton._dkdv_kernel``) and as the
gradients of :func:`linfusion.kernels.local_reference.local_attention_reference`, for the one case
where Triton 3.6's automatic Hopper warp specialisation can split its work:

* tokens in tile order (``local_layout.to_tile_order``), ``shape="tile"``, every grid dimension a
  multiple of the tile, tiles of exactly ``BN = 128`` tokens, a text length that is a multiple of
  128, head dim 128, fp16 / bf16 (:func:`ws_dkdv_supported` names what fails).

Why only there (``benchmarks/NOTES_local.md``, 24th and 25th sessions): the pass turns a loop marked
``tl.range(..., warp_specialize=True)`` into one producer warp issuing the TMA loads and two consumer
warpgroups that each own half of the key block (64 keys) with 232 registers (``setmaxnreg``). It
partitions only plain 2D descriptor loads and stores made on the device, needs ``num_warps=4``, one
such loop per kernel and no runtime ``else`` branch. With tile-ordered tokens every key tile and
every query chunk is one 2D box of ``[rows, D]``; in row-major order they are 5D boxes, which the
pass cannot split. So one program here owns one 128-key block and runs a single loop over every
query chunk that sees it; which chunk iteration ``i`` loads is pure arithmetic (the producer warp
does it):

* text-key programs (first, as their loops are the longest): every query, ``i · BM``;
* image-key programs: the text queries first (``i · BM`` for ``i < TEXT / BM``), then the query
  tiles of the symmetric window box around the key tile (clipped to the grid, row-major over the
  box), ``TV / BM`` chunks per tile.

LSE (log2 units) and Δ are read from the token-order columns of the statistics rows
(``local_triton._stats``): in tile order those are already a tile's contiguous run.

:func:`launch_dq_ws` is the same scheme for dQ (one program per query block, a loop over the text
keys and the key tiles of its window box). It matches the reference in the tests and on the H200,
but brings nothing there (29th session, ``benchmarks/results/ws_dq_29th.json``): alone it is at most
3% faster than the split backward's dQ kernel (flux-4k 5.84 against 5.91 ms at 128×128 blocks,
slower at 8K), and it needs Δ from a separate pass (0.20 ms at 4K) that the split dQ kernel
computes on the way, so ``backward="split_ws"`` with it was level or slower end to end (4K 13.38
and 13.61 against 13.36 ms). It runs only when opted in
(``local_configs.set_config_override("dq_ws", {})``); ``benchmarks/ws_dkdv.py --dq`` times it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BN = 128  # keys per program: one tile; the two consumer warpgroups take 64 each
BM = 64  # query rows per chunk (the dense probe's fastest, benchmarks/ws_probe.py)
HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _window_box(tile, N0, N1, N2, R0, R1, R2):
    """The box of tiles within tile radius (R0, R1, R2) of ``tile`` (row-major tile number),
    clipped to the N0 × N1 × N2 tile grid: its first tile (lo0, lo1, lo2), n2 = its extent in the
    last dimension, n12 = its tiles per plane, n_box = all its tiles."""
    c0 = tile // (N1 * N2)
    c1 = (tile // N2) % N1
    c2 = tile % N2
    lo0, lo1, lo2 = tl.maximum(c0 - R0, 0), tl.maximum(c1 - R1, 0), tl.maximum(c2 - R2, 0)
    n2 = tl.minimum(c2 + R2, N2 - 1) - lo2 + 1
    n12 = (tl.minimum(c1 + R1, N1 - 1) - lo1 + 1) * n2
    n_box = (tl.minimum(c0 + R0, N0 - 1) - lo0 + 1) * n12
    return lo0, lo1, lo2, n2, n12, n_box


@triton.jit
def _query_chunk_row(i, n_dense, TEXT, lo0, lo1, lo2, n12, n2, N1, N2, BM: tl.constexpr, TV: tl.constexpr):
    """First token (tile order) of query chunk ``i`` of a program: dense chunks ``i · BM`` for
    ``i < n_dense``, then ``TV / BM`` chunks per query tile of the window box starting at tile
    (lo0, lo1, lo2), whose last two dimensions span n12 = n1 · n2 tiles, n2 the last's."""
    SUBQ: tl.constexpr = TV // BM
    j = tl.maximum(i - n_dense, 0)
    t = j // SUBQ
    sub = j - t * SUBQ
    a = t // n12
    rem = t - a * n12
    c = rem // n2
    tile = ((lo0 + a) * N1 + lo1 + c) * N2 + lo2 + (rem - c * n2)
    return tl.where(i < n_dense, i * BM, TEXT + tile * TV + sub * BM)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """a @ b (+ acc) in fp32; UPCAST: fp32 operands (the CPU interpreter has no bf16 dot)."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _dkdv_ws_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
    H, L, SL, TEXT, n_text_progs, NTB, n_tiles,
    N0, N1, N2, R0, R1, R2, qk_scale, sm_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TV: tl.constexpr, WS: tl.constexpr, UPCAST: tl.constexpr,
):
    """dK, dV of one block of BN keys of one (batch, head): programs ``[0, n_text_progs)`` own BN
    text keys (NTB such blocks per head), the others one image tile. Inputs (B, H, L, D) by
    strides, tokens in tile order; LSE, DELTA (B·H, SL) fp32; DK, DV (B, H, L, D) by strides."""
    pid = tl.program_id(0)
    is_text = pid < n_text_progs
    pid_img = tl.maximum(pid - n_text_progs, 0)
    bh = tl.where(is_text, pid // NTB, pid_img // n_tiles)
    tile = pid_img - (pid_img // n_tiles) * n_tiles
    key_row = tl.where(is_text, (pid - (pid // NTB) * NTB) * BN, TEXT + tile * TV)
    b = bh // H
    h = bh - b * H
    # the window box of query tiles around this key tile (symmetric window), clipped to the grid
    lo0, lo1, lo2, n2, n12, n_box = _window_box(tile, N0, N1, N2, R0, R1, R2)
    n_dense = tl.where(is_text, L // BM, TEXT // BM)
    n_iter = n_dense + tl.where(is_text, 0, n_box * (TV // BM))
    # on-device descriptors: the only kind the warp specialisation partitions (host ones hang)
    q_d = tl.make_tensor_descriptor(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, [L, D], [sqn, 1], [BM, D])
    do_d = tl.make_tensor_descriptor(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, [L, D], [sdn, 1], [BM, D])
    k_d = tl.make_tensor_descriptor(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh, [L, D], [skn, 1], [BN, D])
    v_d = tl.make_tensor_descriptor(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh, [L, D], [svn, 1], [BN, D])
    lse_d = tl.make_tensor_descriptor(LSE + bh.to(tl.int64) * SL, [L], [1], [BM])
    delta_d = tl.make_tensor_descriptor(DELTA + bh.to(tl.int64) * SL, [L], [1], [BM])
    k = k_d.load([key_row, 0])
    v = v_d.load([key_row, 0])
    dk = tl.zeros([BN, D], dtype=tl.float32)
    dv = tl.zeros([BN, D], dtype=tl.float32)
    for i in tl.range(0, n_iter, warp_specialize=WS):
        row = _query_chunk_row(i, n_dense, TEXT, lo0, lo1, lo2, n12, n2, N1, N2, BM, TV)
        q = q_d.load([row, 0])
        do = do_d.load([row, 0])
        lse = lse_d.load([row])
        delta = delta_d.load([row])
        pT = tl.math.exp2(_mma(k, tl.trans(q), None, UPCAST) * qk_scale - lse[None, :])  # [BN, BM]
        dpT = _mma(v, tl.trans(do), None, UPCAST)
        dv = _mma(pT.to(do.dtype), do, dv, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk = _mma(dsT.to(q.dtype), q, dk, UPCAST)
    base_k = DK + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh
    base_v = DV + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh
    tl.make_tensor_descriptor(base_k, [L, D], [sgn, 1], [BN, D]).store([key_row, 0], (dk * sm_scale).to(DK.dtype.element_ty))
    tl.make_tensor_descriptor(base_v, [L, D], [sgn, 1], [BN, D]).store([key_row, 0], dv.to(DV.dtype.element_ty))


@triton.jit
def _dq_ws_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
    H, L, SL, TEXT, n_text_progs, NTQ, n_tiles,
    N0, N1, N2, R0, R1, R2, qk_scale, sm_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TV: tl.constexpr, WS: tl.constexpr, UPCAST: tl.constexpr,
):
    """dQ of one block of BM queries of one (batch, head). Programs ``[0, n_text_progs)`` own BM
    text queries (NTQ such blocks per head) and loop over every key, BN at a time; the others one BM-row slice of an image tile, and loop over the text
    keys, then the key tiles of the window box around their tile (the dK/dV kernel's walk, with keys
    in place of queries: the window is symmetric). Inputs (B, H, L, D) by strides, tokens in tile
    order; LSE, DELTA (B·H, SL) fp32, token-order columns; DQ (B, H, L, D) by strides."""
    SUBQ: tl.constexpr = TV // BM
    pid = tl.program_id(0)
    is_text = pid < n_text_progs
    pid_img = tl.maximum(pid - n_text_progs, 0)
    bh = tl.where(is_text, pid // NTQ, pid_img // (n_tiles * SUBQ))
    j = pid_img - (pid_img // (n_tiles * SUBQ)) * (n_tiles * SUBQ)
    tile = j // SUBQ
    q_row = tl.where(is_text, (pid - (pid // NTQ) * NTQ) * BM, TEXT + tile * TV + (j - tile * SUBQ) * BM)
    b = bh // H
    h = bh - b * H
    lo0, lo1, lo2, n2, n12, n_box = _window_box(tile, N0, N1, N2, R0, R1, R2)  # its key tiles
    n_dense = tl.where(is_text, L // BN, TEXT // BN)
    n_iter = n_dense + tl.where(is_text, 0, n_box * (TV // BN))
    q_d = tl.make_tensor_descriptor(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, [L, D], [sqn, 1], [BM, D])
    do_d = tl.make_tensor_descriptor(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, [L, D], [sdn, 1], [BM, D])
    k_d = tl.make_tensor_descriptor(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh, [L, D], [skn, 1], [BN, D])
    v_d = tl.make_tensor_descriptor(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh, [L, D], [svn, 1], [BN, D])
    q = q_d.load([q_row, 0])
    do = do_d.load([q_row, 0])
    # LSE and Δ by descriptors too: with pointer loads, or Δ = rowsum(dO ∘ O) reduced here, Triton
    # 3.6's warp specialisation fails to compile the loop at BM = 128 (WSLowerToken / WSDataPartition)
    delta = tl.make_tensor_descriptor(DELTA + bh.to(tl.int64) * SL, [L], [1], [BM]).load([q_row])
    lse = tl.make_tensor_descriptor(LSE + bh.to(tl.int64) * SL, [L], [1], [BM]).load([q_row])
    dq = tl.zeros([BM, D], dtype=tl.float32)
    for i in tl.range(0, n_iter, warp_specialize=WS):
        row = _query_chunk_row(i, n_dense, TEXT, lo0, lo1, lo2, n12, n2, N1, N2, BN, TV)
        k = k_d.load([row, 0])
        v = v_d.load([row, 0])
        p = tl.math.exp2(_mma(q, tl.trans(k), None, UPCAST) * qk_scale - lse[:, None])  # [BM, BN]
        dp = _mma(do, tl.trans(v), None, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, UPCAST)
    base = DQ + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh
    tl.make_tensor_descriptor(base, [L, D], [sgn, 1], [BM, D]).store([q_row, 0], (dq * sm_scale).to(DQ.dtype.element_ty))


def _aligned(t: torch.Tensor) -> bool:
    """TMA: a 16-byte aligned base and 16-byte multiples as strides (last dimension contiguous)."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])


def ws_dkdv_unsupported(q: torch.Tensor, tensors, layout, text_len: int, tile_order: bool) -> str | None:
    """Why :func:`launch_dkdv_ws` cannot serve this backward (None: it can). ``tensors``: the other
    (B, H, L, D) operands (k, v, dO, and the dK / dV outputs)."""
    if not tile_order:
        return "tokens are row-major (the warp specialisation needs every key tile as one 2D box: tile order)"
    if layout.shape != "tile":
        return "the window is a circle (its edge tiles need per-token masks)"
    if layout.tile_volume != BN or any(g % t for g, t in zip(layout.grid, layout.tile)):
        return f"tiles of {layout.tile_volume} tokens or a grid not a multiple of the tile (needs {BN}, whole tiles)"
    if text_len % BN:
        return f"text length {text_len} is not a multiple of {BN}"
    if q.shape[-1] != HEAD_DIM or q.dtype not in SUPPORTED_DTYPES:
        return f"head dim {q.shape[-1]} / {q.dtype} (needs {HEAD_DIM}, fp16 or bf16)"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) != (9, 0):
        return "not a Hopper (sm_90) GPU"
    if not all(_aligned(t) for t in (q, *tensors)):
        return "an operand is not 16-byte aligned for TMA"
    return None


@contextlib.contextmanager
def _descriptor_scratch(device: torch.device):
    """On-device descriptors need Triton's global scratch allocator; set one for this launch only
    and restore the caller's (a library must not replace it for good)."""
    from triton.runtime import _allocation

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    token = _allocation._allocator.set(alloc)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _launch_ws(kernel, pointers, strided, layout, text_len: int, sl: int, qk_scale: float, sm_scale: float,
               block_m: int, block_n: int, text_block: int, progs_per_tile: int, num_stages: int) -> None:
    """Launch one of the WS kernels: ``pointers`` its tensor arguments in order, ``strided`` the
    (B, H, L, D) ones whose batch / head / token strides follow; ``text_block`` tokens per text
    program, ``progs_per_tile`` programs per image tile (per batch and head)."""
    q = pointers[0]
    B, H, L, D = q.shape
    n0, n1, n2 = layout.n_tiles
    r0, r1, r2 = layout.radius
    n_text_blocks = text_len // text_block
    n_text_progs = n_text_blocks * B * H
    n_tiles = n0 * n1 * n2
    strides = [s for t in strided for s in t.stride()[:3]]
    with _descriptor_scratch(q.device):
        kernel[(n_text_progs + n_tiles * progs_per_tile * B * H,)](
            *pointers, *strides,
            H, L, sl, text_len, n_text_progs, max(n_text_blocks, 1), n_tiles, n0, n1, n2, r0, r1, r2, qk_scale, sm_scale,
            D=D, BM=block_m, BN=block_n, TV=layout.tile_volume, WS=q.device.type == "cuda",
            UPCAST=q.device.type != "cuda" and q.dtype == torch.bfloat16, num_warps=4, num_stages=num_stages,
        )


def launch_dkdv_ws(q, k, v, do, lse, delta, dk, dv, layout, text_len: int, sl: int,
                   qk_scale: float, sm_scale: float, num_stages: int = 2) -> None:
    """dK, dV (written into ``dk``, ``dv``, (B, H, L, D) views) of a tile-window local attention on
    tile-ordered tokens; ``lse`` (log2 units) and ``delta`` are the (B, H, sl) statistics rows.
    The caller checks :func:`ws_dkdv_unsupported` first."""
    _launch_ws(_dkdv_ws_kernel, (q, k, v, do, lse, delta, dk, dv), (q, k, v, do, dk), layout, text_len, sl,
               qk_scale, sm_scale, BM, BN, text_block=BN, progs_per_tile=1, num_stages=num_stages)


def launch_dq_ws(q, k, v, do, lse, delta, dq, layout, text_len: int, sl: int,
                 qk_scale: float, sm_scale: float, block_m: int = 128, block_n: int = 64,
                 num_stages: int = 2) -> None:
    """dQ (written into ``dq``, a (B, H, L, D) view) of a tile-window local attention on
    tile-ordered tokens; ``lse`` (log2 units) and ``delta`` (Δ = rowsum(dO ∘ O), e.g. from
    ``local_triton._launch_delta``) the (B, H, sl) statistics rows, token-order columns. Serves what
    :func:`ws_dkdv_unsupported` accepts (``block_m`` and ``block_n`` dividing 128).
    ``backward="split_ws"`` runs it only when opted in (``local_configs.dq_ws_config``; no faster
    end to end on the H200, see the module docstring); Triton 3.6 compiles it for sm_90 at
    (BM, BN) = (128, 64), (128, 128), (64, 64), (64, 128) with 2 or 3 stages, 168 registers and no
    spills (ptxas -v); 64-query blocks run twice as slow."""
    if BN % block_m or BN % block_n:
        raise ValueError(f"block_m ({block_m}) and block_n ({block_n}) must divide the {BN}-token tile")
    _launch_ws(_dq_ws_kernel, (q, k, v, do, lse, delta, dq), (q, k, v, do, dq), layout, text_len, sl,
               qk_scale, sm_scale, block_m, block_n, text_block=block_m, progs_per_tile=BN // block_m,
               num_stages=num_stages)
