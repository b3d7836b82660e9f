"""FLUX.1 transformers: double-stream (joint) and single-stream blocks.

Both put text tokens first. Double-stream blocks project text with ``add_*_proj``;
single-stream blocks get ``[text | image]`` already concatenated and return the
attention output without an output projection. RoPE covers the whole sequence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..kernels import rotary_embedding
from ..methods import QKV
from ..processor import LinFusionProcessor, heads_last
from .base import FamilyAdapter


def _rope(x: torch.Tensor, rotary, start: int, stop: int) -> torch.Tensor:
    """Apply FLUX's RoPE rows [start, stop) to x of layout (B, L, H, D).

    One fused Triton pass on CUDA (the stock arithmetic makes ~10 elementwise passes over q
    and k, ~15% of a 4096² step once attention is linear); diffusers' exact arithmetic elsewhere.
    """
    if rotary is None:
        return x
    cos, sin = rotary
    return rotary_embedding(x, cos[start:stop], sin[start:stop])


class FluxProcessor(LinFusionProcessor):
    """Replaces ``FluxAttnProcessor`` in both block types."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:
            raise ValueError(f"patched layer {self.layer_name!r}: attention masks are not supported")
        original = self.original_if_dense(hidden_states, encoder_hidden_states)
        if original is not None:
            return original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        double_stream = encoder_hidden_states is not None
        if double_stream:
            x_txt, x_img = encoder_hidden_states, hidden_states
        else:  # single-stream: [text | image]; the text length follows from the token grid
            n_img = math.prod(self.token_grid.current())
            x_txt, x_img = hidden_states[:, :-n_img], hidden_states[:, -n_img:]
        n_txt = x_txt.shape[1]

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (-1, attn.head_dim))  # (B, L, H, D)

        def project(x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[QKV, QKV]:
            q_txt_proj, k_txt_proj, v_txt_proj = (
                (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if double_stream else (attn.to_q, attn.to_k, attn.to_v)
            )
            norm_q_txt, norm_k_txt = (attn.norm_added_q, attn.norm_added_k) if double_stream else (attn.norm_q, attn.norm_k)
            end = n_txt + x_img.shape[1]
            img = QKV(
                _rope(attn.norm_q(split_heads(attn.to_q(x_q))), image_rotary_emb, n_txt, end),
                _rope(attn.norm_k(split_heads(attn.to_k(x_k))), image_rotary_emb, n_txt, end),
                split_heads(attn.to_v(x_img)),
            )
            txt = QKV(
                _rope(norm_q_txt(split_heads(q_txt_proj(x_txt))), image_rotary_emb, 0, n_txt),
                _rope(norm_k_txt(split_heads(k_txt_proj(x_txt))), image_rotary_emb, 0, n_txt),
                split_heads(v_txt_proj(x_txt)),
            )
            return QKV(*(t.transpose(1, 2) for t in img)), QKV(*(t.transpose(1, 2) for t in txt))

        out_img, out_txt = self.attend(project, x_img, n_txt)
        out_img = heads_last(out_img).to(x_img.dtype)
        out_txt = heads_last(out_txt).to(x_img.dtype)
        if not double_stream:
            return torch.cat([out_txt, out_img], dim=1)
        out_img = attn.to_out[1](attn.to_out[0](out_img))
        return out_img, attn.to_add_out(out_txt)


class FluxFamily(FamilyAdapter):
    name = "flux"
    description = "FLUX.1 transformer"
    model_classes = ("FluxTransformer2DModel",)
    processor_classes = ("FluxAttnProcessor", "FluxAttnProcessor2_0")
    processor_cls = FluxProcessor

    def self_attention_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {
            name: module
            for name, module in model.named_modules()
            if name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(".attn")
        }

    def token_grid(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...]:
        ids = kwargs.get("img_ids")
        if ids is None:
            raise TypeError("FLUX transformer called without img_ids: LinFusion reads the token grid from them")
        ids = ids[0] if ids.dim() == 3 else ids  # (N, 3): (unused, row, col), row-major
        n = ids.shape[0]
        # Columns = length of the first run of equal row ids. Not max - min + 1: pipelines hand
        # the ids over in the model dtype, and bf16 cannot hold integers above 256 exactly, so
        # from 8192 px on (512 rows) neighbouring ids collapse while the first rows stay exact.
        row = ids[:, 1]
        changes = torch.nonzero(row[1:] != row[:-1])
        cols = int(changes[0]) + 1 if changes.numel() else n
        rows = n // cols
        exact = not ids.is_floating_point() or torch.finfo(ids.dtype).bits >= 32
        if exact:
            span_r = int(ids[:, 1].max() - ids[:, 1].min()) + 1
            span_c = int(ids[:, 2].max() - ids[:, 2].min()) + 1
        else:
            span_r, span_c = rows, cols
        if rows * cols != n or (span_r, span_c) != (rows, cols):
            raise ValueError(
                f"img_ids do not form one full row-major grid ({n} tokens, first row {cols} long, ids span "
                f"{span_r}x{span_c}); LinFusion supports FLUX calls with a single image grid"
            )
        return rows, cols
