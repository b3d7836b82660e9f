"""Distillation toolkit: teach the patched attention to stand in for softmax.

Modules (one job each):

* :mod:`.data` / :mod:`.capture` / :mod:`.prompts`: data-free data from the teacher pipeline
  (sharded safetensors, resumable), or captioned images;
* :mod:`.schedule`: ε / v / flow-velocity algebra;
* :mod:`.inheritance`: student = teacher patched in place, trainable set, teacher forward;
* :mod:`.losses`, :mod:`.adm`, :mod:`.selective`: the loss terms;
* :mod:`.checkpoint`, :mod:`.trainer`: the accelerate trainer; :mod:`.cli`: the commands.

Typical use is the CLI: ``linfusion distill --model PATH --method linear --steps N --output DIR``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DistillConfig": "linfusion.distill.config",
    "run_distill": "linfusion.distill.trainer",
    "generate_data": "linfusion.distill.data",
    "GenerationSettings": "linfusion.distill.data",
    "DistillDataset": "linfusion.distill.data",
    "build_student": "linfusion.distill.inheritance",
    "finalize_selection": "linfusion.distill.selective",
    "DEFAULT_PROMPTS": "linfusion.distill.prompts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'linfusion.distill' has no attribute {name!r}")
