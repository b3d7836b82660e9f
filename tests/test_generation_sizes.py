"""The size rules shared by ``linfusion generate``, the demo and the high-resolution pipeline."""

from __future__ import annotations

import pytest

from linfusion.generation import check_resolution, max_side, native_size, resolution_multiple
from linfusion.pipelines.highres import plan_stages
from linfusion.testing.tiny_pipelines import build_tiny_pipeline, call_kwargs


@pytest.mark.parametrize(
    "family, native, multiple",
    [
        ("sd15", (32, 32), 8),            # sample_size 16 × VAE 2
        ("pixart_sigma", (32, 32), 8),    # 16 × 2, patch 2 → 4, and diffusers checks 8
        ("flux", (1024, 1024), 8),        # FLUX's sample_size counts packed tokens
        ("wan21", (480, 832), 16),        # WanPipeline.__call__'s own defaults; VAE 8 × patch 2
        ("cogvideox", (32, 48), 8),       # sample_height/width × VAE
    ],
)
def test_native_size_and_multiple_per_family(family, native, multiple):
    pipe = build_tiny_pipeline(family)
    assert native_size(pipe) == native
    assert resolution_multiple(pipe) == multiple


def test_sd3_side_cap_matches_diffusers_and_is_refused_everywhere():
    pipe = build_tiny_pipeline("sd3")
    limit, step = max_side(pipe), resolution_multiple(pipe)
    assert limit == 16 * 2 * 2  # pos_embed_max_size × patch × VAE factor of the tiny config
    check_resolution(pipe, limit, limit)
    pipe(**{**call_kwargs("sd3", height=limit, width=limit, steps=1), "output_type": "latent"})  # diffusers agrees
    with pytest.raises(ValueError, match="Height"):  # ... and refuses one step more, deep in the transformer
        pipe(**{**call_kwargs("sd3", height=limit + step, width=limit, steps=1), "output_type": "latent"})
    for refuse in (lambda: check_resolution(pipe, limit + step, limit), lambda: plan_stages(pipe, limit + step, limit)):
        with pytest.raises(ValueError, match=f"pos_embed_max_size=16.*at most {limit} px"):
            refuse()
    assert max_side(build_tiny_pipeline("sd15")) is None


def test_check_resolution_names_the_nearest_valid_size():
    with pytest.raises(ValueError, match="divisible by 8.*nearest: 64x96"):
        check_resolution(build_tiny_pipeline("sd15"), 60, 96)
    with pytest.raises(ValueError, match="positive"):
        check_resolution(build_tiny_pipeline("sd15"), 0, 96)


def test_demo_presets_stop_at_the_model_side_cap():
    from linfusion.app.engine import DemoEngine

    pipe = build_tiny_pipeline("sd3")
    presets = DemoEngine(pipe, model_name="tiny-sd3", max_pixels=10**9).presets()
    sides = [max(size) for _, size in presets]
    assert sides[0] == 32 and max(sides) == max_side(pipe)  # native 32 px up to the 64 px cap, nothing above
