"""Where each transformer family's token sequence is split and gathered.

A plan names the submodules at the denoiser boundary, like diffusers' ``_cp_plan``:
the outputs to *scatter* (the image tokens right after patch embedding, and the
positional embeddings that travel with them: text rows kept whole) and the output
to *gather* (the final projection). Everything between runs on this rank's tokens;
per-token layers need no communication, attention layers do theirs in
:mod:`linfusion.parallel.attention`.

Why not diffusers' own ``enable_parallelism`` for FLUX and Wan: its plans split the
text tokens too and cut the sequence into equal token counts (not whole rows), and
its ring/Ulysses attention sees only q/k/v, while LinFusion's layers need the
token grid, replicated text and whole rows (local windows). The same hook mechanism
(diffusers-style, forward hooks, fully removable) is used instead, with plans for
FLUX, Wan, SD3, PixArt and CogVideoX.

UNets are not supported: their convolutions mix neighbouring rows at every level,
so a row split would need a halo exchange around every ResNet block and
down/up-sampler (not only attention); they raise :class:`ContextParallelError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .split import ContextParallelError, Shard

#: scatter(shard, output) -> output of the hooked module
Scatter = Callable[[Shard, Any], Any]


def _tokens(dim: int = 1) -> Scatter:
    """Output (.., N, ..) of image tokens only."""
    return lambda shard, out: shard.take(out, dim)


def _text_then_tokens(dim: int) -> Scatter:
    """Output with [text | image] along ``dim``; the text prefix follows from the length."""

    def scatter(shard: Shard, out: torch.Tensor) -> torch.Tensor:
        return shard.take(out, dim, prefix=out.shape[dim] - shard.n_global)

    return scatter


def _each(inner: Scatter) -> Scatter:
    """Apply to each tensor of a tuple output (RoPE cos/sin)."""
    return lambda shard, out: type(out)(inner(shard, t) for t in out)


def _box(first_grid_dim: int) -> Scatter:
    return lambda shard, out: shard.take_box(out, first_grid_dim)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    #: submodule path -> how to scatter its output
    scatter: dict[str, Scatter]
    #: submodule whose output (B, N, C) is gathered along dim 1
    gather: str
    #: model kwargs to scatter before the forward (name -> scatter), e.g. precomputed RoPE
    inputs: dict[str, Scatter] = dataclasses.field(default_factory=dict)
    #: a check of the model's inputs that raises ContextParallelError when the plan cannot apply
    check: Callable[[tuple, dict], None] | None = None


def _wan_check(args: tuple, kwargs: dict) -> None:
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if timestep is not None and timestep.dim() == 2:
        raise ContextParallelError("Wan with a per-token timestep (TI2V) is not supported under context parallelism")


def _cog_rope(shard: Shard, rope):
    if rope is None:
        return None
    return tuple(shard.take(t, -2) for t in rope)  # (N, D) each


PLANS: dict[str, ShardPlan] = {
    # x_embedder: (B, N, C); pos_embed(ids): (cos, sin) of (N_txt + N, D), text first
    "flux": ShardPlan(
        scatter={"x_embedder": _tokens(1), "pos_embed": _each(_text_then_tokens(0))},
        gather="proj_out",
    ),
    # rope: (cos, sin) of (1, N, 1, D); patch_embedding: (B, C, T, H, W)
    "wan": ShardPlan(
        scatter={"rope": _each(_tokens(1)), "patch_embedding": _box(2)},
        gather="proj_out",
        check=_wan_check,
    ),
    "sd3": ShardPlan(scatter={"pos_embed": _tokens(1)}, gather="proj_out"),
    "pixart": ShardPlan(scatter={"pos_embed": _tokens(1)}, gather="proj_out"),
    # patch_embed(text, video) -> [text | video] (B, T + N, C); RoPE comes in as a model kwarg
    "cogvideox": ShardPlan(
        scatter={"patch_embed": _text_then_tokens(1)},
        gather="proj_out",
        inputs={"image_rotary_emb": _cog_rope},
    ),
}


def plan_for(family_name: str) -> ShardPlan:
    if family_name not in PLANS:
        if family_name == "sd-unet" or "unet" in family_name:
            raise ContextParallelError(
                "context parallelism supports transformer denoisers (FLUX, Wan, SD3, PixArt, CogVideoX), not UNets: "
                "a UNet's convolutions and resamplers mix neighbouring rows at every level, so splitting its "
                "tokens would need a halo exchange around every ResNet block, not only around attention"
            )
        raise ContextParallelError(f"no context-parallel plan for the {family_name!r} family; known: {sorted(PLANS)}")
    return PLANS[family_name]
