"""Attention kernels: PyTorch references and Triton fast paths behind one API.

Layout everywhere is (B, heads, L, D). ``backend=None`` picks Triton on CUDA and
the reference elsewhere; see :mod:`linfusion.kernels.dispatch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .dispatch import available_backends, choose_backend
from .linear_reference import accumulation_dtype
from .linear_reference import linear_attention_apply as _apply_reference
from .linear_reference import linear_attention_reference
from .linear_reference import linear_attention_state as _state_reference
from .local_reference import local_attention_mask, local_attention_reference
from .rope_reference import rotary_embedding_reference

logger = logging.getLogger(__name__)


def _triton_rejects(check: Callable[..., None], *tensors: torch.Tensor) -> str | None:
    """The reason a Triton kernel's own input check refuses these tensors, or None."""
    try:
        check(*tensors)
    except (ValueError, TypeError, RuntimeError) as error:
        return str(error)
    return None


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6, backend: str | None = None
) -> torch.Tensor:
    """Mean-normalised bidirectional linear attention (see ``linear_reference``).

    Args:
        q: (B, H, M, Dk) non-negative feature-mapped queries.
        k: (B, H, N, Dk) non-negative feature-mapped keys.
        v: (B, H, N, Dv) values.
        eps: denominator guard (added after the 1/N mean normalisation).
        backend: None, "triton" or "torch".

    Returns:
        (B, H, M, Dv) in q's dtype; state and normaliser accumulate in fp32.
    """
    if choose_backend("linear", q, backend) == "triton":
        from .linear_triton import _check_inputs, linear_attention_triton

        # backend=None: shapes the kernel does not cover (e.g. Dv > 128) fall back to the reference;
        # an explicit backend="triton" lets the kernel raise its own error.
        reason = _triton_rejects(_check_inputs, q, k, v) if backend is None else None
        if reason is None:
            return linear_attention_triton(q, k, v, eps)
        logger.debug("linear attention: PyTorch reference, Triton refused: %s", reason)
    return linear_attention_reference(q, k, v, eps)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def linear_attention_state(
    k: torch.Tensor, v: torch.Tensor, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean state of :func:`linear_attention` on its own, for callers that combine states
    (context parallelism sums them across ranks before applying).

    Args:
        k: (B, H, N, Dk) non-negative feature-mapped keys; v: (B, H, N, Dv) values.
        backend: None, "triton" or "torch" (Triton is inference-only here: with gradients
            needed, ``None`` uses the differentiable reference).

    Returns:
        kv (B, H, Dk, Dv) = (1/N) Σ_j k_jᵀ v_j and k_mean (B, H, Dk), fp32 (float64 stays float64).
    """
    if choose_backend("linear", k, backend) == "triton":
        from .linear_triton import _check_inputs, linear_state_triton

        reason = None
        if backend is None:
            reason = "gradients needed" if _needs_grad(k, v) else _triton_rejects(_check_inputs, k[:, :, :0], k, v)
        if reason is None:
            return linear_state_triton(k, v)
        logger.debug("linear attention state: PyTorch reference (%s)", reason)
    return _state_reference(k, v)


def linear_attention_apply(
    q: torch.Tensor, kv: torch.Tensor, k_mean: torch.Tensor, eps: float = 1e-6, backend: str | None = None
) -> torch.Tensor:
    """Apply a (combined) state to queries: ``(q kv) / (q · k_mean + eps)``, (B, H, M, Dv) in q's dtype.

    Args:
        q: (B, H, M, Dk) non-negative feature-mapped queries.
        kv, k_mean: (B, H, Dk, Dv) and (B, H, Dk) from :func:`linear_attention_state` (or sums
            of such states divided by the total key count).
        backend: as in :func:`linear_attention_state`.
    """
    if choose_backend("linear", q, backend) == "triton":
        from .linear_triton import _check_inputs, linear_apply_triton

        reason = None
        if backend is None:
            dk, dv = kv.shape[-2:]
            probe_k, probe_v = q.new_empty(*q.shape[:2], 1, dk), q.new_empty(*q.shape[:2], 1, dv)
            reason = "gradients needed" if _needs_grad(q, kv, k_mean) else _triton_rejects(_check_inputs, q, probe_k, probe_v)
        if reason is None:
            return linear_apply_triton(q, kv, k_mean, eps)
        logger.debug("linear attention apply: PyTorch reference (%s)", reason)
    acc = accumulation_dtype(q.dtype)
    return _apply_reference(q, kv.to(acc), k_mean.to(acc), eps)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    window,
    text_len: int = 0,
    shape: str = "circle",
    tile: Sequence[int] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Local window attention over ``[text | grid]`` tokens (see ``local_reference``).

    Args:
        q, k, v: (B, H, L, D), L = text_len + prod(grid), text first, grid row-major.
        grid: (H, W) or (T, H, W).
        window: radius or per-dimension radii.
        text_len: leading global text tokens.
        shape: "circle" (exact ellipse) or "tile" (tile-aligned window).
        tile: tile size per dimension (default (8, 16) in 2D, (2, 8, 8) in 3D). It defines a tile
            window; for a circle it is only the kernel's unit of work (the window is exact), and the
            Triton kernel picks its own when none is given (``local_configs.circle_tile``).
        backend: None, "triton", "torch" or "fa4". "fa4" (opt-in, ``pip install flash-attn-4``) runs
            tile windows of 128-token tiles through FlashAttention-4's block-sparse kernels on
            Hopper/Blackwell GPUs (``local_fa4``) and raises, naming the reason, for anything else.

    Returns:
        (B, H, L, D) in q's dtype.
    """
    if backend == "fa4":
        from .local_fa4 import local_attention_fa4

        return local_attention_fa4(q, k, v, grid, window, text_len, shape, tile)
    if choose_backend("local", q, backend) == "triton":
        from .local_triton import _check_inputs, local_attention_triton

        reason = _triton_rejects(_check_inputs, q, k, v) if backend is None else None
        if reason is None:
            return local_attention_triton(q, k, v, grid, window, text_len, shape, tile)
        logger.debug("local attention: PyTorch reference, Triton refused: %s", reason)
    return local_attention_reference(q, k, v, grid, window, text_len, shape, tile)


def rotary_embedding(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """FLUX-style rotary position embedding of interleaved channel pairs (see ``rope_reference``).

    Args:
        x: (B, L, H, D) tokens on dim 1 (the layout the processors project into), D even.
        cos, sin: (L, D) per-token tables, as diffusers' ``FluxPosEmbed`` returns them.
        backend: None (fused Triton kernel on CUDA, reference elsewhere), "triton" or "torch".

    Returns:
        (B, L, H, D) in x's dtype, rotated in fp32.
    """
    if choose_backend("rope", x, backend) == "triton":
        from .rope_triton import check_inputs, rotary_embedding_triton

        reason = None
        if backend is None:
            reason = _triton_rejects(check_inputs, x, cos, sin)
            if reason is None and (cos.requires_grad or sin.requires_grad):
                reason = "gradients of the cos/sin tables needed"
        if reason is None:
            return rotary_embedding_triton(x, cos, sin)
        logger.debug("rotary embedding: PyTorch reference, Triton refused: %s", reason)
    return rotary_embedding_reference(x, cos, sin)


__all__ = [
    "available_backends",
    "choose_backend",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_state",
    "linear_attention_apply",
    "local_attention",
    "local_attention_mask",
    "local_attention_reference",
    "rotary_embedding",
    "rotary_embedding_reference",
]
