"""Stable Diffusion 1.x / 2.x (incl. v-prediction) and SDXL UNets."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import FamilyAdapter, first_tensor
from .self_attention import SelfAttentionProcessor

LEGACY_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "XFormersAttnProcessor")


class UNetFamily(FamilyAdapter):
    name = "sd-unet"
    description = "Stable Diffusion 1.x/2.x/SDXL UNet"
    model_classes = ("UNet2DConditionModel",)
    processor_classes = LEGACY_PROCESSORS
    processor_cls = SelfAttentionProcessor

    def self_attention_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {
            name: module
            for name, module in model.named_modules()
            if name.endswith(".attn1") and not getattr(module, "is_cross_attention", True)
        }

    def token_grid(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...]:
        sample = first_tensor(args, kwargs, "sample")  # (B, C, H, W) latents
        return tuple(sample.shape[-2:])

    def default_mlp_ratio(self, model: nn.Module) -> float:
        # LinFusion: m = C for SD 1.x/2.x, C/16 for SDXL (recognised by its extra time/text embedding).
        return 1 / 16 if getattr(model.config, "addition_embed_type", None) == "text_time" else 1.0
