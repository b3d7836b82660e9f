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


def test_a_vae_swapped_after_construction_is_refused():
    """diffusers computes vae_scale_factor in the constructor: a VAE registered afterwards leaves the
    old factor (here 2 with an 8× VAE: every latent 4× too large per side, as the 16K benchmark's base
    pass ran before the 30th session). check_resolution, and so generate_highres, name it; a pipeline
    built with the new VAE passes."""
    from diffusers import AutoencoderKL

    from linfusion.pipelines.highres import generate_highres

    pipe = build_tiny_pipeline("sdxl")
    config = {k: v for k, v in pipe.vae.config.items() if not k.startswith("_")}
    vae = AutoencoderKL(**{**config, "block_out_channels": (8, 16, 16, 16),
                           "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4})
    check_resolution(pipe, 64, 64)
    pipe.register_modules(vae=vae)
    for refuse in (lambda: check_resolution(pipe, 64, 64),
                   lambda: generate_highres(pipe, "a fox", 128, 128, base_height=64, base_width=64, steps=1)):
        with pytest.raises(ValueError, match="vae_scale_factor is 2, but its VAE .* scales by 8"):
            refuse()
    rebuilt = type(pipe)(**{**pipe.components, "vae": vae})
    check_resolution(rebuilt, 64, 64)
