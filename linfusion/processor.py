"""The processor base class every family adapter builds on.

A diffusers attention processor receives the attention module and its hidden
states. Family processors (in :mod:`linfusion.pipelines`) only know how their
family projects q/k/v (norms, RoPE, where the text sits) and how it projects the
output; the shared :meth:`LinFusionProcessor.attend` does the rest: feature
MLPs, the method's math, the optional softmax gate.

The token grid is not module state: a forward pre-hook on the denoiser records
the grid of each call in a :class:`TokenGrid` owned by the patch, and each layer
derives its own level from its token count (UNet levels halve the grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .methods import QKV, AttentionMethod, SoftmaxGate, dense_attention

#: project(x_for_q, x_for_k) -> (image QKV, text QKV or None), each (B, H, L, D)
Projector = Callable[[torch.Tensor, torch.Tensor], tuple[QKV, "QKV | None"]]


class TokenGrid:
    """The latent token grid of the denoiser call in flight: (H, W) or (T, H, W)."""

    def __init__(self) -> None:
        self.grid: tuple[int, ...] | None = None
        #: this rank's :class:`linfusion.parallel.Shard` while a context-parallel call is in flight
        #: (the grid above is then the rank's local box); None otherwise
        self.parallel = None

    def record(self, grid: tuple[int, ...]) -> None:
        self.grid = tuple(int(g) for g in grid)

    def current(self) -> tuple[int, ...]:
        """The recorded grid; raises if the model was not called through its forward."""
        if self.grid is None:
            raise RuntimeError(
                "LinFusion does not know the token grid: call the patched model through its forward "
                "(the patch records the grid of each call there)"
            )
        return self.grid

    def for_tokens(self, n_tokens: int) -> tuple[int, ...]:
        """The grid of a layer holding ``n_tokens`` image tokens.

        Equal to the recorded grid for transformers; for UNets, the recorded grid
        halved (rounding up, like a stride-2 convolution) once per level.
        """
        grid = self.current()
        while math.prod(grid) > n_tokens and grid[-1] > 1:
            grid = grid[:-2] + tuple(-(-g // 2) for g in grid[-2:])
        if math.prod(grid) != n_tokens:
            raise RuntimeError(
                f"a patched layer got {n_tokens} image tokens, which matches no level of the token grid {self.grid}"
            )
        return grid


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H·D) -> (B, H, L, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def heads_last(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H·D)."""
    return x.transpose(1, 2).flatten(2)


class DenseFallback:
    """``layers="auto"``: at inference, run dense softmax where it beats the patched attention.

    The decision comes from :mod:`linfusion.crossover`'s cost model, per layer shape,
    token count, device and dtype, and is cached per resolution. While gradients are
    on (distillation) the patched path always runs: it is what is being trained.
    """

    def __init__(self, config, channels: int, heads: int, head_dim: int, mlp_ratio: float) -> None:
        self.config = config
        self.channels, self.heads, self.head_dim, self.mlp_ratio = channels, heads, head_dim, mlp_ratio
        self._decisions: dict[tuple, bool] = {}

    def patched_is_faster(self, processor: LinFusionProcessor, x_img: torch.Tensor, n_txt: int) -> bool:
        if torch.is_grad_enabled():
            return True
        batch = x_img.shape[0]
        shard = processor.token_grid.parallel  # context parallel: decide on the global grid, alike on every rank
        grid = shard.global_grid if shard is not None else processor.token_grid.for_tokens(x_img.shape[1])
        key = (batch, grid, n_txt, x_img.device.type, x_img.dtype)  # one decision per resolution
        if key not in self._decisions:
            from .crossover import patched_pays_off

            self._decisions[key] = patched_pays_off(
                self.config, batch=batch, heads=self.heads, tokens=math.prod(grid), head_dim=self.head_dim,
                text_len=n_txt, grid=grid, dtype=x_img.dtype, device=x_img.device,
                channels=self.channels, mlp_ratio=self.mlp_ratio,
            )
        return self._decisions[key]


class LinFusionProcessor(nn.Module):
    """Base class of the patched processors: holds the method, the gate and the grid.

    It is an ``nn.Module`` so its parameters join the denoiser's ``parameters()``,
    ``state_dict`` and ``.to()``; subclasses define ``__call__`` with the exact
    signature of the processor they replace (diffusers drops kwargs a processor's
    ``__call__`` does not declare).
    """

    def __init__(
        self,
        method: AttentionMethod,
        token_grid: TokenGrid,
        layer_name: str,
        gate: SoftmaxGate | None = None,
        dense_fallback: DenseFallback | None = None,
    ) -> None:
        super().__init__()
        self.method = method
        self.gate = gate
        self.layer_name = layer_name
        self.token_grid = token_grid
        self.dense_fallback = dense_fallback
        #: "patched" or "dense": what the last call ran (read by the patch's once-per-size notice)
        self.last_choice: str | None = None

    def bind_original(self, original) -> None:
        """Remember the diffusers processor this one replaces (a plain attribute, never a submodule)."""
        object.__setattr__(self, "_original", original)

    def original_if_dense(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None):
        """The replaced diffusers processor when ``layers="auto"`` finds dense attention faster for this
        layer at this size, else None.

        Family processors call it first and hand the call over unchanged: a layer kept dense then runs
        exactly as unpatched (same arithmetic, same speed), so the patch never makes a step slower. Not
        under context parallelism, where dense attention must span the ranks (see :meth:`attend`).

        Args:
            hidden_states: (B, L, C) or (B, C, H, W) as the processor received them (image tokens last;
                FLUX single-stream blocks put the text first).
            encoder_hidden_states: (B, N_txt, C) joint-attention text, or None.
        """
        original = getattr(self, "_original", None)
        if original is None or self.dense_fallback is None or self.token_grid.parallel is not None:
            return None
        if hidden_states.dim() == 4:  # UNet attention blocks may hand over (B, C, H, W) maps
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        n_img = min(math.prod(self.token_grid.current()), hidden_states.shape[1])
        n_txt = hidden_states.shape[1] - n_img + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        if self.dense_fallback.patched_is_faster(self, hidden_states[:, hidden_states.shape[1] - n_img :], n_txt):
            return None
        self.last_choice = "dense"
        return original

    def extra_repr(self) -> str:
        return f"layer={self.layer_name!r}, method={self.method.name!r}, gated={self.gate is not None}"

    def attend(
        self, project: Projector, x_img: torch.Tensor, n_txt: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the patched attention (or dense softmax where ``layers="auto"`` finds it faster).

        Args:
            project: the family's projection, ``project(x_q, x_k) -> (img QKV, txt QKV | None)``.
            x_img: (B, N_img, C) image hidden states entering the q/k/v projections.
            n_txt: number of text tokens joining the attention (for the cost estimate).

        Returns:
            (o_img, o_txt): (B, H, N_img, D) and (B, H, N_txt, D) or None.
        """
        shard = self.token_grid.parallel
        dense = dense_attention if shard is None else shard.dense  # exact softmax (cross-rank under CP)
        # Dense layers normally never get here (original_if_dense handed them to the replaced
        # processor); this branch serves context parallelism and processors with no original bound.
        if self.dense_fallback is not None and not self.dense_fallback.patched_is_faster(self, x_img, n_txt):
            self.last_choice = "dense"
            return dense(*project(x_img, x_img))
        self.last_choice = "patched"
        x_q, x_k = self.method.adapt_inputs(x_img)
        img, txt = project(x_q, x_k)
        grid = self.token_grid.for_tokens(img.q.shape[2])
        if shard is None:
            out_img, out_txt = self.method(img, txt, grid)
        else:  # context parallel: the method's cross-rank form (linfusion.parallel.attention)
            out_img, out_txt = shard.method_forward(self.method, img, txt, grid)
        if self.gate is None:
            return out_img, out_txt
        if x_q is not x_img or x_k is not x_img:  # softmax uses the untouched projections
            img, txt = project(x_img, x_img)
        soft_img, soft_txt = dense(img, txt)
        return self.gate.mix(soft_img, out_img), self.gate.mix(soft_txt, out_txt)
