"""Tiny, offline, deterministic diffusers pipelines for every family LinFusion supports.

Every model is built from a config (never downloaded), with hidden sizes of 16-64, one or two
layers and two attention heads, so that each pipeline builds and runs two denoising steps on CPU
in about a second. Tokenizers are built in memory from a small character-level vocabulary and
survive ``save_pretrained`` / ``from_pretrained`` without network access.

Public API
----------
``FAMILIES``                      all family names, ``VIDEO_FAMILIES`` the video ones.
``build_tiny_pipeline(family)``   a float32, CPU, ``.eval()`` pipeline with deterministic weights.
``call_kwargs(family)``           kwargs for ``pipe(**kw)``: prompt, 2 steps, non-square size, CFG.
``save_tiny_pipeline(family, p)`` build and ``save_pretrained`` to ``p``; returns ``str(p)``.
``denoiser_names(family)``        attribute names of the denoiser(s), e.g. ``("unet",)``.
``token_grid(family)``            token grid at the first self-attention for ``call_kwargs`` sizes.

Token grids at the attention layers with the ``call_kwargs`` defaults (height x width [x frames]):

==============  =============  =======================================================
family          pixels         self-attention token grid
==============  =============  =======================================================
sd15, sd2_v     32 x 48        16 x 24 (down/up block 0) and 8 x 12 (block 1, mid)
sdxl            32 x 48        8 x 12 (only block 1 and mid have attention, as in SDXL)
pixart_sigma    32 x 48        8 x 12
sd3             32 x 48        8 x 12 (+32 text tokens: 16 CLIP + 16 T5, text last)
flux            32 x 48        8 x 12 (+16 text tokens, text first)
wan21, wan22    64 x 96, 9 f   3 x 4 x 6 (frames x rows x cols)
cogvideox       32 x 48, 9 f   3 x 4 x 6 (+16 text tokens, text first)
==============  =============  =======================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

FAMILIES: tuple[str, ...] = (
    "sd15",
    "sd2_v",
    "sdxl",
    "pixart_sigma",
    "sd3",
    "flux",
    "wan21",
    "wan22",
    "cogvideox",
)
VIDEO_FAMILIES: tuple[str, ...] = ("wan21", "wan22", "cogvideox")

PROMPT = "a photo of a red car"
TEXT_LEN = 16  # CLIP model_max_length and T5 max_sequence_length: 16 text tokens everywhere.

# Characters the tokenizers know (T5 also knows upper case; CLIP lower-cases its input).
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789,.!?'-")
_WORDS = "a an the of photo picture red blue green car cat dog house tree on in with".split()


# --------------------------------------------------------------------------------------------
# Tokenizers and text encoders
# --------------------------------------------------------------------------------------------


def _clip_tokenizer() -> CLIPTokenizer:
    """A tiny CLIP BPE tokenizer padded to ``TEXT_LEN`` tokens.

    The vocabulary holds single characters (so any lowercase text tokenizes) plus merges that
    turn each word of ``_WORDS`` into one token, so ``PROMPT`` takes 6 tokens + BOS/EOS.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in _CHARS:
            vocab[char + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: ("p", "h"), ("ph", "o"), ...
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [pair[0] + pair[1]] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_LEN)


def _t5_tokenizer() -> T5Tokenizer:
    """A tiny Unigram T5 tokenizer: a few whole words plus single characters as fallback."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + word, -1.0) for word in _WORDS]
    pieces += [(char, -5.0) for char in _CHARS + [c.upper() for c in _CHARS if c.isalpha()]]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TEXT_LEN)


def _clip_encoder(tokenizer: CLIPTokenizer, hidden: int = 32, projection: int | None = None):
    """A one-layer CLIP text encoder; ``projection`` set -> ``CLIPTextModelWithProjection``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection or hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LEN,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_cls(config)


def _t5_encoder(tokenizer: T5Tokenizer, d_model: int = 32, umt5: bool = False):
    """A one-layer T5 (or UMT5, as in Wan) encoder with dropout off."""
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return model_cls(config)


# --------------------------------------------------------------------------------------------
# Image VAE (factor 2) and schedulers shared by several families
# --------------------------------------------------------------------------------------------


def _image_vae(latent_channels: int = 4, shift_factor: float | None = None) -> AutoencoderKL:
    """A two-level ``AutoencoderKL``: spatial factor 2, so 32x48 px -> 16x24 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=shift_factor,
    )


def _ddim(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD-style DDIM scheduler (scaled-linear betas)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="trailing" if prediction_type == "v_prediction" else "leading",
    )


# --------------------------------------------------------------------------------------------
# Per-family builders. Each is called right after torch.manual_seed(seed).
# --------------------------------------------------------------------------------------------


def _sd_unet(sd2: bool) -> UNet2DConditionModel:
    """SD1.5 (int heads) or SD2 (per-block list, linear projection) tiny UNet, 2 levels + mid."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        # diffusers' historical naming: for SD UNets `attention_head_dim` is the number of heads.
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
    )


def _build_sd(sd2: bool) -> StableDiffusionPipeline:
    """StableDiffusionPipeline: SD1.5 (epsilon) or SD2 (v-prediction)."""
    unet = _sd_unet(sd2)
    vae = _image_vae()
    tokenizer = _clip_tokenizer()
    text_encoder = _clip_encoder(tokenizer, hidden=32)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim("v_prediction" if sd2 else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_sdxl() -> StableDiffusionXLPipeline:
    """SDXL: two CLIP encoders (second with projection), ``text_time`` added conditioning."""
    time_dim, proj_dim = 8, 32
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
        cross_attention_dim=32 + 32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=proj_dim + 6 * time_dim,
    )
    vae = _image_vae()
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    text_encoder = _clip_encoder(tokenizer, hidden=32)
    text_encoder_2 = _clip_encoder(tokenizer_2, hidden=32, projection=proj_dim)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_pixart_sigma() -> PixArtSigmaPipeline:
    """PixArt-Sigma: DiT with adaLN-single, T5 captions, learned sigma (8 output channels)."""
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=16,
        patch_size=2,
        norm_num_groups=8,
        use_additional_conditions=False,
    )
    vae = _image_vae()
    tokenizer = _t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer, d_model=32)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _build_sd3() -> StableDiffusion3Pipeline:
    """SD3.5-medium style: MMDiT with qk RMS-norm, block 0 has dual (extra self-) attention."""
    clip_hidden, t5_dim = 16, 32  # two CLIP embeddings are concatenated and padded to t5_dim
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_dim,
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_hidden,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = _image_vae(shift_factor=0.1)
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_encoder(tokenizer, hidden=clip_hidden, projection=clip_hidden)
    text_encoder_2 = _clip_encoder(tokenizer_2, hidden=clip_hidden, projection=clip_hidden)
    text_encoder_3 = _t5_encoder(tokenizer_3, d_model=t5_dim)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux() -> FluxPipeline:
    """FLUX.1-dev style: 1 double + 1 single block, guidance embedding, 2x2 latent packing."""
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _image_vae(shift_factor=0.1)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_encoder(tokenizer, hidden=32)
    text_encoder_2 = _t5_encoder(tokenizer_2, d_model=32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _wan_transformer() -> WanTransformer3DModel:
    """A two-block Wan DiT: patch (1, 2, 2), 3D RoPE split 8/4/4 over the 16-dim heads."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _build_wan(two_experts: bool) -> WanPipeline:
    """Wan 2.1 T2V, or Wan 2.2 A14B style (high-noise ``transformer`` + low-noise ``transformer_2``)."""
    transformer = _wan_transformer()
    transformer_2 = _wan_transformer() if two_experts else None
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],  # 3 spatial downsamples -> factor 8
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # temporal factor 4
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    tokenizer = _t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer, d_model=32, umt5=True)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
        transformer_2=transformer_2,
        # With 2 steps the timesteps are 1000 and ~9: one step per expert.
        boundary_ratio=0.875 if two_experts else None,
    )


def _build_cogvideox() -> CogVideoXPipeline:
    """CogVideoX-5b style: 3D RoPE, text tokens first in joint attention, v-prediction DDIM."""
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=2,
        sample_width=12,  # latent units (48 px / 4)
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=True,
    )
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),  # 2 spatial downsamples -> factor 4
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=32,
        sample_width=48,
    )
    tokenizer = _t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer, d_model=32)
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


_BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "sd15": lambda: _build_sd(sd2=False),
    "sd2_v": lambda: _build_sd(sd2=True),
    "sdxl": _build_sdxl,
    "pixart_sigma": _build_pixart_sigma,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "wan21": lambda: _build_wan(two_experts=False),
    "wan22": lambda: _build_wan(two_experts=True),
    "cogvideox": _build_cogvideox,
}


# --------------------------------------------------------------------------------------------
# Per-family call settings
# --------------------------------------------------------------------------------------------

# Default (height, width, num_frames, guidance_scale). Sizes give the non-square grids in the
# module docstring; guidance > 1 turns CFG on (FLUX: distilled guidance embedding instead).
_DEFAULTS: dict[str, tuple[int, int, int | None, float]] = {
    "sd15": (32, 48, None, 5.0),
    "sd2_v": (32, 48, None, 5.0),
    "sdxl": (32, 48, None, 5.0),
    "pixart_sigma": (32, 48, None, 4.5),
    "sd3": (32, 48, None, 5.0),
    "flux": (32, 48, None, 3.5),
    "wan21": (64, 96, 9, 5.0),
    "wan22": (64, 96, 9, 5.0),
    "cogvideox": (32, 48, 9, 6.0),
}

# Families whose pipeline takes `max_sequence_length` (the T5 prompt length).
_T5_FAMILIES = ("pixart_sigma", "sd3", "flux", "wan21", "wan22", "cogvideox")

# (spatial pixels per token, latent frames per `num_frames`) used by `token_grid`.
_PIXELS_PER_TOKEN = {
    "sd15": 2, "sd2_v": 2, "sdxl": 4, "pixart_sigma": 4, "sd3": 4, "flux": 4,
    "wan21": 16, "wan22": 16, "cogvideox": 8,
}


def _check_family(family: str) -> None:
    """Raise a helpful error for unknown family names."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """Build the tiny pipeline of ``family`` with weights drawn after ``torch.manual_seed(seed)``.

    All components are float32 on CPU in eval mode; the progress bar is disabled.
    """
    _check_family(family)
    torch.manual_seed(seed)
    pipe = _BUILDERS[family]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # built on CPU in float32 (torch's default dtype) already
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(
    family: str,
    *,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    steps: int = 2,
    seed: int = 0,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``pipe(**kw)``: a prompt, ``steps`` steps, a seeded CPU generator,
    ``output_type="np"``, a non-square default size and CFG on (see ``_DEFAULTS``)."""
    _check_family(family)
    default_h, default_w, default_frames, default_cfg = _DEFAULTS[family]
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "num_inference_steps": steps,
        "height": height or default_h,
        "width": width or default_w,
        "guidance_scale": default_cfg if guidance_scale is None else guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "np",
    }
    if family in VIDEO_FAMILIES:
        kwargs["num_frames"] = num_frames or default_frames
    elif num_frames is not None:
        raise ValueError(f"{family} is an image family; num_frames must be None")
    if family in _T5_FAMILIES:
        kwargs["max_sequence_length"] = TEXT_LEN
    if family == "pixart_sigma":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    return kwargs


def token_grid(
    family: str,
    *,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
) -> tuple[int, ...]:
    """Image-token grid seen by the first self-attention layer: ``(rows, cols)`` for image
    families, ``(latent_frames, rows, cols)`` for video (temporal VAE factor 4).

    For the UNets this is the full-resolution level (block 0; SDXL: block 1, as in real SDXL).
    """
    _check_family(family)
    default_h, default_w, default_frames, _ = _DEFAULTS[family]
    step = _PIXELS_PER_TOKEN[family]
    grid = ((height or default_h) // step, (width or default_w) // step)
    if family in VIDEO_FAMILIES:
        grid = ((num_frames or default_frames) - 1) // 4 + 1, *grid
    return grid


def save_tiny_pipeline(family: str, path: str | os.PathLike, seed: int = 0) -> str:
    """Build the tiny pipeline and ``save_pretrained`` it to ``path`` (tokenizers included).

    ``DiffusionPipeline.from_pretrained(path)`` reloads it fully offline.
    """
    pipe = build_tiny_pipeline(family, seed=seed)
    pipe.save_pretrained(str(path))
    return str(Path(path))


def denoiser_names(family: str) -> tuple[str, ...]:
    """Names of the pipeline attributes holding the denoiser(s) that LinFusion patches."""
    _check_family(family)
    if family in ("sd15", "sd2_v", "sdxl"):
        return ("unet",)
    if family == "wan22":
        return ("transformer", "transformer_2")
    return ("transformer",)
