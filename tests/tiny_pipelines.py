"""Re-export of :mod:`linfusion.testing.tiny_pipelines` so tests can ``import tiny_pipelines``."""

from linfusion.testing.tiny_pipelines import (  # noqa: F401
    FAMILIES,
    VIDEO_FAMILIES,
    build_tiny_pipeline,
    call_kwargs,
    denoiser_names,
    save_tiny_pipeline,
    token_grid,
)
