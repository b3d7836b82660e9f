"""LinFusion-Mini: a procedural text-image world with known ground truth and an
analytic prompt-adherence checker (see ``world`` and ``checker``)."""

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

__all__ = [
    "AdherenceChecker", "degrade", "validate_checker",
    "COLOURS", "PALETTE", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "TEXTURES",
    "Obj", "ObjectMask", "Placement", "Relation", "Scene",
    "layout", "parse_prompt", "prompt_set", "render", "render_with_masks",
    "sample_scene", "scene_split", "scene_to_prompt",
]
