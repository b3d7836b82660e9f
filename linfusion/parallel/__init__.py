"""Context-parallel inference on torch.distributed: each rank holds a slice of the image/video tokens.

Usage (under ``torchrun --nproc-per-node N``)::

    cp = init_context_parallel()              # NCCL on CUDA, gloo on CPU, bounded timeouts
    patch_pipeline(pipe, method="linear")
    enable_context_parallel(pipe, cp)         # reversible: disable_context_parallel(pipe)
    image = pipe(prompt, generator=torch.Generator("cpu").manual_seed(0)).images[0]  # same on every rank

Modules: :mod:`.group` (process group), :mod:`.split` (token split, halo, gather),
:mod:`.attention` (cross-rank forms of the methods), :mod:`.plans` (where each family
is split), :mod:`.model` (the enable/disable pair), :mod:`.comm` (counted collectives),
:mod:`.volume` (communication volume per layer, computed).
"""

from .comm import CommStats
from .group import ContextParallel, init_context_parallel, launched_distributed
from .model import disable_context_parallel, enable_context_parallel, is_context_parallel
from .plans import PLANS
from .split import ContextParallelError, GridSplit, Shard, choose_split

__all__ = [
    "PLANS",
    "CommStats",
    "ContextParallel",
    "ContextParallelError",
    "GridSplit",
    "Shard",
    "choose_split",
    "disable_context_parallel",
    "enable_context_parallel",
    "init_context_parallel",
    "is_context_parallel",
    "launched_distributed",
]
