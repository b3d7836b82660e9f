"""``linfusion distill`` and ``linfusion generate-data``.

Flags override a ``--config`` file (YAML or JSON with the same keys, dashes or
underscores), which overrides the defaults of :class:`~linfusion.distill.config.DistillConfig`.

Several processes: launch the same command with ``accelerate launch --multi_gpu --num_processes N
-m linfusion distill ...`` or ``torchrun --nproc_per_node N -m linfusion distill ...`` (on a
machine without CUDA add ``ACCELERATE_USE_CPU=1`` to accelerate; the processes use gloo).

* ``--fsdp`` (``fsdp: true``): shard the denoisers per block with FSDP2 instead of replicating
  them (teachers the size of FLUX); not with ``--teacher offload`` or ``--trainable lora``.
* ``--resume`` continues from a checkpoint written by any number of processes, sharded or not,
  if the global batch ``--batch-size × processes × --grad-accum`` is unchanged (2 processes with
  ``--batch-size 1`` resume in 1 process with ``--batch-size 2``).
* ``--mixed-precision bf16`` autocasts the forwards (CPU too); trainable weights stay fp32.
* ``--gradient-checkpointing``: diffusers' ``enable_gradient_checkpointing()`` on the denoisers.

DeepSpeed ZeRO is not wired in (``deepspeed`` is not a dependency); ``--fsdp`` covers the
sharding that ZeRO-3 would.
"""

from __future__ import annotations

import argparse
import json
import sys

# (flag, dest, type, help); type None means a store_true switch
_SHARED = (
    ("--model", "model", str, "diffusers pipeline: hub id or local folder (anything DiffusionPipeline.from_pretrained takes)"),
    ("--output", "output", str, "output folder"),
    ("--seed", "seed", int, "random seed (default 0)"),
    ("--resolution", "resolution", str, "generation size: N or HxW pixels (default: the pipeline's)"),
    ("--num-frames", "num_frames", int, "frames per video (video models)"),
    ("--prompts", "prompts", str, "prompt file: one per line, or a JSON list (default: built-in list)"),
    ("--num-prompts", "num_prompts", int, "use only the first N prompts"),
    ("--data-steps", "data_steps", int, "teacher sampling steps per prompt (default 20)"),
    ("--guidance-scale", "guidance_scale", float, "teacher guidance scale (default: the pipeline's)"),
    ("--max-sequence-length", "max_sequence_length", int, "text length for T5-based pipelines"),
    ("--prompts-per-shard", "prompts_per_shard", int, "prompts per data shard (default 8)"),
    ("--dtype", "dtype", str, "weights dtype to load: float32 (default), bf16, fp16"),
)
_DISTILL = (
    ("--method", "method", str, "linear (default) or local"),
    ("--steps", "steps", int, "optimizer steps (default 1000)"),
    ("--checkpoint-every", "checkpoint_every", int, "write an atomic checkpoint every N steps (default 500)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept (default 2)"),
    ("--batch-size", "batch_size", int, "samples per process per micro-batch (default 1)"),
    ("--grad-accum", "grad_accum", int, "gradient accumulation steps (default 1)"),
    ("--lr", "lr", float, "learning rate (default 1e-4)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0)"),
    ("--warmup-steps", "warmup_steps", int, "linear LR warm-up steps (default 0)"),
    ("--lr-decay", "lr_decay", str, "learning rate after the warm-up: constant (default), cosine or linear (to 0 at --steps)"),
    ("--focus-timesteps", "focus_timesteps", str, "LO:HI:SHARE: draw SHARE of the samples from recorded points with "
     "LO <= timestep <= HI (the denoiser's own timestep units), the rest from the others (default: uniform)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm (default 1; 0 turns it off)"),
    ("--mixed-precision", "mixed_precision", str, "no (default), bf16 or fp16"),
    ("--data", "data", str, "data folder (reused, resumed, or generated here) or a folder of images with .txt captions"),
    ("--trainable", "trainable", str, "auto (default), new, new+qkvo or lora"),
    ("--lora-rank", "lora_rank", int, "LoRA rank for --trainable lora (default 16)"),
    ("--teacher", "teacher", str, "auto (default), shared (no copy), copy or offload (copy kept on the CPU)"),
    ("--select-layers", "select_layers", int, "selective transfer: number of layers to convert"),
    ("--select-weight", "select_weight", float, "weight of the selection regularisers (default 0.01)"),
    ("--select-lr", "select_lr", float, "learning rate of the gate scores (default 0.05)"),
    ("--log-every", "log_every", int, "log metrics every N steps (default 1)"),
)


def _add(parser: argparse.ArgumentParser, table) -> None:
    for flag, dest, kind, text in table:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def _common_tail(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest="config", default=None, help="YAML or JSON file with the same keys as the flags")
    parser.add_argument("--pipeline-kwarg", dest="pipeline_kwargs", action="append", default=None, metavar="KEY=VALUE",
                        help="extra keyword for the teacher pipeline call (JSON values), repeatable")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def add_parser(subparsers) -> None:
    distill = subparsers.add_parser("distill", help="distill a patched pipeline from its own softmax teacher")
    _add(distill, _SHARED)
    _add(distill, _DISTILL)
    distill.add_argument("--resume", nargs="?", const="latest", default=None,
                         help="continue from the newest checkpoint in --output (or the given checkpoint folder)")
    distill.add_argument("--losses", nargs="+", default=None, metavar="NAME[=W]",
                         help="loss terms and weights: task kd attn var adm (default task=1 kd=0.5 attn=0.5 var=0.05)")
    distill.add_argument("--keep-softmax", nargs="+", default=None, metavar="LAYER", help="layers that stay softmax")
    distill.add_argument("--keep-first", dest="keep_first", action="store_true", default=None,
                         help="keep the first self-attention layer softmax (default with --select-layers)")
    distill.add_argument("--no-keep-first", dest="keep_first", action="store_false")
    distill.add_argument("--gradient-checkpointing", action="store_true", default=None,
                         help="recompute the denoiser's blocks in backward (diffusers enable_gradient_checkpointing)")
    distill.add_argument("--fsdp", action="store_true", default=None,
                         help="shard the denoisers across the processes with FSDP2 (per block); checkpoints stay full")
    distill.add_argument("--patch-option", dest="patch", action="append", default=None, metavar="KEY=VALUE",
                         help="PatchConfig option, e.g. window=8 or feature_map=relu (JSON values), repeatable")
    _common_tail(distill)
    distill.set_defaults(run=run_distill_command)

    data = subparsers.add_parser("generate-data", help="build the data-free distillation data set from the teacher")
    _add(data, _SHARED)
    data.add_argument("--images", default=None, help="a folder of images with .txt captions instead of prompts")
    _common_tail(data)
    data.set_defaults(run=run_generate_command)


def parse_key_values(items: list[str] | None, flag: str) -> dict | None:
    """["window=4", "shape=tile"] -> {"window": 4, "shape": "tile"}: values read as JSON where they parse;
    Python's True / False / None too, so ``conv_v=False`` is never the (truthy) string "False"."""
    if items is None:
        return None
    python_literals = {"True": True, "False": False, "None": None}
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        if value.strip() in python_literals:
            result[key.strip()] = python_literals[value.strip()]
            continue
        try:
            result[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            result[key.strip()] = value
    return result


def _config_from_args(args: argparse.Namespace):
    from .config import DistillConfig

    values = {k: v for k, v in vars(args).items() if k not in ("run", "command", "config", "images")}
    values["pipeline_kwargs"] = parse_key_values(values.get("pipeline_kwargs"), "--pipeline-kwarg")
    if "patch" in values:
        values["patch"] = parse_key_values(values.get("patch"), "--patch-option")
    return DistillConfig.from_sources(args.config, **values)


def _fail(error: Exception) -> int:
    print(f"linfusion: error: {error}", file=sys.stderr)
    return 2


def run_distill_command(args: argparse.Namespace) -> int:
    from ..adapter import AdapterMismatchError
    from ..pipelines import UnsupportedModelError
    from .checkpoint import CheckpointError
    from .data import DataMismatchError
    from .trainer import DistillError, run_distill

    try:
        cfg = _config_from_args(args)
        summary = run_distill(cfg)
    except (ValueError, FileNotFoundError, UnsupportedModelError, DataMismatchError, CheckpointError,
            DistillError, AdapterMismatchError) as error:
        return _fail(error)
    print(json.dumps(summary))
    return 0


def run_generate_command(args: argparse.Namespace) -> int:
    from ..pipelines import UnsupportedModelError
    from .data import DataMismatchError, generate_data
    from .trainer import DistillError, check_supported, generation_settings, load_pipeline, prompt_list

    try:
        cfg = _config_from_args(args)
        if not cfg.model or not cfg.output:
            raise ValueError("generate-data needs --model and --output")
        pipe = load_pipeline(cfg.model, cfg.dtype)
        check_supported(pipe)
        import torch

        if torch.cuda.is_available():
            pipe.to("cuda")
        prompts = None if args.images else prompt_list(cfg)
        path = generate_data(pipe, cfg.output, prompts, generation_settings(cfg), images=args.images,
                             source=cfg.model, progress=cfg.progress)
    except (ValueError, FileNotFoundError, UnsupportedModelError, DataMismatchError, DistillError) as error:
        return _fail(error)
    print(json.dumps({"data": str(path)}))
    return 0
