"""Every knob of a distillation run: one dataclass, filled from defaults < config file < flags.

Resuming (``--resume``) requires the checkpoint's *resume identity* (every key not in
:data:`RESUME_FREE_KEYS`, plus the model and data fingerprints and the global batch) to match.
The split of the global batch ``batch_size × processes × grad_accum`` is free, and so is
``fsdp`` (checkpoints hold full, gathered tensors): a run of N processes resumes in M.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import PatchConfig
from .losses import parse_losses

MIXED_PRECISION = ("no", "bf16", "fp16")
#: learning-rate shapes after the warm-up: flat, or down to zero at the last step
LR_DECAYS = ("constant", "cosine", "linear")
#: keys that may change between a run and its resume (everything else must match)
RESUME_FREE_KEYS = (
    "model", "output", "resume", "checkpoint_every", "log_every", "keep_checkpoints", "progress", "data", "prompts",
    "num_prompts", "data_steps", "guidance_scale", "max_sequence_length", "prompts_per_shard", "resolution",
    "num_frames", "pipeline_kwargs", "teacher", "gradient_checkpointing", "steps",
    # the global batch batch_size·world·grad_accum is checked instead of its factors
    "batch_size", "grad_accum", "fsdp",
)


@dataclasses.dataclass
class DistillConfig:
    """Options of ``linfusion distill`` (flags use dashes: ``--batch-size`` is ``batch_size``)."""

    model: str = ""
    output: str = ""
    method: str = "linear"
    steps: int = 1000
    resume: str | None = None  # None, "latest" or a checkpoint folder
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "constant"
    # "LO:HI:SHARE": SHARE of the samples drawn from recorded points with LO <= timestep <= HI
    focus_timesteps: Any = None
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    dtype: str = "float32"
    fsdp: bool = False  # shard the denoisers (FSDP2 fully_shard per block) across the processes
    # data
    data: str | None = None
    prompts: str | None = None
    num_prompts: int | None = None
    resolution: str | None = None  # "512" or "HxW"
    num_frames: int | None = None
    data_steps: int = 20
    guidance_scale: float | None = None
    max_sequence_length: int | None = None
    prompts_per_shard: int = 8
    pipeline_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # student
    patch: dict[str, Any] = dataclasses.field(default_factory=dict)
    trainable: str = "auto"
    lora_rank: int = 16
    teacher: str = "auto"
    # losses
    losses: Any = None
    select_layers: int | None = None
    keep_softmax: list[str] = dataclasses.field(default_factory=list)
    keep_first: bool | None = None
    select_weight: float = 0.01
    select_lr: float = 0.05
    # logging
    log_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in ("linear", "local"):
            raise ValueError(f"--method must be 'linear' or 'local', got {self.method!r}")
        for key in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "data_steps", "prompts_per_shard"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"--lr-decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        self.focus_timesteps = parse_focus_timesteps(self.focus_timesteps)
        if self.select_layers is not None and self.select_layers < 0:
            raise ValueError(f"--select-layers must be >= 0, got {self.select_layers}")
        if self.fsdp and self.teacher == "offload":
            raise ValueError("--fsdp cannot be combined with --teacher offload (a sharded teacher is already spread "
                             "over the processes); use --teacher shared or copy")
        if self.fsdp and self.trainable == "lora":
            raise ValueError("--fsdp does not support --trainable lora (merging LoRA needs the full base weights); "
                             "use --trainable new or new+qkvo")
        self.losses = parse_losses(self.losses)
        self.size()
        # the patch options now, not after the teacher data is generated (an option of the other
        # method, or a typo, would otherwise stop the run only then)
        try:
            PatchConfig.from_kwargs(**dict(self.patch or {}, method=self.method, gate=self.selective))
        except TypeError as error:  # an unknown key: a usage error like the others here
            raise ValueError(f"--patch-option: {error}") from None

    def size(self) -> tuple[int | None, int | None]:
        """(height, width) from ``resolution`` ("512" or "HxW"), or (None, None)."""
        if self.resolution in (None, ""):
            return None, None
        text = str(self.resolution).lower()
        parts = text.split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"--resolution must be N or HxW, got {self.resolution!r}") from None
        if len(values) == 1:
            values = values * 2
        if len(values) != 2 or min(values) < 1:
            raise ValueError(f"--resolution must be N or HxW, got {self.resolution!r}")
        return values[0], values[1]

    @property
    def selective(self) -> bool:
        return self.select_layers is not None

    def resume_identity(self) -> dict[str, Any]:
        """The options a checkpoint must share with the run that resumes it."""
        data = dataclasses.asdict(self)
        identity = {k: v for k, v in data.items() if k not in RESUME_FREE_KEYS}
        if self.lr_decay == "constant":
            del identity["lr_decay"]  # so checkpoints written before the option existed still resume
        if self.focus_timesteps is None:
            del identity["focus_timesteps"]  # likewise
        if self.selective or self.lr_decay != "constant":
            identity["steps"] = self.steps  # the α anneal and a decaying learning rate depend on it
        return json.loads(json.dumps(identity, default=str))

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_sources(cls, file: str | Path | None = None, **overrides: Any) -> DistillConfig:
        """Defaults, then a YAML/JSON config file, then ``overrides`` (None values ignored)."""
        values: dict[str, Any] = load_config_file(file) if file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - cls.fields()
        if unknown:
            raise ValueError(f"unknown distill option(s) {sorted(unknown)}; known: {sorted(cls.fields())}")
        return cls(**values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Keys of a YAML or JSON file, with dashes turned into underscores."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_focus_timesteps(value: Any) -> list[float] | None:
    """"550:750:0.5" (or a 3-item list) -> [550.0, 750.0, 0.5]; None or "" -> None.

    LO and HI are in the units the denoiser receives as its ``timestep`` argument (0-1000 for
    SD / SDXL / PixArt; FLUX and Wan pipelines pass their own scale); SHARE is in (0, 1]."""
    if value is None or value == "":
        return None
    parts = value.split(":") if isinstance(value, str) else list(value)
    try:
        lo, hi, share = (float(x) for x in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--focus-timesteps must be LO:HI:SHARE (e.g. 550:750:0.5), got {value!r}") from None
    if not lo <= hi:
        raise ValueError(f"--focus-timesteps needs LO <= HI, got {lo} > {hi}")
    if not 0 < share <= 1:
        raise ValueError(f"--focus-timesteps SHARE must be in (0, 1], got {share}")
    return [lo, hi, share]
