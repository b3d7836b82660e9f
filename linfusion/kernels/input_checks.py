"""Input checks the PyTorch references share with the public API (the Triton kernels check more:
``linear_triton._check_inputs``, ``local_triton._check_inputs``).

Without them a reference would compute on integer tensors and truncate the result on the way back,
or fail inside ``einsum`` with a message that names no argument.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_dtypes(op: str, **tensors: torch.Tensor) -> None:
    """Every tensor floating point (fp16, bf16, fp32 or fp64), else a TypeError naming it."""
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; supported: float16, bfloat16, float32, float64")


def check_linear_shapes(op: str, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None:
    """q (B, H, M, Dk), k (B, H, N, Dk), v (B, H, N, Dv) with N ≥ 1, else a ValueError with the shapes."""
    named = {"k": k, "v": v} if q is None else {"q": q, "k": k, "v": v}
    shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in named.items())
    if any(t.dim() != 4 for t in named.values()):
        raise ValueError(f"{op}: expected 4-D (B, H, L, D) tensors; got {shapes}")
    if len({t.shape[:2] for t in named.values()}) != 1:
        raise ValueError(f"{op}: q, k, v must share (B, H); got {shapes}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{op}: k and v must have the same length; got {shapes}")
    if k.shape[2] == 0:
        raise ValueError(f"{op}: k and v must hold at least one token (the state is a mean over keys); got {shapes}")
    if q is not None and q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q and k must have the same head dim Dk; got {shapes}")
