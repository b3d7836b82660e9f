"""Build the student from the teacher by weight inheritance, and keep a teacher to learn from.

The student is the teacher pipeline patched in place: every weight is inherited, new
branches start at zero (feature MLPs, LiT's conv), gates start at softmax. What trains:

* ``"new"``: the patch's own parameters (and gate scores) only;
* ``"new+qkvo"``: plus the patched layers' ``to_q/to_k/to_v/to_out.0`` (CLEAR style);
  registered with :func:`linfusion.patch.mark_base_params_trained` so unpatching restores
  them and :func:`linfusion.save_adapter` stores them;
* ``"lora"``: peft LoRA on those projections; merged into the base weights by
  :func:`finalize_lora` before saving (they are then stored like ``new+qkvo``);
* ``"auto"``: ``"new"`` if the patch has parameters, else ``"new+qkvo"``.

The teacher: with ``"new"`` the student's base weights *are* the teacher's, so the teacher
forward is the same model with its original processors swapped back in (no copy; the
memory-efficient choice for FLUX-size models). Otherwise a frozen deep copy is kept, on the
training device or, with ``offload``, on the CPU and moved over per forward.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..config import PatchConfig
from ..patch import denoisers, mark_base_params_trained, patch_model, patch_record
from ..pipelines import family_for

TRAINABLE = ("auto", "new", "new+qkvo", "lora")
TEACHER_MODES = ("auto", "shared", "copy", "offload")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


class Teacher:
    """The frozen teacher of each denoiser component; use :meth:`active` around its forwards."""

    def __init__(self, models: dict[str, nn.Module], mode: str, copies: dict[str, nn.Module] | None = None) -> None:
        self.models = models
        self.mode = mode
        self.copies = copies or {}

    @contextlib.contextmanager
    def active(self, component: str) -> Iterator[nn.Module]:
        """Yield a module computing the teacher's forward for ``component``."""
        if self.mode == "shared":
            model = self.models[component]
            record = patch_record(model)
            swapped = [(attn, attn.processor, original) for attn, original in record.layers.values()]
            try:
                for attn, _, original in swapped:
                    attn.set_processor(original)
                yield model
            finally:
                for attn, ours, _ in swapped:
                    attn.set_processor(ours)
            return
        teacher = self.copies[component]
        if self.mode == "offload":
            device = next(self.models[component].parameters()).device
            teacher.to(device)
            try:
                yield teacher
            finally:
                teacher.to("cpu")
            return
        yield teacher

    def attention_modules(self, component: str, names: Sequence[str]) -> dict[str, nn.Module]:
        """The teacher's attention module for each patched layer name."""
        model = self.models[component] if self.mode == "shared" else self.copies[component]
        return {name: model.get_submodule(name) for name in names}


@dataclasses.dataclass
class Student:
    """The patched pipeline's trainable state.

    models: component -> patched denoiser. params: component -> {name: Parameter} of what trains
    (names as in ``model.named_parameters()``). gate_params: the selective-transfer scores among them.
    """

    pipe: object
    models: dict[str, nn.Module]
    trainable: str
    params: dict[str, dict[str, nn.Parameter]]
    gate_params: dict[str, dict[str, nn.Parameter]]
    teacher: Teacher
    config: PatchConfig

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``component.param`` -> Parameter, in a fixed order (checkpoints use these names)."""
        for component in sorted(self.params):
            for name, param in self.params[component].items():
                yield f"{component}.{name}", param

    def patched_layers(self, component: str) -> dict[str, nn.Module]:
        return {name: attn for name, (attn, _) in patch_record(self.models[component]).layers.items()}


def _projection_modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Linear]:
    found = {}
    for layer in layers:
        attn = model.get_submodule(layer)
        for proj in PROJECTIONS:
            try:
                module = attn.get_submodule(proj)
            except AttributeError:
                continue  # FLUX single blocks have no to_out
            if isinstance(module, nn.Linear):
                found[f"{layer}.{proj}"] = module
    return found


def select_layers(model: nn.Module, keep_softmax: Sequence[str], keep_first: bool) -> list[str]:
    """Self-attention layers to patch: all but ``keep_softmax`` (and the first one if ``keep_first``)."""
    names = list(family_for(model).self_attention_layers(model))
    keep = set(keep_softmax)
    unknown = keep - set(names)
    if unknown:
        raise ValueError(f"--keep-softmax names no self-attention layer: {sorted(unknown)[:5]}")
    if keep_first and names:
        keep.add(names[0])
    chosen = [n for n in names if n not in keep]
    if not chosen:
        raise ValueError("no self-attention layer left to convert after keeping softmax layers")
    return chosen


def build_student(
    pipe,
    config: PatchConfig,
    *,
    trainable: str = "auto",
    teacher: str = "auto",
    lora_rank: int = 16,
    keep_softmax: Sequence[str] = (),
    keep_first: bool = False,
) -> Student:
    """Patch ``pipe`` in place into the student and pick what trains.

    Args:
        pipe: the teacher pipeline (changed in place).
        config: patch options; ``layers`` is replaced by the layers chosen here.
        trainable: see module docstring.
        teacher: "auto" (shared when possible, else a copy), "shared", "copy" or "offload".
        lora_rank: LoRA rank for ``trainable="lora"``.
        keep_softmax: layer names (per component) that stay softmax.
        keep_first: keep the first self-attention layer softmax (LinVideo).
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if teacher not in TEACHER_MODES:
        raise ValueError(f"teacher must be one of {TEACHER_MODES}, got {teacher!r}")
    models = dict(denoisers(pipe))
    if not models:
        raise ValueError(f"{type(pipe).__name__} has no denoiser to distill")
    plans = {c: select_layers(m, keep_softmax, keep_first) for c, m in models.items()}  # validates families
    if trainable == "auto":
        trainable = "new" if patch_has_parameters(config) else "new+qkvo"
    mode = teacher if teacher != "auto" else ("shared" if trainable == "new" else "copy")
    if mode == "shared" and trainable != "new":
        raise ValueError("a shared teacher needs trainable='new' (the base weights must stay the teacher's)")
    copies: dict[str, nn.Module] = {}
    for component, model in models.items():
        model.requires_grad_(False)
        if mode != "shared":  # an unpatched frozen copy, taken before anything changes
            twin = copy.deepcopy(model).requires_grad_(False).eval()
            copies[component] = twin.to("cpu") if mode == "offload" else twin
        patch_model(model, dataclasses.replace(config, layers=plans[component], **_train_everywhere(config)))
    params: dict[str, dict[str, nn.Parameter]] = {}
    gates: dict[str, dict[str, nn.Parameter]] = {}
    for component, model in models.items():
        record = patch_record(model)
        chosen: dict[str, nn.Parameter] = {}
        named = dict(model.named_parameters())
        processor_ids = {id(p) for proc in record.processors().values() for p in proc.parameters()}
        for name, param in named.items():
            if id(param) in processor_ids:
                chosen[name] = param
        gates[component] = {n: p for n, p in chosen.items() if n.endswith("gate.score")}
        projections = _projection_modules(model, list(record.layers))
        if trainable in ("new+qkvo", "lora"):
            base = [f"{m}.{p}" for m, module in projections.items() for p, _ in module.named_parameters()]
            mark_base_params_trained(model, base)
        if trainable == "new+qkvo":
            for name in base:
                chosen[name] = named[name]
        if trainable == "lora":
            chosen.update(_inject_lora(model, list(projections), lora_rank))
        for param in chosen.values():
            param.requires_grad_(True)
        params[component] = chosen
    return Student(pipe, models, trainable, params, gates, Teacher(models, mode, copies), config)


def _train_everywhere(config: PatchConfig) -> dict:
    """Training needs the replacement in every chosen layer: no dense fallback (where the core has one)."""
    return {"dense_fallback": False} if "dense_fallback" in {f.name for f in dataclasses.fields(config)} else {}


def patch_has_parameters(config: PatchConfig) -> bool:
    """Whether the patch adds trainable parameters besides gates."""
    if config.method == "linear":
        return config.feature_mlp or config.feature_map == "hedgehog" or config.conv_v
    return config.global_pool is not None


def _inject_lora(model: nn.Module, modules: list[str], rank: int) -> dict[str, nn.Parameter]:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name="linfusion")
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def finalize_lora(student: Student) -> None:
    """Merge LoRA into the projections and put the plain ``nn.Linear`` back (names as before)."""
    if student.trainable != "lora":
        return
    from peft.tuners.lora import LoraLayer

    for model in student.models.values():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge(safe_merge=True)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for component, model in student.models.items():
        student.params[component] = {n: p for n, p in student.params[component].items() if "lora_" not in n}
        named = dict(model.named_parameters())
        student.params[component].update({n: named[n] for n in patch_record(model).original_base_params})


def trainable_parameter_count(student: Student) -> int:
    return sum(p.numel() for _, p in student.named_trainable())


def freeze_all(pipe) -> None:
    """requires_grad False on every module of a pipeline (text encoders, VAE ...)."""
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, nn.Module):
            component.requires_grad_(False)
            component.eval()


def cast_trainable(student: Student, dtype: torch.dtype) -> None:
    """Keep trainable parameters in ``dtype`` (fp32 master weights under mixed precision)."""
    for _, param in student.named_trainable():
        param.data = param.data.to(dtype)
