"""``enable_context_parallel(pipe)`` / ``disable_context_parallel(pipe)``: the reversible pair.

Enabling registers, on every denoiser of the pipeline:

* a forward pre-hook on the model that reads the global token grid of the call,
  chooses the split (:func:`~linfusion.parallel.split.choose_split`) and scatters
  precomputed inputs named by the family's plan;
* forward hooks on the plan's submodules that keep this rank's tokens (and point
  the patch's token grid at the local box and the :class:`Shard`);
* a forward hook on the final projection that all-gathers the tokens;
* for self-attention layers LinFusion did not patch, the family's processor with
  exact softmax whose keys/values are gathered across ranks (put back on disable).

The pipeline itself is untouched: every rank runs the text encoders, the scheduler
and the VAE on the full (replicated) latents; only the denoiser's token sequence
is split. Patch first, then enable; to re-patch, disable first.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from torch import nn

from ..patch import _models_of, patch_record
from ..pipelines import family_for
from ..processor import TokenGrid
from .attention import DenseAttention
from .group import ContextParallel, init_context_parallel
from .plans import ShardPlan, plan_for
from .split import ContextParallelError, Shard, choose_split

_STATE = "_linfusion_context_parallel"


@dataclasses.dataclass
class _CPState:
    cp: ContextParallel
    plan: ShardPlan
    axis: int | None
    handles: list
    #: layer name -> (attention module, original processor) for layers given dense CP processors
    dense_layers: dict[str, tuple[nn.Module, Any]]
    dense_grid: TokenGrid
    shard: Shard | None = None
    global_grid: tuple[int, ...] | None = None


def _token_grids(model: nn.Module, state: _CPState) -> list[TokenGrid]:
    grids = [state.dense_grid] if state.dense_layers else []
    record = patch_record(model)
    if record is not None:
        grids.append(record.token_grid)
    return grids


def _split_units(model: nn.Module, ndim: int) -> tuple[int, ...]:
    """Rows per split unit: whole tiles when local attention uses tile windows, else 1."""
    record = patch_record(model)
    if record is None or record.config.method != "local" or record.config.shape != "tile":
        return (1,) * ndim
    from ..kernels.local_reference import default_tile

    return tuple(record.config.tile or default_tile(ndim))


def _pre_forward(model: nn.Module, args: tuple, kwargs: dict):
    state: _CPState = getattr(model, _STATE)
    family = family_for(model)
    if state.plan.check is not None:
        state.plan.check(args, kwargs)
    grid = tuple(family.token_grid(model, args, kwargs))
    split = choose_split(grid, state.cp.world, _split_units(model, len(grid)), state.axis)
    state.shard, state.global_grid = Shard(state.cp, split), grid
    for name, scatter in state.plan.inputs.items():
        if kwargs.get(name) is not None:
            kwargs[name] = scatter(state.shard, kwargs[name])
    return args, kwargs


def _scatter_output(model: nn.Module, scatter, module, args, output):
    state: _CPState = getattr(model, _STATE)
    if state.shard is None:
        return output
    for grid in _token_grids(model, state):  # inside the forward: after any grid-recording pre-hook
        grid.record(state.shard.local_grid)
        grid.parallel = state.shard
    return scatter(state.shard, output)


def _gather_output(model: nn.Module, module, args, output):
    state: _CPState = getattr(model, _STATE)
    if state.shard is None:
        return output
    return state.shard.gather(output, dim=1)


def _post_forward(model: nn.Module, args, kwargs, output):
    state: _CPState = getattr(model, _STATE)
    for grid in _token_grids(model, state):
        grid.parallel = None
        if state.global_grid is not None:
            grid.record(state.global_grid)
    state.shard = None
    return output


def _install(model: nn.Module, cp: ContextParallel, axis: int | None) -> None:
    family = family_for(model)
    plan = plan_for(family.name)
    record = patch_record(model)
    patched = set(record.layers) if record is not None else set()
    dense = {name: attn for name, attn in family.self_attention_layers(model).items() if name not in patched}
    for name, attn in dense.items():
        family.check_processor(name, attn)
    for path in (*plan.scatter, plan.gather):
        try:
            model.get_submodule(path)
        except AttributeError as error:
            raise ContextParallelError(f"{type(model).__name__} has no submodule {path!r} ({error})") from None
    dense_grid = TokenGrid()
    state = _CPState(cp, plan, axis, [], {}, dense_grid)
    setattr(model, _STATE, state)
    reference = next(model.parameters())
    for name, attn in dense.items():
        processor = family.processor_cls(DenseAttention(), dense_grid, name).to(reference.device)
        state.dense_layers[name] = (attn, attn.processor)
        attn.set_processor(processor)
    handles = state.handles
    handles.append(model.register_forward_pre_hook(_pre_forward, with_kwargs=True))
    for path, scatter in plan.scatter.items():
        hook = functools.partial(_scatter_output, model, scatter)
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    handles.append(model.get_submodule(plan.gather).register_forward_hook(functools.partial(_gather_output, model)))
    handles.append(model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True))


def enable_context_parallel(pipe: Any, cp: ContextParallel | None = None, *, axis: int | None = None) -> Any:
    """Run every denoiser of ``pipe`` (or a bare denoiser) context parallel over ``cp``'s ranks.

    Args:
        pipe: a pipeline (or denoiser) of a transformer family, patched or not.
        cp: the process group (default: :func:`init_context_parallel` from torchrun's environment).
        axis: force the split dimension (0: rows of images / frames of videos; 1: rows of
            videos); default: the outermost one with enough extent.

    Every rank must call the pipeline with the same inputs (same prompt and seed);
    each gets the same output. Returns ``pipe``.
    """
    cp = cp or init_context_parallel()
    models = _models_of(pipe)
    if not models:
        raise ContextParallelError(f"{type(pipe).__name__} has no denoiser to run context parallel")
    for _, model in models:  # check everything before changing anything
        plan_for(family_for(model).name)
        if is_context_parallel(model):
            raise ContextParallelError("context parallelism is already enabled; call disable_context_parallel first")
    done = []
    try:
        for _, model in models:
            _install(model, cp, axis)
            done.append(model)
    except Exception:
        for model in done:
            _remove(model)
        raise
    return pipe


def _remove(model: nn.Module) -> None:
    state: _CPState = getattr(model, _STATE)
    for handle in state.handles:
        handle.remove()
    for attn, original in state.dense_layers.values():
        attn.set_processor(original)
    delattr(model, _STATE)


def disable_context_parallel(pipe: Any) -> Any:
    """Undo :func:`enable_context_parallel`: hooks removed, original processors of dense layers back."""
    models = [model for _, model in _models_of(pipe) if is_context_parallel(model)]
    if not models:
        raise ValueError(f"{type(pipe).__name__} is not running context parallel")
    for model in models:
        _remove(model)
    return pipe


def is_context_parallel(obj: Any) -> bool:
    return any(hasattr(model, _STATE) for _, model in _models_of(obj))
