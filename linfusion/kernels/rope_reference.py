"""Rotary position embedding (RoPE) in plain PyTorch: the reference of ``rope_triton``.

FLUX-style interleaved pairs: channels (2i, 2i+1) of every head are one complex number
rotated by the token's angle. With per-token tables ``cos``/``sin`` of shape (L, D)
(each value repeated for both channels of a pair, as diffusers builds them)::

    out[2i]   = x[2i]   · cos[2i]   − x[2i+1] · sin[2i]
    out[2i+1] = x[2i+1] · cos[2i+1] + x[2i]   · sin[2i+1]

computed in fp32 and cast back to x's dtype. This is the arithmetic of diffusers'
``apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)``,
op for op, so the reference reproduces the stock processors bit for bit.
"""

from __future__ import annotations

import torch

from .input_checks import check_float_dtypes


def rotary_embedding_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` by per-token angles.

    Args:
        x: (B, L, H, D) tokens on dim 1, D even.
        cos, sin: (L, D) tables (fp32 in diffusers).

    Returns:
        (B, L, H, D) in x's dtype.
    """
    check_float_dtypes("rotary_embedding", x=x, cos=cos, sin=sin)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rotary embedding expects x of shape (B, L, H, D) with even D, got {tuple(x.shape)}")
    if cos.shape != (x.shape[1], x.shape[3]) or sin.shape != cos.shape:
        raise ValueError(
            f"rotary tables must be (L, D) = {(x.shape[1], x.shape[3])}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    cos, sin = cos[None, :, None, :].to(x.device), sin[None, :, None, :].to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)
