"""Local window attention (CLEAR / sliding-tile style) in plain PyTorch terms.

An image query at grid position p attends to:

* every text token (joint-attention models keep text global);
* the image tokens p' inside its window: ``Σ_d ((p'_d - p_d)/r_d)² ≤ 1`` for
  ``shape="circle"``, or whole tiles within ``ceil(r_d/t_d)`` tiles for ``shape="tile"``
  (the exact definitions live in :mod:`linfusion.kernels.local_reference`);
* optionally, a down-sampled global summary of K/V (CLEAR's global branch):
  tokens pooled d×d with a learnable kernel shared across heads, initialised to
  average pooling.

Text queries attend to every text and image key (never to pooled tokens).
There are no new parameters unless the global branch is on: the layer's own
q/k/v/out are inherited, so the patched model starts as a windowed teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import local_attention
from .base import QKV, AttentionMethod, concat_text_first, text_queries_dense


class GridPooling(nn.Module):
    """Learnable d×d (or 1×d×d for video) pooling of grid tokens, shared by all heads and channels.

    Maps (B, H, N, D) with N = prod(grid) to (B, H, P, D); initialised to average pooling.
    Partial windows at the grid edge are padded by replication.
    """

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.weight = nn.Parameter(torch.full((factor, factor), 1.0 / factor**2))

    def forward(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        b, h, n, d = x.shape
        spatial = grid[-2:]
        frames = n // (spatial[0] * spatial[1])
        # (B·H·T, D, Hs, Ws): pool every frame on its own
        y = x.reshape(b * h, frames, *spatial, d).permute(0, 1, 4, 2, 3).reshape(b * h * frames, d, *spatial)
        pad_h = -spatial[0] % self.factor
        pad_w = -spatial[1] % self.factor
        if pad_h or pad_w:
            y = F.pad(y, (0, pad_w, 0, pad_h), mode="replicate")
        kernel = self.weight.to(x.dtype).expand(d, 1, self.factor, self.factor)
        pooled = F.conv2d(y, kernel, stride=self.factor, groups=d)  # (BHT, D, h', w')
        pooled = pooled.flatten(2).transpose(1, 2)  # (BHT, P_frame, D)
        return pooled.reshape(b, h, frames * pooled.shape[1], d)


class LocalAttention(AttentionMethod):
    """Windowed attention for one patched layer.

    Args:
        radii: window radius per grid dimension ((r_h, r_w) or (r_t, r_h, r_w)),
            or a callable ``ndim -> radii`` resolved per call (images and videos).
        shape: "circle" or "tile".
        tile: tile size per dimension for "tile" (None: the kernel's default).
        global_pool: pooling factor of the global K/V branch, or None.
        backend: kernel backend (None, "triton", "torch", "fa4").
    """

    name = "local"

    def __init__(
        self,
        radii,
        shape: str = "circle",
        tile: tuple[int, ...] | None = None,
        global_pool: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.radii = radii
        self.shape = shape
        self.tile = tile
        self.backend = backend
        self.pool = GridPooling(global_pool) if global_pool else None

    def radii_for(self, grid: tuple[int, ...]) -> tuple[float, ...]:
        return self.radii(len(grid)) if callable(self.radii) else tuple(self.radii)

    def forward(
        self, img: QKV, txt: QKV | None, grid: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n_txt = 0 if txt is None else txt.q.shape[2]
        prefix = txt
        if self.pool is not None:
            # Pooled tokens join the global prefix seen by image queries only.
            pooled_k, pooled_v = self.pool(img.k, grid), self.pool(img.v, grid)
            pooled = QKV(torch.zeros_like(pooled_k), pooled_k, pooled_v)  # their queries are discarded
            prefix = pooled if txt is None else concat_text_first(pooled, txt)
        full = concat_text_first(img, prefix)
        n_prefix = 0 if prefix is None else prefix.q.shape[2]
        out = local_attention(
            full.q, full.k, full.v, grid, self.radii_for(grid), text_len=n_prefix,
            shape=self.shape, tile=self.tile, backend=self.backend,
        )
        out_img = out[:, :, n_prefix:]
        if self.pool is not None:
            return out_img, text_queries_dense(img, txt)
        return out_img, (out[:, :, :n_txt] if n_txt else None)
