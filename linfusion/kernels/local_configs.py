"""Block sizes of the Triton local-attention kernels (kept apart from the kernels, NATTEN style).

Chosen per (pass, dtype, padded head dim, tile volume). ``BM`` is the query block (a whole
query tile or a slice of it), ``BN`` the key chunk of the inner loop. fp32 inputs use
exact fp32 dots (``input_precision="ieee"``) and smaller blocks to fit shared memory.
Override for experiments with ``set_config_override``.
"""

from __future__ import annotations


import torch

from .dispatch import triton_interpreter_enabled


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_OVERRIDE: dict[str, dict] = {}


def set_config_override(kind: str, config: dict | None) -> None:
    """Force the config of one kernel kind ("fwd", "dkdv", "dq", "dkdv_fused", "dq_ws": see
    ``dq_ws_config``), or clear it with None."""
    if config is None:
        _OVERRIDE.pop(kind, None)
    else:
        _OVERRIDE[kind] = dict(config)


def dq_ws_config() -> dict | None:
    """Keyword arguments of ``local_dkdv_hopper.launch_dq_ws`` (block_m, block_n, num_stages) when
    ``backward="split_ws"`` is to run the warp-specialised dQ kernel too, else None (the default:
    on the H200 it was level or slower end to end, ``ws_dq_29th.json``). Opt in with
    ``set_config_override("dq_ws", {})`` or
    with explicit blocks, e.g. ``{"block_m": 64, "block_n": 128}``."""
    if "dq_ws" not in _OVERRIDE:
        return None
    return {"block_m": 128, "block_n": 64, "num_stages": 2, **_OVERRIDE["dq_ws"]}


def local_config(kind: str, dtype: torch.dtype, d_pad: int, tile_volume: int, head_dim: int | None = None,
                 circle_dot: bool = False, window_mask: bool = True) -> dict:
    """{"BM", "BN", "num_warps", "num_stages"} for kernel ``kind`` ("fwd", "dkdv", "dq", "dkdv_fused"),
    plus ``"mask_dot": True`` where the circle test runs as a tensor-core dot.

    ``circle_dot``: the layout allows that dot (a circle in formula mode whose features are exact,
    ``local_layout.mask_dot_exact``); it is used where the H200 measured it faster
    (``_circle_dot_config``). An override may set ``"mask_dot"`` too (ignored where not allowed).
    ``window_mask``: the window needs a per-token mask (circles; False for tile windows), which
    decides the backward's dot order (``_dot_order_config``) and two measured exceptions of the
    split dK/dV kernel (``"stats_tma": False``: LSE and Δ by pointers rather than TMA;
    ``"dense_whole": False``: its dense loop compiled for partial chunks).

    "dkdv_fused" is the dK/dV kernel of ``backward="fused_dq"`` (it also adds dQ with atomics): its
    own H200-swept blocks where they were measured (bf16/fp16, head dim 128, whole 128-token tiles,
    no "dkdv" override), else the dK/dV config; any "dkdv_fused" override on top.
    ``head_dim`` (default ``d_pad``): the backward's swept configs apply where they were verified
    on the H200, head dim 128; of the head dims padded to 128, 72 (PixArt) has its own swept dK/dV
    blocks on whole 128-token tiles, 80 and 96 keep the earlier ones. Head dims padded to 64
    (33..64: SDXL's 64, SD 1.5's 40) have their own swept configs, every kind."""
    head_dim = d_pad if head_dim is None else head_dim
    if kind == "dkdv_fused":
        cfg = local_config("dkdv", dtype, d_pad, tile_volume, head_dim)
        if _swept_fused(dtype, head_dim, tile_volume) and head_dim == 128 and "dkdv" not in _OVERRIDE:
            # H200 sweeps (benchmarks/results/kernels_local_sweep_dkdv_fused_{1,2}.json, flux-4k): 128-key blocks
            # halve the atomic adds per query row, and need 8 warps for their dK/dV accumulators;
            # fused backward 19.1 ms circle / 17.9 ms tile, against 35.4 / 31.3 ms with dK/dV's blocks
            cfg = {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 2}
        if _swept_fused(dtype, head_dim, tile_volume):
            # dQ by TMA reductions where the kernel can (local_triton._dq_tma_allowed): 14th session,
            # interleaved in one call (benchmarks/results/ab_local_dq_tma_14th.json), against the
            # per-element atomics: circle backward flux-4k 19.16 -> 18.73 ms, sdxl-4k 1.785 -> 1.576,
            # Wan 5.30 -> 4.94; tile windows 1.5-3.6% too. (no tensor-core circle test: _circle_dot_config)
            cfg = {**cfg, "dq_tma": True}
        return {**cfg, **_OVERRIDE.get(kind, {})}
    interp = triton_interpreter_enabled()
    tile_block = max(16, min(128, _pow2(tile_volume)))
    if interp:
        # the interpreter's cost is per operation, not per element: large blocks (the caller
        # clamps them to the tile volume)
        if kind == "dkdv":
            cfg = {"BM": 128, "BN": 128, "num_warps": 4, "num_stages": 1}
        else:
            cfg = {"BM": tile_block, "BN": 128, "num_warps": 4, "num_stages": 1}
    elif dtype == torch.float32:
        cfg = {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 2}  # exact fp32 dots (no tensor cores)
    elif kind == "fwd":
        if d_pad == 64:  # H200 sweep at sdxl-4k (kernels_local_sweep_sdxl4k.json): 1.15x over the row below
            cfg = {"BM": tile_block, "BN": 64, "num_warps": 4, "num_stages": 3}
        else:
            cfg = {"BM": tile_block, "BN": 128, "num_warps": 8, "num_stages": 3}  # H200 sweep winner at flux-4k
    elif kind == "dkdv":  # BN keys (dK, dV accumulators) × BM-query chunks
        if d_pad == 64:
            # H200 sweep at sdxl-4k (2×10×16384×64): one warpgroup on 128 keys × 32-query chunks, backward
            # 1.20x over 8 warps on 128 keys × 64 queries (both windows), gradients bit-identical
            cfg = {"BM": 32, "BN": tile_block, "num_warps": 4, "num_stages": 2}
            if head_dim == 64 and not circle_dot:
                # 17th session, two calls (ab_local_lazy_17th.json, ab_local_dpt_17th.json): the tile
                # window's backward 1.358 -> 1.315 and 1.344 -> 1.304 ms with dPᵀ before the dV dot;
                # the circle's 1.498 -> 1.510 (not taken)
                cfg["dpt_first"] = True
        elif head_dim == 128:
            # H200 sweep (benchmarks/results/kernels_local_sweep.json, flux-4k, D=128, 8×16 tiles): one
            # warpgroup on 64 keys × 64-query chunks; backward 17.9 ms against 21.0 ms with the earlier
            # 8 warps on 128 keys × 32 queries (circle 21.0 vs 23.9), gradients bit-identical
            cfg = {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2}
        elif head_dim == 72 and tile_block == 128:
            # H200 sweep at pixart-4k (1×16×65536×72, kernels_local_sweep_pixart4k.json): backward 1.07x
            # (circle) / 1.10x (tile) over the row below, gradients bit-identical; 80 and 96 not swept
            cfg = {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 2}
        else:
            cfg = {"BM": 32 if d_pad > 64 else 64, "BN": tile_block, "num_warps": 8, "num_stages": 3}
    elif d_pad == 64:  # dq; the sdxl-4k sweep: one warpgroup, 3 stages (circle backward 1.14x, tile 1.03x)
        cfg = {"BM": tile_block, "BN": 64, "num_warps": 4, "num_stages": 3}
    else:  # dq; 3 stages at D=128: 19.0 vs 21.0 ms backward in the same sweep (circle 23.4 vs 23.9)
        cfg = {"BM": tile_block, "BN": 64, "num_warps": 8, "num_stages": 3 if head_dim == 128 else 2}
    if not interp and dtype != torch.float32 and tile_block <= 64:
        # blocks of ≤ 64 rows (small tiles): one warpgroup. On the H200 a circle mask with a
        # 64-row block split over 8 warps gave wrong results (13×21 grid, tile 8×8); 4 warps is
        # the standard layout for 64-row wgmma blocks. (Not re-verified on the GPU yet.)
        cfg["num_warps"] = 4
    if not interp and dtype != torch.float32:
        cfg.update(_tma_loads_config(kind, head_dim, tile_block, circle_dot))
        if kind == "fwd" and head_dim == 128 and tile_block <= 64:
            # text programs of two 64-row blocks sharing each K/V chunk (half their key traffic from
            # L2). 17th session, interleaved (benchmarks/results/ab_local_textpair_17th.json), FLUX
            # circles on 8×8 tiles: flux-2k 1.385 -> 1.355 ms, 4k 5.67 -> 5.53, 8k 24.42 -> 23.56.
            # (128-row blocks: the two halves' buffers exceed shared memory.)
            cfg["text_pair"] = True
            # image programs of two neighbouring 64-token tiles sharing the K/V chunks both windows hold
            # (local_triton._image_pairs decides where a launch can). 18th session, interleaved
            # (benchmarks/results/ab_local_imgpair_18th.json, ab_local_imgpair_order_18th.json), circles:
            # flux-2k 1.343 -> 1.296 ms, 4k 5.627 -> 5.256, 8k 23.05 -> 22.22, Wan 720p (1×8×8 tiles,
            # 10 tile columns) 3.452 -> 3.313. Not at other head dims (ab_local_imgpair_hd_18th.json:
            # sdxl-4k 0.447 -> 0.566, pixart-4k 2.90 -> 3.23, head dim 96 2.528 -> 2.479).
            cfg["img_pair"] = True
    if circle_dot and not interp:
        cfg.update(_circle_dot_config(kind, dtype, d_pad, head_dim, tile_block))
    if not interp and dtype != torch.float32:
        cfg.update(_dot_order_config(kind, head_dim, window_mask))
        if kind == "dkdv" and head_dim in (64, 72) and not window_mask:
            # Two exceptions the H200 measured for the tile window's dK/dV kernel (22nd session,
            # benchmarks/results/ab_dense_whole_22nd.json, ab_notext_22nd.json). Head dim 64: LSE and Δ
            # by pointers rather than TMA (local_triton._stats_descriptors; sdxl-4k backward 1.096
            # against 1.163 ms; its circle 1.187 with TMA, 1.252 without; flux-4k tile 14.26 with,
            # 16.45 without). Head dim 72: the dense loop compiled for partial chunks (DENSE_WHOLE
            # off). Without text that loop never runs, but its body changes how ptxas allocates the
            # window loop's registers: PixArt backward 7.48 against 7.91 ms (sdxl-4k the other way:
            # 1.082 against 1.148 ms)
            if head_dim == 64:
                cfg["stats_tma"] = False
            else:
                cfg["dense_whole"] = False
    cfg.update(_OVERRIDE.get(kind, {}))
    return cfg


def _dot_order_config(kind: str, head_dim: int, window_mask: bool) -> dict:
    """Issue dP right after the scores, before the exponentials, where the H200 measured it faster
    (20th session, interleaved in one call each: ``benchmarks/results/ab_early_20th.json``,
    ``ab_order_20th.json``, ``ab_order_hd_20th.json``). Triton waits for each dot whose result the
    same iteration uses right after issuing it; with dP issued second the two waits come back to
    back, and the exponentials, the mask and dS run as one stretch.

    * dQ (``"dp_early"``), every window at head dims 64, 72 and 128: dQ kernel sdxl-4k circle
      0.534 -> 0.508 ms, tile 0.448 -> 0.439; Wan 480p circle 1.610 -> 1.553, tile 1.836 -> 1.682;
      flux-2k circle 1.518 -> 1.481, tile 1.571 -> 1.402; flux-4k tile 6.22 -> 5.87, circle 6.16 ->
      6.15; PixArt (72) backward circle 9.22 -> 9.14, tile 8.70 -> 8.56. Not at 80 and 96 (one padded
      kernel; head dim 96: circle 8.03 -> 7.98, tile 9.04 -> 9.10).
    * dK/dV (``"dpt_early"``), tile windows only (no per-token mask), head dims 64 to 128: dK/dV
      kernel flux-4k 9.82 -> 9.45 ms, flux-2k 2.44 -> 2.27, Wan 480p 2.80 -> 2.62, sdxl-4k 0.817 (dPᵀ
      first) -> 0.812; backward PixArt 8.56 -> 8.28, head dim 96 9.10 -> 8.52. With a circle's mask
      between the two dots it is slower (flux-4k dK/dV 9.68 -> 12.57 ms: dPᵀ stays live through the
      mask, 14 -> 20 spills; head dim 96 backward 7.98 -> 8.22).

    With both, split backward (5 interleaved repeats, ``ab_order_20th.json``): flux-4k tile 16.45 ->
    15.98 ms, circle 16.31 -> 16.29; flux-1k tile 0.956 -> 0.930, circle 0.970 -> 0.957; Wan 720p tile
    10.56 -> 10.25, circle 9.78 -> 9.68; sdxl-4k tile 1.269 -> 1.252, circle 1.468 -> 1.443."""
    if kind == "dq" and head_dim in (64, 72, 128):
        # and a circle's mask on the scores (-inf) before the exponentials rather than on P after them:
        # the mask's own K = 16 dot and wait follow the scores' and dP's (ab_maskscores_20th.json, dQ
        # kernel: flux-4k 5.99 -> 5.91 ms, flux-2k 1.517 -> 1.455, sdxl-4k 0.508 -> 0.503, Wan 480p 1.553
        # -> 1.542; bit-identical gradients). dK/dV was slower so (flux-4k 9.71 -> 10.44 ms): not offered.
        return {"dp_early": True, **({"mask_scores": True} if window_mask and head_dim != 72 else {})}
    if kind == "dkdv" and not window_mask and head_dim in (64, 72, 80, 96, 128):
        # (takes precedence over "dpt_first": local_triton._dpt_order); and at head dims 72 and 128 the
        # window's chunks by division (local_triton._chunk_at): with the loop-carried counters every
        # other kernel uses, this dK/dV kernel ran slower on the H200 (21st session,
        # benchmarks/results/ab_counters_21st.json, ab_counters_more_21st.json: dK/dV kernel flux-4k
        # 9.37 -> 9.75 ms; split backward Wan 480p 4.33 -> 4.50, 720p 10.33 -> 10.64), and again with
        # the LSE and Δ by TMA (22nd session, ab_stats_tma_22nd.json: dK/dV flux-4k 8.19 against 8.47
        # ms, Wan 480p 2.16 / 2.27, PixArt 4.71 / 5.50); at head dim 64 faster (sdxl-4k 1.256 -> 1.171)
        # and at 80 / 96, whose dK/dV has no TMA loads (ab_divchunks0_22nd.json: head dim 96 4.79 -> 4.56)
        return {"dpt_early": True, **({"div_chunks": True} if head_dim in (72, 128) else {})}
    return {}


def _tma_loads_config(kind: str, head_dim: int, tile_block: int, circle_dot: bool = False) -> dict:
    """TMA loads of the tiles each kernel's loops walk (``local_triton._tma_loads_allowed`` decides
    where a launch can use them), where the H200 measured them faster in the 15th session
    (``benchmarks/results/ab_local_tma_15th.json``, ``ab_local_t8_15th.json``: interleaved in one
    call each), at head dims 64 and 128:

    * forward on 128-token tiles: flux-4k tile window 5.35 -> 4.74 ms, circle 5.91 -> 5.80; sdxl-4k
      tile 0.432 -> 0.410 (its circle, ``circle_dot``, is slower: 0.500 -> 0.524, so no TMA loads there);
    * forward on 64-token tiles at head dim 128, with 2 stages (two programs share an SM: 104 KB of
      shared memory each): flux-4k circle on 8×8 tiles 7.86 -> 5.65 ms, Wan's circle on 1×8×8 tiles
      2.22 -> 1.50 ms (3 stages 7.14 / 1.98, 4 stages 7.25 / 2.08);
    * the split backward's dK/dV and dQ kernels: flux-4k circle 19.19 -> 18.86 ms, tile 17.49 ->
      17.64 (within the spread of repeats), sdxl-4k tile 1.396 -> 1.345, Wan tile 4.82 -> 4.48; on
      64-token tiles at head dim 128 with a 2-stage dQ kernel: flux-4k circle 20.28 -> 16.93 ms
      (3 stages 18.61), Wan circle 5.71 -> 4.61.

    Not the fused backward's dK/dV kernel (flux-4k circle 18.91 -> 20.32 ms: it spills already).

    Head dim 72 (PixArt-Σ, padded to 128; 16th session, ``ab_local_hd_16th.json``, pixart-4k,
    bit-identical results): TMA loads everywhere, whose per-token pointer loads of 144-byte rows
    were the bottleneck: forward circle (8×16 tiles) 6.05 -> 3.91 ms, on 8×8 tiles 6.24 -> 2.90,
    tile window 5.57 -> 2.93; split backward 16.26 -> 11.50, on 8×8 tiles 18.98 -> 9.22, tile
    window 14.60 -> 9.44 (all with 2 stages for the forward and dQ). On 128-token tiles 3 stages
    for both (17th session, ``ab_local_pixart_17th.json``): tile window forward 2.93 -> 2.15 ms,
    backward 9.50 -> 8.87; on 8×8 tiles 2 stages stay (3: forward 2.90 -> 3.72, backward 9.21 -> 10.13).

    Head dims 80 and 96 (padded to 128; 16th session, ``ab_local_hd80_96_16th.json``, 1×16×65536,
    bit-identical results): on 64-token tiles TMA loads everywhere, 2 stages for the forward and dQ
    (circle forward on 8×8 tiles 4.02 -> 2.54 ms, split backward 8.44 -> 8.01 at both); on 128-token
    tiles only the forward's, with its 3 stages (tile window 2.39 -> 2.02 ms; 2 stages 2.48; the
    backward's 9.01 -> 9.12 ms, slower)."""
    if kind not in ("fwd", "dkdv", "dq") or head_dim not in (64, 72, 80, 96, 128):
        return {}
    small_tiles = tile_block <= 64
    if (kind == "fwd" and head_dim == 64 and circle_dot) or (head_dim in (80, 96) and not small_tiles and kind != "fwd"):
        return {}
    if kind != "dkdv" and head_dim != 64 and small_tiles:
        return {"tma_loads": True, "num_stages": 2}
    if kind == "dq" and head_dim == 72:  # on 128-token tiles (the forward keeps its 3 stages)
        return {"tma_loads": True, "num_stages": 3}
    return {"tma_loads": True}


def _circle_dot_config(kind: str, dtype: torch.dtype, d_pad: int, head_dim: int, tile_block: int) -> dict:
    """The tensor-core circle test where the H200 measured it faster in every call of the 13th
    session (circle r16 with 8×16 tiles, bit-identical results; ``kernels_local_flags_*_13th_*.json``),
    and the blocks it needs.

    The forward at head dims padded to 128 (flux-4k: 6.63 → 5.73–5.87 ms, on 64-key chunks: the
    128-key chunks' three stages plus the features exceed shared memory, and two stages are
    slower) and to 64 (sdxl-4k: 1.17–1.26×); the dQ kernel at 128 (1.06–1.07× the split backward in
    three calls). Not the dK/dV kernels (split 0.96–1.06×, fused 0.95–1.04×: within the spread of
    repeated backward timings) nor dQ at 64 (0.95–1.02×). Interpreted (CPU) and fp32 runs keep the
    formula unless an override asks for the dot.

    The split dK/dV kernel on 64-token tiles at head dim 128 (19th session,
    ``ab_local_dkdv_maskdot_19th.json``): on 8×8 tiles at r = 16 every window chunk but the own
    tile's is an edge chunk (on 8×16 tiles far fewer), and the formula's ~7 fp32 operations per
    score were the dK/dV loop's largest ALU cost after the exponentials: dK/dV kernel flux-4k
    10.34 -> 9.65 ms, Wan 720p 6.87 -> 6.15."""
    if dtype not in (torch.float16, torch.bfloat16) or d_pad not in (64, 128):
        return {}
    if kind == "dkdv" and head_dim == 128 and tile_block <= 64:
        return {"mask_dot": True}
    if kind == "fwd":
        return {"mask_dot": True, **({"BN": 64} if d_pad == 128 else {})}
    if kind == "dq" and d_pad == 128:
        return {"mask_dot": True}
    return {}


def _swept_fused(dtype: torch.dtype, head_dim: int, tile_volume: int) -> bool:
    """The fused backward was measured on the H200 here: compiled (not interpreted) bf16/fp16, head
    dims 128 (flux-4k, Wan) and 64 (sdxl-4k), whole 128-token tiles."""
    return not triton_interpreter_enabled() and dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128) and tile_volume >= 128


def circle_tile(ndim: int, dtype: torch.dtype, head_dim: int) -> tuple[int, ...] | None:
    """The kernel tile of a circle window on row-major tokens when the caller gives none (None: the
    reference's default tile, ``local_reference.default_tile``).

    For a circle the tile is only the kernel's unit of work: the window is exact whatever the tile.
    Smaller query tiles visit fewer keys: at r = 16, 8×8 tiles visit the 5×5 key tiles whose nearest
    pair is within the radius, 1,600 image keys per query, against 1,920 for 8×16 tiles. On the H200
    (15th session, ``benchmarks/results/ab_local_t8_15th.json``, with the 64-token configs of
    ``_tma_loads_config``) at head dim 128: flux-4k circle forward 5.87 -> 5.65 ms, backward 18.9
    (fused) -> 16.9 ms; Wan's circle (2, 8, 8) on 1×8×8 tiles forward 1.79 -> 1.50 ms, backward
    4.96 -> 4.61 ms; at head dim 64, sdxl-4k forward 0.499 -> 0.447 ms, backward 1.576 -> 1.49 ms;
    at head dim 72 (16th session, pixart-4k, both with ``_tma_loads_config``'s TMA loads) forward
    3.91 -> 2.90 ms, backward 11.50 -> 9.22 ms; at head dim 96 (1×16×65536, against 8×16 tiles
    with pointer loads, the default there before) forward 3.21 -> 2.53 ms, backward 10.80 -> 8.01
    ms, and head dim 80 alike (its 8×8 and 8×16-tile figures match 96's within 1%: the same padded
    kernel). Compiled bf16/fp16 at head dims 64 to 128 (where it was measured; not SD 1.5's 40)."""
    if triton_interpreter_enabled() or dtype not in (torch.float16, torch.bfloat16) or head_dim not in (64, 72, 80, 96, 128):
        return None
    return (8, 8) if ndim == 2 else (1, 8, 8)


def default_backward(shape: str, dtype: torch.dtype, head_dim: int, tile_volume: int) -> str:
    """The backward variant ``backward="auto"`` starts from (see ``local_triton.BACKWARDS``;
    ``local_triton._auto_backward`` took "split_ws" where that kernel could serve the call from the
    27th to the 32nd session, when it was found to leave a dK/dV block non-finite now and then).

    "split" everywhere since the 27th session (benchmarks/results/fused_27th.json,
    auto_circle_27th.json, H200, bf16, same calls): the split backward's dK/dV and dQ kernels gained
    TMA loads of the LSE / Δ runs, mask-free whole chunks and the 8×8 circle tile, the fused one did
    not keep up: flux-4k circle on 8×16 tiles 15.83 ms split against 18.17 fused (8K 65.9 / 74.6),
    tile window 14.21 / 16.89, default 8×8 circle tiles 14.07 / 30.31, sdxl-4k 1.18 / 1.62, Wan
    480p 4.63 / 10.61. (The 14th session had measured the fused one 3–22% faster on circles.) The
    arguments stay so a future sweep can bring a case back."""
    del shape, dtype, head_dim, tile_volume
    return "split"
