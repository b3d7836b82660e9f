"""CogVideoX video transformers: joint attention over ``[text | video]`` with shared projections."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods import QKV
from ..processor import LinFusionProcessor, heads_first, heads_last
from .base import FamilyAdapter, first_tensor


class CogVideoXProcessor(LinFusionProcessor):
    """Replaces ``CogVideoXAttnProcessor2_0``; RoPE touches the video tokens only."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        if attention_mask is not None:
            raise ValueError(f"patched layer {self.layer_name!r}: attention masks are not supported")
        original = self.original_if_dense(hidden_states, encoder_hidden_states)
        if original is not None:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        x, context = hidden_states, encoder_hidden_states

        def rope(t: torch.Tensor) -> torch.Tensor:
            if image_rotary_emb is None:
                return t
            from diffusers.models.embeddings import apply_rotary_emb

            return apply_rotary_emb(t, image_rotary_emb)

        def project(x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[QKV, QKV]:
            def qk(proj, norm, inp):
                t = heads_first(proj(inp), attn.heads)
                return t if norm is None else norm(t)

            img = QKV(
                rope(qk(attn.to_q, attn.norm_q, x_q)),
                rope(qk(attn.to_k, attn.norm_k, x_k)),
                heads_first(attn.to_v(x), attn.heads),
            )
            txt = QKV(
                qk(attn.to_q, attn.norm_q, context),
                qk(attn.to_k, attn.norm_k, context),
                heads_first(attn.to_v(context), attn.heads),
            )
            return img, txt

        out_img, out_txt = self.attend(project, x, 0 if context is None else context.shape[1])
        out = torch.cat([heads_last(out_txt), heads_last(out_img)], dim=1).to(x.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        n_txt = context.shape[1]
        return out[:, n_txt:], out[:, :n_txt]


class CogVideoXFamily(FamilyAdapter):
    name = "cogvideox"
    description = "CogVideoX video transformer"
    model_classes = ("CogVideoXTransformer3DModel",)
    processor_classes = ("CogVideoXAttnProcessor2_0",)
    processor_cls = CogVideoXProcessor
    grid_dims = 3

    def self_attention_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: module for name, module in model.named_modules() if name.endswith(".attn1")}

    def token_grid(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...]:
        video = first_tensor(args, kwargs, "hidden_states")  # (B, F, C, H, W)
        patch, patch_t = model.config.patch_size, model.config.patch_size_t or 1
        return video.shape[1] // patch_t, video.shape[3] // patch, video.shape[4] // patch
