"""Block sizes of the Triton local-attention kernels (kept apart from the kernels, NATTEN style).

Chosen per (pass, dtype, padded head dim, tile volume). ``BM`` is the query block (a whole
query tile or a slice of it), ``BN`` the key chunk of the inner loop. fp32 inputs use
exact fp32 dots (``input_precision="ieee"``) and smaller blocks to fit shared memory.
Override for experiments with ``set_config_override``.
"""

from __future__ import annotations

import os

import torch


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_OVERRIDE: dict[str, dict] = {}


def set_config_override(kind: str, config: dict | None) -> None:
    """Force the config of one kernel kind ("fwd", "dkdv", "dq"), or clear it with None."""
    if config is None:
        _OVERRIDE.pop(kind, None)
    else:
        _OVERRIDE[kind] = dict(config)


def local_config(kind: str, dtype: torch.dtype, d_pad: int, tile_volume: int) -> dict:
    """{"BM", "BN", "num_warps", "num_stages"} for kernel ``kind`` ("fwd", "dkdv", "dq")."""
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
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
        cfg = {"BM": tile_block, "BN": 128, "num_warps": 8, "num_stages": 3}  # H200 sweep winner at flux-4k
    elif kind == "dkdv":  # BN keys (dK, dV accumulators) × BM-query chunks; BM 64 spills at D=128
        cfg = {"BM": 32 if d_pad > 64 else 64, "BN": tile_block, "num_warps": 8, "num_stages": 3}
    else:  # dq
        cfg = {"BM": tile_block, "BN": 64, "num_warps": 8, "num_stages": 2}
    if not interp and dtype != torch.float32 and tile_block <= 64:
        # blocks of ≤ 64 rows (small tiles): one warpgroup. On the H200 a circle mask with a
        # 64-row block split over 8 warps gave wrong results (13×21 grid, tile 8×8); 4 warps is
        # the standard layout for 64-row wgmma blocks. (Not re-verified on the GPU yet.)
        cfg["num_warps"] = 4
    cfg.update(_OVERRIDE.get(kind, {}))
    return cfg
