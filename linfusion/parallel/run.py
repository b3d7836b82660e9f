"""Running a whole pipeline call context parallel (what ``linfusion generate --context-parallel`` does)."""

from __future__ import annotations

from typing import Any

from .group import ContextParallel
from .model import disable_context_parallel, enable_context_parallel


def run_pipeline_parallel(cp: ContextParallel, pipe: Any, prompt: str, **kwargs: Any):
    """:func:`linfusion.generation.run_pipeline` with the denoisers split over ``cp``'s ranks.

    Enables context parallelism for the call only, so patching between calls
    (``--compare``) works as usual. Every rank runs it and gets the same result.
    """
    from ..generation import run_pipeline

    if cp.world == 1:
        return run_pipeline(pipe, prompt, **kwargs)
    enable_context_parallel(pipe, cp)
    try:
        return run_pipeline(pipe, prompt, **kwargs)
    finally:
        disable_context_parallel(pipe)
