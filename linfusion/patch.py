"""One-call, fully reversible patching of diffusers models and pipelines.

``patch_model`` swaps the processors of the selected self-attention layers for
LinFusion processors and registers one forward pre-hook that records the token
grid of each call. Everything needed to undo it is kept in a :class:`PatchRecord`
on the model, so ``unpatch_model`` puts back the very same processor objects (and
any base weights a trainer or adapter changed): outputs are bit-identical again.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .config import PatchConfig
from .methods import SoftmaxGate, build_method
from .pipelines import FamilyAdapter, UnsupportedModelError, family_for, supported_families
from .processor import DenseFallback, LinFusionProcessor, TokenGrid

#: pipeline attributes that may hold a denoiser, in order
DENOISER_ATTRIBUTES = ("unet", "transformer", "transformer_2")
_RECORD = "_linfusion_patch"


@dataclasses.dataclass
class PatchRecord:
    """What a patch changed on one denoiser, and what it needs to undo it."""

    config: PatchConfig
    family: FamilyAdapter
    token_grid: TokenGrid
    #: layer name -> (attention module, its original processor)
    layers: dict[str, tuple[nn.Module, Any]]
    hooks: list[torch.utils.hooks.RemovableHandle]
    #: base parameter name -> original value (CPU copy) for weights changed after patching
    original_base_params: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def processors(self) -> dict[str, LinFusionProcessor]:
        return {name: attn.processor for name, (attn, _) in self.layers.items()}


def patch_record(model: nn.Module) -> PatchRecord | None:
    """The model's patch record, or None if it is not patched."""
    return getattr(model, _RECORD, None)


def is_patched(obj: Any) -> bool:
    """True if a model, or any denoiser of a pipeline, carries a LinFusion patch."""
    return any(patch_record(model) is not None for _, model in _models_of(obj))


def denoisers(pipe: Any) -> list[tuple[str, nn.Module]]:
    """(attribute, module) of each denoiser of a pipeline (Wan 2.2 has two)."""
    found = [(name, getattr(pipe, name, None)) for name in DENOISER_ATTRIBUTES]
    return [(name, model) for name, model in found if isinstance(model, nn.Module)]


def default_component_name(model: nn.Module) -> str:
    """The pipeline attribute a bare denoiser would have (for adapters saved from ``patch_model``)."""
    return "unet" if "UNet" in type(model).__name__ else "transformer"


def _models_of(obj: Any) -> list[tuple[str, nn.Module]]:
    if isinstance(obj, nn.Module):
        return [(default_component_name(obj), obj)]
    return denoisers(obj)


def _select_layers(all_layers: dict[str, nn.Module], selector, component: str) -> dict[str, nn.Module]:
    if selector in ("all", "auto"):
        return dict(all_layers)
    if callable(selector):
        return {name: module for name, module in all_layers.items() if selector(name)}
    wanted = set()
    for name in selector:  # names may be qualified with the component: "transformer_2.blocks.0.attn1"
        prefix, _, rest = name.partition(".")
        wanted.add(rest if prefix in DENOISER_ATTRIBUTES and prefix == component else name)
    return {name: module for name, module in all_layers.items() if name in wanted}


def _record_grid(family: FamilyAdapter, token_grid: TokenGrid, model: nn.Module, args: tuple, kwargs: dict) -> None:
    token_grid.record(family.token_grid(model, args, kwargs))


def _notice_if_all_dense(noticed: set, model: nn.Module, args: tuple, output: Any) -> None:
    """Tell the user once per resolution when no patched layer paid off (``layers="auto"``)."""
    record = patch_record(model)
    processors = list(record.processors().values())
    grid = record.token_grid.grid
    # (while a trainer swaps the original processors in for a teacher pass, they are not ours)
    if grid in noticed or not processors or any(getattr(p, "last_choice", None) != "dense" for p in processors):
        return
    noticed.add(grid)
    from .crossover import crossover_tokens

    fallback = processors[0].dense_fallback
    threshold = crossover_tokens(record.config, fallback.heads, fallback.head_dim, channels=fallback.channels,
                                 mlp_ratio=fallback.mlp_ratio, device=next(model.parameters()).device,
                                 dtype=next(model.parameters()).dtype)
    where = f"from about {threshold} image tokens per layer" if threshold else "at no size up to 4M tokens"
    warnings.warn(
        f"LinFusion: at this size (token grid {'x'.join(map(str, grid))}) dense attention is estimated faster "
        f"than {record.config.method} attention in every patched layer of {type(model).__name__}, so the original "
        f"attention runs (layers='auto'). On this device the patch pays off {where}; "
        "pass dense_fallback=False to force it.",
        stacklevel=2,
    )


def patch_model(model: nn.Module, config: PatchConfig | None = None, **options: Any) -> nn.Module:
    """Patch a bare UNet or transformer in place and return it.

    Args:
        model: a supported diffusers denoiser (see README for the list).
        config: a :class:`PatchConfig`; or give its fields as keyword arguments.

    A model that is already patched is first unpatched, then patched again with
    the new options. Nothing changes if any check fails.
    """
    config = config or PatchConfig.from_kwargs(**options)
    plan = _plan_patch(model, config, default_component_name(model))
    if callable(config.layers) and not plan[1]:
        _no_layer_selected(type(model).__name__, len(plan[0].self_attention_layers(model)))
    _apply_plan(model, config, *plan)
    return model


def _no_layer_selected(what: str, n_layers: int) -> None:
    raise ValueError(f"the layers selector chose none of the {n_layers} self-attention layers of {what}; "
                     "see `linfusion.describe(...)` for their names")


def _plan_patch(
    model: nn.Module, config: PatchConfig, component: str
) -> tuple[FamilyAdapter, dict[str, nn.Module]]:
    """Validate everything that could fail before the model is touched."""
    family = family_for(model)
    all_layers = family.self_attention_layers(model)
    if not all_layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no self-attention layers LinFusion could patch")
    if config.method == "local" and config.temporal_window is not None and family.grid_dims != 3:
        raise ValueError(f"temporal_window applies to video models (a (T, H, W) token grid); {type(model).__name__} "
                         f"({family.description}) has a 2D grid: give window=... alone")
    if config.method == "local" and isinstance(config.window, tuple) and len(config.window) != family.grid_dims:
        raise ValueError(f"window {config.window} has {len(config.window)} radii but {type(model).__name__}'s token "
                         f"grid has {family.grid_dims} dimensions ({'(T, H, W)' if family.grid_dims == 3 else '(H, W)'})")
    selected = _select_layers(all_layers, config.layers, component)
    for name, attn in selected.items():
        if patch_record(model) is None or name not in patch_record(model).layers:
            family.check_processor(name, attn)
    return family, selected


def _apply_plan(model: nn.Module, config: PatchConfig, family: FamilyAdapter, selected: dict[str, nn.Module]) -> None:
    if patch_record(model) is not None:
        unpatch_model(model)
    reference = next(model.parameters())
    ratio = family.default_mlp_ratio(model)
    token_grid = TokenGrid()
    processors = {}
    for name, attn in selected.items():
        channels, heads, head_dim = family.layer_dims(attn)
        method = build_method(config, channels, heads, head_dim, ratio)
        gate = SoftmaxGate() if config.gate else None
        fallback = DenseFallback(config, channels, heads, head_dim, ratio) if config.dense_fallback else None
        processor = family.processor_cls(method, token_grid, name, gate, fallback)
        processors[name] = processor.to(device=reference.device, dtype=reference.dtype)
    layers = {}
    for name, processor in processors.items():
        attn = selected[name]
        layers[name] = (attn, attn.processor)
        processor.bind_original(attn.processor)
        attn.set_processor(processor)
    hooks = [model.register_forward_pre_hook(functools.partial(_record_grid, family, token_grid), with_kwargs=True)]
    if config.dense_fallback:
        hooks.append(model.register_forward_hook(functools.partial(_notice_if_all_dense, set())))
    setattr(model, _RECORD, PatchRecord(config, family, token_grid, layers, hooks))


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: original processors and base weights back, hook removed."""
    record = patch_record(model)
    if record is None:
        raise ValueError(f"{type(model).__name__} is not patched by LinFusion")
    for attn, original in record.layers.values():
        attn.set_processor(original)
    for hook in record.hooks:
        hook.remove()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in record.original_base_params.items():
            params[name].copy_(value)
    delattr(model, _RECORD)
    return model


def patch_pipeline(pipe: Any, method: str | None = None, *, adapter: str | None = None, **options: Any) -> Any:
    """Patch every denoiser of a diffusers pipeline in place; returns the pipeline.

    Args:
        pipe: a diffusers pipeline of a supported family.
        method: "linear" or "local" (default "linear"); not allowed with ``adapter``.
        adapter: a folder or hub id written by :func:`save_adapter`: re-creates that
            patch with its trained weights (``backend=`` and ``dense_fallback=`` may still be given).
        **options: :class:`PatchConfig` fields (``window=16``, ``layers=[...]``, ...).

    Patching an already patched pipeline replaces the old patch.
    """
    if adapter is not None:
        if method is not None or set(options) - {"backend", "dense_fallback"}:
            raise ValueError(
                "patch_pipeline(adapter=...) re-creates the saved patch; only `backend=` and `dense_fallback=` "
                "may be given beside it"
            )
        from .adapter import load_adapter

        return load_adapter(pipe, adapter, **options)
    config = PatchConfig.from_kwargs(method=method or "linear", **options)
    models = denoisers(pipe)
    if not models:
        raise UnsupportedModelError(
            f"{type(pipe).__name__} has no denoiser attribute ({', '.join(DENOISER_ATTRIBUTES)}). "
            f"Supported denoisers: {supported_families()}"
        )
    plans = [(model, _plan_patch(model, config, name)) for name, model in models]
    if isinstance(config.layers, list):
        _check_layer_names_exist(config.layers, models)
    if callable(config.layers) and not any(selected for _, (_, selected) in plans):
        _no_layer_selected(type(pipe).__name__, sum(len(f.self_attention_layers(m)) for m, (f, _) in plans))
    for model, plan in plans:
        _apply_plan(model, config, *plan)
    return pipe


def _check_layer_names_exist(names: Iterable[str], models: list[tuple[str, nn.Module]]) -> None:
    known = set()
    for component, model in models:
        layers = family_for(model).self_attention_layers(model)
        known |= set(layers) | {f"{component}.{name}" for name in layers}
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(f"no self-attention layer named {missing[:5]}; see `linfusion.describe(pipe)` for names")


def unpatch_pipeline(pipe: Any) -> Any:
    """Undo :func:`patch_pipeline` on every patched denoiser; outputs are bit-identical again."""
    patched = [model for _, model in _models_of(pipe) if patch_record(model) is not None]
    if not patched:
        raise ValueError(f"{type(pipe).__name__} is not patched by LinFusion")
    for model in patched:
        unpatch_model(model)
    return pipe


def iter_processors(obj: Any) -> Iterator[tuple[str, str, LinFusionProcessor]]:
    """(component, layer name, processor) of every patched layer of a model or pipeline."""
    for component, model in _models_of(obj):
        record = patch_record(model)
        if record is not None:
            for name, processor in record.processors().items():
                yield component, name, processor


def mark_base_params_trained(model: nn.Module, names: Iterable[str]) -> None:
    """Remember base weights (e.g. q/k/v/out) that training will change, so unpatch restores them
    and :func:`save_adapter` stores them.

    It also turns the dense fallback off for good: with retrained base weights, "the original
    attention" would run softmax on projections trained for the replacement -- neither the
    original model nor the student (the bundled Mini students drew noise that way at 128 px).
    """
    record = patch_record(model)
    if record is None:
        raise ValueError("mark_base_params_trained needs a patched model")
    params = dict(model.named_parameters())
    names = list(names)
    for name in names:
        if name not in params:
            raise KeyError(f"{type(model).__name__} has no parameter {name!r}")
        if name not in record.original_base_params:
            record.original_base_params[name] = params[name].detach().to("cpu", copy=True)
    if names:
        record.config = dataclasses.replace(record.config, dense_fallback=False)  # configs may be shared
        for processor in record.processors().values():
            processor.dense_fallback = None


def describe(obj: Any) -> dict[str, Any]:
    """What is patched: per denoiser, its family, method, options and layers.

    Returns a JSON-able dict ``{"patched": bool, "components": {name: {...}}}``.
    """
    components = {}
    for component, model in _models_of(obj):
        try:
            family = family_for(model)
        except UnsupportedModelError:
            continue
        all_layers = family.self_attention_layers(model)
        record = patch_record(model)
        info: dict[str, Any] = {
            "family": family.name,
            "model_class": type(model).__name__,
            "self_attention_layers": list(all_layers),
            "patched": record is not None,
        }
        if record is not None:
            processors = record.processors()
            info.update(
                method=record.config.method,
                options=record.config.to_dict(),
                patched_layers=list(processors),
                new_parameters=sum(p.numel() for proc in processors.values() for p in proc.parameters()),
                gates={name: float(proc.gate.r.detach()) for name, proc in processors.items() if proc.gate is not None},
            )
        components[component] = info
    return {"patched": any(c["patched"] for c in components.values()), "components": components}
