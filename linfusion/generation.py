"""Loading pipelines and running them: shared by the CLI and the web demo.

Keeps one pipeline in memory and patches/unpatches it in turn (never a deep
copy), so an original-vs-accelerated comparison costs no extra weights.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .hub import looks_like_local_path
from .patch import denoisers, is_patched, patch_pipeline, unpatch_pipeline
from .pipelines.vae_tiling import vae_scale_factor

VIDEO_PIPELINES = ("WanPipeline", "CogVideoXPipeline")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """"auto" → bf16 on CUDA, fp32 on CPU."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def load_pipeline(model: str | os.PathLike | None, device: torch.device | None = None, dtype: str | None = None):
    """A diffusers pipeline from a hub id or local folder; ``None`` loads the bundled LinFusion-Mini."""
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if model is None:
        from .mini.bundle import load_mini_pipeline

        pipe = load_mini_pipeline(torch_dtype=torch_dtype)
    else:
        from diffusers import DiffusionPipeline

        text = str(model)
        if not Path(text).exists() and looks_like_local_path(text):
            raise FileNotFoundError(f"no model folder at {text!r} (a folder written by save_pretrained, or a "
                                    "Hugging Face hub id 'namespace/name')")
        pipe = DiffusionPipeline.from_pretrained(text, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def is_video_pipeline(pipe) -> bool:
    return type(pipe).__name__ in VIDEO_PIPELINES


def _vae_factor(pipe) -> int:
    """Pixels per latent cell along a side (video pipelines name it ``vae_scale_factor_spatial``)."""
    return int(getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8))


def resolution_multiple(pipe) -> int:
    """Pixel multiple a pipeline's height/width must respect: VAE factor × patch size (FLUX packs 2×2
    latents into one token), and 8, which diffusers' pipelines check."""
    model = denoisers(pipe)[0][1]
    patch = model.config.get("patch_size", 1) or 1
    if isinstance(patch, (tuple, list)):
        patch = patch[-1]
    if type(pipe).__name__.startswith("Flux"):
        patch = 2
    return math.lcm(_vae_factor(pipe) * int(patch), 8)


def max_side(pipe) -> int | None:
    """Largest side in pixels the denoiser's positional embedding covers (SD3's cropped table), or None."""
    model = denoisers(pipe)[0][1]
    limit = model.config.get("pos_embed_max_size", None)
    if not limit or type(model).__name__ != "SD3Transformer2DModel":
        return None
    return int(limit) * int(model.config.patch_size) * _vae_factor(pipe)


def native_size(pipe) -> tuple[int, int]:
    """The model's default (height, width) in pixels.

    In order: integer defaults of the pipeline's own ``__call__`` (Wan: 480×832), the denoiser's
    ``sample_height``/``sample_width`` (CogVideoX), ``default_sample_size`` or ``sample_size`` × VAE
    factor (image pipelines; FLUX's counts packed tokens, so it is 1024²).
    """
    call = inspect.signature(type(pipe).__call__).parameters
    defaults = [call[name].default if name in call else None for name in ("height", "width")]
    if all(isinstance(d, int) and not isinstance(d, bool) for d in defaults):
        return defaults[0], defaults[1]
    if type(pipe).__name__.startswith("Flux"):
        return 1024, 1024
    config, factor = denoisers(pipe)[0][1].config, _vae_factor(pipe)
    if config.get("sample_height", None) and config.get("sample_width", None):
        return int(config.sample_height) * factor, int(config.sample_width) * factor
    sample = getattr(pipe, "default_sample_size", None) or config.get("sample_size", None) or 64
    sample = sample[0] if isinstance(sample, (tuple, list)) else sample
    return int(sample) * factor, int(sample) * factor


def check_vae_factor(pipe) -> None:
    """Raise ``ValueError`` when the pipeline's VAE factor is not its VAE's: diffusers computes
    ``vae_scale_factor`` once, in the pipeline's constructor, so a VAE swapped in afterwards
    (``register_modules(vae=...)``) leaves latents sized for the old one (a 2× VAE's factor with an
    8× VAE makes every pass 4× too large per side). VAEs whose config has no ``block_out_channels``
    (Wan's) are not checked."""
    vae = getattr(pipe, "vae", None)
    channels = getattr(getattr(vae, "config", None), "block_out_channels", None)
    if not channels:
        return
    expected, have = vae_scale_factor(vae), _vae_factor(pipe)
    if have != expected:
        raise ValueError(
            f"{type(pipe).__name__}'s vae_scale_factor is {have}, but its VAE ({type(vae).__name__}, "
            f"{len(channels)} blocks) scales by {expected}: the VAE was swapped after the pipeline was built, "
            f"and diffusers would size the latents for the old one. Build the pipeline with this VAE, e.g. "
            f"{type(pipe).__name__}(**{{**pipe.components, 'vae': vae}})"
        )


def check_resolution(pipe, height: int, width: int) -> None:
    """Raise ``ValueError`` naming what is supported when a pipeline cannot serve height×width (or its
    VAE factor is stale: :func:`check_vae_factor`)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    check_vae_factor(pipe)
    multiple = resolution_multiple(pipe)
    if height % multiple or width % multiple:
        def near(x: int) -> int:
            return max(multiple, round(x / multiple) * multiple)

        raise ValueError(
            f"{type(pipe).__name__} needs height and width divisible by {multiple}; got {height}x{width} "
            f"(nearest: {near(height)}x{near(width)})"
        )
    limit = max_side(pipe)
    if limit is not None and max(height, width) > limit:
        model = denoisers(pipe)[0][1]
        raise ValueError(
            f"{type(model).__name__} cannot serve {height}x{width}: its positional embedding "
            f"(pos_embed_max_size={model.config.pos_embed_max_size}) covers at most {limit} px per side"
        )


@dataclasses.dataclass
class GenerationResult:
    """Images as PIL (videos: the frames of the first video), and wall time in seconds."""

    images: list[Image.Image]
    seconds: float
    peak_memory_gb: float | None = None


def _to_pil(output, video: bool) -> list[Image.Image]:
    frames = output.frames[0] if video else output.images
    if isinstance(frames, torch.Tensor):
        frames = frames.float().cpu().numpy()
    if isinstance(frames, np.ndarray):
        arrays = frames if frames.ndim == 4 else frames[None]
        return [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in arrays]
    return list(frames)


def _device_of(pipe) -> torch.device:
    return torch.device(pipe._execution_device if hasattr(pipe, "_execution_device") else default_device())


def step_callback_kwargs(pipe, callback) -> dict[str, Any]:
    """Pipeline kwargs that call ``callback(pipe, step_index, timestep, callback_kwargs)`` after
    every denoising step, in whichever API the pipeline has.

    Most pipelines take ``callback_on_step_end``; PixArt (LinFusion-Mini's class) still has the
    legacy ``callback(step, timestep, latents)`` with ``callback_steps`` and would swallow an
    unknown ``callback_on_step_end`` in its ``**kwargs`` -- no progress, no cancel -- so the name
    is checked against the signature, never just passed.
    """
    if callback is None:
        return {}
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params:
        return {"callback_on_step_end": callback}
    if "callback" in params and "callback_steps" in params:
        def legacy(step_index: int, timestep, latents) -> None:
            callback(pipe, step_index, timestep, {"latents": latents})

        return {"callback": legacy, "callback_steps": 1}
    raise TypeError(f"{type(pipe).__name__} takes no per-step callback (neither callback_on_step_end nor callback)")


def _optional_kwargs(pipe, guidance_scale: float | None, negative_prompt: str | None, callback) -> dict[str, Any]:
    """Pipeline kwargs that are passed only when set (so each pipeline keeps its own defaults)."""
    kwargs: dict[str, Any] = {}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
    kwargs.update(step_callback_kwargs(pipe, callback))
    return kwargs


def _timed(device: torch.device, call) -> tuple[Any, float, float | None]:
    """(result, wall seconds, peak GiB on CUDA or None); CUDA is synchronised around the call."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = call()
    if cuda:
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return result, time.perf_counter() - start, peak


def run_pipeline(
    pipe,
    prompt: str,
    *,
    height: int,
    width: int,
    steps: int,
    seed: int = 0,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    num_frames: int | None = None,
    callback=None,
    extra: dict[str, Any] | None = None,
) -> GenerationResult:
    """Run the pipeline once with a fixed seed; time it (synchronising CUDA) and read peak memory."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    if not isinstance(steps, int) or steps < 1:  # diffusers' schedulers divide by it
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_resolution(pipe, height, width)
    kwargs: dict[str, Any] = dict(prompt=prompt, height=height, width=width, num_inference_steps=steps)
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    kwargs["output_type"] = "np"
    kwargs.update(_optional_kwargs(pipe, guidance_scale, negative_prompt, callback))
    video = is_video_pipeline(pipe)
    if video and num_frames:
        kwargs["num_frames"] = num_frames
    if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
        kwargs["use_resolution_binning"] = False  # PixArt would silently snap the size to its bins
    kwargs.update(extra or {})
    output, seconds, peak = _timed(_device_of(pipe), lambda: pipe(**kwargs))
    return GenerationResult(_to_pil(output, video), seconds, peak)


def run_highres(
    pipe,
    prompt: str,
    *,
    height: int,
    width: int,
    steps: int,
    seed: int = 0,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    strength: float = 0.6,
    lean: bool = False,
    upscale: str = "bicubic",
    callback=None,
) -> GenerationResult:
    """The high-resolution recipe (native pass, then upscale + SDEdit refinement), timed like
    :func:`run_pipeline`. See :func:`linfusion.pipelines.highres.generate_highres`."""
    from .pipelines.highres import generate_highres

    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    kwargs = _optional_kwargs(pipe, guidance_scale, negative_prompt, callback)
    output, seconds, peak = _timed(_device_of(pipe), lambda: generate_highres(
        pipe, prompt, height, width, steps=steps, strength=strength, lean=lean, upscale=upscale,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kwargs))
    return GenerationResult(list(output.images), seconds, peak)


def apply_patch(pipe, method: str | None, adapter: str | None, options: dict[str, Any] | None = None) -> None:
    """Patch with ``method`` (or an adapter); ``method=None`` and no adapter leave it original.
    With an adapter only ``backend`` may be given: the rest of the patch is the adapter's."""
    options = options or {}
    if adapter and set(options) - {"backend"}:
        raise ValueError(f"{sorted(set(options) - {'backend'})} cannot be set with an adapter ({adapter}): its "
                         "saved configuration fixes them; drop them, or patch zero-shot without the adapter")
    if is_patched(pipe):
        unpatch_pipeline(pipe)
    if adapter:
        patch_pipeline(pipe, adapter=adapter, **({"backend": options["backend"]} if "backend" in options else {}))
    elif method:
        patch_pipeline(pipe, method=method, **options)


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    """One image with ``left`` and ``right`` next to each other on a white background."""
    height = max(left.height, right.height)
    canvas = Image.new("RGB", (left.width + gap + right.width, height), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def save_images(images: list[Image.Image], out: str | os.PathLike) -> Path:
    """One image → PNG at ``out``; several (video frames) → an animated GIF/PNG strip beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(out)
        return out
    if out.suffix.lower() == ".gif":
        images[0].save(out, save_all=True, append_images=images[1:], duration=125, loop=0)
        return out
    images[0].save(out, save_all=True, append_images=images[1:], duration=125, loop=0, format="PNG")
    return out
