"""Attention methods: each replacement's math in plain PyTorch, one file each."""

from __future__ import annotations

from ..config import PatchConfig
from .base import QKV, AttentionMethod, SoftmaxGate, dense_attention
from .linear import LinearAttention
from .local import LocalAttention


def build_method(
    config: PatchConfig, channels: int, heads: int, head_dim: int, default_mlp_ratio: float
) -> AttentionMethod:
    """The method module of one layer with C=``channels`` input width and its head layout."""
    if config.method == "linear":
        ratio = config.mlp_ratio if config.mlp_ratio is not None else default_mlp_ratio
        return LinearAttention(
            channels,
            heads,
            head_dim,
            feature_map=config.feature_map,
            hedgehog_features=config.hedgehog_features,
            feature_mlp=config.feature_mlp,
            mlp_hidden=max(1, round(channels * ratio)),
            conv_v=config.conv_v,
            conv_kernel=config.conv_kernel,
            eps=config.eps,
            backend=config.backend,
        )
    return LocalAttention(
        config.radii, shape=config.shape, tile=config.tile, global_pool=config.global_pool, backend=config.backend
    )


__all__ = ["QKV", "AttentionMethod", "LinearAttention", "LocalAttention", "SoftmaxGate", "build_method", "dense_attention"]
