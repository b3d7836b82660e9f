"""A 16384² image from an SDXL-size pipeline, end to end, through the high-resolution pipeline.

Run on the H200 (random weights from the published SDXL configuration, bf16, lean mode)::

    python benchmarks/highres16k.py --out benchmarks/results/highres16k.json [--method linear]

CPU smoke mode (the tiny SDXL pipeline, 32 → 128 px)::

    python benchmarks/highres16k.py --tiny --out /tmp/highres.json

Recipe: native 1024² base pass, then ×2 stages (2048, 4096, 8192, 16384) of bicubic upscale +
SDEdit refinement with the patched UNet, tiled VAE, lean mode (CFG halves one at a time,
feed-forward chunking, model CPU offload). Records total time, time per pass (``pass_seconds``)
and peak GPU memory (``torch.cuda.max_memory_allocated``) in ``{"env", "config", "total_s", "peak_gb", ...}``.
The CLIP text encoders are tiny stand-ins (their cost is irrelevant at this size); the UNet and
VAE are real-size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import environment  # noqa: E402

SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=False,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2,
)


def build_sdxl(device: torch.device, dtype: torch.dtype):
    """An SDXL pipeline with the real-size UNet and VAE (random weights); text encoders with the
    real widths (768 and 1280, projection 1280) but 2 layers and the tiny tokenizers."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from benchmarks.e2e import build_model
    from linfusion.testing.tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("sdxl")

    def clip(tokenizer, hidden, projection=None):
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                                projection_dim=projection or hidden, num_hidden_layers=2,
                                num_attention_heads=hidden // 64, max_position_embeddings=tokenizer.model_max_length,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()

    # a new pipeline from the components, not register_modules on the tiny one: the constructor
    # derives vae_scale_factor (8 here, 2 for the tiny VAE) and the image processors from the VAE.
    # (Until the 30th session the 16K run swapped the VAE in, so its base pass ran 4× too large per
    # side: linfusion.generation.check_vae_factor now refuses such a pipeline.)
    pipe = type(pipe)(**{
        **pipe.components,
        "unet": build_model("sdxl", False, device, dtype),
        "vae": AutoencoderKL(**SDXL_VAE).eval(),
        "text_encoder": clip(pipe.tokenizer, 768),
        "text_encoder_2": clip(pipe.tokenizer_2, 1280, projection=1280),
    })
    assert pipe.vae_scale_factor == 8, pipe.vae_scale_factor
    return pipe.to(device=device, dtype=dtype)


def main(argv=None, log=print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/highres16k.json")
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--base", type=int, default=1024)
    parser.add_argument("--method", default="linear", choices=("linear", "local", "none"))
    parser.add_argument("--steps", type=int, default=20, help="base pass steps")
    parser.add_argument("--refine-steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--upscale", default="bicubic", choices=("bicubic", "latent"),
                        help="between stages: pixel space (VAE decode + encode) or on the latents")
    parser.add_argument("--vae-tile", type=int, default=None)
    parser.add_argument("--no-lean", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny SDXL on CPU, 32 -> 128 px")
    args = parser.parse_args(argv)

    from linfusion import patch_pipeline
    from linfusion.generation import step_callback_kwargs
    from linfusion.pipelines.highres import generate_highres, plan_stages

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.size, args.base, args.steps, args.refine_steps = 128, 32, 2, 4
    if not args.tiny and device.type != "cuda":
        raise SystemExit("the 16K run needs a CUDA GPU (use --tiny on CPU)")
    t_build = time.perf_counter()
    if args.tiny:
        from linfusion.testing.tiny_pipelines import build_tiny_pipeline

        pipe = build_tiny_pipeline("sdxl")
    else:
        pipe = build_sdxl(device, dtype)
    if args.method != "none":
        patch_pipeline(pipe, method=args.method)
    build_s = time.perf_counter() - t_build
    sizes = plan_stages(pipe, args.size, args.size, base_height=args.base, base_width=args.base)
    log(f"passes: {sizes}")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_seconds: dict[str, float] = {}  # denoising time per pass, keyed by latent size
    step_times: dict[str, list[float]] = {}  # each step's time per pass
    last = [time.perf_counter()]

    def on_step_end(_pipe, _index, _timestep, callback_kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        key = "x".join(str(pipe.vae_scale_factor * n) for n in callback_kwargs["latents"].shape[-2:])
        step_seconds[key] = round(step_seconds.get(key, 0.0) + now - last[0], 2)
        step_times.setdefault(key, []).append(round(now - last[0], 3))
        last[0] = now
        return callback_kwargs

    t0 = last[0] = time.perf_counter()
    out = generate_highres(
        pipe, "a detailed aerial photo of a coastal city", args.size, args.size, base_height=args.base,
        base_width=args.base, steps=args.steps, refine_steps=args.refine_steps, strength=args.strength,
        upscale=args.upscale, vae_tile=args.vae_tile, lean=not args.no_lean, generator=torch.Generator("cpu").manual_seed(0),
        output_type="np", guidance_scale=5.0, **step_callback_kwargs(pipe, on_step_end),
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    image = out.images
    result = {
        "env": environment(),
        "config": {k: v for k, v in vars(args).items()},
        "sizes": out.sizes,
        "image_shape": list(image.shape),
        "finite": bool(torch.isfinite(torch.from_numpy(image)).all()),
        "total_s": round(total, 2),
        # time from the previous step's end (or the start) to each step's end, summed per pass: a
        # pass's first step also carries the upscale + VAE encode before it; the final decode is not in any
        "pass_seconds": step_seconds,
        # a pass's first step minus the median of its others: the upscale (and VAE decode + encode in pixel
        # space) before the pass; after the last step: the final decode
        "between_passes_s": {key: round(times[0] - statistics.median(times[1:]), 2) if len(times) > 1 else None
                             for key, times in step_times.items()},
        "final_decode_s": round(total - sum(sum(times) for times in step_times.values()), 2),
        "step_times": step_times,
        "build_s": round(build_s, 2),
        "peak_gb": round(peak, 2),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"{args.size}² in {total:.1f} s, peak {peak:.1f} GB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
