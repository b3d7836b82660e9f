"""Tile configurations for the Triton linear-attention kernels (``linear_triton``).

Kept apart from the kernels (NATTEN style) so that tuning touches no kernel code.
Every kernel processes whole padded head dimensions (``DK_PAD``/``DV_PAD``, the
next power of two ≥ 16); the blocks below are along the token axis, except the
state pass, which may also split the state into ``(block_dk, block_dv)`` tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD_DIM = 256  # Dk (hedgehog feature maps double it)
MAX_HEAD_DIM_FP32 = 128  # fp32 states of 256 rows overflow shared memory in the backward
MAX_VALUE_DIM = 128  # Dv: larger states no longer fit shared memory in the backward


@dataclass(frozen=True)
class LinearConfig:
    # pass 1 (partial states KᵀV and Σk over a chunk of tokens)
    state_block_n: int
    state_block_dk: int
    state_block_dv: int
    state_warps: int
    state_stages: int
    # pass 2 (apply the state to queries)
    apply_block_m: int
    apply_warps: int
    apply_stages: int
    # backward pass A (dq, partial dS and dz over a chunk of queries)
    bwdq_block_m: int
    bwdq_block_dk: int
    bwdq_warps: int
    bwdq_stages: int
    # backward pass B (dk, dv)
    bwdkv_block_n: int
    bwdkv_warps: int
    bwdkv_stages: int
    # programs per multiprocessor aimed at when a pass is split over tokens
    programs_per_sm: int = 4


def padded_dim(d: int) -> int:
    """Next power of two ≥ max(d, 16): tl.dot needs power-of-two blocks of at least 16."""
    p = 16
    while p < d:
        p *= 2
    return p


def linear_config(dk_pad: int, dv_pad: int, elem_bytes: int, interpret: bool) -> LinearConfig:
    """Tile configuration for padded head dims (dk_pad, dv_pad) and an element size in bytes."""
    if interpret:
        # CPU interpreter: small blocks so tiny test shapes still cross block and chunk edges.
        return LinearConfig(
            state_block_n=32, state_block_dk=min(dk_pad, 128), state_block_dv=min(dv_pad, 128),
            state_warps=4, state_stages=1,
            apply_block_m=32, apply_warps=4, apply_stages=1,
            bwdq_block_m=32, bwdq_block_dk=min(dk_pad, 128), bwdq_warps=4, bwdq_stages=1,
            bwdkv_block_n=32, bwdkv_warps=4, bwdkv_stages=1,
            programs_per_sm=2,
        )
    if elem_bytes == 4:
        # fp32 (IEEE dots on the FMA units; for checking, not speed): small token blocks keep
        # shared memory well under the limit (the fp32 state alone is 64 KB at 128 × 128).
        return LinearConfig(
            state_block_n=32, state_block_dk=dk_pad, state_block_dv=dv_pad, state_warps=8, state_stages=2,
            apply_block_m=32, apply_warps=8, apply_stages=1,
            bwdq_block_m=16, bwdq_block_dk=dk_pad, bwdq_warps=8, bwdq_stages=1,
            bwdkv_block_n=16, bwdkv_warps=8, bwdkv_stages=1,
        )
    if max(dk_pad, dv_pad) <= 128:
        # Hopper, head dims ≤ 128, 16-bit: tuned on H200 (see benchmarks/NOTES_linear.md).
        return LinearConfig(
            state_block_n=64, state_block_dk=dk_pad, state_block_dv=dv_pad, state_warps=4, state_stages=3,
            apply_block_m=128, apply_warps=8, apply_stages=3,
            bwdq_block_m=64, bwdq_block_dk=dk_pad, bwdq_warps=8, bwdq_stages=2,
            bwdkv_block_n=64, bwdkv_warps=8, bwdkv_stages=2,
        )
    # Hedgehog Dk = 2·Dv up to 256 (16-bit): smaller token blocks to fit shared memory.
    return LinearConfig(
        state_block_n=32, state_block_dk=min(dk_pad, 128), state_block_dv=min(dv_pad, 128),
        state_warps=8, state_stages=2,
        apply_block_m=64 if max(dk_pad, dv_pad) <= 128 else 32, apply_warps=8, apply_stages=2,
        bwdq_block_m=32, bwdq_block_dk=min(dk_pad, 128), bwdq_warps=8, bwdq_stages=1,
        bwdkv_block_n=32, bwdkv_warps=8, bwdkv_stages=1,
    )
