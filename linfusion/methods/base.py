"""What every attention method shares: the q/k/v bundle, dense softmax, the gate.

A method receives the per-head projections of the image (or video) tokens and,
for joint-attention models, of the text tokens, and returns their outputs::

    img = (q, k, v)  each (B, H, N_img, D)
    txt = (q, k, v)  each (B, H, N_txt, D) or None

Text tokens always stay global: text queries use exact softmax over every key.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class QKV(NamedTuple):
    """Per-head projections, each (B, H, L, D)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def cat_tokens(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Concatenate two (B, H, L_i, D) tensors along the token axis.

    Projections come out token-major ((B, L, H, D) memory seen through a heads-first view).
    A plain ``torch.cat(dim=2)`` of such views runs a slow strided copy (7x the time of a
    contiguous one on an H200); concatenating in the token-major layout is one contiguous copy,
    and the kernels read the heads-first view of the result through its strides.
    """
    if first.transpose(1, 2).is_contiguous() and second.transpose(1, 2).is_contiguous():
        return torch.cat([first.transpose(1, 2), second.transpose(1, 2)], dim=1).transpose(1, 2)
    return torch.cat([first, second], dim=2)


def concat_text_first(img: QKV, txt: QKV | None) -> QKV:
    """[text | image] along the token axis (the kernels' layout)."""
    if txt is None:
        return img
    return QKV(*(cat_tokens(t, i) for t, i in zip(txt, img)))


def dense_attention(img: QKV, txt: QKV | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact softmax attention over all [text | image] tokens; returns (o_img, o_txt)."""
    full = concat_text_first(img, txt)
    out = F.scaled_dot_product_attention(full.q, full.k, full.v)
    if txt is None:
        return out, None
    n_txt = txt.q.shape[2]
    return out[:, :, n_txt:], out[:, :, :n_txt]


def text_queries_dense(
    img: QKV, txt: QKV | None, keys: torch.Tensor | None = None, values: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Softmax output of the text queries over every key (None without text).

    ``keys``/``values``: the (B, H, N_txt + N_img, D) concatenations ``[text | image]`` when the
    caller already built them (saves two full-size copies per layer); ignored without text."""
    if txt is None:
        return None
    keys = cat_tokens(txt.k, img.k) if keys is None else keys
    values = cat_tokens(txt.v, img.v) if values is None else values
    return F.scaled_dot_product_attention(txt.q, keys, values)


class AttentionMethod(nn.Module, abc.ABC):
    """Base class of the replacements for softmax self-attention.

    Subclasses implement :meth:`forward` and may override :meth:`adapt_inputs`
    to change the hidden states fed to the q and k projections (LinFusion's
    feature MLPs).
    """

    name: str = "base"

    def adapt_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of the query and key projections for image tokens (B, N, C)."""
        return hidden_states, hidden_states

    @abc.abstractmethod
    def forward(
        self, img: QKV, txt: QKV | None, grid: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(o_img, o_txt) of shapes (B, H, N_img, D) and (B, H, N_txt, D) or None."""


class SoftmaxGate(nn.Module):
    """Learnable mix ``r·softmax + (1 - r)·new`` with a score r ∈ [0, 1] (starts at 1).

    The score is stored unconstrained and clamped on use, so an optimiser can push
    it to exactly 0 or 1; selective transfer rounds it at the end.
    """

    def __init__(self, initial: float = 1.0) -> None:
        super().__init__()
        self.score = nn.Parameter(torch.tensor(float(initial)))

    @property
    def r(self) -> torch.Tensor:
        return self.score.clamp(0.0, 1.0)

    def mix(self, softmax_out: torch.Tensor | None, new_out: torch.Tensor | None) -> torch.Tensor | None:
        if new_out is None:
            return None
        r = self.r.to(new_out.dtype)
        return r * softmax_out + (1 - r) * new_out
