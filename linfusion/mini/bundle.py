"""Where the bundled LinFusion-Mini pipeline and its distilled adapters live inside the package."""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
ADAPTER_DIRS = {"linear": WEIGHTS_DIR / "adapter-linear", "local": WEIGHTS_DIR / "adapter-local"}


class MiniNotBundledError(FileNotFoundError):
    """This installation carries no LinFusion-Mini weights."""


def mini_is_bundled() -> bool:
    return (PIPELINE_DIR / "model_index.json").is_file()


def load_mini_pipeline(torch_dtype: torch.dtype = torch.float32):
    """The bundled LinFusion-Mini text-to-image pipeline (offline, from package data)."""
    if not mini_is_bundled():
        raise MiniNotBundledError(
            "LinFusion-Mini weights are not bundled in this version of linfusion; pass --model PATH_OR_ID "
            "with a diffusers pipeline (hub id or local folder)"
        )
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(PIPELINE_DIR), dtype=torch_dtype)


def bundled_adapter(method: str) -> str:
    """Folder of the bundled distilled adapter for ``method`` ("linear" or "local")."""
    if method not in ADAPTER_DIRS:
        raise ValueError(f"LinFusion-Mini ships adapters for {sorted(ADAPTER_DIRS)}, not {method!r}")
    folder = ADAPTER_DIRS[method]
    if not (folder / "linfusion_adapter.json").is_file():
        raise MiniNotBundledError(f"the LinFusion-Mini {method} adapter is not bundled in this version")
    return str(folder)
