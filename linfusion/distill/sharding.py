"""FSDP for the distillation trainer (``--fsdp``): shard the denoisers, gather full state to save.

Sharding is torch FSDP2 (``torch.distributed.fsdp.fully_shard``) applied per block: every item
of the denoiser's top-level ``ModuleList``s (``transformer_blocks``, ``single_transformer_blocks``,
``down_blocks`` ...) is one unit, the rest of the model the root unit. Frozen base weights and the
trainable patch parameters are sharded alike (a unit may mix dtypes and frozen/trainable
parameters); gradients are reduce-scattered and the optimizer state lives on each shard.

FSDP2 keeps parameter names (no wrapper prefixes) and the module objects, so the patch record,
forward hooks and the shared teacher (the same model with its original processors swapped back
in) work unchanged; a separate teacher copy is sharded the same way. Nothing leaves the shards
except through the functions here, which every process must call together:

* :func:`full_tensor` / :func:`full_optimizer_state`: gathered tensors in the layout of an
  unsharded run, so checkpoints do not depend on the process count;
* :func:`load_full` / :func:`shard_optimizer_state`: back onto the shards when resuming;
* :func:`clip_grad_norm`: one norm over shards and whole tensors;
* :func:`gathered`: the trainable parameters swapped for full copies, to write the adapter with
  ``save_adapter`` (the frozen base weights are never gathered).

Works on CUDA (NCCL) and on CPU (gloo, torch >= 2.6).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules to shard, innermost first: items of top-level ModuleLists, then the model."""
    units = [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]
    return [*units, model]


def shard_models(models: Iterable[nn.Module], device: torch.device, world: int) -> list[nn.Module]:
    """``fully_shard`` each model per block over all ``world`` processes; returns every unit sharded.

    0-d parameters (selective-transfer gate scores) stay whole on every process; the trainer
    all-reduces their gradients like a data-parallel run's.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    sharded = []
    for model in models:
        model.to(device)  # buffers and the scalars left replicated; parameters are moved as shards anyway
        scalars = {p for p in model.parameters() if p.dim() == 0}  # gate scores: FSDP2 cannot shard 0-d tensors
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=mesh, reshard_after_forward=True, ignored_params=scalars)
            sharded.append(unit)
    return sharded


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered from the shards; collective) as a plain tensor."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def load_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into ``param`` (its own shard only, when sharded)."""
    with torch.no_grad():
        param.copy_(_like(value, param))


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (full) laid out like ``param``: the local shard of a sharded one, no communication."""
    if not is_sharded(param):
        return value.to(device=param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=param.device), param.device_mesh, param.placements, src_data_rank=None)


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict`` with every sharded state tensor gathered (collective)."""
    per_param = {index: {key: full_tensor(value) if torch.is_tensor(value) else value for key, value in entry.items()}
                 for index, entry in state["state"].items()}
    return dict(state, state=per_param)


def shard_optimizer_state(state: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """The inverse of :func:`full_optimizer_state` for the parameters in optimizer order."""
    per_param = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        per_param[index] = {
            key: _like(value, param) if torch.is_tensor(value) and value.shape == param.shape else value
            for key, value in entry.items()
        }
    return dict(state, state=per_param)


@contextlib.contextmanager
def gathered(models: dict[str, nn.Module], names: dict[str, Iterable[str]]) -> Iterator[None]:
    """Swap the named sharded parameters of each component for full plain copies (collective), restore on exit.

    Only these parameters (the trainable set) are gathered, not the frozen base weights, so writing the
    adapter needs memory for the adapter only. Inside, each model also shows its own class again
    (FSDP2 turns ``FluxTransformer2DModel`` into ``FSDPFluxTransformer2DModel``; adapters record the name).
    """
    swapped, classes = [], []
    for model in models.values():
        original = unsharded_class(type(model))
        if original is not type(model):
            classes.append((model, type(model)))
            model.__class__ = original
    for component, model in models.items():
        for name in names[component]:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            param = owner._parameters[leaf]
            if is_sharded(param):
                owner._parameters[leaf] = nn.Parameter(param.full_tensor().detach(), requires_grad=False)
                swapped.append((owner, leaf, param))
    try:
        yield
    finally:
        for owner, leaf, param in swapped:
            owner._parameters[leaf] = param
        for model, cls in classes:
            model.__class__ = cls


def unsharded_class(cls: type) -> type:
    """The model class under FSDP2's ``FSDP<Name>`` subclass (``cls`` itself when not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    if not issubclass(cls, FSDPModule):
        return cls
    return next(base for base in cls.__bases__ if base is not FSDPModule)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients of sharded and whole parameters alike to a total norm of at most ``max_norm``."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    if not norms:
        return 0.0
    total = float(torch.linalg.vector_norm(torch.stack([full_tensor(n) for n in norms])))
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return total


def set_gradient_sync(units: list[nn.Module], enabled: bool) -> None:
    """Skip the reduce-scatter on micro-batches before the last of a gradient accumulation."""
    for unit in units:
        unit.set_requires_gradient_sync(enabled, recurse=False)
