"""High-resolution pipeline: staged upscale + SDEdit refinement, tiled VAE, lean mode, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linfusion import is_patched, patch_pipeline
from linfusion.pipelines.highres import generate_highres, img2img_pipeline, plan_stages
from linfusion.pipelines.vae_tiling import enable_tiled_vae, disable_tiled_vae, tiled_decode, tiled_encode
from linfusion.testing.tiny_pipelines import build_tiny_pipeline, call_kwargs

FAMILIES = ("sd15", "sdxl", "pixart_sigma", "flux", "sd3")
# (target, base): SD3's tiny positional embedding covers 64 px per side
SIZES = {"sd3": ((64, 64), (32, 32))}


def _run(pipe, family, **kw):
    (h, w), (bh, bw) = SIZES.get(family, ((64, 96), (32, 48)))
    call = call_kwargs(family)
    extra = {k: call[k] for k in ("guidance_scale", "max_sequence_length") if k in call}
    return generate_highres(
        pipe, call["prompt"], h, w, base_height=bh, base_width=bw, stages=2, steps=2, refine_steps=4,
        strength=0.5, generator=torch.Generator().manual_seed(0), output_type="np", **extra, **kw,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_two_stages_reach_target_with_patch_in_place(family):
    pipe = build_tiny_pipeline(family)
    patch_pipeline(pipe, method="linear", layers="all")
    model = pipe.unet if family in ("sd15", "sdxl") else pipe.transformer
    before = dict(model.attn_processors)
    out = _run(pipe, family)
    (h, w), _ = SIZES.get(family, ((64, 96), (32, 48)))
    assert out.images.shape == (1, h, w, 3)
    assert len(out.sizes) == 3 and out.sizes[-1] == (h, w)
    assert np.isfinite(out.images).all()
    assert is_patched(pipe)
    assert all(model.attn_processors[k] is v for k, v in before.items())


def test_refiner_shares_modules():
    pipe = build_tiny_pipeline("sdxl")
    refiner = img2img_pipeline(pipe)
    assert refiner.unet is pipe.unet and refiner.vae is pipe.vae
    assert img2img_pipeline(build_tiny_pipeline("pixart_sigma")) is None  # SDEdit via timesteps instead


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lean_mode_matches_normal(family):
    pipe = build_tiny_pipeline(family)
    patch_pipeline(pipe, method="linear", layers="all")
    normal = _run(pipe, family).images
    lean = _run(pipe, family, lean=True).images
    np.testing.assert_allclose(lean, normal, atol=1e-4)
    # hooks removed afterwards: a plain call is unchanged
    assert "linfusion_batch_chunking" not in getattr(getattr(pipe.unet, "_diffusers_hook", None), "hooks", {})


def test_lean_feed_forward_chunks_any_token_count(monkeypatch):
    """Feed-forward layers run on at most FF_CHUNK_TOKENS tokens at a time in lean mode, whatever
    the token count of each UNet level (the last chunk may be shorter), with unchanged results;
    the hooks are gone afterwards."""
    from linfusion.pipelines import highres

    pipe = build_tiny_pipeline("sdxl")
    patch_pipeline(pipe, method="linear", layers="all")
    normal = _run(pipe, "sdxl").images
    calls = []
    for ff in highres._feed_forwards(pipe.unet):
        # the first layer inside: the hook's chunks go through its __call__ (the FF's own does not see them)
        ff.net[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    monkeypatch.setattr(highres, "FF_CHUNK_TOKENS", 7)  # divides no level's token count
    lean = _run(pipe, "sdxl", lean=True).images
    assert calls and max(calls) <= 7 and min(calls) < 7
    np.testing.assert_allclose(lean, normal, atol=1e-4)
    calls.clear()
    _run(pipe, "sdxl")
    assert max(calls) > 7  # unchunked again


@pytest.mark.parametrize("builtin", [True, False], ids=["diffusers", "fallback"])
def test_tiled_vae_close_to_untiled(builtin):
    vae = build_tiny_pipeline("sd15").vae
    torch.manual_seed(0)
    z = torch.randn(1, 4, 40, 56)
    with torch.no_grad():
        full = vae.decode(z).sample
        enable_tiled_vae(vae, tile=48, overlap=0.25, builtin=builtin)
        if builtin:
            tiled = vae.decode(z).sample
        else:
            tiled = tiled_decode(vae, z, tile=48, overlap=0.25)
        disable_tiled_vae(vae)
    assert tiled.shape == full.shape
    rel = (tiled - full).abs().mean() / full.abs().mean()
    assert rel < 0.3, float(rel)  # random tiny VAE: GroupNorm statistics differ per tile
    # encode: tiled latent mean close to the untiled one
    x = full.clamp(-1, 1)
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mode()
        enc = tiled_encode(vae, x, tile=48, overlap=0.25)
    assert enc.shape == ref.shape
    assert (enc - ref).abs().mean() / ref.abs().mean() < 0.25


def test_fallback_tiling_single_tile_is_exact():
    vae = build_tiny_pipeline("sd15").vae
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(tiled_decode(vae, z, tile=32), vae.decode(z).sample)


def test_plan_stages_defaults_and_errors():
    pipe = build_tiny_pipeline("sd15")  # native 16 latents x 2 = 32 px
    assert plan_stages(pipe, 128, 128) == [(32, 32), (64, 64), (128, 128)]
    assert plan_stages(pipe, 64, 64, stages=[(48, 48), (64, 64)]) == [(32, 32), (48, 48), (64, 64)]
    with pytest.raises(ValueError, match="smaller than the base"):
        plan_stages(pipe, 64, 64, base_height=96, base_width=96)
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_stages(pipe, 100, 64)
    with pytest.raises(ValueError, match="last stage"):
        plan_stages(pipe, 64, 64, stages=[(48, 48)])
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        plan_stages(build_tiny_pipeline("sd3"), 128, 128)
    with pytest.raises(ValueError, match="strength"):
        generate_highres(pipe, "a cat", 64, 64, strength=[0.5, 0.5, 0.5], steps=1)
    with pytest.raises(ValueError, match="upscale"):
        generate_highres(pipe, "a cat", 64, 64, upscale="lanczos9", steps=2)
    with pytest.raises(TypeError, match="image pipelines"):
        generate_highres(build_tiny_pipeline("wan21"), "a cat", 64, 64)
    with pytest.raises(TypeError, match="unknown pipeline argument"):
        generate_highres(pipe, "a cat", 64, 64, steps=2, not_an_arg=3)
    with pytest.raises(ValueError, match="steps and refine_steps must be positive, got 0 and None"):
        generate_highres(pipe, "a cat", 64, 64, steps=0)
    with pytest.raises(ValueError, match=r"refine_steps=1 × strength=0.6 gives none"):
        generate_highres(pipe, "a cat", 64, 64, steps=1)  # int(1 × 0.6) = 0 steps: was an error deep in diffusers
    with pytest.raises(ValueError, match=r"refine_steps=3 × strength=0.25 gives none"):
        generate_highres(pipe, "a cat", 64, 64, steps=1, refine_steps=3, strength=0.25)


@pytest.mark.parametrize("family", ["sdxl", "pixart_sigma", "flux"])
def test_latent_upscale_skips_the_vae_between_stages(family, monkeypatch):
    from linfusion.pipelines import highres

    pipe = build_tiny_pipeline(family)
    patch_pipeline(pipe, method="linear", layers="all")
    calls = {"encode": 0, "decode": 0}
    for name in ("encode", "decode"):
        original = getattr(highres, f"_{name}")

        def counted(*args, _original=original, _name=name, **kw):
            calls[_name] += 1
            return _original(*args, **kw)

        monkeypatch.setattr(highres, f"_{name}", counted)
    out = _run(pipe, family, upscale="latent")
    (h, w), _ = SIZES.get(family, ((64, 96), (32, 48)))
    assert out.images.shape == (1, h, w, 3) and np.isfinite(out.images).all()
    assert calls == {"encode": 0, "decode": 1}  # only the final image
    pixel = _run(pipe, family)
    assert not np.allclose(pixel.images, out.images)  # a different path, not a silent fallback
    assert calls["encode"] == 2 and calls["decode"] == 1 + 3


def test_upscale_latents_shape_and_dtype():
    from linfusion.pipelines.highres import _upscale_latents

    z = torch.randn(2, 4, 5, 7, dtype=torch.bfloat16)
    up = _upscale_latents(z, (10, 14))
    assert up.shape == (2, 4, 10, 14) and up.dtype == torch.bfloat16
    flat = _upscale_latents(torch.full((1, 4, 3, 5), 0.7), (6, 10))
    torch.testing.assert_close(flat, torch.full((1, 4, 6, 10), 0.7))  # a constant stays constant
