"""Atomic training checkpoints: written to a temporary folder, then renamed into place.

A checkpoint ``checkpoints/step-00000100/`` holds

* ``trainable.safetensors``: the trainable parameters (``component.param`` keys);
* ``optimizer.pt``: optimizer and LR-scheduler state (plain tensors, loaded ``weights_only``);
* ``state.json``: step, the run's resume identity, the process count that wrote it.

Everything is *full* state written by the main process: trainable tensors and optimizer moments
gathered from FSDP shards where ``--fsdp`` sharded them, one copy of the (identical) replicas
otherwise. So a checkpoint of an N-process run resumes in an M-process run, sharded or not, as
long as the global batch ``batch_size × processes × grad_accum`` is the same (a different one
changes which samples each step sees and the gradient's scale; it is refused).

No RNG state is stored: the trainer reseeds the global RNGs from (seed, step, rank) at every
step (see :func:`linfusion.distill.trainer.step_seed`), and the data order is a function of
(seed, step, global batch), so the resumed run draws what the uninterrupted one would have.
Random draws inside a step (dropout, if a model had any) are per process, so they match an
uninterrupted run exactly only with the same process count.

Only complete folders carry the ``step-`` name, so a run killed while writing leaves at most
a ``.tmp-`` folder that resuming ignores (and removes).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
#: what ``state.json`` says about RNG state instead of storing it
RNG_NOTE = "not stored: every step reseeds the RNGs from (seed, step, rank)"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit this run."""


def fault(name: str) -> bool:
    """Test hook: True when ``LINFUSION_DISTILL_FAULT`` names this fault point."""
    return os.environ.get("LINFUSION_DISTILL_FAULT") == name


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(
    root: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and keep the newest ``keep`` ones.

    On any ``OSError`` (a full disk: ``ENOSPC``) the partial folder is removed, older
    checkpoints are untouched, and a :class:`CheckpointError` explains what happened.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, str(tmp / TRAINABLE))
        if fault("enospc-checkpoint") or fault(f"enospc-checkpoint-{step}"):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        torch.save(optimizer_state, tmp / OPTIMIZER)
        if fault(f"kill-in-checkpoint-{step}"):
            os._exit(137)
        (tmp / STATE).write_text(json.dumps(dict(state, step=step)))
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in checkpoint_dirs(root)]
        reason = "the disk is full" if error.errno == errno.ENOSPC else f"of an I/O error ({error})"
        raise CheckpointError(
            f"could not write checkpoint {final.name} because {reason}; nothing half-written was left behind; "
            f"the last complete checkpoint is {previous[-1] if previous else 'none'}. "
            "Free space and rerun with --resume."
        ) from error
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partial(root: Path) -> None:
    """Remove ``.tmp-`` folders left by a killed run."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(root: Path, which: str) -> Path | None:
    """``which`` = "latest" (newest under ``root``, None if there is none) or a checkpoint folder."""
    if which in ("latest", "auto", "true", ""):
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(which)
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE})")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable tensors, optimizer state, state dict)."""
    state = json.loads((path / STATE).read_text())
    return load_file(str(path / TRAINABLE)), torch.load(path / OPTIMIZER, weights_only=True), state


def check_identity(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint made with a different configuration, naming the keys."""
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in differing[:6])
        raise CheckpointError(
            f"cannot resume from {path}: it was made with a different configuration ({', '.join(differing)}). "
            f"{details}. Use the original options or a new --output."
        )


def check_global_batch(saved: dict[str, Any], global_batch: int, batch_size: int, world: int, accum: int,
                       path: Path) -> None:
    """Refuse a resume with another global batch; any split of the same one (processes, accumulation) is fine."""
    if "global_batch" not in saved:  # checkpoints before cross-world resume stored the factors
        saved["global_batch"] = saved.pop("batch_size", 1) * saved.pop("world_size", 1) * saved.pop("grad_accum", 1)
    before = int(saved["global_batch"])
    if before != global_batch:
        hint = (f"; with {world} process(es) use --batch-size {before // (world * accum)}"
                if before % (world * accum) == 0 else "")
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with global batch {before} (batch-size x processes x "
            f"grad-accum), this run has {global_batch} = {batch_size} x {world} x {accum}. The global batch "
            f"fixes the samples of every step, so it must stay the same{hint} (or change --grad-accum)."
        )
