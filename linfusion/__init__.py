"""LinFusion: fast high-resolution diffusion by swapping self-attention for linear or local attention."""

__version__ = "0.1.0"
