"""Wan 2.1 / 2.2 video transformers (self-attention ``attn1``; 2.2 has two experts)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods import QKV
from ..processor import LinFusionProcessor, heads_last
from .base import FamilyAdapter, first_tensor


def _wan_rope(x: torch.Tensor, rotary) -> torch.Tensor:
    """Wan's interleaved RoPE on (B, L, H, D), as in diffusers' WanAttnProcessor."""
    if rotary is None:
        return x
    freqs_cos, freqs_sin = rotary
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanProcessor(LinFusionProcessor):
    """Replaces ``WanAttnProcessor`` on the video self-attention layers."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"patched layer {self.layer_name!r} is unmasked self-attention")
        original = self.original_if_dense(hidden_states)
        if original is not None:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        x = hidden_states

        def project(x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[QKV, None]:
            q = _wan_rope(attn.norm_q(attn.to_q(x_q)).unflatten(2, (attn.heads, -1)), rotary_emb)
            k = _wan_rope(attn.norm_k(attn.to_k(x_k)).unflatten(2, (attn.heads, -1)), rotary_emb)
            v = attn.to_v(x).unflatten(2, (attn.heads, -1))
            return QKV(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), None

        out, _ = self.attend(project, x)
        return attn.to_out[1](attn.to_out[0](heads_last(out).type_as(x)))


class WanFamily(FamilyAdapter):
    name = "wan"
    description = "Wan 2.1/2.2 video transformer"
    model_classes = ("WanTransformer3DModel",)
    processor_classes = ("WanAttnProcessor", "WanAttnProcessor2_0")
    processor_cls = WanProcessor
    grid_dims = 3

    def self_attention_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: module for name, module in model.named_modules() if name.endswith(".attn1")}

    def token_grid(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...]:
        video = first_tensor(args, kwargs, "hidden_states")  # (B, C, F, H, W)
        pt, ph, pw = model.config.patch_size
        return video.shape[2] // pt, video.shape[3] // ph, video.shape[4] // pw
