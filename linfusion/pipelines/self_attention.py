"""Processor for diffusers' legacy ``Attention`` used as plain self-attention.

Replaces ``AttnProcessor2_0`` on image-only self-attention layers: SD 1.x/2.x and
SDXL UNets (``attn1``), PixArt (``attn1``) and SD3.5's extra image-only ``attn2``.
Mirrors the original's group/spatial norm, 4D input, residual and rescale handling.
"""

from __future__ import annotations

import torch

from ..methods import QKV
from ..processor import LinFusionProcessor, heads_first, heads_last


class SelfAttentionProcessor(LinFusionProcessor):
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(f"patched layer {self.layer_name!r} is self-attention but got encoder_hidden_states")
        if attention_mask is not None:
            raise ValueError(f"patched layer {self.layer_name!r}: self-attention masks are not supported")
        original = self.original_if_dense(hidden_states)
        if original is not None:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        x = hidden_states

        def project(x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[QKV, None]:
            q = heads_first(attn.to_q(x_q), attn.heads)
            k = heads_first(attn.to_k(x_k), attn.heads)
            v = heads_first(attn.to_v(x), attn.heads)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            return QKV(q, k, v), None

        out, _ = self.attend(project, x)
        out = attn.to_out[1](attn.to_out[0](heads_last(out).to(x.dtype)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
