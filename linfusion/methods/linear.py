"""Linear attention (LinFusion / LiT / SANA style) in plain PyTorch.

For image queries::

    Q = φ(W_q (x + f_q(x)))    K = φ(W_k (x + f_k(x)))    V = W_v x
    O_i = Q_i · [(1/N) Σ_j K_jᵀ V_j] / (Q_i · (1/N) Σ_j K_j + eps)      (+ DWConv(V) optional)

where ``f`` is LinFusion's residual feature MLP (Linear → LayerNorm → LeakyReLU →
Linear, last layer zero-initialised) and φ the feature map:

* ``elu1``: ELU(u) + 1 (LinFusion);
* ``relu``: ReLU(u) (SANA / LiT; no 1/√d);
* ``hedgehog``: softmax(uW) ⊕ softmax(-uW) per head, W (d × m) learnable, initialised to the
  identity (m = d; for m > d, further near-identity blocks, which leave the initial attention
  almost unchanged: a repeated block only rescales both sides of the normalised ratio).

Weight inheritance: W_q, W_k, W_v and the output projection are the layer's own;
with the MLPs at zero the patched layer starts as ``φ`` linear attention on the
teacher's projections. In joint attention the text keys join the sum and the text
queries keep exact softmax. The O(N) contraction runs in
:func:`linfusion.kernels.linear_attention` (Triton on CUDA), with fp32 state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear_attention
from .base import QKV, AttentionMethod, cat_tokens, text_queries_dense


class FeatureMLP(nn.Module):
    """Residual branch f(x): Linear(C→m) → LayerNorm(m) → LeakyReLU → Linear(m→C), last layer zero."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(channels, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.LeakyReLU()
        self.fc_out = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.norm(self.fc_in(x))))


class HedgehogFeatureMap(nn.Module):
    """φ(u) = softmax(uW) ⊕ softmax(-uW) per head, W: (D, M); maps (B, H, L, D) → (B, H, L, 2M).

    ``features`` M (default D): more features give the kernel φ(q)·φ(k) more rank, so it can
    follow sharper attention (the state grows to 2M × D per head). W starts as [I | I + noise | …]:
    exact copies of a block would keep identical gradients forever, the noise (std 1e-2, from a
    fixed seed, so a zero-shot patch is reproducible) lets them part."""

    def __init__(self, heads: int, head_dim: int, features: int | None = None) -> None:
        super().__init__()
        features = head_dim if features is None else features
        eye = torch.eye(head_dim)
        noise = torch.Generator().manual_seed(0)
        blocks = [eye] + [eye + 1e-2 * torch.randn(head_dim, head_dim, generator=noise)
                          for _ in range(-(-features // head_dim) - 1)]
        weight = torch.cat(blocks, dim=1)[:, :features]
        self.weight = nn.Parameter(weight.repeat(heads, 1, 1))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        projected = torch.einsum("bhld,hde->bhle", u, self.weight.to(u.dtype))
        return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], dim=-1)


def elu1(u: torch.Tensor) -> torch.Tensor:
    return F.elu(u) + 1.0


class DepthwiseConvV(nn.Module):
    """LiT's depthwise convolution of V over the token grid, added to the output (zero-init)."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.channels = channels
        self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel, kernel))

    def forward(self, v: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """v: (B, H, N, D) with N = prod(grid) → (B, H, N, D)."""
        b, h, n, d = v.shape
        x = v.permute(0, 1, 3, 2).reshape(b, h * d, *grid)
        pad = self.kernel // 2
        weight = self.weight.to(v.dtype)
        if len(grid) == 2:
            y = F.conv2d(x, weight, padding=pad, groups=self.channels)
        else:  # video: the same spatial kernel on every frame
            y = F.conv3d(x, weight.unsqueeze(2), padding=(0, pad, pad), groups=self.channels)
        return y.reshape(b, h, d, n).permute(0, 1, 3, 2)


class LinearAttention(AttentionMethod):
    """Mean-normalised non-causal linear attention for one patched layer.

    Args:
        channels: width C of the hidden states entering the q/k projections.
        heads, head_dim: the layer's head layout.
        feature_map: "elu1", "relu" or "hedgehog".
        hedgehog_features: the hedgehog map's projected features per sign (None: head_dim).
        feature_mlp: add LinFusion's residual feature MLPs.
        mlp_hidden: hidden width m of those MLPs.
        conv_v: add LiT's depthwise convolution of V.
        conv_kernel: its kernel size.
        eps: denominator guard.
        backend: kernel backend (None, "triton", "torch").
    """

    name = "linear"

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        feature_map: str = "elu1",
        hedgehog_features: int | None = None,
        feature_mlp: bool = True,
        mlp_hidden: int | None = None,
        conv_v: bool = False,
        conv_kernel: int = 5,
        eps: float = 1e-6,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.feature_map_name = feature_map
        self.eps = eps
        self.backend = backend
        hidden = mlp_hidden or channels
        self.feature_q = FeatureMLP(channels, hidden) if feature_mlp else None
        self.feature_k = FeatureMLP(channels, hidden) if feature_mlp else None
        self.hedgehog = HedgehogFeatureMap(heads, head_dim, hedgehog_features) if feature_map == "hedgehog" else None
        self.conv = DepthwiseConvV(heads * head_dim, conv_kernel) if conv_v else None

    def adapt_inputs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.feature_q is None:
            return hidden_states, hidden_states
        return hidden_states + self.feature_q(hidden_states), hidden_states + self.feature_k(hidden_states)

    def feature_map(self, u: torch.Tensor) -> torch.Tensor:
        if self.hedgehog is not None:
            return self.hedgehog(u)
        if self.feature_map_name == "relu":
            return F.relu(u)
        return elu1(u)

    def forward(
        self, img: QKV, txt: QKV | None, grid: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys, values = img.k, img.v
        if txt is not None:  # text keys join the linear sum; order does not matter
            keys = cat_tokens(txt.k, img.k)
            values = cat_tokens(txt.v, img.v)
        out_img = linear_attention(
            self.feature_map(img.q), self.feature_map(keys), values, eps=self.eps, backend=self.backend
        )
        if self.conv is not None:
            out_img = out_img + self.conv(img.v, grid)
        return out_img, text_queries_dense(img, txt, keys=keys, values=values)
