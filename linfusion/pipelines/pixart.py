"""PixArt-α / PixArt-Σ transformers (self-attention ``attn1``, cross-attention ``attn2`` untouched)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import FamilyAdapter, first_tensor
from .self_attention import SelfAttentionProcessor
from .unet import LEGACY_PROCESSORS


class PixArtFamily(FamilyAdapter):
    name = "pixart"
    description = "PixArt-α/Σ transformer"
    model_classes = ("PixArtTransformer2DModel",)
    processor_classes = LEGACY_PROCESSORS
    processor_cls = SelfAttentionProcessor

    def self_attention_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: module for name, module in model.named_modules() if name.endswith(".attn1")}

    def token_grid(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...]:
        latents = first_tensor(args, kwargs, "hidden_states")  # (B, C, H, W)
        patch = model.config.patch_size
        return latents.shape[-2] // patch, latents.shape[-1] // patch
