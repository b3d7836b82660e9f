"""High-resolution generation: native size first, then upscale + SDEdit refinement, stage by stage.

The recipe LinFusion and CLEAR both use for their largest images::

    base   = pipe(prompt, height=h0, width=w0)                  # the model's native size
    for each stage (h_i, w_i), e.g. ×2 per stage up to the target:
        image  = upscale(decode(latents), (h_i, w_i))          # bicubic in pixel space
        latents = img2img(prompt, image=encode(image), strength=s_i)   # the *patched* model

Every denoising pass uses the same components (``AutoPipelineForImage2Image.from_pipe``: no
weight copies), so LinFusion's patched processors, which live on the shared modules, stay in
place; only the refinement stages run at high resolution, where the patch pays off. Families
without an img2img pipeline in diffusers (PixArt) get the same SDEdit through the text-to-image
pipeline: noised latents at the strength's timestep plus the tail of the timestep schedule.

Memory: the VAE is tiled (:mod:`linfusion.pipelines.vae_tiling`); ``lean=True`` also runs the
classifier-free-guidance halves one at a time (a diffusers ``ModelHook`` on each denoiser,
removed afterwards), chunks feed-forward layers over tokens where the blocks support it, and on
CUDA enables ``enable_model_cpu_offload`` (idle text encoders and VAE wait in CPU memory; this
stays enabled on the pipeline afterwards, as with diffusers' own call).

Entry point: :func:`generate_highres`; sizes: :func:`plan_stages`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..generation import check_resolution, native_size, resolution_multiple
from .vae_tiling import (
    disable_tiled_vae,
    enable_tiled_vae,
    from_model_latents,
    to_model_latents,
    vae_decode,
    vae_encode,
)

IMAGE_DENOISERS = ("UNet2DConditionModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
UPSCALE_MODES = ("bicubic", "bilinear", "nearest", "latent")
_CHUNK_HOOK = "linfusion_batch_chunking"


@dataclasses.dataclass
class HighResOutput:
    """``images`` in the requested ``output_type``; ``sizes`` the (height, width) of every pass."""

    images: Any
    sizes: list[tuple[int, int]]


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


def _denoiser(pipe) -> nn.Module:
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            return model
    raise TypeError(f"{type(pipe).__name__} has no unet or transformer")


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def plan_stages(
    pipe, height: int, width: int, *, base_height: int | None = None, base_width: int | None = None,
    stages: int | Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """[(h0, w0), (h1, w1), ..., (height, width)]: the base pass then every refinement pass.

    The base defaults to the native area at the target's aspect ratio; ``stages`` is the
    number of refinement passes (default: one per ×2 of the longer side, at least 1) spaced
    geometrically, or the explicit list of refinement sizes (the last must be the target).
    Raises ``ValueError`` for sizes the VAE / patch grid cannot serve or a target below the base.
    """
    mult = resolution_multiple(pipe)
    for name, value in (("height", height), ("width", width), ("base_height", base_height), ("base_width", base_width)):
        if value is not None and (value <= 0 or value % mult):
            raise ValueError(
                f"{name}={value} is not a positive multiple of {mult} (VAE factor {pipe.vae_scale_factor} × patch "
                f"size): {type(pipe).__name__} cannot serve it; use e.g. {_round(abs(value) or mult, mult)}"
            )
    check_resolution(pipe, height, width)  # e.g. SD3's positional embedding caps the side
    if (base_height is None) != (base_width is None):
        raise ValueError("give both base_height and base_width, or neither")
    if base_height is None:
        side = math.sqrt(math.prod(native_size(pipe)))  # the native area at the target aspect
        aspect = width / height
        base_height = min(height, _round(side / math.sqrt(aspect), mult))
        base_width = min(width, _round(side * math.sqrt(aspect), mult))
    if height < base_height or width < base_width:
        raise ValueError(
            f"target {height}x{width} is smaller than the base {base_height}x{base_width}: high-resolution "
            "generation only goes up; call the pipeline directly, or pass a smaller base_height/base_width"
        )
    if stages is not None and not isinstance(stages, int):
        sizes = [(int(h), int(w)) for h, w in stages]
        if not sizes or sizes[-1] != (height, width):
            raise ValueError(f"the last stage size must be the target {(height, width)}, got {sizes[-1:] or None}")
        prev = (base_height, base_width)
        for h, w in sizes:
            if h % mult or w % mult or h < prev[0] or w < prev[1]:
                raise ValueError(f"stage size {h}x{w} must be a multiple of {mult} and not below {prev[0]}x{prev[1]}")
            prev = (h, w)
        return [(base_height, base_width), *sizes]
    ratio = max(height / base_height, width / base_width)
    n = stages if stages is not None else max(1, math.ceil(math.log2(ratio) - 1e-9))
    if n < 0:
        raise ValueError(f"stages must be >= 0, got {n}")
    if n == 0 and (height, width) != (base_height, base_width):
        raise ValueError("stages=0 needs the target to equal the base size")
    sizes = [(base_height, base_width)]
    for i in range(1, n + 1):
        f = i / n
        h = _round(base_height * (height / base_height) ** f, mult)
        w = _round(base_width * (width / base_width) ** f, mult)
        sizes.append((height, width) if i == n else (h, w))
    return sizes


# --------------------------------------------------------------------------------------------
# Lean mode
# --------------------------------------------------------------------------------------------


def _split(value, batch: int, chunk: int, index: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[index * chunk : (index + 1) * chunk]
    if isinstance(value, dict):
        return {k: _split(v, batch, chunk, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return type(value)(_split(v, batch, chunk, index) for v in value)
    return value


def _merge(outputs: list):
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs, dim=0)
    if isinstance(first, tuple) and not hasattr(first, "keys"):
        return tuple(_merge([o[i] for o in outputs]) for i in range(len(first)))
    if hasattr(first, "keys"):  # diffusers BaseOutput (an OrderedDict dataclass)
        return type(first)(**{k: _merge([o[k] for o in outputs]) for k in first.keys()})
    return first


def _batch_chunk_hook(chunk: int):
    from diffusers.hooks import ModelHook

    class BatchChunkHook(ModelHook):
        """Run the denoiser on ``chunk`` samples at a time (the CFG halves one by one)."""

        def new_forward(self, module, *args, **kwargs):
            ref = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            batch = ref.shape[0]
            if batch <= chunk:
                return self.fn_ref.original_forward(*args, **kwargs)
            outputs = [
                self.fn_ref.original_forward(*_split(args, batch, chunk, i), **_split(kwargs, batch, chunk, i))
                for i in range(math.ceil(batch / chunk))
            ]
            return _merge(outputs)

    return BatchChunkHook()


_FF_CHUNK_HOOK = "linfusion_ff_chunking"
#: tokens per feed-forward call in lean mode (SDXL-size 16K: 1M tokens × 5120 hidden in 64 chunks)
FF_CHUNK_TOKENS = 16384


def _ff_chunk_hook(max_tokens: int):
    from diffusers.hooks import ModelHook

    class FeedForwardChunkHook(ModelHook):
        """Run a feed-forward layer on at most ``max_tokens`` tokens at a time (it is token-wise, so
        the result is the same; the 4x-wide hidden activation is what no longer has to fit)."""

        def new_forward(self, module, hidden_states, *args, **kwargs):
            if hidden_states.dim() != 3 or hidden_states.shape[1] <= max_tokens:
                return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
            return torch.cat([self.fn_ref.original_forward(part, *args, **kwargs)
                              for part in hidden_states.split(max_tokens, dim=1)], dim=1)

    return FeedForwardChunkHook()


def _feed_forwards(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "FeedForward"]


def _set_ff_chunking(model: nn.Module, max_tokens: int | None) -> None:
    """Chunk every feed-forward layer of ``model`` over tokens (any token count: the last chunk
    may be shorter), or undo it with ``None``. Unlike diffusers' ``set_chunk_feed_forward``, no
    chunk size has to divide the token count of every level at every pass."""
    from diffusers.hooks import HookRegistry

    for ff in _feed_forwards(model):
        registry = HookRegistry.check_if_exists_or_initialize(ff)
        if registry.get_hook(_FF_CHUNK_HOOK) is not None:
            registry.remove_hook(_FF_CHUNK_HOOK, recurse=False)
        if max_tokens is not None:
            registry.register_hook(_ff_chunk_hook(max_tokens), _FF_CHUNK_HOOK)


@contextlib.contextmanager
def lean_mode(pipe, *, chunk: int = 1):
    """Memory-lean denoising inside the ``with``: CFG halves one by one, feed-forward layers
    over at most :data:`FF_CHUNK_TOKENS` tokens at a time, CPU offload on CUDA."""
    from diffusers.hooks import HookRegistry

    models = [m for m in (getattr(pipe, n, None) for n in ("unet", "transformer")) if isinstance(m, nn.Module)]
    device = _execution_device(pipe)
    if device.type == "cuda" and not getattr(pipe, "_linfusion_offloaded", False):
        pipe.enable_model_cpu_offload(device=device)
        pipe._linfusion_offloaded = True
    for model in models:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        if registry.get_hook(_CHUNK_HOOK) is None:
            registry.register_hook(_batch_chunk_hook(chunk), _CHUNK_HOOK)
        _set_ff_chunking(model, FF_CHUNK_TOKENS)
    try:
        yield pipe
    finally:
        for model in models:
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(_CHUNK_HOOK, recurse=False)
            _set_ff_chunking(model, None)


def _execution_device(pipe) -> torch.device:
    return torch.device(getattr(pipe, "_execution_device", None) or _denoiser(pipe).device)


# --------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------


def _accepted(fn, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _check_kwargs(pipes, kwargs: dict[str, Any]) -> None:
    known = set()
    for p in pipes:
        known |= set(inspect.signature(p.__call__).parameters)
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"unknown pipeline argument(s) {sorted(unknown)} for {[type(p).__name__ for p in pipes]}")


def _unpack_if_flux(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if latents.dim() == 3 and hasattr(pipe, "_unpack_latents"):  # FLUX returns packed tokens
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    return latents


def img2img_pipeline(pipe):
    """The family's img2img pipeline on the same components, or None (SDEdit via timesteps)."""
    from diffusers import AutoPipelineForImage2Image

    try:
        refiner = AutoPipelineForImage2Image.from_pipe(pipe)
    except (ValueError, KeyError, AttributeError):
        return None
    refiner.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return refiner


def _sdedit_by_timesteps(pipe, latents, strength, steps, generator, kwargs):
    """SDEdit through a text-to-image pipeline: noise the latents to the strength's timestep
    and run the tail of the schedule (for families without an img2img pipeline)."""
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = pipe.scheduler
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters or not hasattr(scheduler, "add_noise"):
        raise TypeError(f"{type(scheduler).__name__} cannot run SDEdit (needs custom timesteps and add_noise)")
    device = latents.device
    scheduler.set_timesteps(steps, device=device)
    run = min(max(1, int(steps * strength)), steps)
    tail = scheduler.timesteps[(steps - run) * scheduler.order :]
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    noisy = scheduler.add_noise(latents, noise, tail[:1].repeat(latents.shape[0]))
    return pipe(latents=noisy, timesteps=[int(t) for t in tail], **kwargs)


def _base_kwargs(pipe, prompt, height, width, steps, generator, kwargs):
    call = dict(kwargs, prompt=prompt, height=height, width=width, num_inference_steps=steps,
                generator=generator, output_type="latent")
    if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
        call.setdefault("use_resolution_binning", False)
    if "clean_caption" in inspect.signature(pipe.__call__).parameters:
        call.setdefault("clean_caption", False)
    return _accepted(pipe.__call__, call)


def generate_highres(
    pipe,
    prompt: str | list[str] | None,
    height: int,
    width: int,
    *,
    base_height: int | None = None,
    base_width: int | None = None,
    stages: int | Sequence[tuple[int, int]] | None = None,
    strength: float | Sequence[float] = 0.6,
    steps: int = 30,
    refine_steps: int | None = None,
    upscale: str | Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] = "bicubic",
    tiled_vae: bool = True,
    vae_tile: int | None = None,
    lean: bool = False,
    generator: torch.Generator | None = None,
    output_type: str = "pil",
    **pipe_kwargs: Any,
) -> HighResOutput:
    """Generate a ``height × width`` image: native-size pass, then upscale + refine stages.

    Args:
        pipe: a text-to-image pipeline of an image family (SD 1.x/2.x, SDXL, PixArt, SD3, FLUX),
            patched with LinFusion or not (refinement reuses its modules, hence the patch).
        prompt: as for the pipeline (other pipeline arguments go in ``pipe_kwargs``, e.g.
            ``guidance_scale``, ``negative_prompt``, ``max_sequence_length``).
        height, width: target size in pixels (multiples of :func:`linfusion.generation.resolution_multiple`).
        base_height, base_width: size of the first pass (default: the native area at the
            target's aspect ratio).
        stages: number of refinement passes (default one per ×2), or their sizes.
        strength: SDEdit strength of every refinement pass (or one per pass): the fraction of
            the noise schedule re-run; lower keeps more of the upscaled image.
        steps: denoising steps of the base pass.
        refine_steps: ``num_inference_steps`` of each refinement (default ``steps``); it runs
            ``int(refine_steps · strength)`` of them, which must be at least 1 (else ValueError).
        upscale: "bicubic", "bilinear", "nearest" (in pixel space: decode, upscale, encode), "latent"
            (bicubic on the latents: no VAE encode or decode between stages, only the final decode;
            a latent upscale is softer, so give it more strength), or
            ``f(images in [-1, 1], (h, w)) -> images``.
        tiled_vae: tile VAE encode/decode (diffusers' tiling, or LinFusion's fallback).
        vae_tile: VAE tile size in pixels (None: the VAE's default).
        lean: chunked CFG, feed-forward chunking and (CUDA) model CPU offload.
        generator: torch generator used by every pass.
        output_type: "pil", "np", "pt" or "latent" (the denoiser's latent space).

    Returns:
        :class:`HighResOutput` with ``images`` and the ``sizes`` of every pass.
    """
    family = type(_denoiser(pipe)).__name__
    if family not in IMAGE_DENOISERS:
        raise TypeError(f"generate_highres supports image pipelines ({', '.join(IMAGE_DENOISERS)}); got {family}")
    if not callable(upscale) and upscale not in UPSCALE_MODES:
        raise ValueError(f"upscale must be one of {UPSCALE_MODES} or a callable, got {upscale!r}")
    if "num_inference_steps" in pipe_kwargs:
        steps = pipe_kwargs.pop("num_inference_steps")
    for key in ("image", "latents", "output_type", "strength", "height", "width", "timesteps"):
        if key in pipe_kwargs:
            raise TypeError(f"generate_highres sets {key!r} itself")
    sizes = plan_stages(pipe, height, width, base_height=base_height, base_width=base_width, stages=stages)
    n_refine = len(sizes) - 1
    strengths = [float(strength)] * n_refine if isinstance(strength, (int, float)) else [float(s) for s in strength]
    if len(strengths) != n_refine or any(not 0 < s <= 1 for s in strengths):
        raise ValueError(f"strength must be in (0, 1], one value or one per refinement pass ({n_refine})")
    if steps < 1 or (refine_steps is not None and refine_steps < 1):
        raise ValueError(f"steps and refine_steps must be positive, got {steps} and {refine_steps}")
    refine_steps = refine_steps or steps
    too_few = [s for s in strengths if int(refine_steps * s) < 1]
    if too_few:  # diffusers' img2img would run an empty schedule and fail deep inside the model
        raise ValueError(f"a refinement pass runs int(refine_steps × strength) denoising steps: refine_steps="
                         f"{refine_steps} × strength={too_few[0]} gives none; raise refine_steps (default: steps) "
                         f"or the strength so that their product is at least 1")
    refiner = img2img_pipeline(pipe) if n_refine else None
    _check_kwargs([pipe] + ([refiner] if refiner is not None else []), pipe_kwargs)

    vae = pipe.vae
    had_tiling = getattr(vae, "use_tiling", False)
    if tiled_vae:
        enable_tiled_vae(vae, tile=vae_tile)
    ctx = lean_mode(pipe) if lean else contextlib.nullcontext()
    try:
        with ctx:
            h0, w0 = sizes[0]
            out = pipe(**_base_kwargs(pipe, prompt, h0, w0, steps, generator, pipe_kwargs))
            latents = _unpack_if_flux(pipe, out.images, h0, w0)
            for (h, w), s in zip(sizes[1:], strengths):
                latents = _refine(pipe, refiner, latents, prompt, h, w, s, refine_steps, upscale, generator,
                                  pipe_kwargs)
        return HighResOutput(_finish(pipe, latents, output_type), sizes)
    finally:
        if tiled_vae:
            disable_tiled_vae(vae)
            if had_tiling:
                vae.enable_tiling()


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae_decode(vae, from_model_latents(vae, latents))


def _encode(vae, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return to_model_latents(vae, vae_encode(vae, images))


def _upscale(images: torch.Tensor, size: tuple[int, int], mode) -> torch.Tensor:
    if callable(mode):
        out = mode(images, size)
    else:
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        out = F.interpolate(images.float(), size=size, mode=mode, **kwargs)
    if tuple(out.shape[-2:]) != tuple(size):
        raise ValueError(f"upscaler returned {tuple(out.shape[-2:])}, expected {size}")
    return out.clamp(-1, 1).to(images.dtype)


def _upscale_latents(latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upscale of (B, C, h, w) model-space latents to ``size`` (latent pixels)."""
    return F.interpolate(latents.float(), size=size, mode="bicubic", align_corners=False).to(latents.dtype)


def _refine(pipe, refiner, latents, prompt, height, width, strength, steps, upscale, generator, kwargs):
    vae = pipe.vae
    if upscale == "latent":
        factor = int(pipe.vae_scale_factor)
        init = _upscale_latents(latents, (height // factor, width // factor))
        del latents
    else:
        images = _upscale(_decode(vae, latents), (height, width), upscale)
        del latents
        init = _encode(vae, images)
        del images
    if refiner is None:
        call = _base_kwargs(pipe, prompt, height, width, steps, generator, kwargs)
        call.pop("num_inference_steps")
        out = _sdedit_by_timesteps(pipe, init, strength, steps, generator, call)
    else:
        call = dict(kwargs, prompt=prompt, image=init, strength=strength, num_inference_steps=steps,
                    generator=generator, output_type="latent", height=height, width=width)
        out = refiner(**_accepted(refiner.__call__, call))
    return _unpack_if_flux(pipe, out.images, height, width)


def _finish(pipe, latents: torch.Tensor, output_type: str):
    if output_type == "latent":
        return latents
    images = _decode(pipe.vae, latents)
    return pipe.image_processor.postprocess(images, output_type=output_type)


__all__ = ["HighResOutput", "generate_highres", "img2img_pipeline", "lean_mode", "plan_stages"]
