"""What a family adapter declares: which models, which layers, how to read the grid.

One small subclass per diffusers model family lives beside this file. The math is
shared (:mod:`linfusion.methods`); an adapter only names the self-attention
layers, the processor class that knows the family's q/k/v layout, and how the
token grid follows from the denoiser's inputs.
"""

from __future__ import annotations

import abc
from typing import Any

from torch import nn

from ..processor import LinFusionProcessor


class UnsupportedModelError(TypeError):
    """The model, or the state of its attention processors, is not one LinFusion can patch."""


class FamilyAdapter(abc.ABC):
    """Base class of the per-family adapters."""

    #: short id stored in adapters, e.g. "sd-unet"
    name: str = ""
    #: what users read in errors and ``describe``
    description: str = ""
    #: denoiser class names handled by this adapter
    model_classes: tuple[str, ...] = ()
    #: processor class names this adapter knows how to replace
    processor_classes: tuple[str, ...] = ()
    #: the patched processor class
    processor_cls: type[LinFusionProcessor] = LinFusionProcessor
    #: dimensions of the latent token grid: 2 (H, W) for images, 3 (T, H, W) for video
    grid_dims: int = 2

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    @abc.abstractmethod
    def self_attention_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """Module path -> attention module of every self-attention layer, in model order."""

    @abc.abstractmethod
    def token_grid(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...]:
        """The latent token grid of one denoiser call, from its inputs."""

    def default_mlp_ratio(self, model: nn.Module) -> float:
        """Hidden width of LinFusion's feature MLPs relative to the channels."""
        return 1 / 16

    def layer_dims(self, attn: nn.Module) -> tuple[int, int, int]:
        """(channels entering to_q, heads, head_dim) of an attention module."""
        heads = attn.heads
        return attn.to_q.in_features, heads, attn.to_q.out_features // heads

    def check_processor(self, name: str, attn: nn.Module) -> None:
        """Refuse layers whose processor was altered (fused QKV, IP-Adapter, unknown)."""
        processor = attn.processor
        cls = type(processor).__name__
        if getattr(attn, "fused_projections", False) or "Fused" in cls:
            raise UnsupportedModelError(
                f"layer {name!r} uses fused QKV projections ({cls}); call `unfuse_qkv_projections()` on the "
                "pipeline before patching with LinFusion"
            )
        if "IPAdapter" in cls:
            raise UnsupportedModelError(
                f"layer {name!r} uses an IP-Adapter processor ({cls}); LinFusion replaces self-attention only "
                "and cannot keep IP-Adapter processors it would overwrite: call `unload_ip_adapter()` first"
            )
        if cls not in self.processor_classes:
            raise UnsupportedModelError(
                f"layer {name!r} has processor {cls}, which LinFusion's {self.description} adapter does not "
                f"know; supported processors: {', '.join(self.processor_classes)} "
                "(call `set_default_attn_processor()` to restore the default)"
            )


def first_tensor(args: tuple, kwargs: dict[str, Any], name: str):
    """The denoiser's first input, passed positionally or by keyword ``name``."""
    if name in kwargs:
        return kwargs[name]
    if args:
        return args[0]
    raise TypeError(f"the denoiser was called without {name!r}")
