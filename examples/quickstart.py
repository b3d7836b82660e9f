"""Quickstart that needs no download: patch a pipeline, generate, unpatch, save the adapter.

It builds a tiny Stable-Diffusion-1.5-shaped pipeline from configs with random
weights (so the images are noise-like); with a real checkpoint, replace
``build_tiny_pipeline("sd15")`` by ``StableDiffusionPipeline.from_pretrained(...)``.
"""

from __future__ import annotations

import tempfile

import numpy as np

from linfusion import describe, patch_pipeline, save_adapter, unpatch_pipeline
from linfusion.patch import iter_processors
from linfusion.testing.tiny_pipelines import build_tiny_pipeline, call_kwargs


def main() -> None:
    pipe = build_tiny_pipeline("sd15")
    kwargs = dict(call_kwargs("sd15", height=64, width=96))

    original = pipe(**kwargs).images
    print(f"original image {original.shape[1:3]}")

    # The default, layers="auto", keeps dense attention in every layer where the cost model
    # (linfusion.crossover) estimates it faster at this resolution, so a patch never slows you down.
    patch_pipeline(pipe, method="linear")
    pipe(**call_kwargs("sd15", height=64, width=96))
    choices = [processor.last_choice for _, _, processor in iter_processors(pipe)]
    print(f"layers='auto' at 64x96 px: {choices.count('patched')} layers patched, {choices.count('dense')} kept dense")

    # layers="all" forces the replacement everywhere (what distillation trains).
    patch_pipeline(pipe, method="linear", layers="all")  # or method="local", window=16
    info = describe(pipe)["components"]["unet"]
    print(f"patched {len(info['patched_layers'])} self-attention layers with {info['method']} attention")
    patched = pipe(**call_kwargs("sd15", height=64, width=96)).images
    # Random weights and a tiny model: this shows the mechanics, not speed (see README: speed pays off
    # at high resolution on GPU) or quality (distil the new attention first: `linfusion distill`).
    print(f"patched image differs from the original by at most {np.abs(patched - original).max():.3f}")

    with tempfile.TemporaryDirectory() as folder:
        save_adapter(pipe, folder)
        print(f"adapter saved to {folder}")

    unpatch_pipeline(pipe)
    restored = pipe(**call_kwargs("sd15", height=64, width=96)).images
    print(f"unpatched: bit-identical to the original: {np.array_equal(restored, original)}")


if __name__ == "__main__":
    main()
