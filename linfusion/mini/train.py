"""Train LinFusion-Mini from scratch, then distil its linear and local students.

One command::

    python -m linfusion.mini.train --out DIR [--minutes 5.5] [--device cuda]
    python -m linfusion.mini.train --out DIR --smoke          # seconds on a CPU, tiny sizes

Stages (time budgets are fractions of ``--minutes``; ``--*-steps`` fix step counts instead):

1. **VAE** (28%): ``AutoencoderKL`` on renders streamed from CPU workers (L1 + L2 weighted up
   on object pixels, edge loss, tiny KL), on 64 px crops for 60% of its time, then on full frames; then the latent
   mean is folded into the VAE and ``scaling_factor`` set.
2. **text encoder** (5%): T5 pre-trained to parse the prompt into its scene (slot heads).
3. **transformer** (67%, ``torch.compile`` on CUDA): v-prediction on VAE latents of fresh renders
   with the text encoder frozen, loss weighted up on object pixels, timesteps biased to the
   middle of the schedule (where shapes and counts are decided), 10% empty prompts for
   classifier-free guidance; the EMA or the raw weights are kept, whichever scores higher on
   held-out prompts.
4. ``save_pretrained`` of the ``PixArtSigmaPipeline`` in fp16 safetensors to ``DIR/pipeline``.
5. **students**: the distillation toolkit's own commands, ``linfusion generate-data`` once
   and ``linfusion distill --method linear|local`` on that data (see :func:`distill_argv`),
   written to ``DIR/adapter-linear`` and ``DIR/adapter-local`` (weights then stored fp16).

``DIR/train_summary.json`` records sizes, steps, losses and timings.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import model as mm
from .data import OBJECT_CODES, RenderStream, to_tensor, to_uint8

#: local attention radius (latent tokens) of the student: the base grid is 16x16 tokens
LOCAL_WINDOW = 4
#: pooling factor of the local student's global K/V branch: every query also sees the 16x16 grid
#: pooled 4x, for the counts and layouts a radius-4 window cannot see (attempt 8, the bundled weights,
#: with it and a better teacher: local student 80.2% strict, 0.87x its teacher; attempt 7 without: 72.9%, 0.81x)
LOCAL_GLOBAL_POOL = 4
#: the local student's attention options unless MINI_LOCAL_OPTIONS / ``local_options`` says otherwise
DEFAULT_LOCAL_OPTIONS = {"window": LOCAL_WINDOW, "global_pool": LOCAL_GLOBAL_POOL}
#: the linear student's: LiT's depthwise convolution of V (attempt 6's linear student, without it,
#: drew 35 of 50 small objects in the wrong shape; attempt 7 with it: 63.5% strict, was 47.9%;
#: attempt 8: 57.3%) and Hedgehog's learned softmax feature map (attempt 9, same losses: 64.6% strict
#: with ELU+1, 71.9% with hedgehog; small objects in the wrong shape 20 of 50), with 128 projected
#: features per sign instead of the head dim's 64 (attempt 10: 77 of 96 against 72, same recipe)
DEFAULT_LINEAR_OPTIONS = {"conv_v": True, "feature_map": "hedgehog", "hedgehog_features": 128}
DEFAULT_STUDENT_OPTIONS = {"local": DEFAULT_LOCAL_OPTIONS, "linear": DEFAULT_LINEAR_OPTIONS}
#: attempt 4: the VAE's share up from 0.22 (its reconstructions passed the checker only 73% of the time in attempt 3)
STAGE_SHARES = {"vae": 0.28, "text": 0.05, "dit": 0.67}
#: VAE training window (px): random crops of the 128 px renders, for the first VAE_CROP_SHARE of its
#: time; full frames after that (a crop-only VAE tinted flat full-frame backgrounds: 31 dB on
#: 64 px tiles, 24.9 dB on whole 128 px frames in the second H200 run)
VAE_CROP = 64
VAE_CROP_SHARE = 0.6
#: loss weight of latent pixels covered by an object: 1 + OBJECT_WEIGHT (background: 1). Every
#: failure of the second teacher was on objects, which cover a few % of the pixels.
OBJECT_WEIGHT = 4.0
#: the object weight's multiplier on small objects (attempt 6's wrong shapes were small objects
#: above all; attempt 7 used 3 with 346 s of training: 77.1% -> 89.6% strict)
SMALL_OBJECT_SCALE = 3.0
#: the same for textured objects (dots, stripes, checks; multiplies the small-object scale): attempt 7
#: (1: like plain ones) failed ten held-out prompts, all with a textured object, eight a checkered one
#: (mini_attempt7/); attempt 8, the bundled weights, used 2: 89.6% -> 92.7% strict (mini_attempt8/)
TEXTURED_OBJECT_SCALE = 2.0
#: the same weighting in the VAE's reconstruction loss: attempt 3's VAE reached 31 dB on whole frames
#: yet broke up small textured objects (73% of its reconstructions passed the checker)
VAE_OBJECT_WEIGHT = 4.0
#: share of training timesteps drawn from MID_T (else uniform over all). Attempts 2-4 used
#: (150, 800), 0.7 (the second teacher decided, and lost, shapes and counts between t = 800 and 400);
#: attempt 4's SDEdit test put the count decision at t = 700..600, and attempts 5-8 (8: the
#: bundled weights) drew half their timesteps from 550..750: strict adherence 35.4% -> 38.5%
#: (attempt 6's canonical layouts, world.py, then took it to 77.1%; attempt 7 to 89.6%, attempt 8 to 92.7%)
MID_T, MID_T_SHARE = (550, 750), 0.5
#: students: steps each and teacher-data prompts (attempt 3 used 1200 and 192; 192 prompts x 20 steps
#: were ~20 passes over the data, and 833 steps scored like 1200; attempts 5-6 1500, attempts 7-8 2500)
DISTILL_STEPS, DISTILL_PROMPTS = 2500, 1024  # 512 until attempt 9 (attempt 10: 1024 gave the linear student 79 vs 77 of 96)
#: the students' losses and LR shape (``linfusion distill`` flags). On the teacher's recorded CFG
#: trajectories the task term's target is the guided sample, which neither branch of the teacher
#: predicts; with it at a constant LR the local student drifted from the teacher as it trained
#: (attempt 8: 80.2% strict). KD + attention losses with a cosine LR, attempt 9 (the bundled weights):
#: local 88.5% (0.95x its teacher), linear 64.6% with attempt 8's ELU+1 features (mini_attempt9/analysis.md).
DEFAULT_DISTILL_ARGS = ("--losses", "task=0", "kd=1", "attn=0.5", "--lr-decay", "cosine")
#: per-method flags after DEFAULT_DISTILL_ARGS (a caller's flags come after these). Attempt 10: the linear
#: student matched the teacher's attention outputs at weight 1 (82 of 96 strict, against 79 at 0.5;
#: mini_attempt10/analysis.md)
DEFAULT_METHOD_ARGS = {"linear": ("--losses", "task=0", "kd=1", "attn=1"), "local": ()}
#: learning rates (attempt 10: lr 1e-3 for the linear student, 72 of 96 against attempt 9's 69 at 3e-4)
DEFAULT_STUDENT_LRS = {"linear": 1e-3, "local": 2e-4}
STUDENTS = ("linear", "local")


# --------------------------------------------------------------------------- helpers


class Budget:
    """Stop after ``steps`` steps if given, else after ``seconds``; ``progress`` in [0, 1]."""

    def __init__(self, seconds: float, steps: int | None = None) -> None:
        self.seconds, self.steps, self.start, self.step = max(seconds, 1e-3), steps, time.time(), 0

    @property
    def progress(self) -> float:
        if self.steps:
            return min(1.0, self.step / self.steps)
        return min(1.0, (time.time() - self.start) / self.seconds)

    def done(self) -> bool:
        return self.step >= self.steps if self.steps else time.time() - self.start >= self.seconds

    def elapsed(self) -> float:
        return time.time() - self.start


def lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0.05 over the budget."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class EMA:
    """Exponential moving average of a module's parameters (decay ramps up from 0)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.module, self.decay, self.n = module, decay, 0
        self.shadow = [p.detach().clone().float() for p in module.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.module.parameters()], 1 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for p, s in zip(module.parameters(), self.shadow):
            p.copy_(s)


def log(msg: str) -> None:
    print(f"[mini.train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- stage 1: VAE


def train_vae(vae, stream: RenderStream, budget: Budget, device, batch: int, lr: float, keep: list,
              crop: int | None = None) -> dict:
    """Train the VAE on streamed renders (random ``crop``-pixel windows when given); every
    non-crop chunk seen is appended to ``keep``."""
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    capacity = 16384 if device.type == "cuda" else 256
    size = vae.config.sample_size
    pool = torch.empty((capacity, 3, size, size), dtype=torch.uint8, device=device)
    pool_objects = torch.zeros((capacity, size, size), dtype=torch.bool, device=device)  # False for crop chunks
    filled, pos, losses = 0, 0, []

    def add(chunks) -> None:
        nonlocal filled, pos
        for chunk in chunks:
            if not chunk.crop:
                keep.append(chunk)
            x = torch.from_numpy(chunk.images).permute(0, 3, 1, 2).to(device, non_blocking=True)
            rows = ((torch.arange(x.shape[0]) + pos) % capacity).to(device)
            pool[rows] = x
            pool_objects[rows] = (torch.from_numpy(chunk.objects > 0).to(device) if chunk.objects is not None else False)
            pos = (pos + x.shape[0]) % capacity
            filled = min(capacity, filled + x.shape[0])

    while filled < min(batch, capacity):
        add([stream.get()])
    while not budget.done():
        add(stream.drain(limit=64))
        if stream.workers == 0 and budget.step % 4 == 0:
            add([stream.get()])
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(budget.progress, budget.step, 100)
        idx = torch.randint(0, filled, (batch,), device=device)
        x, objects = pool[idx], pool_objects[idx]
        if crop and crop < x.shape[-1] and budget.progress < VAE_CROP_SHARE:  # the VAE is convolutional: crops teach it as well, 4x cheaper
            y0, x0 = (int(v) for v in np.random.randint(0, x.shape[-1] - crop + 1, 2))
            x = x[..., y0 : y0 + crop, x0 : x0 + crop]
            objects = objects[..., y0 : y0 + crop, x0 : x0 + crop]
        x = x.float().div(127.5).sub(1.0)
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample.float()
        loss = vae_reconstruction_loss(rec, x, objects) + 1e-6 * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        budget.step += 1
        losses.append(float(loss.detach()) if budget.step % 50 == 0 or budget.step < 3 else losses[-1] if losses else 0.0)
        if budget.step % 500 == 0:
            log(f"vae step {budget.step} loss {losses[-1]:.4f} ({budget.elapsed():.0f}s)")
    vae.eval()
    return {"steps": budget.step, "seconds": round(budget.elapsed(), 1), "final_loss": losses[-1] if losses else None}


@torch.no_grad()
def vae_recon_adherence(vae, device, n: int) -> dict:
    """Checker pass rate of VAE reconstructions of ``n`` held-out ground-truth renders: the ceiling
    any teacher built on this VAE can reach."""
    from .checker import AdherenceChecker
    from .quality import psnr
    from .world import parse_prompt, prompt_set, render

    prompts = prompt_set("heldout", n)
    size = vae.config.sample_size
    images = np.stack([np.asarray(render(parse_prompt(p), size, size)) for p in prompts])
    with autocast(device):
        rec = to_uint8(vae.decode(vae.encode(to_tensor(images).to(device)).latent_dist.mean).sample)
    checker = AdherenceChecker()
    passed = [checker.check(r, p) for r, p in zip(rec, prompts)]
    psnr_db = float(np.mean([psnr(a, b) for a, b in zip(rec, images)]))
    return {"n": n, "passed": round(float(np.mean(passed)), 4), "psnr_db": round(psnr_db, 2)}


def vae_reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """L1 + L2 with object pixels weighted 1 + VAE_OBJECT_WEIGHT (normalised by the mean weight, so
    the scale is a plain loss's), plus the unweighted edge L1.

    rec, x: (B, 3, H, W) in [-1, 1]; objects: (B, H, W) bool."""
    weight = 1.0 + VAE_OBJECT_WEIGHT * objects[:, None].float()
    error = rec - x
    pixel = ((error.abs() + error**2) * weight).mean() / weight.mean()
    return pixel + _edge_l1(rec, x)


def _edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


@torch.no_grad()
def normalise_latents(vae, chunks: list, device) -> dict:
    """Centre the latents (folded into the VAE) and set ``scaling_factor`` to 1/std."""
    images = np.concatenate([c.images for c in chunks[:64]])[:2048]
    means = []
    for i in range(0, len(images), 256):
        with autocast(device):
            means.append(vae.encode(to_tensor(images[i : i + 256]).to(device)).latent_dist.mean.float())
    z = torch.cat(means)
    mean = z.mean(dim=(0, 2, 3))
    mm.center_latents(vae, mean)
    std = float((z - mean[None, :, None, None]).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"latent_mean": [round(float(m), 4) for m in mean], "latent_std": round(std, 4), "scaling_factor": 1.0 / std}


# --------------------------------------------------------------------------- latent bank


class Bank:
    """Ring buffer (on the training device) of scaled latents, token ids, masks and parse targets."""

    def __init__(self, capacity: int, latent_shape: tuple[int, ...], n_targets: int, device, dtype) -> None:
        self.z = torch.empty((capacity, *latent_shape), dtype=dtype, device=device)
        self.ids = torch.zeros((capacity, mm.TEXT_LEN), dtype=torch.long, device=device)
        self.mask = torch.zeros((capacity, mm.TEXT_LEN), dtype=torch.long, device=device)
        self.targets = torch.zeros((capacity, n_targets), dtype=torch.long, device=device)
        #: codes of the objects covering each latent pixel (data.object_codes max-pooled to the
        #: latent grid, so the smallest object under a latent pixel decides; 0 = none)
        self.objects = torch.zeros((capacity, *latent_shape[1:]), dtype=torch.uint8, device=device)
        self.capacity, self.size, self.pos, self.added = capacity, 0, 0, 0
        #: the frozen text encoder's states of every row, once attach_text_encoder was called
        self.hidden: torch.Tensor | None = None
        self.text_encoder = None

    @torch.no_grad()
    def attach_text_encoder(self, text_encoder, batch: int = 4096) -> None:
        """Encode every row's prompt once with the (now frozen) ``text_encoder`` and keep doing so
        for rows added later. The transformer stage then reads states instead of re-running the
        encoder each step (in the third H200 run its eager forward and weight casts were a large
        part of the ~450 kernel launches of a step that was host-bound: 86 ms wall, 27 ms device)."""
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        device = self.ids.device
        self.hidden = torch.empty((self.capacity, mm.TEXT_LEN, text_encoder.config.d_model), dtype=self.z.dtype,
                                  device=device)
        for i in range(0, self.size, batch):
            rows = torch.arange(i, min(i + batch, self.size), device=device)
            self.hidden[rows] = self.encode_text(self.ids[rows], self.mask[rows])

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(n, TEXT_LEN, d_model) states of token ``ids``/``mask`` (n, TEXT_LEN) in the bank's dtype."""
        with autocast(ids.device):
            return self.text_encoder(ids, attention_mask=mask).last_hidden_state.to(self.z.dtype)

    @torch.no_grad()
    def add_chunks(self, chunks: list, vae, tokenizer, device) -> None:
        chunks = [c for c in chunks if not c.crop]
        for i in range(0, len(chunks), 64):  # bounded host memory for large backlogs
            self._add(chunks[i : i + 64], vae, tokenizer, device)

    def _add(self, chunks: list, vae, tokenizer, device) -> None:
        if not chunks:
            return
        # uint8 pixels go to the device as they are and become floats there: the CPU-side float
        # conversion of every fresh render (and its synchronous copy) was on the training loop's path
        images = torch.from_numpy(np.concatenate([c.images for c in chunks]))
        prompts = [p for c in chunks for p in c.prompts]
        targets = torch.from_numpy(np.concatenate([c.targets for c in chunks]))
        objects = (torch.from_numpy(np.concatenate([c.objects for c in chunks]))
                   if all(c.objects is not None for c in chunks) else None)
        ids, mask = mm.tokenize(tokenizer, prompts)

        def upload(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)

        for i in range(0, len(images), 512):
            with autocast(device):
                z = vae.encode(to_tensor(upload(images[i : i + 512]))).latent_dist.mean.float()
            z = z * vae.config.scaling_factor
            n = z.shape[0]
            rows = (torch.arange(n, device=device) + self.pos) % self.capacity
            self.z[rows] = z.to(self.z.dtype)
            self.ids[rows] = upload(ids[i : i + n])
            self.mask[rows] = upload(mask[i : i + n])
            self.targets[rows] = upload(targets[i : i + n])
            if objects is not None:
                codes = upload(objects[i : i + n])[:, None].float()
                self.objects[rows] = F.adaptive_max_pool2d(codes, self.objects.shape[1:])[:, 0].to(torch.uint8)
            if self.hidden is not None:
                self.hidden[rows] = self.encode_text(self.ids[rows], self.mask[rows])
            self.pos = (self.pos + n) % self.capacity
            self.size = min(self.capacity, self.size + n)
            self.added += n

    def sample(self, n: int, device):
        """(latents, token ids, token mask, parse targets, object maps) of ``n`` random rows."""
        idx = torch.randint(0, self.size, (n,), device=device)
        return self.z[idx].float(), self.ids[idx], self.mask[idx], self.targets[idx], self.objects[idx]

    def sample_encoded(self, n: int, device):
        """(latents, text states, token mask, object maps) of ``n`` random rows (needs
        :meth:`attach_text_encoder`)."""
        if self.hidden is None:
            raise RuntimeError("Bank.sample_encoded needs attach_text_encoder first")
        idx = torch.randint(0, self.size, (n,), device=device)
        return self.z[idx].float(), self.hidden[idx], self.mask[idx], self.objects[idx]


# --------------------------------------------------------------------------- stage 2: text encoder


def train_text(text_encoder, head, bank: Bank, budget: Budget, device, batch: int, lr: float) -> dict:
    text_encoder.to(device).train()
    head.to(device).train()
    params = list(text_encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    loss = torch.zeros(())
    while not budget.done():
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(budget.progress, budget.step, 50)
        _, ids, mask, targets, _ = bank.sample(batch, device)
        with autocast(device):
            hidden = text_encoder(ids, attention_mask=mask).last_hidden_state
            loss = head(hidden, mask, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        budget.step += 1
        if budget.step % 200 == 0:
            log(f"text step {budget.step} parse loss {float(loss.detach()):.4f}")
    return {"steps": budget.step, "seconds": round(budget.elapsed(), 1), "final_parse_loss": float(loss.detach())}


# --------------------------------------------------------------------------- stage 3: transformer


def resolve_band(band: tuple[int, int, float] | None = None, num_train: int = 1000) -> tuple[int, int, float]:
    """``band`` (lo, hi, share) checked against ``num_train`` timesteps; None: ``(*MID_T, MID_T_SHARE)``."""
    lo, hi, share = band if band is not None else (*MID_T, MID_T_SHARE)
    if not (0 <= lo < hi <= num_train and 0.0 <= share <= 1.0):
        raise ValueError(f"timestep band needs 0 <= lo < hi <= {num_train} and 0 <= share <= 1, got {(lo, hi, share)}")
    return lo, hi, share


def sample_timesteps(n: int, num_train: int, device, band: tuple[int, int, float] | None = None) -> torch.Tensor:
    """``n`` training timesteps: a ``share`` of them uniform in ``[lo, hi)``, the rest uniform over all
    (``band`` as in :func:`resolve_band`)."""
    lo, hi, share = resolve_band(band, num_train)
    everywhere = torch.randint(0, num_train, (n,), device=device)
    middle = torch.randint(lo, hi, (n,), device=device)
    return torch.where(torch.rand(n, device=device) < share, middle, everywhere)


def object_scales(small_object_scale: float = 1.0, textured_object_scale: float = 1.0, device=None) -> torch.Tensor:
    """Object-weight multiplier per code of data.object_code (index 0: background, 0): the product
    of ``small_object_scale`` (small objects) and ``textured_object_scale`` (textured ones)."""
    scales = torch.zeros(1 + max(OBJECT_CODES.values()), device=device)
    for (size, textured), code in OBJECT_CODES.items():
        scales[code] = (small_object_scale if size == "small" else 1.0) * (textured_object_scale if textured else 1.0)
    return scales


def object_weighted_mse(pred: torch.Tensor, target: torch.Tensor, objects: torch.Tensor,
                        scales: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error with latent pixels under an object weighted 1 + OBJECT_WEIGHT x scale.

    pred, target: (B, C, h, w); objects: (B, h, w) codes (uint8, data.object_code; a bool map
    reads as code 1); scales: per code, default :func:`object_scales` () = every object alike.
    Normalised by the weights' mean, so the loss keeps the scale of a plain MSE."""
    scales = object_scales(device=pred.device) if scales is None else scales
    weight = 1.0 + OBJECT_WEIGHT * scales[objects.long()][:, None]
    return ((pred.float() - target) ** 2 * weight).mean() / weight.mean()


def train_dit(transformer, text_encoder, tokenizer, vae, bank: Bank, stream: RenderStream, scheduler,
              budget: Budget, device, batch: int, lr: float, cfg_drop: float = 0.1,
              ema_decay: float = 0.998, timestep_band: tuple[int, int, float] | None = None,
              small_object_scale: float = SMALL_OBJECT_SCALE,
              textured_object_scale: float = TEXTURED_OBJECT_SCALE) -> dict:
    """v-prediction training of the transformer on the (frozen, pre-trained) text encoder's states.

    Returns the summary; ``summary["raw_state"]`` holds the last raw weights (CPU) and the
    transformer is left holding the EMA weights, so the caller can keep whichever samples better.
    """
    transformer.to(device).train()
    text_encoder.to(device)
    bank.attach_text_encoder(text_encoder)  # its parse loss was ~0.002 already: frozen, states cached
    # fused AdamW: one kernel for all parameters instead of a per-tensor loop of launches on the host
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0,
                            fused=device.type == "cuda")
    ema = EMA(transformer, ema_decay)
    alphas = scheduler.alphas_cumprod.to(device, torch.float32)
    scales = object_scales(small_object_scale, textured_object_scale, device)
    empty_ids, empty_mask = (t.to(device) for t in mm.tokenize(tokenizer, [""]))
    empty_hidden = bank.encode_text(empty_ids, empty_mask)
    added = {"resolution": None, "aspect_ratio": None}
    history, t0 = [], time.time()
    forward = _maybe_compiled(transformer, device)
    data_seconds = 0.0  # host time spent taking in fresh renders (where the step time goes)
    profiler = StepProfiler(device, start=int(os.environ.get("MINI_PROFILE_AT", "300")), steps=10)
    while not budget.done():
        profiler.step(budget.step)
        if budget.step % 8 == 0:
            t_data = time.perf_counter()
            ready = stream.drain(limit=32) if stream.workers else ([stream.get()] if budget.step % 32 == 0 else [])
            bank.add_chunks(ready, vae, tokenizer, device)
            data_seconds += time.perf_counter() - t_data
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(budget.progress, budget.step, 200)
        z, hidden, mask, objects = bank.sample_encoded(batch, device)
        drop = torch.rand(batch, device=device) < cfg_drop
        hidden = torch.where(drop[:, None, None], empty_hidden, hidden)
        mask = torch.where(drop[:, None], empty_mask, mask)
        t = sample_timesteps(batch, alphas.numel(), device, timestep_band)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        noise = torch.randn_like(z)
        x_t, v = a * z + s * noise, a * noise - s * z
        with autocast(device):
            call = dict(encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=t,
                        added_cond_kwargs=added, return_dict=False)
            try:
                pred = forward(x_t, **call)[0]
            except Exception as error:  # noqa: BLE001 - a compiler failure must not cost the run
                if forward is transformer:
                    raise
                log(f"torch.compile failed ({type(error).__name__}: {str(error)[:200]}); eager from here")
                forward = transformer
                pred = forward(x_t, **call)[0]
        loss = object_weighted_mse(pred, v, objects, scales)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        ema.update()
        budget.step += 1
        if budget.step % 100 == 0 or budget.step == 1:
            history.append({"step": budget.step, "loss": round(float(loss.detach()), 5), "bank": bank.size,
                            "seen": bank.added, "time": round(time.time() - t0, 1)})
            if budget.step % 500 == 0:
                log(f"dit step {budget.step} {history[-1]}")
    profiler.close()
    raw_state = {k: v.detach().to("cpu", copy=True) for k, v in transformer.state_dict().items()}
    ema.copy_to(transformer)
    transformer.eval()
    return {"steps": budget.step, "seconds": round(budget.elapsed(), 1), "samples": budget.step * batch,
            "steps_per_second": round(budget.step / max(budget.elapsed(), 1e-9), 2),
            "data_host_seconds": round(data_seconds, 1),
            "unique_images": bank.added, "history": history[-20:], "raw_state": raw_state}


class StepProfiler:
    """``torch.profiler`` over steps [start, start + steps) of a training loop on CUDA; logs the
    wall time per step and the kernels that take the device time (the second teacher ran ~10
    steps/s where its FLOPs allow ~100). Never fails the run; start < 0 turns it off."""

    def __init__(self, device: torch.device, start: int, steps: int) -> None:
        self.active = device.type == "cuda" and start >= 0
        self.start, self.stop, self.prof, self.t0 = start, start + steps, None, 0.0

    def step(self, step: int) -> None:
        if not self.active:
            return
        try:
            if step == self.start:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()
            elif step == self.stop:
                self.close()
        except Exception as error:  # noqa: BLE001 - a diagnostic must not cost the run
            log(f"profiler off ({type(error).__name__}: {error})")
            self.active, self.prof = False, None

    def close(self) -> None:
        if self.prof is None:
            return
        prof, self.prof, self.active = self.prof, None, False
        try:
            torch.cuda.synchronize()
            wall = (time.perf_counter() - self.t0) / (self.stop - self.start)
            prof.__exit__(None, None, None)
            events = prof.key_averages()
            device_ms = sum(e.self_device_time_total for e in events) / 1e3 / (self.stop - self.start)
            log(f"profile: {wall * 1e3:.1f} ms wall per step, {device_ms:.1f} ms of device kernels per step")
            log("\n" + events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
            log("\n" + events.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
        except Exception as error:  # noqa: BLE001
            log(f"profile failed ({type(error).__name__}: {error})")


def _maybe_compiled(module: torch.nn.Module, device: torch.device):
    """``torch.compile`` of the transformer on CUDA (its step is bound by unfused element-wise
    ops at this size); eager elsewhere or with MINI_COMPILE=0. Shapes are fixed, so one graph."""
    if device.type != "cuda" or os.environ.get("MINI_COMPILE", "1") == "0":
        return module
    try:
        # MINI_COMPILE_MODE=reduce-overhead tries CUDA graphs (the step is host-bound); untested here
        return torch.compile(module, dynamic=False, mode=os.environ.get("MINI_COMPILE_MODE") or None)
    except Exception as error:  # noqa: BLE001
        log(f"torch.compile unavailable ({type(error).__name__}); eager")
        return module


# --------------------------------------------------------------------------- saving


def save_pipeline(components: dict, folder: Path) -> dict:
    """fp16 safetensors ``save_pretrained``; returns file sizes in MB."""
    pipe = mm.assemble_pipeline({k: (copy.deepcopy(v).to("cpu", torch.float16) if isinstance(v, torch.nn.Module) else v)
                                 for k, v in components.items()})
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return {str(p.relative_to(folder)): round(p.stat().st_size / 2**20, 3) for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- stage 5: students


def distill_argv(pipeline: Path, out: Path, *, method: str, data: Path, steps: int, batch_size: int, lr: float,
                 mixed_precision: str, options: dict | None = None, extra: list[str] | None = None) -> list[str]:
    """The ``linfusion distill`` command line of one student (see ``linfusion distill --help``);
    ``options``: attention options of the student (default :data:`DEFAULT_LOCAL_OPTIONS` /
    :data:`DEFAULT_LINEAR_OPTIONS`; ``{}`` for none); ``extra``: more flags, appended last
    (e.g. ``["--losses", "task=0", "kd=1", "attn=0.5", "--lr-decay", "cosine"]``)."""
    argv = ["distill", "--model", str(pipeline), "--method", method, "--output", str(out), "--data", str(data),
            "--steps", str(steps), "--batch-size", str(batch_size), "--lr", str(lr), "--warmup-steps",
            str(min(50, max(1, steps // 10))), "--mixed-precision", mixed_precision, "--trainable", "new+qkvo",
            "--checkpoint-every", str(10**9), "--log-every", "25", "--no-progress"]
    # layers=all: the replacement runs in every layer at every size (no per-size dense fallback),
    # so the student learns the new attention and the adapter keeps it that way.
    argv += ["--patch-option", "layers=all"]
    options = DEFAULT_STUDENT_OPTIONS[method] if options is None else options
    for key, value in options.items():
        argv += ["--patch-option", f"{key}={value}"]
    return argv + list(extra or [])


def generate_data_argv(pipeline: Path, data: Path, prompts_file: Path, data_steps: int) -> list[str]:
    """``linfusion generate-data``: the teacher's own trajectories on training prompts, at 128 px."""
    return ["generate-data", "--model", str(pipeline), "--output", str(data), "--prompts", str(prompts_file),
            "--resolution", "128", "--data-steps", str(data_steps), "--max-sequence-length", str(mm.TEXT_LEN),
            "--prompts-per-shard", "16", "--no-progress"]


def run_linfusion(argvs: list[list[str]], parallel: bool, logs: list[Path]) -> None:
    """Run ``linfusion ARGV`` for each argv: in this process one after the other, or as
    parallel subprocesses (``python -m linfusion``) sharing the GPU."""
    if not parallel:
        from ..cli import main as cli_main

        for argv in argvs:
            log("linfusion " + " ".join(argv))
            code = cli_main(argv)
            if code:
                raise RuntimeError(f"linfusion {argv[0]} failed with exit code {code}")
        return
    procs = []
    for argv, path in zip(argvs, logs):
        log("linfusion " + " ".join(argv) + f"  (log: {path})")
        handle = open(path, "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "linfusion", *argv], stdout=handle,
                                       stderr=subprocess.STDOUT, env=os.environ.copy()), handle, argv, path))
    failed = []
    for proc, handle, argv, path in procs:
        code = proc.wait()
        handle.close()
        if code:
            failed.append(f"linfusion {argv[0]} {argv[argv.index('--method') + 1] if '--method' in argv else ''} "
                          f"exit {code}: {path.read_text()[-2000:]}")
    if failed:
        raise RuntimeError("\n".join(failed))


def adapter_to_fp16(folder: Path) -> None:
    """Store an adapter's weights in fp16 (they are loaded into fp32 or fp16 models alike)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "linfusion_adapter.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def parse_student_options(text: str | None) -> dict | None:
    """"window=4,global_pool=4" -> {"window": 4, "global_pool": 4}, read like ``linfusion distill
    --patch-option`` (MINI_LOCAL_OPTIONS / MINI_LINEAR_OPTIONS); None or "" -> None."""
    from ..distill.cli import parse_key_values

    return parse_key_values(text.split(","), "student options") if text else None


def student_method(name: str) -> str:
    """"linear" -> "linear", "linear-wide" -> "linear": a student's method is its name up to the first '-'."""
    return name.split("-", 1)[0]


def parse_student_args(text: str | None) -> dict[str, list[str]]:
    """"linear-long: --steps 3500; linear-wide: --patch-option hedgehog_features=128" ->
    {"linear-long": ["--steps", "3500"], ...} (MINI_STUDENT_ARGS: flags for one student only)."""
    out: dict[str, list[str]] = {}
    for item in (text or "").split(";"):
        if item.strip():
            name, sep, flags = item.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"student arguments must read 'NAME: FLAGS', got {item.strip()!r}")
            out[name.strip()] = shlex.split(flags)
    return out


def distill_students(out: Path, *, steps: int, prompts: int, data_steps: int, batch_size: int,
                     parallel: bool, device: torch.device, lrs: dict[str, float] | None = None,
                     local_options: dict | None = None, linear_options: dict | None = None,
                     distill_args: list[str] | None = None, students: tuple[str, ...] = STUDENTS,
                     student_args: dict[str, list[str]] | None = None) -> dict:
    """Teacher data once, then the ``students`` (default both), with the distillation toolkit's commands.

    ``students``: names "linear", "local", or variants "METHOD-TAG" (e.g. "linear-wide"), each trained
    into ``out/adapter-NAME`` (in parallel on one GPU, so one call can compare recipes).
    ``local_options``: the local student's attention options (default :data:`DEFAULT_LOCAL_OPTIONS`;
    e.g. ``{"window": 4, "global_pool": 4}`` adds the pooled global branch). ``linear_options``:
    the linear student's (default :data:`DEFAULT_LINEAR_OPTIONS`, LiT's depthwise convolution of V).
    ``distill_args``: more ``linfusion distill`` flags for all (MINI_DISTILL_ARGS), after
    :data:`DEFAULT_DISTILL_ARGS` and the method's :data:`DEFAULT_METHOD_ARGS`: a flag given again
    overrides it (e.g. ``--losses task=1 kd=0.5``); ``student_args``: flags for one student each,
    last (MINI_STUDENT_ARGS). ``lrs``: per method (default :data:`DEFAULT_STUDENT_LRS`)."""
    from .world import prompt_set

    student_args = student_args or {}
    unknown = {s for s in students if student_method(s) not in STUDENTS or s.endswith("-")}
    if unknown or not students or len(set(students)) != len(students):
        raise ValueError(f"students must be distinct names from {STUDENTS} or METHOD-TAG variants of them, got {students}")
    if set(student_args) - set(students):
        raise ValueError(f"student arguments for students not trained: {sorted(set(student_args) - set(students))}")
    distill_args = list(distill_args or [])
    lrs = lrs or DEFAULT_STUDENT_LRS
    pipeline, data = out / "pipeline", out / "distill-data"
    prompts_file = out / "distill_prompts.txt"
    prompts_file.write_text("\n".join(prompt_set("train", prompts, seed=1)) + "\n")
    mixed = "bf16" if device.type == "cuda" else "no"
    start = time.time()
    run_linfusion([generate_data_argv(pipeline, data, prompts_file, data_steps)], False, [])
    data_seconds = time.time() - start
    given = {"local": local_options, "linear": linear_options}
    options = {m: dict(DEFAULT_STUDENT_OPTIONS[m] if given[m] is None else given[m]) for m in given}
    methods = {name: student_method(name) for name in students}
    # flags: the shared defaults, the method's, the caller's for all, the caller's for this student (last wins)
    flags = {name: [*DEFAULT_DISTILL_ARGS, *DEFAULT_METHOD_ARGS[m], *distill_args, *student_args.get(name, [])]
             for name, m in methods.items()}
    argvs = [distill_argv(pipeline, out / f"adapter-{name}", method=m, data=data, steps=steps, batch_size=batch_size,
                          lr=lrs[m], mixed_precision=mixed, options=options[m], extra=flags[name])
             for name, m in methods.items()]
    run_linfusion(argvs, parallel, [out / f"distill-{name}.log" for name in students])
    summary = {"data_seconds": round(data_seconds, 1), "distill_seconds": round(time.time() - start - data_seconds, 1),
               "steps": steps, "prompts": prompts, "data_steps": data_steps, "batch_size": batch_size, "lr": lrs,
               "local_window": options["local"].get("window"), "local_options": options["local"],
               "linear_options": options["linear"], "distill_args": [*DEFAULT_DISTILL_ARGS, *distill_args],
               "students": list(students), "student_flags": flags}
    if student_args:
        summary["student_args"] = student_args
    for m in students:
        folder = out / f"adapter-{m}"
        adapter_to_fp16(folder)
        metrics = folder / "metrics.jsonl"
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            summary[f"{m}_last_metrics"] = json.loads(lines[-1]) if lines else None
        summary[f"{m}_mb"] = round((folder / "linfusion_adapter.safetensors").stat().st_size / 2**20, 3)
    return summary


# --------------------------------------------------------------------------- driver


def _adherence(pipe, n: int, steps: int) -> float:
    """Strict adherence of ``pipe`` on the first ``n`` held-out prompts (seed 0)."""
    from .checker import AdherenceChecker
    from .quality import generate
    from .world import prompt_set

    prompts = prompt_set("heldout", n, seed=0)
    images = generate(pipe, prompts, size=pipe.transformer.config.sample_size * pipe.vae_scale_factor, steps=steps,
                      seed=0, batch=32)
    checker = AdherenceChecker()
    return float(np.mean([checker.check(img, p) for img, p in zip(images, prompts)]))


@torch.no_grad()
def choose_ema_or_raw(components: dict, raw_state: dict, device, n: int, steps: int) -> dict:
    """Keep the EMA or the raw transformer weights, whichever scores higher on ``n`` held-out prompts
    (ties keep the EMA). ``components["transformer"]`` holds the EMA weights on entry."""
    pipe = mm.assemble_pipeline(components)
    ema_state = {k: v.detach().to("cpu", copy=True) for k, v in components["transformer"].state_dict().items()}
    scores = {"ema": _adherence(pipe, n, steps)}
    components["transformer"].load_state_dict(raw_state)
    scores["raw"] = _adherence(pipe, n, steps)
    kept = "raw" if scores["raw"] > scores["ema"] else "ema"
    if kept == "ema":
        components["transformer"].load_state_dict(ema_state)
    return {"kept": kept, "n": n, "adherence": scores}


def quick_adherence(folder: Path, device, n: int, steps: int) -> dict:
    """Teacher adherence on ``n`` held-out prompts (an early read-out; the benchmark is the reference)."""
    from .quality import load_pipeline

    return {"n": n, "adherence": _adherence(load_pipeline(folder, device), n, steps)}


def train_all(out: Path, *, minutes: float, device: torch.device, smoke: bool, seed: int = 0, workers: int | None = None,
              steps: dict[str, int | None] | None = None, distill: bool = True, distill_steps: int | None = None,
              distill_prompts: int | None = None, distill_parallel: bool | None = None,
              batch_sizes: tuple[int, int, int] | None = None, check_prompts: int | None = None,
              timestep_band: tuple[int, int, float] | None = None,
              small_object_scale: float = SMALL_OBJECT_SCALE,
              textured_object_scale: float = TEXTURED_OBJECT_SCALE, keep: str = "best") -> dict:
    cfg = mm.SMOKE if smoke else mm.FULL
    steps = steps or {}
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    np.random.seed(seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if workers is None:
        # leave cores to the training process: its kernel launches are on the critical path
        workers = 0 if smoke else max(1, (os.cpu_count() or 2) - 4)
    summary: dict = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "device": str(device),
                     "minutes": minutes, "seed": seed, "workers": workers}
    start = time.time()
    # DiT batch 512 (256 in attempt 3): that step was host-bound (86 ms wall, 27 ms of device
    # kernels), so twice the samples per step cost little wall time
    batch = {"vae": 8, "text": 16, "dit": 8} if smoke else {"vae": 64, "text": 1024, "dit": 512}
    if batch_sizes:
        batch = dict(zip(("vae", "text", "dit"), batch_sizes))
    summary["batch_sizes"] = batch
    stream = RenderStream(seed, chunk=8 if smoke else 64, size=cfg.resolution, workers=workers,
                          crop_every=0 if smoke else 4)
    try:
        tokenizer = mm.build_tokenizer()
        components = mm.build_components(cfg, tokenizer)
        summary["parameters"] = mm.parameter_counts(components)
        log(f"parameters {summary['parameters']}, {workers} render workers, device {device}")
        seconds = {k: minutes * 60 * v for k, v in STAGE_SHARES.items()}
        kept: list = []
        summary["vae"] = train_vae(components["vae"], stream, Budget(seconds["vae"], steps.get("vae")), device,
                                   batch["vae"], 1e-3, kept, crop=None if smoke else VAE_CROP)
        summary["vae"].update(normalise_latents(components["vae"], kept, device))
        summary["vae"]["recon_adherence"] = vae_recon_adherence(components["vae"], device, n=8 if smoke else 64)
        log(f"vae {summary['vae']}")
        latent_shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        capacity = 600_000 if cuda else 512
        bank = Bank(capacity, latent_shape, len(mm.scene_targets(_any_scene())), device,
                    torch.bfloat16 if cuda else torch.float32)
        bank.add_chunks(kept, components["vae"], tokenizer, device)
        kept.clear()
        head = mm.ParseHead(cfg.text_dim)
        summary["text"] = train_text(components["text_encoder"], head, bank, Budget(seconds["text"], steps.get("text")),
                                     device, batch["text"], 1e-3)
        log(f"text {summary['text']}")
        summary["dit"] = train_dit(components["transformer"], components["text_encoder"], tokenizer,
                                   components["vae"], bank, stream, components["scheduler"],
                                   Budget(seconds["dit"], steps.get("dit")), device, batch["dit"], 1e-3,
                                   timestep_band=timestep_band, small_object_scale=small_object_scale,
                                   textured_object_scale=textured_object_scale)
        summary["dit"]["timestep_band"] = list(resolve_band(timestep_band))
        summary["dit"]["small_object_scale"] = small_object_scale
        summary["dit"]["textured_object_scale"] = textured_object_scale
        log(f"dit steps {summary['dit']['steps']} samples {summary['dit']['samples']} "
            f"unique images {summary['dit']['unique_images']} ({summary['dit']['steps_per_second']} steps/s)")
    finally:
        stream.close()
    # EMA or raw weights, whichever follows the prompts better on held-out prompts (the EMA lags
    # when the loss is still falling at the end of a short run)
    raw_state = summary["dit"].pop("raw_state")
    if keep == "best":
        summary["weights_choice"] = choose_ema_or_raw(components, raw_state, device, n=4 if smoke else 64,
                                                      steps=2 if smoke else 20)
    else:  # a fixed choice saves the ~20 s of the read-out (attempt 6: EMA and raw tied)
        if keep == "raw":
            components["transformer"].load_state_dict(raw_state)
        summary["weights_choice"] = {"kept": keep, "n": 0, "adherence": {}}
    log(f"weights {summary['weights_choice']}")
    summary["train_seconds"] = round(time.time() - start, 1)
    summary["files_mb"] = save_pipeline(components, out / "pipeline")
    summary["pipeline_mb"] = round(sum(summary["files_mb"].values()), 3)
    log(f"saved {out / 'pipeline'} ({summary['pipeline_mb']} MB)")
    del components
    if cuda:
        torch.cuda.empty_cache()
    summary["quick_adherence"] = quick_adherence(out / "pipeline", device, n=check_prompts or (4 if smoke else 64), steps=2 if smoke else 20)
    log(f"teacher quick adherence {summary['quick_adherence']}")
    _write(out / "train_summary.json", summary)
    if distill:
        summary["distill"] = distill_students(
            out, steps=distill_steps or (2 if smoke else DISTILL_STEPS), prompts=distill_prompts or (2 if smoke else DISTILL_PROMPTS),
            data_steps=2 if smoke else 20, batch_size=2 if smoke else 64,
            parallel=cuda if distill_parallel is None else distill_parallel, device=device,
        )
        log(f"distill {summary['distill']}")
    summary["total_seconds"] = round(time.time() - start, 1)
    _write(out / "train_summary.json", summary)
    return summary


def _any_scene():
    from .world import sample_scene

    return sample_scene(0)


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))


def _parse_band(text: str | None) -> tuple[int, int, float] | None:
    if text is None:
        return None
    try:
        lo, hi, share = text.split(",")
        band = (int(lo), int(hi), float(share))
    except ValueError:
        raise SystemExit(f"--timestep-band takes LO,HI,SHARE (e.g. 550,750,0.5), got {text!r}") from None
    return resolve_band(band)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linfusion.mini.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (pipeline/, adapter-*/, train_summary.json)")
    parser.add_argument("--minutes", type=float, default=5.5, help="teacher training time, all stages (default 5.5)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps: tests the code path on a CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: cores - 4; smoke: 0)")
    parser.add_argument("--vae-steps", type=int, default=None, help="fix the VAE's steps instead of its time share")
    parser.add_argument("--text-steps", type=int, default=None)
    parser.add_argument("--dit-steps", type=int, default=None)
    parser.add_argument("--batch-sizes", default=None, help="VAE,TEXT,DIT batch sizes (default 64,1024,512; smoke 8,16,8)")
    parser.add_argument("--check-prompts", type=int, default=None, help="held-out prompts for the teacher read-out (64)")
    parser.add_argument("--timestep-band", default=None,
                        help=f"LO,HI,SHARE: share of the transformer's training timesteps drawn from [LO, HI) "
                             f"(default {MID_T[0]},{MID_T[1]},{MID_T_SHARE})")
    parser.add_argument("--small-object-scale", type=float, default=SMALL_OBJECT_SCALE,
                        help=f"multiplies the transformer loss's object weight on small objects (default "
                             f"{SMALL_OBJECT_SCALE:g}; 1: every object alike, as up to attempt 6)")
    parser.add_argument("--textured-object-scale", type=float, default=TEXTURED_OBJECT_SCALE,
                        help=f"the same for textured objects, times the small-object scale (default "
                             f"{TEXTURED_OBJECT_SCALE:g}; 1: like plain ones, as up to attempt 7)")
    parser.add_argument("--keep", choices=["best", "ema", "raw"], default="best",
                        help="transformer weights to ship: the EMA or the raw ones, or whichever scores higher "
                             "on 64 held-out prompts (best, the default; ~20 s on an H200)")
    parser.add_argument("--no-distill", dest="distill", action="store_false", help="train the teacher only")
    parser.add_argument("--distill-steps", type=int, default=None, help=f"steps per student (default {DISTILL_STEPS}; smoke 2)")
    parser.add_argument("--distill-prompts", type=int, default=None, help=f"teacher-data prompts (default {DISTILL_PROMPTS})")
    parser.add_argument("--distill-parallel", choices=["auto", "yes", "no"], default="auto",
                        help="run both students at once as subprocesses (default: on CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    smoke_steps = {"vae": 3, "text": 3, "dit": 3} if args.smoke else {}
    steps = {k: getattr(args, f"{k}_steps") or smoke_steps.get(k) for k in ("vae", "text", "dit")}
    parallel = None if args.distill_parallel == "auto" else args.distill_parallel == "yes"
    summary = train_all(Path(args.out), minutes=args.minutes, device=device, smoke=args.smoke, seed=args.seed,
                        workers=args.workers, steps=steps, distill=args.distill, distill_steps=args.distill_steps,
                        distill_prompts=args.distill_prompts, distill_parallel=parallel,
                        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else None,
                        check_prompts=args.check_prompts, timestep_band=_parse_band(args.timestep_band),
                        small_object_scale=args.small_object_scale,
                        textured_object_scale=args.textured_object_scale, keep=args.keep)
    log(f"done in {summary['total_seconds']} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
