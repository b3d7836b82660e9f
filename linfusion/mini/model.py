"""LinFusion-Mini's architecture: a real ``PixArtSigmaPipeline``, every component small.

* tokenizer -- a Unigram ``T5Tokenizer`` built in memory: every word of the prompt
  grammar (and the parser's synonyms) is one piece, single characters are the fallback,
  so any lower-case text tokenizes;
* text encoder -- ``T5EncoderModel`` (d_model 192, 3 layers, ~1.4M parameters);
* VAE -- ``AutoencoderKL`` with factor 4 and 4 latent channels (128 px -> 32x32x4), no
  attention, so it is a pure convnet at any size;
* denoiser -- ``PixArtTransformer2DModel`` (hidden 256, 6 layers, 4 heads of 64, patch 2:
  256 image tokens at 128 px), v-prediction;
* scheduler -- ``DPMSolverMultistepScheduler`` (linear betas, trailing spacing).

``MiniConfig`` holds every size; :data:`FULL` is the shipped model, :data:`SMOKE` a
seconds-on-CPU version with the same code path. :class:`ParseHead` is the auxiliary
scene-parsing head the text encoder is pre-trained with (not shipped).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch
from torch import nn

from . import world

#: prompt length used in training; the pipeline pads further (300) with a mask, which
#: leaves every real token's embedding unchanged.
TEXT_LEN = 48


@dataclasses.dataclass(frozen=True)
class MiniConfig:
    """Every size of the LinFusion-Mini pipeline."""

    resolution: int = 128
    # text encoder (T5)
    text_dim: int = 192
    text_layers: int = 3
    text_heads: int = 3
    text_ff: int = 512
    # VAE (factor 2**(len(vae_channels)-1))
    vae_channels: tuple[int, ...] = (32, 64, 128)
    vae_groups: int = 32
    # 8, not 4: at equal training the 4-channel VAE lost most small shapes (recon PSNR 17 vs 20 dB
    # on CPU; the first H200 teacher's 4-channel VAE reconstructions passed the checker only 53%)
    latent_channels: int = 8
    # transformer
    dit_heads: int = 4
    dit_head_dim: int = 64
    dit_layers: int = 6
    patch_size: int = 2
    norm_groups: int = 32

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_factor

    @property
    def dit_dim(self) -> int:
        return self.dit_heads * self.dit_head_dim


FULL = MiniConfig()
SMOKE = MiniConfig(text_dim=32, text_layers=1, text_heads=2, text_ff=64, vae_channels=(8, 16, 16), vae_groups=8,
                   dit_heads=2, dit_head_dim=16, dit_layers=2, norm_groups=8)


# --------------------------------------------------------------------------- tokenizer

_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789,.!?'-;:()")


def grammar_words(n_prompts: int = 1500, seed: int = 0) -> list[str]:
    """Every word the prompt grammar writes (sampled) plus the parser's vocabulary, sorted."""
    words: set[str] = set()
    rng = np.random.default_rng(seed)
    for _ in range(n_prompts):
        words.update(re.findall(r"[a-z0-9\-]+", world.scene_to_prompt(world.sample_scene(rng), rng)))
    for table in ("_WORD_COUNTS", "_WORD_SIZES", "_WORD_COLOURS", "_WORD_TEXTURES", "_WORD_SHAPES",
                  "_WORD_RELATIONS", "_WORD_ROWS", "_WORD_CENTER", "_WORD_BACKGROUND"):
        words.update(str(w) for w in getattr(world, table, ()))
    words.update(s + "s" for s in world.SHAPES)
    words.update(str(n) for n in range(10))
    words.update("the a an of on in with and at to there is are image picture photo left right top".split())
    return sorted(w for w in words if w)


def build_tokenizer():
    """Unigram T5 tokenizer: whole grammar words first, characters as the fallback."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    pieces += [("\u2581" + w, -1.0) for w in grammar_words()]
    pieces += [(c, -8.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=300)


def tokenize(tokenizer, prompts: list[str], length: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) exactly as ``PixArtSigmaPipeline.encode_prompt`` makes them (lower-cased, EOS, padded)."""
    text = [p.lower().strip() for p in prompts]
    out = tokenizer(text, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                    return_tensors="pt")
    return out.input_ids, out.attention_mask


# --------------------------------------------------------------------------- components


def build_components(cfg: MiniConfig = FULL, tokenizer=None) -> dict:
    """Fresh (untrained) components of the pipeline, float32, on the CPU."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = tokenizer or build_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=cfg.text_dim, d_kv=cfg.text_dim // cfg.text_heads, d_ff=cfg.text_ff,
        num_layers=cfg.text_layers, num_heads=cfg.text_heads, relative_attention_num_buckets=16,
        relative_attention_max_distance=64, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.vae_groups, sample_size=cfg.resolution,
        scaling_factor=1.0, mid_block_add_attention=False,
    )
    transformer = PixArtTransformer2DModel(
        num_attention_heads=cfg.dit_heads, attention_head_dim=cfg.dit_head_dim, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.dit_layers, cross_attention_dim=cfg.dit_dim,
        caption_channels=cfg.text_dim, sample_size=cfg.latent_size, patch_size=cfg.patch_size,
        norm_num_groups=cfg.norm_groups, use_additional_conditions=False,
    )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="v_prediction", timestep_spacing="trailing", solver_order=2,
        algorithm_type="dpmsolver++", final_sigmas_type="zero",
    )
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def assemble_pipeline(components: dict):
    """The ``PixArtSigmaPipeline`` of the components (eval mode, progress bar off)."""
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(**components)
    for module in (pipe.text_encoder, pipe.vae, pipe.transformer):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(components: dict) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in components.items() if isinstance(m, nn.Module)}


def center_latents(vae, mean: torch.Tensor) -> None:
    """Fold a per-channel latent mean into the VAE (exactly): the encoder's mean output drops
    by ``mean`` and the decoder's 1x1 ``post_quant_conv`` adds it back, so latents are centred
    and decoding is unchanged. (``PixArtSigmaPipeline`` ignores ``shift_factor``.)"""
    c = mean.numel()
    with torch.no_grad():
        vae.quant_conv.bias[:c] -= mean.to(vae.quant_conv.bias)
        w = vae.post_quant_conv.weight[:, :, 0, 0]
        vae.post_quant_conv.bias += w @ mean.to(w)


# --------------------------------------------------------------------------- text pre-training head

#: (name, classes) of each scene-parse target; slots 0 and 1 are the first two object groups.
SLOT_FIELDS = (("present", 2), ("shape", len(world.SHAPES)), ("colour", len(world.COLOURS)),
               ("size", len(world.SIZES)), ("texture", len(world.TEXTURES)), ("count", world.MAX_OBJECTS),
               ("position", len(world.POSITIONS) + 1), ("relation", len(world.RELATIONS) + 1))
BG_FIELDS = (("bg_colour", len(world.COLOURS)), ("bg_texture", len(world.TEXTURES)))
N_SLOTS = 2
IGNORE = -100


def scene_targets(scene: world.Scene) -> np.ndarray:
    """Integer targets (``IGNORE`` where undefined): per slot the SLOT_FIELDS, then BG_FIELDS."""
    out: list[int] = []
    for k in range(N_SLOTS):
        if k < len(scene.objects):
            o = scene.objects[k]
            rel = next((world.RELATIONS.index(r.relation) + 1 for r in scene.relations if r.subject == k), 0)
            pos = world.POSITIONS.index(o.position) if o.position is not None else len(world.POSITIONS)
            out += [1, world.SHAPES.index(o.shape), world.COLOURS.index(o.colour), world.SIZES.index(o.size),
                    world.TEXTURES.index(o.texture), o.count - 1, pos, rel]
        else:
            out += [0] + [IGNORE] * (len(SLOT_FIELDS) - 1)
    out += [world.COLOURS.index(scene.background), world.TEXTURES.index(scene.background_texture)]
    return np.asarray(out, np.int64)


class ParseHead(nn.Module):
    """Attention-pools the text encoder's tokens into slot vectors and classifies the scene."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(N_SLOTS + 1, dim) * dim**-0.5)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.slot_heads = nn.ModuleList(nn.Linear(dim, n) for _, n in SLOT_FIELDS)
        self.bg_heads = nn.ModuleList(nn.Linear(dim, n) for _, n in BG_FIELDS)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("qd,bld->bql", self.queries.to(hidden.dtype), hidden) * hidden.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        pooled = self.mlp(torch.einsum("bql,bld->bqd", scores.softmax(-1), hidden))
        logits = [head(pooled[:, k]) for k in range(N_SLOTS) for head in self.slot_heads]
        logits += [head(pooled[:, N_SLOTS]) for head in self.bg_heads]
        # Mean over the fields that have any target in the batch, computed without a host sync
        # (a `bool(...)` per field stalled the GPU queue ~30 times a training step).
        sums = torch.stack([nn.functional.cross_entropy(lg.float(), targets[:, i], ignore_index=IGNORE, reduction="sum")
                            for i, lg in enumerate(logits)])
        counts = (targets[:, : len(logits)] != IGNORE).sum(0).float()
        present = (counts > 0).float()
        return (sums / counts.clamp(min=1) * present).sum() / present.sum().clamp(min=1)
