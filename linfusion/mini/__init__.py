"""LinFusion-Mini: a procedural text-image world with known ground truth, an analytic
prompt-adherence checker (``world``, ``checker``), and the bundled text-to-image model
trained on it with its distilled students (``bundle``: loading; ``model``, ``data``,
``train``: how it was made; ``quality``: the benchmark; ``package``: moving weights in).

``load_mini_pipeline``, ``bundled_adapter``, ``mini_is_bundled`` and ``MiniNotBundledError``
are imported lazily, so ``import linfusion.mini`` does not pull in torch.
"""

import importlib

from .checker import AdherenceChecker, degrade, validate_checker
from .world import (
    COLOURS,
    PALETTE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Obj,
    ObjectMask,
    Placement,
    Relation,
    Scene,
    layout,
    parse_prompt,
    prompt_set,
    render,
    render_with_masks,
    sample_scene,
    scene_split,
    scene_to_prompt,
)

_LAZY = {name: "linfusion.mini.bundle" for name in
         ("load_mini_pipeline", "bundled_adapter", "mini_is_bundled", "MiniNotBundledError")}

__all__ = [
    "load_mini_pipeline", "bundled_adapter", "mini_is_bundled", "MiniNotBundledError",
    "AdherenceChecker", "degrade", "validate_checker",
    "COLOURS", "PALETTE", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "TEXTURES",
    "Obj", "ObjectMask", "Placement", "Relation", "Scene",
    "layout", "parse_prompt", "prompt_set", "render", "render_with_masks",
    "sample_scene", "scene_split", "scene_to_prompt",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'linfusion.mini' has no attribute {name!r}")
