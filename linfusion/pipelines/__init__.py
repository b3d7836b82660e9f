"""Family adapters (one per diffusers model family) and the registry that finds them."""

from __future__ import annotations

from torch import nn

from .base import FamilyAdapter, UnsupportedModelError
from .cogvideox import CogVideoXFamily
from .flux import FluxFamily
from .pixart import PixArtFamily
from .sd3 import SD3Family
from .unet import UNetFamily
from .wan import WanFamily

FAMILIES: tuple[FamilyAdapter, ...] = (
    UNetFamily(),
    PixArtFamily(),
    SD3Family(),
    FluxFamily(),
    WanFamily(),
    CogVideoXFamily(),
)


def supported_families() -> str:
    """One line per family: what users read when a model is not supported."""
    return "; ".join(f"{f.description} ({', '.join(f.model_classes)})" for f in FAMILIES)


def family_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for a denoiser, or an error listing what is supported."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise UnsupportedModelError(
        f"LinFusion does not support {type(model).__name__}. Supported denoisers: {supported_families()}"
    )


def family_by_name(name: str) -> FamilyAdapter:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModelError(f"unknown model family {name!r}; known: {[f.name for f in FAMILIES]}")


__all__ = ["FAMILIES", "FamilyAdapter", "UnsupportedModelError", "family_by_name", "family_for", "supported_families"]
