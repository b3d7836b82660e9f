"""Stable Diffusion 3 / 3.5 joint-attention transformers (MMDiT).

SD3 concatenates image tokens *before* text tokens; SD3.5-medium blocks add an
image-only self-attention ``attn2`` with the same processor and no text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods import QKV
from ..processor import LinFusionProcessor, heads_first, heads_last
from .base import FamilyAdapter, first_tensor


def _normed(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class JointAttentionProcessor(LinFusionProcessor):
    """Replaces ``JointAttnProcessor2_0``: image tokens change, text tokens stay global."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        if attention_mask is not None:
            raise ValueError(f"patched layer {self.layer_name!r}: attention masks are not supported")
        original = self.original_if_dense(hidden_states, encoder_hidden_states)
        if original is not None:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        x, context = hidden_states, encoder_hidden_states

        def project(x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[QKV, QKV | None]:
            img = QKV(
                _normed(attn.norm_q, heads_first(attn.to_q(x_q), attn.heads)),
                _normed(attn.norm_k, heads_first(attn.to_k(x_k), attn.heads)),
                heads_first(attn.to_v(x), attn.heads),
            )
            if context is None:
                return img, None
            txt = QKV(
                _normed(attn.norm_added_q, heads_first(attn.add_q_proj(context), attn.heads)),
                _normed(attn.norm_added_k, heads_first(attn.add_k_proj(context), attn.heads)),
                heads_first(attn.add_v_proj(context), attn.heads),
            )
            return img, txt

        out_img, out_txt = self.attend(project, x, 0 if context is None else context.shape[1])
        out = attn.to_out[1](attn.to_out[0](heads_last(out_img).to(x.dtype)))
        if context is None:
            return out
        out_txt = heads_last(out_txt).to(x.dtype)
        if not attn.context_pre_only:
            out_txt = attn.to_add_out(out_txt)
        return out, out_txt


class SD3Family(FamilyAdapter):
    name = "sd3"
    description = "Stable Diffusion 3/3.5 transformer"
    model_classes = ("SD3Transformer2DModel",)
    processor_classes = ("JointAttnProcessor2_0",)
    processor_cls = JointAttentionProcessor

    def self_attention_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {
            name: module
            for name, module in model.named_modules()
            if name.startswith("transformer_blocks.") and name.endswith((".attn", ".attn2"))
        }

    def token_grid(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...]:
        latents = first_tensor(args, kwargs, "hidden_states")  # (B, C, H, W)
        patch = model.config.patch_size
        return latents.shape[-2] // patch, latents.shape[-1] // patch
