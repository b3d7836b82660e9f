"""LinFusion: fast high-resolution diffusion by swapping self-attention for linear or local attention.

Public API::

    from linfusion import patch_pipeline, unpatch_pipeline, save_adapter
    pipe = patch_pipeline(pipe, method="linear")      # or method="local", window=16
    save_adapter(pipe, "out_dir")
    pipe = patch_pipeline(pipe, adapter="out_dir")     # re-creates the patch with its weights
    unpatch_pipeline(pipe)                             # original outputs, bit for bit

Names are imported lazily so ``import linfusion.kernels`` does not pull in diffusers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PatchConfig": "linfusion.config",
    "patch_pipeline": "linfusion.patch",
    "unpatch_pipeline": "linfusion.patch",
    "patch_model": "linfusion.patch",
    "unpatch_model": "linfusion.patch",
    "is_patched": "linfusion.patch",
    "describe": "linfusion.patch",
    "save_adapter": "linfusion.adapter",
    "load_adapter": "linfusion.adapter",
    "AdapterMismatchError": "linfusion.adapter",
    "UnsupportedModelError": "linfusion.pipelines",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'linfusion' has no attribute {name!r}")


def __dir__():
    return __all__
