"""The distillation trainer, on ``accelerate``.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` samples on each of
the ``world`` processes (global batch ``G = batch_size·world·grad_accum``). Step ``k`` trains
on samples ``k·G … (k+1)·G − 1`` of a stream of epoch permutations seeded by ``seed``, so the
data of a step depends only on (seed, step, G), not on how G is split. Every process builds
the student from the same seed (identical replicas), and each step reseeds the global RNGs
(Python, NumPy, torch) from (seed, step, rank): nothing random carries over from one step to
the next, so a checkpoint needs no RNG state and resuming is exact for any process count.

Parallelism (launch with ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun``;
CPU processes talk through gloo when CUDA is absent):

* default, data parallel: every process holds the whole model; the gradients of the (small)
  trainable set are averaged with one all-reduce; the denoiser is never wrapped in DDP, which
  keeps frozen-teacher forwards and hooks simple;
* ``--fsdp`` (``fsdp: true`` in ``--config``): the denoisers (and a teacher copy) are sharded
  per block with FSDP2 (see :mod:`.sharding`), for teachers the size of FLUX. The shared
  teacher still works (same model, original processors swapped in); ``--teacher offload`` and
  ``--trainable lora`` are refused. With one process ``--fsdp`` is a no-op.

Checkpoints hold full (gathered) trainable tensors and the full optimizer state, written by
the main process: a run of N processes resumes in M (same global batch; see
:mod:`.checkpoint`). The adapter is written with ``save_adapter`` from full weights.
Losses and weights of an N-process run equal a 1-process run's up to float summation order.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter import save_adapter
from ..config import PatchConfig
from ..patch import denoisers
from ..pipelines import family_for
from . import checkpoint as ckpt
from . import sharding
from .adm import adm_direction, adm_surrogate
from .capture import output_tensor
from .config import DistillConfig
from .data import (
    Batch, DataMismatchError, DistillDataset, GenerationSettings, MANIFEST, check_data_model, generate_data,
    is_image_folder, model_fingerprints, read_manifest,
)
from .inheritance import Student, build_student, finalize_lora, freeze_all
from .losses import attention_matching_loss, capture_attention, mse, split_variance, task_loss
from .schedule import deterministic_step
from .selective import alpha_schedule, reg_ramp, finalize_selection, project_scores, scores_of, selection_losses

METRICS = "metrics.jsonl"


class DistillError(RuntimeError):
    """A distillation run cannot start or continue; the message says why."""


def load_pipeline(model: str, dtype: str = "float32"):
    """``DiffusionPipeline.from_pretrained`` (hub id or local folder), progress bars off."""
    from diffusers import DiffusionPipeline

    torch_dtype = {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                   "fp16": torch.float16, "float16": torch.float16}[dtype]
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise DistillError(f"could not load a diffusers pipeline from {model!r}: {error}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_supported(pipe) -> None:
    """Raise ``UnsupportedModelError`` (via the core registry) for families LinFusion cannot patch."""
    models = denoisers(pipe)
    if not models:
        from ..pipelines import UnsupportedModelError, supported_families

        raise UnsupportedModelError(f"{type(pipe).__name__} has no denoiser LinFusion can patch. Supported: {supported_families()}")
    for _, model in models:
        family_for(model)


def generation_settings(cfg: DistillConfig) -> GenerationSettings:
    height, width = cfg.size()
    return GenerationSettings(
        height=height, width=width, num_frames=cfg.num_frames, steps=cfg.data_steps,
        guidance_scale=cfg.guidance_scale, max_sequence_length=cfg.max_sequence_length, seed=cfg.seed,
        prompts_per_shard=cfg.prompts_per_shard, pipeline_kwargs=dict(cfg.pipeline_kwargs),
    )


def prompt_list(cfg: DistillConfig) -> list[str]:
    from .prompts import DEFAULT_PROMPTS, read_prompts

    prompts = read_prompts(cfg.prompts) if cfg.prompts else list(DEFAULT_PROMPTS)
    return prompts[: cfg.num_prompts] if cfg.num_prompts else prompts


def prepare_data(cfg: DistillConfig, pipe, is_main: bool, wait, device: torch.device | None = None) -> Path:
    """The data folder to train on: reuse a finished one, finish a partial one, or generate it.

    ``device``: move the pipeline there to generate and back to the CPU after (FSDP runs keep it on the CPU).
    """
    output = Path(cfg.output)
    if cfg.data and is_image_folder(cfg.data):
        directory, images = output / "data", cfg.data
    else:
        directory, images = Path(cfg.data) if cfg.data else output / "data", None
    if (directory / MANIFEST).exists():
        manifest = read_manifest(directory)
        check_data_model(manifest, pipe, directory)
        if manifest.get("complete"):
            return directory
    elif cfg.data and images is None and Path(cfg.data).is_dir() and any(Path(cfg.data).iterdir()):
        raise DataMismatchError(f"--data {cfg.data} is neither a distillation data folder nor a folder of captioned images")
    if is_main:
        if device is not None:
            pipe.to(device)
        generate_data(pipe, directory, prompt_list(cfg), generation_settings(cfg), images=images,
                      source=cfg.model, progress=cfg.progress)
        if device is not None:
            pipe.to("cpu")
    wait()
    return directory


class IndexStream:
    """Sample indices for (step, micro-batch, rank): epoch-wise permutations seeded by (seed, epoch).

    With ``focus`` (indices of the focused samples) and ``share``, the global stream interleaves two
    such streams: position p is focused when floor((p + 1) * share) > floor(p * share), so any run
    of positions holds the share, and every index stays a pure function of (step, micro, rank) for
    exact resume."""

    def __init__(self, size: int, seed: int, batch_size: int, world: int, accum: int,
                 focus: Sequence[int] | None = None, share: float = 0.0) -> None:
        self.size, self.seed, self.batch_size, self.world, self.accum = size, seed, batch_size, world, accum
        # [others, focused]: pool 0 keeps the seeds (and, without focus, the order) of a plain stream
        self._pools: list[list[int]] = [list(range(size)), []]
        self._share = (0, 1)  # rational share (numerator, denominator): exact for any position
        if focus is not None:
            focused = sorted(set(int(i) for i in focus))
            if not focused:
                raise ValueError("no sample is in the focus")
            others = sorted(set(range(size)) - set(focused))
            if others:  # a focus holding every sample is the plain stream
                self._pools = [others, focused]
                self._share = (max(1, round(share * 10_000)), 10_000)
        self._cache: dict[int, tuple[int, torch.Tensor]] = {}

    def _draw(self, pool: int, position: int) -> int:
        """The sample at ``position`` of pool ``pool``'s endless stream of epoch-wise permutations."""
        members = self._pools[pool]
        epoch, n = position // len(members), len(members)
        cached = self._cache.get(pool)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch + pool * 1_000_003)
            self._cache[pool] = cached = (epoch, torch.randperm(n, generator=generator))
        return members[int(cached[1][position % n])]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        start = ((step * self.accum + micro) * self.world + rank) * self.batch_size
        num, den = self._share
        out = []
        for position in range(start, start + self.batch_size):
            before, after = position * num // den, (position + 1) * num // den
            out.append(self._draw(1, before) if after > before else self._draw(0, position - before))
        return out


def focused_samples(dataset, focus: list[float] | None) -> tuple[list[int] | None, float]:
    """(indices of the samples whose timestep lies in [LO, HI], SHARE) for ``--focus-timesteps``,
    or (None, 0.0) without one; a focus that matches nothing is an error naming the data's range."""
    if focus is None:
        return None, 0.0
    lo, hi, share = focus
    timesteps = dataset.row_timesteps()
    if timesteps is None:
        raise DistillError("--focus-timesteps needs recorded timesteps; this data's denoiser calls have none")
    inside = ((timesteps >= lo) & (timesteps <= hi)).nonzero().flatten().tolist()
    if not inside:
        raise DistillError(f"--focus-timesteps {lo:g}:{hi:g} matches no recorded sample; the data's timesteps "
                           f"range from {float(timesteps.min()):g} to {float(timesteps.max()):g}")
    return inside, share


def group_losses(student: Student, batch: Batch, weights: dict[str, float], kind: str, autocast) -> dict[str, torch.Tensor]:
    """Unweighted loss terms of one component's share of a batch."""
    model = student.models[batch.component]
    kwargs = dict(batch.kwargs, return_dict=False)
    x_t = batch.x_t
    layers = student.patched_layers(batch.component) if weights["attn"] > 0 else {}
    with capture_attention(layers) as student_attn, autocast():
        output = output_tensor(model(**kwargs))
    pred, variance = split_variance(output, x_t)
    teacher_pred, teacher_var = split_variance(batch.teacher, x_t)
    terms: dict[str, torch.Tensor] = {}
    if weights["task"] > 0:
        terms["task"] = task_loss(kind, pred, x_t, batch.x0, batch.a, batch.s)
    if weights["kd"] > 0:
        terms["kd"] = mse(pred, teacher_pred)
    if weights["var"] > 0 and variance is not None:
        terms["var"] = mse(variance, teacher_var)
    if layers:
        modules = student.teacher.attention_modules(batch.component, list(layers))
        with torch.no_grad(), student.teacher.active(batch.component) as teacher, capture_attention(modules) as teacher_attn, autocast():
            teacher(**kwargs)
        terms["attn"] = attention_matching_loss(student_attn, teacher_attn)
    # ADM runs even when no row has a next point (its term is then an exact 0): every process must run
    # the same forwards (FSDP all-gathers in each) and have a loss with a graph
    if weights["adm"] > 0 and batch.next_timestep is not None:
        terms["adm"] = adm_term(student, batch, kwargs, pred, kind, autocast)
    return terms


def adm_term(student: Student, batch: Batch, kwargs: dict[str, Any], pred: torch.Tensor, kind: str, autocast) -> torch.Tensor:
    """ADM on the student's own step to the next trajectory level (see :mod:`.adm`)."""
    x_t = batch.x_t
    x_hat = deterministic_step(kind, x_t.float(), pred.float(), batch.a, batch.s, batch.a_next, batch.s_next)
    moved = dict(kwargs, timestep=batch.next_timestep)
    moved[batch.input_name] = x_hat.detach().to(x_t.dtype)
    with torch.no_grad():
        with student.teacher.active(batch.component) as teacher, autocast():
            pred_teacher = split_variance(output_tensor(teacher(**moved)), x_t)[0]
        with autocast():
            pred_student = split_variance(output_tensor(student.models[batch.component](**moved)), x_t)[0]
    direction = adm_direction(kind, x_hat.detach(), pred_teacher.float(), pred_student.float(), batch.a_next, batch.s_next)
    return adm_surrogate(x_hat, direction, batch.has_next)


class Trainer:
    """Runs one distillation (see :func:`run_distill`)."""

    def __init__(self, cfg: DistillConfig) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        # Several processes on a machine without CUDA (torchrun, `accelerate launch --multi_gpu` with
        # ACCELERATE_USE_CPU=1): data parallel on CPU through gloo.
        cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)
        self.output = Path(cfg.output)
        self.ckpt_root = self.output / "checkpoints"
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.fsdp = cfg.fsdp and self.world > 1
        self.units: list[torch.nn.Module] = []  # FSDP units (empty without --fsdp)

    # ---- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.resume_from = None
        if cfg.resume:
            self.resume_from = ckpt.find_checkpoint(self.ckpt_root, cfg.resume)
        elif ckpt.checkpoint_dirs(self.ckpt_root):
            raise DistillError(
                f"{self.output} already holds checkpoints of a run; pass --resume to continue it or use a new --output"
            )
        _seed_everything(cfg.seed)  # the same on every process: identical replicas of new parameters
        self.pipe = load_pipeline(cfg.model, cfg.dtype)
        check_supported(self.pipe)
        freeze_all(self.pipe)
        device = self.accelerator.device
        if not self.fsdp:
            self.pipe.to(device)  # with FSDP the denoisers reach the device shard by shard
        self.output.mkdir(parents=True, exist_ok=True)
        self.data_dir = prepare_data(cfg, self.pipe, self.is_main, self.accelerator.wait_for_everyone,
                                     device=device if self.fsdp else None)
        self.dataset = DistillDataset(self.data_dir)
        check_data_model(self.dataset.manifest, self.pipe, self.data_dir)
        self.identity = dict(
            cfg.resume_identity(), model_fingerprints=model_fingerprints(self.pipe),
            data_fingerprint=self.dataset.fingerprint, global_batch=self.global_batch,
        )
        if self.resume_from is not None:
            saved = json.loads((self.resume_from / ckpt.STATE).read_text())["identity"]
            ckpt.check_global_batch(saved, self.global_batch, cfg.batch_size, self.world, cfg.grad_accum,
                                    self.resume_from)
            ckpt.check_identity(saved, self.identity, self.resume_from)
        patch_options = dict(cfg.patch, method=cfg.method, gate=cfg.selective)
        keep_first = cfg.keep_first if cfg.keep_first is not None else cfg.selective
        self.student = build_student(
            self.pipe, PatchConfig.from_kwargs(**patch_options), trainable=cfg.trainable, teacher=cfg.teacher,
            lora_rank=cfg.lora_rank, keep_softmax=cfg.keep_softmax, keep_first=keep_first,
        )
        for _, param in self.student.named_trainable():
            param.data = param.data.float()
        if cfg.gradient_checkpointing:
            for model in self.student.models.values():
                if hasattr(model, "enable_gradient_checkpointing"):
                    model.enable_gradient_checkpointing()
        for model in self.student.models.values():
            model.train()
        if self.fsdp:
            self._shard(device)
        self._build_optimizer()
        self.stream = IndexStream(len(self.dataset), cfg.seed, cfg.batch_size, self.world, cfg.grad_accum,
                                  *focused_samples(self.dataset, cfg.focus_timesteps))
        self.step = 0
        if self.resume_from is not None:
            self._load(self.resume_from)
        ckpt.clean_partial(self.ckpt_root) if self.is_main else None

    def _shard(self, device: torch.device) -> None:
        """FSDP2 over the denoisers and the teacher copies; re-point the trainable set at the sharded parameters."""
        student = self.student
        if len(student.models) > 1:  # processes would run different components' forwards (collectives hang)
            raise DistillError(f"--fsdp supports pipelines with one denoiser; this one has {sorted(student.models)}")
        models = [*student.models.values(), *student.teacher.copies.values()]
        self.units = sharding.shard_models(models, device, self.world)
        for component, model in student.models.items():
            named = dict(model.named_parameters())  # fully_shard replaced the Parameter objects
            student.params[component] = {name: named[name] for name in student.params[component]}
            student.gate_params[component] = {name: named[name] for name in student.gate_params[component]}

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        gate_ids = {id(p) for comp in self.student.gate_params.values() for p in comp.values()}
        named = list(self.student.named_trainable())
        main = [p for _, p in named if id(p) not in gate_ids]
        gates = [p for _, p in named if id(p) in gate_ids]
        if not named:
            raise DistillError("nothing to train: the patch has no parameters (try --trainable new+qkvo)")
        groups = []
        if main:
            groups.append({"params": main, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
        if gates:
            groups.append({"params": gates, "lr": cfg.select_lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_multiplier, warmup=cfg.warmup_steps, total=cfg.steps, decay=cfg.lr_decay)
        )
        self.optimizer = self.accelerator.prepare(optimizer)
        self.params = [p for _, p in named]

    def _load(self, path: Path) -> None:
        """Full tensors and optimizer state onto this run's layout (any process count, sharded or not)."""
        tensors, optim, state = ckpt.load_checkpoint(path)
        named = dict(self.student.named_trainable())
        missing = set(named) ^ set(tensors)
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {path} does not hold the trainable set of this run: {sorted(missing)[:5]}")
        for name, param in named.items():
            sharding.load_full(param, tensors[name])
        ordered = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer.load_state_dict(sharding.shard_optimizer_state(optim["optimizer"], ordered))
        self.scheduler.load_state_dict(optim["scheduler"])
        self.step = int(state["step"])  # RNGs are reseeded from (seed, step, rank) each step: nothing to restore
        if self.is_main:
            _truncate_metrics(self.output / METRICS, self.step)

    def _save(self) -> None:
        """Gather the full trainable set and optimizer state (every process), write them on the main one."""
        tensors = {name: sharding.full_tensor(p) for name, p in self.student.named_trainable()}
        optim = {"optimizer": sharding.full_optimizer_state(self.optimizer.state_dict()),
                 "scheduler": self.scheduler.state_dict()}
        if self.is_main:
            state = {"identity": self.identity, "rng": ckpt.RNG_NOTE, "samples": self.step * self.global_batch,
                     "world_size": self.world}
            ckpt.save_checkpoint(self.ckpt_root, self.step, tensors, optim, state, keep=self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    # ---- training ------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world * self.cfg.grad_accum

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        weights = cfg.losses
        kind = self.dataset.kind
        totals: dict[str, float] = {}
        _seed_everything(step_seed(cfg.seed, self.step, self.rank))
        for micro in range(cfg.grad_accum):
            if self.units:
                sharding.set_gradient_sync(self.units, micro == cfg.grad_accum - 1)
            indices = self.stream.indices(self.step, micro, self.rank)
            groups = self.dataset.batch(indices, self.accelerator.device)
            loss = torch.zeros((), device=self.accelerator.device)
            for batch in groups:
                share = len(batch) / len(indices)
                terms = group_losses(self.student, batch, weights, kind, self.accelerator.autocast)
                for name, value in terms.items():
                    loss = loss + share * weights[name] * value
                    totals[name] = totals.get(name, 0.0) + share * float(value.detach()) / cfg.grad_accum
            if cfg.selective and micro == 0:
                alpha = alpha_schedule(self.step, cfg.steps)
                sel = selection_losses(scores_of(self.student.gate_params), cfg.select_layers, alpha)
                ramp = reg_ramp(self.step, cfg.steps)
                loss = loss + cfg.select_weight * (sel["con"] + ramp * sel["reg"]) * cfg.grad_accum
                totals["con"], totals["reg"] = float(sel["con"].detach()), float(sel["reg"].detach())
            self.accelerator.backward(loss / cfg.grad_accum)
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / cfg.grad_accum
        self._sync_gradients()
        if cfg.max_grad_norm and self.fsdp:
            self.accelerator.unscale_gradients()
            sharding.clip_grad_norm(self.params, cfg.max_grad_norm)
        elif cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        project_scores(self.student.gate_params)
        self.step += 1
        if self.world > 1:
            keys = sorted(totals)
            values = torch.tensor([totals[k] for k in keys], device=self.accelerator.device)
            values = self.accelerator.reduce(values, reduction="mean")
            totals = dict(zip(keys, values.tolist()))
        return totals

    def _sync_gradients(self) -> None:
        """Average the gradients of whole (not FSDP-sharded) trainable tensors over the processes."""
        # FSDP reduce-scatters (and averages) the sharded ones in backward
        params = [p for p in self.params if not sharding.is_sharded(p)]
        if self.world == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for param, grad in zip(params, grads):
            n = grad.numel()
            param.grad = flat[offset : offset + n].view_as(param).clone()
            offset += n

    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc="distill", disable=not (self.is_main and cfg.progress),
                   dynamic_ncols=True)
        running: dict[str, float] = {}
        start = time.time()
        metrics = open(self.output / METRICS, "a", encoding="utf-8") if self.is_main else None
        try:
            while self.step < cfg.steps:
                totals = self.train_step()
                for key, value in totals.items():
                    running[key] = value if key not in running else 0.9 * running[key] + 0.1 * value
                if not all(math.isfinite(v) for v in totals.values()):
                    raise DistillError(f"loss became non-finite at step {self.step}: {totals} (try bf16 or a lower --lr)")
                if metrics and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    record = {"step": self.step, **{k: round(v, 8) for k, v in totals.items()},
                              "lr": self.scheduler.get_last_lr()[0], "global_batch": self.global_batch,
                              "samples": self.step * self.global_batch, "world_size": self.world,
                              "time": round(time.time() - start, 3)}
                    if cfg.selective:
                        record["scores"] = [round(float(v), 4) for v in scores_of(self.student.gate_params)]
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.set_postfix({k: f"{v:.4g}" for k, v in running.items() if k in ("loss", "task", "kd", "attn", "adm")})
                bar.update(1)
                if ckpt.fault(f"kill-at-{self.step}"):
                    os._exit(137)
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self._save()
        finally:
            bar.close()
            if metrics:
                metrics.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Merge LoRA, round the selection, write the adapter (main process; from full weights under FSDP)."""
        with sharding.gathered(self.student.models, {c: list(p) for c, p in self.student.params.items()}):
            finalize_lora(self.student)
            summary: dict[str, Any] = {"steps": self.step, "output": str(self.output)}
            if self.cfg.selective:
                summary["converted_layers"] = finalize_selection(self.student.models, self.cfg.select_layers)
                if not any(summary["converted_layers"].values()):
                    raise DistillError("selective transfer converted no layer; nothing to save (raise --select-layers)")
            if self.is_main:
                save_adapter(self.pipe, self.output, dense_fallback=True)  # users get layers="auto" behaviour
                (self.output / "distill_summary.json").write_text(json.dumps(summary, indent=2))
            self.accelerator.wait_for_everyone()
        return summary


def lr_multiplier(step: int, *, warmup: int, total: int, decay: str = "constant") -> float:
    """Factor on the peak learning rate before optimizer step ``step`` (0-based): a linear warm-up over
    ``warmup`` steps, then flat (``constant``) or down to 0 at step ``total`` (``cosine``, ``linear``)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))  # 0 on the first decaying step, 1 after the last
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the global RNGs during optimizer step ``step`` on process ``rank``."""
    return (seed * 1_000_003 + step) * 4_099 + rank


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged steps after ``step`` (a resumed run logs them again)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def run_distill(cfg: DistillConfig) -> dict[str, Any]:
    """Generate (or reuse) the data, distill, and write the adapter to ``cfg.output``."""
    if not cfg.model:
        raise DistillError("--model is required")
    if not cfg.output:
        raise DistillError("--output is required")
    trainer = Trainer(cfg)
    trainer.setup()
    if trainer.step >= cfg.steps and trainer.resume_from is not None:
        print(f"checkpoint {trainer.resume_from.name} is already at step {trainer.step}", file=sys.stderr)
    return trainer.train()


@contextlib.contextmanager
def _nullcontext():
    yield
