"""Process-group setup for context parallelism, from the environment ``torchrun`` / ``accelerate`` set.

One :class:`ContextParallel` describes who takes part: the process group, this
rank, the world size, the device the rank computes on, and the communication
counters (:class:`~linfusion.parallel.comm.CommStats`). NCCL on CUDA, gloo on
CPU. Every collective runs under a bounded timeout, so a rank that dies makes
its peers raise (and ``torchrun`` fail) instead of hanging forever.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist

from .comm import CommStats

logger = logging.getLogger(__name__)

#: default bound on any collective: generous for an 8K step, short enough that a dead peer is noticed
DEFAULT_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("LINFUSION_CP_TIMEOUT", 300)))


@dataclasses.dataclass
class ContextParallel:
    """A context-parallel process group: ``world`` ranks, each holding a slice of the tokens."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    device: torch.device
    stats: CommStats = dataclasses.field(default_factory=CommStats)
    #: True when :func:`init_context_parallel` created the default group (then :meth:`close` destroys it)
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def launched_distributed() -> bool:
    """True under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE and RANK are set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_context_parallel(
    backend: str | None = None,
    timeout: datetime.timedelta | float | None = None,
    device: str | torch.device | None = None,
) -> ContextParallel:
    """Join (or create) the default process group from torchrun's environment.

    Args:
        backend: "nccl", "gloo" or None (NCCL when CUDA is available, else gloo).
        timeout: bound on every collective (seconds or timedelta; default 300 s,
            ``LINFUSION_CP_TIMEOUT`` overrides). A rank that dies makes the others
            raise within it; ``torchrun`` then stops the job with the failing rank's error.
        device: where this rank computes (default: ``cuda:LOCAL_RANK`` when CUDA is
            available, else CPU).

    Without torchrun's environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...) this
    returns a one-rank ContextParallel without a process group, so the same code
    runs as a single process.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if isinstance(timeout, (int, float)):
        timeout = datetime.timedelta(seconds=float(timeout))
    timeout = timeout or DEFAULT_TIMEOUT
    if dist.is_available() and dist.is_initialized():
        return ContextParallel(None, dist.get_rank(), dist.get_world_size(), device)
    if not launched_distributed():
        logger.info("context parallel: no torchrun environment, running as a single process")
        return ContextParallel(None, 0, 1, device)
    backend = backend or default_backend(device)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("the NCCL backend needs CUDA devices; use backend='gloo' on CPU")
    dist.init_process_group(backend=backend, timeout=timeout, **({"device_id": device} if backend == "nccl" else {}))
    cp = ContextParallel(None, dist.get_rank(), dist.get_world_size(), device, owns_group=True)
    logger.info("context parallel: rank %d of %d on %s (%s, timeout %s)", cp.rank, cp.world, device, backend, timeout)
    return cp
