"""Record what a denoiser is called with during a pipeline run.

Training replays those calls: the stored keyword arguments (latents, timestep, text
embeddings, pooled embeddings, ids, guidance, ...) are family-agnostic, so no
per-family input preparation is re-implemented here.

A call's arguments become a JSON *template* (tensors replaced by ``{"__tensor__": key}``
markers, ``None``/scalars kept, nested dicts kept) and a flat dict of tensors. A tensor
whose first dimension is the call's batch is *batched* (split per row); others (FLUX's
``img_ids``) are *shared*. 0-dim tensors (the UNet's timestep) are expanded to (B,).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: tensors never split per row even if their length happens to equal the batch
SHARED_NAMES = ("img_ids", "txt_ids")
TENSOR = "__tensor__"


class CaptureError(RuntimeError):
    """A denoiser argument cannot be stored (unknown type) or calls disagree in structure."""


def input_name(model: nn.Module) -> str:
    """Name of the denoiser's first forward argument: ``sample`` (UNet) or ``hidden_states``."""
    return next(iter(inspect.signature(model.forward).parameters))


def bind_call(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """All arguments of a forward call as keywords (positional ones named)."""
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    return dict(bound.arguments)


def flatten_call(call: dict[str, Any], batch: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split a call's keyword arguments into a JSON template and flat tensors.

    Returns:
        (template, tensors): ``tensors[key]`` is (B, ...) for batched entries, as passed otherwise.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if torch.is_tensor(value):
            t = value.detach()
            if t.ndim == 0:
                t = t.expand(batch)
            batched = t.ndim >= 1 and t.shape[0] == batch and key.rsplit(".", 1)[-1] not in SHARED_NAMES
            tensors[key] = t.to("cpu", copy=True).contiguous()
            return {TENSOR: key, "batched": batched}
        if isinstance(value, dict):
            return {"__dict__": {str(k): walk(v, f"{key}.{k}") for k, v in value.items()}}
        if isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
            return {"__list__": [walk(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CaptureError(f"cannot store denoiser argument {key!r} of type {type(value).__name__}")

    template = {name: walk(value, name) for name, value in call.items() if name != "return_dict"}
    return template, tensors


def tensor_keys(template: Any) -> dict[str, bool]:
    """key -> batched, for every tensor marker in a template."""
    found: dict[str, bool] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if TENSOR in node:
                found[node[TENSOR]] = bool(node["batched"])
            for child in node.get("__dict__", {}).values():
                walk(child)
            for child in node.get("__list__", []):
                walk(child)

    for node in template.values():
        walk(node)
    return found


def build_call(template: dict[str, Any], lookup: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`flatten_call`: keyword arguments with tensors from ``lookup(key)``."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if TENSOR in node:
                return lookup(node[TENSOR])
            if "__dict__" in node:
                return {k: walk(v) for k, v in node["__dict__"].items()}
            if "__list__" in node:
                return [walk(v) for v in node["__list__"]]
        return node

    return {name: walk(value) for name, value in template.items()}


def output_tensor(output: Any) -> torch.Tensor:
    """The prediction of a denoiser output (tuple, ``BaseOutput`` or tensor)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample if hasattr(output, "sample") else output[0]
