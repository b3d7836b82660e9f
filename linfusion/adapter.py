"""Save and load what a patch learned: one JSON config + one safetensors file.

An adapter folder holds

* ``linfusion_adapter.json``: format version, library version and, per denoiser
  component, its family, class, a fingerprint of its config, the patch options,
  the patched layer names and the base weights the adapter overrides;
* ``linfusion_adapter.safetensors``: every new parameter (keys
  ``<component>.<layer>.<param>``) and overridden base weights
  (``<component>.base.<param>``).

Loading checks class, config fingerprint and format first and names any mismatch.
Weights are read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import ADAPTER_FORMAT_VERSION, PatchConfig
from .hub import looks_like_local_path
from .patch import _models_of, mark_base_params_trained, patch_model, patch_record
from .pipelines import family_for

CONFIG_NAME = "linfusion_adapter.json"
WEIGHTS_NAME = "linfusion_adapter.safetensors"


class AdapterMismatchError(ValueError):
    """The adapter was saved for another model, another format, or is incomplete."""


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The denoiser's public config (diffusers' private ``_`` keys dropped), JSON-able."""
    config = dict(getattr(model, "config", {}) or {})
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, default=str))


def config_fingerprint(model: nn.Module) -> str:
    """sha256 of the denoiser's class and config: equal for the same architecture."""
    payload = json.dumps({"class": type(model).__name__, "config": model_config_dict(model)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(obj: Any, directory: str | os.PathLike, dense_fallback: bool | None = None) -> Path:
    """Write the patch of a pipeline (or bare denoiser) and its weights to ``directory``.

    ``dense_fallback`` overrides the stored choice of running dense attention where it is
    faster (trainers patch without it, but users should get it by default).
    Returns the folder path. Raises ``ValueError`` if nothing is patched.
    """
    directory = Path(directory)
    components: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for component, model in _models_of(obj):
        record = patch_record(model)
        if record is None:
            continue
        options = record.config.to_dict()
        options["layers"] = list(record.layers)  # a predicate is stored as what it selected
        # retrained base weights rule the fallback out (see mark_base_params_trained)
        if dense_fallback is not None and not record.original_base_params:
            options["dense_fallback"] = dense_fallback
        params = dict(model.named_parameters())
        components[component] = {
            "family": record.family.name,
            "model_class": type(model).__name__,
            "config_fingerprint": config_fingerprint(model),
            "model_config": model_config_dict(model),
            "options": options,
            "layers": list(record.layers),
            "base_params": sorted(record.original_base_params),
        }
        for layer, processor in record.processors().items():
            for key, value in processor.state_dict().items():
                tensors[f"{component}.{layer}.{key}"] = value.detach().to("cpu").contiguous()
        for name in record.original_base_params:
            tensors[f"{component}.base.{name}"] = params[name].detach().to("cpu").contiguous()
    if not components:
        raise ValueError("nothing to save: the pipeline/model is not patched by LinFusion")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; an adapter is saved as a folder")
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": ADAPTER_FORMAT_VERSION, "library_version": __version__, "components": components}
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return directory


def resolve_adapter(path_or_id: str | os.PathLike) -> Path:
    """A local folder, or a Hugging Face hub repo id downloaded (config + safetensors only)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterMismatchError(f"{path} is a file; an adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    text = str(path_or_id)
    if looks_like_local_path(text):
        raise AdapterMismatchError(f"no adapter folder at {text!r} (a local folder written by save_adapter, "
                                   "or a Hugging Face hub id 'namespace/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except HFValidationError as exc:
        raise AdapterMismatchError(f"{text!r} is neither a local adapter folder nor a valid hub id: {exc}") from exc


def read_adapter_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise AdapterMismatchError(f"{directory} is not a LinFusion adapter (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterMismatchError(f"{config_path} is not valid JSON ({error}); the adapter is damaged") from None
    if not isinstance(meta, dict):
        raise AdapterMismatchError(f"{config_path} holds a {type(meta).__name__}, not an adapter configuration")
    version = meta.get("format_version")
    if version != ADAPTER_FORMAT_VERSION:
        raise AdapterMismatchError(
            f"adapter format {version} (written by linfusion {meta.get('library_version')}) cannot be read by "
            f"linfusion {__version__}, which reads format {ADAPTER_FORMAT_VERSION}"
        )
    return meta


def _check_same_model(component: str, entry: dict[str, Any], model: nn.Module) -> None:
    if entry["model_class"] != type(model).__name__:
        raise AdapterMismatchError(
            f"adapter component {component!r} was saved for {entry['model_class']}, but the pipeline has "
            f"{type(model).__name__}"
        )
    if entry["config_fingerprint"] != config_fingerprint(model):
        ours = model_config_dict(model)
        theirs = entry.get("model_config", {})
        differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise AdapterMismatchError(
            f"adapter component {component!r} was saved for another {entry['model_class']} configuration; "
            f"differing config keys: {differing[:10]}"
        )


def load_adapter(
    obj: Any, path_or_id: str | os.PathLike, backend: str | None = None, dense_fallback: bool | None = None
) -> Any:
    """Re-create a saved patch on ``obj`` (pipeline or bare denoiser) with its weights.

    ``backend`` overrides the saved kernel backend and ``dense_fallback`` the saved
    choice of running dense attention where it is faster. Everything is checked before
    any model changes; on a weight mismatch the patch is rolled back.
    """
    directory = resolve_adapter(path_or_id)
    meta = read_adapter_config(directory)
    models = dict(_models_of(obj))
    plans = []
    for component, entry in meta["components"].items():
        if component not in models:
            raise AdapterMismatchError(
                f"adapter has a {component!r} component, but {type(obj).__name__} has only {sorted(models)}"
            )
        model = models[component]
        family = family_for(model)
        if family.name != entry["family"]:
            raise AdapterMismatchError(f"adapter is for the {entry['family']} family, the model is {family.name}")
        _check_same_model(component, entry, model)
        options = dict(entry["options"], layers=entry["layers"], backend=backend)
        if dense_fallback and entry.get("base_params"):
            raise ValueError(
                f"dense_fallback=True cannot be honoured: the adapter's {component!r} retrained "
                f"{len(entry['base_params'])} base weights (e.g. {entry['base_params'][0]!r}), so dense attention "
                "with them is not the original model; leave dense_fallback unset"
            )
        if dense_fallback is not None:
            options["dense_fallback"] = dense_fallback
        plans.append((component, model, PatchConfig.from_dict(options), entry))
    try:
        tensors = load_file(directory / WEIGHTS_NAME)
    except SafetensorError as error:
        raise AdapterMismatchError(f"{directory / WEIGHTS_NAME} is not a readable safetensors file ({error}); "
                                   "the adapter is damaged") from None
    for component, model, config, entry in plans:
        patch_model(model, config)
        try:
            _load_weights(component, model, entry, tensors)
        except Exception:
            from .patch import unpatch_model

            unpatch_model(model)
            raise
    return obj


def _load_weights(component: str, model: nn.Module, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    record = patch_record(model)
    for layer, processor in record.processors().items():
        prefix = f"{component}.{layer}."
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        try:
            processor.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise AdapterMismatchError(f"adapter weights for layer {layer!r} do not fit: {error}") from error
    base = entry.get("base_params", [])
    if base:
        mark_base_params_trained(model, base)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in base:
                value = tensors[f"{component}.base.{name}"]
                if value.shape != params[name].shape:
                    raise AdapterMismatchError(f"base weight {name!r} has shape {tuple(value.shape)} in the adapter")
                params[name].copy_(value)
