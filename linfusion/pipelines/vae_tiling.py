"""Tiled VAE encode/decode for very large images.

``enable_tiled_vae(pipe)`` turns on diffusers' own tiling (``vae.enable_tiling()``) where the VAE
has it, optionally with a tile size; for VAEs without it, LinFusion's fallback
(:func:`tiled_decode`, :func:`tiled_encode`) is used by :func:`vae_decode` / :func:`vae_encode`,
which the high-resolution pipeline calls. The fallback cuts the input into overlapping tiles,
runs each through the VAE and blends the overlaps with linear ramps (weights fall to ~0 at a
tile's inner edges), so seams fade instead of showing.

Tiles see only their own neighbourhood, and GroupNorm statistics are per tile, so a tiled result
is close to, not equal to, the untiled one.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

_ATTR = "_linfusion_tiling"


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Fallback tiling: tile size in pixels and the overlapping fraction of a tile."""

    tile: int = 512
    overlap: float = 0.25


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent along each side (8 for SD/SDXL/SD3/FLUX VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def has_builtin_tiling(vae: nn.Module) -> bool:
    return hasattr(vae, "enable_tiling") and hasattr(vae, "use_tiling") and hasattr(vae, "tile_sample_min_size")


def enable_tiled_vae(pipe_or_vae, tile: int | None = None, overlap: float = 0.25, builtin: bool = True) -> nn.Module:
    """Tile the VAE of a pipeline (or a bare VAE); returns the VAE.

    Args:
        tile: tile size in pixels (None: the VAE's own default, e.g. its ``sample_size``; the
            fallback uses 512).
        overlap: fraction of a tile shared with its neighbour (0 < overlap < 1).
        builtin: use diffusers' tiling where the VAE has it (set False to force the fallback).
    """
    vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
    if not 0 < overlap < 1:
        raise ValueError(f"overlap must be in (0, 1), got {overlap}")
    scale = vae_scale_factor(vae)
    if tile is not None and (tile <= 0 or tile % scale):
        raise ValueError(f"tile must be a positive multiple of the VAE factor {scale}, got {tile}")
    if builtin and has_builtin_tiling(vae):
        vae.enable_tiling()
        if tile is not None:
            vae.tile_sample_min_size = tile
            vae.tile_latent_min_size = tile // scale
        vae.tile_overlap_factor = overlap
        setattr(vae, _ATTR, None)
    else:
        setattr(vae, _ATTR, TileSpec(tile or 512, overlap))
    return vae


def disable_tiled_vae(pipe_or_vae) -> None:
    vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
    if hasattr(vae, _ATTR):
        delattr(vae, _ATTR)
    if has_builtin_tiling(vae):
        vae.disable_tiling()


def _ramp(length: int, overlap: int, start_edge: bool, end_edge: bool, device, dtype) -> torch.Tensor:
    """1D blending weights: ramps over ``overlap`` at inner edges, 1 elsewhere, never exactly 0."""
    w = torch.ones(length, device=device, dtype=dtype)
    if overlap > 0:
        ramp = (torch.arange(overlap, device=device, dtype=dtype) + 0.5) / overlap
        if not start_edge:
            w[:overlap] = torch.minimum(w[:overlap], ramp[: min(overlap, length)])
        if not end_edge:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0)[-min(overlap, length):])
    return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, out_scale: float) -> torch.Tensor:
    """Run ``fn`` on overlapping ``tile``² windows of x (B, C, H, W) and blend the outputs.

    ``out_scale`` is output pixels per input pixel (8 for decode, 1/8 for encode).
    """
    _, _, h, w = x.shape
    stride = max(1, tile - overlap)
    out = weight = None
    rows, cols = _starts(h, tile, stride), _starts(w, tile, stride)
    for top in rows:
        for left in cols:
            y = fn(x[:, :, top : top + tile, left : left + tile])
            if out is None:
                oh, ow = round(h * out_scale), round(w * out_scale)
                out = torch.zeros(y.shape[0], y.shape[1], oh, ow, device=y.device, dtype=torch.float32)
                weight = torch.zeros(1, 1, oh, ow, device=y.device, dtype=torch.float32)
            o_top, o_left = round(top * out_scale), round(left * out_scale)
            th, tw = y.shape[-2:]
            o_overlap = max(1, round(overlap * out_scale)) if overlap else 0
            wy = _ramp(th, o_overlap, top == rows[0], top == rows[-1], y.device, torch.float32)
            wx = _ramp(tw, o_overlap, left == cols[0], left == cols[-1], y.device, torch.float32)
            wt = wy[:, None] * wx[None, :]
            out[:, :, o_top : o_top + th, o_left : o_left + tw] += y.float() * wt
            weight[:, :, o_top : o_top + th, o_left : o_left + tw] += wt
    return (out / weight).to(x.dtype)


def tiled_decode(vae: nn.Module, z: torch.Tensor, tile: int = 512, overlap: float = 0.25) -> torch.Tensor:
    """Decode raw latents z (B, C, h, w) tile by tile; ``tile`` in pixels. Returns (B, 3, H, W)."""
    scale = vae_scale_factor(vae)
    t = max(1, tile // scale)
    return _tiled_apply(lambda zz: vae.decode(zz).sample, z, t, int(t * overlap), scale)


def tiled_encode(vae: nn.Module, x: torch.Tensor, tile: int = 512, overlap: float = 0.25) -> torch.Tensor:
    """Encode images x (B, 3, H, W) in [-1, 1] tile by tile to the latent mean (raw, unscaled)."""
    scale = vae_scale_factor(vae)
    tile = max(scale, tile // scale * scale)
    ov = int(tile * overlap) // scale * scale
    return _tiled_apply(lambda xx: vae.encode(xx).latent_dist.mode(), x, tile, ov, 1 / scale)


def _spec(vae: nn.Module) -> TileSpec | None:
    return getattr(vae, _ATTR, None)


def vae_decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Raw latents -> images in [-1, 1], tiled when :func:`enable_tiled_vae` asked for it."""
    spec = _spec(vae)
    z = z.to(vae.dtype)
    if spec is not None:
        return tiled_decode(vae, z, spec.tile, spec.overlap)
    return vae.decode(z).sample


def vae_encode(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> raw latent mean, tiled when :func:`enable_tiled_vae` asked for it."""
    spec = _spec(vae)
    x = x.to(vae.dtype)
    if spec is not None:
        return tiled_encode(vae, x, spec.tile, spec.overlap)
    return vae.encode(x).latent_dist.mode()


def to_model_latents(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the denoiser's latent space ((z - shift) · scale)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def from_model_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift


__all__ = [
    "TileSpec",
    "disable_tiled_vae",
    "enable_tiled_vae",
    "from_model_latents",
    "tiled_decode",
    "tiled_encode",
    "to_model_latents",
    "vae_decode",
    "vae_encode",
    "vae_scale_factor",
]
