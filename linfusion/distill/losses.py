"""Distillation losses: task, output KD, attention-output matching, variance KD.

Totals follow the papers' recipes with every term switchable and weighted::

    LinFusion: L = MSE(ε_s, ε_target) + 0.5·MSE(ε_s, ε_t) + 0.5·mean_l MSE(A_s^l, A_t^l)
    CLEAR:     the same with flow velocities
    LiT:       L = L_simple + 0.5·||ε_t − ε_s||² + 0.05·||Σ_t − Σ_s||²   (learned variance Σ)
    LinVideo:  L = L_ADM + 0.01·(L_con + L_reg)                        (see adm.py, selective.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .schedule import task_target

LOSS_NAMES = ("task", "kd", "attn", "var", "adm")
DEFAULT_WEIGHTS = {"task": 1.0, "kd": 0.5, "attn": 0.5, "var": 0.05, "adm": 0.0}


def parse_losses(spec: list[str] | dict[str, float] | str | None) -> dict[str, float]:
    """Loss weights from ``["task=1", "kd=0.5", "adm"]`` (a bare name takes its default weight,
    falling back to 1 for ADM) or a dict. Names not given are off; ``None`` gives the defaults."""
    if spec is None:
        return dict(DEFAULT_WEIGHTS)
    if isinstance(spec, str):
        spec = [part for part in spec.replace(",", " ").split() if part]
    if isinstance(spec, dict):
        items = [(str(k), float(v)) for k, v in spec.items()]
    else:
        items = []
        for part in spec:
            name, _, weight = str(part).partition("=")
            items.append((name, float(weight) if weight else (DEFAULT_WEIGHTS.get(name) or 1.0)))
    weights = {name: 0.0 for name in LOSS_NAMES}
    for name, weight in items:
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r}; known losses: {LOSS_NAMES}")
        if weight < 0:
            raise ValueError(f"loss weight of {name!r} must be >= 0, got {weight}")
        weights[name] = weight
    return weights


def split_variance(output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, learned variance or None). Learned-sigma models (PixArt, DiT) output 2·C channels on dim 1."""
    if output.shape == x_t.shape:
        return output, None
    if output.ndim == x_t.ndim and output.shape[1] == 2 * x_t.shape[1] and output.shape[2:] == x_t.shape[2:]:
        return output[:, : x_t.shape[1]], output[:, x_t.shape[1] :]
    raise ValueError(f"denoiser output {tuple(output.shape)} does not match its input {tuple(x_t.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32."""
    return F.mse_loss(a.float(), b.float())


def task_loss(kind: str, pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """MSE to the scheduler's target (ε, v or flow velocity) for clean sample x0 at x_t = a·x0 + s·ε."""
    return mse(pred, task_target(kind, x_t.float(), x0.float(), a.float(), s.float()))


@dataclasses.dataclass
class AttentionCapture:
    """Outputs of attention modules captured by forward hooks: name -> tensors of the call."""

    outputs: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def capture_attention(modules: dict[str, nn.Module]) -> Iterator[AttentionCapture]:
    """Record the output tensor(s) of each module (FLUX/SD3 joint blocks return (img, txt)) while active."""
    record = AttentionCapture()

    def hook_for(name: str):
        def hook(module, args, output):
            tensors = [output] if torch.is_tensor(output) else [t for t in output if torch.is_tensor(t)]
            record.outputs[name] = tensors

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def attention_matching_loss(student: AttentionCapture, teacher: AttentionCapture) -> torch.Tensor:
    """mean over layers of MSE(A_s^l, A_t^l) (all output tensors of a layer count)."""
    terms = []
    for name, outs in student.outputs.items():
        theirs = teacher.outputs.get(name)
        if theirs is None:
            raise RuntimeError(f"the teacher forward did not reach attention layer {name!r}")
        terms.append(sum(mse(s, t.detach()) for s, t in zip(outs, theirs)) / len(outs))
    if not terms:
        raise RuntimeError("no attention outputs were captured for attention matching")
    return torch.stack(terms).mean()
