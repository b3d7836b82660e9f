"""Attention kernels: PyTorch references and Triton fast paths behind one API.

Layout everywhere is (B, heads, L, D). ``backend=None`` picks Triton on CUDA and
the reference elsewhere; see :mod:`linfusion.kernels.dispatch`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence

import torch

from .dispatch import TRITON_LOCAL_CIRCLE_ENABLED, available_backends, choose_backend
from .linear_reference import linear_attention_reference
from .local_reference import local_attention_mask, local_attention_reference


logger = logging.getLogger(__name__)


def _triton_rejects(check: Callable[..., None], *tensors: torch.Tensor) -> str | None:
    """The reason a Triton kernel's own input check refuses these tensors, or None."""
    try:
        check(*tensors)
    except (ValueError, TypeError, RuntimeError) as error:
        return str(error)
    return None


@functools.lru_cache(maxsize=1)
def _warn_circle_once() -> None:
    warnings.warn(
        "LinFusion: exact circular windows run on the PyTorch reference on CUDA for now (the Triton circle "
        "path is disabled pending a verified fix); shape='tile' windows run on Triton at full speed",
        stacklevel=3,
    )


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
        tile: tile size per dimension (default (8, 16) in 2D, (2, 8, 8) in 3D).
        backend: None, "triton" or "torch".

    Returns:
        (B, H, L, D) in q's dtype.
    """
    if choose_backend("local", q, backend) == "triton":
        from .local_triton import _check_inputs, local_attention_triton

        reason = _triton_rejects(_check_inputs, q, k, v) if backend is None else None
        if backend is None and shape == "circle" and not TRITON_LOCAL_CIRCLE_ENABLED:
            reason = "the Triton circle path is disabled until its GPU fix is verified (use shape='tile')"
            _warn_circle_once()
        if reason is None:
            return local_attention_triton(q, k, v, grid, window, text_len, shape, tile)
        logger.debug("local attention: PyTorch reference, Triton refused: %s", reason)
    return local_attention_reference(q, k, v, grid, window, text_len, shape, tile)


__all__ = [
    "available_backends",
    "choose_backend",
    "linear_attention",
    "linear_attention_reference",
    "local_attention",
    "local_attention_mask",
    "local_attention_reference",
]
