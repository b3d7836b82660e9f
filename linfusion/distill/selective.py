"""LinVideo's selective transfer: learn which self-attention layers to convert.

Each patched layer has a gate score r_l ∈ [0, 1] (output ``r·softmax + (1−r)·new``, r starts
at 1). Two regularisers drive the scores to a hard choice of ``target`` converted layers::

    L_con = (Σ_l round(1 − r_l) − target)²         straight-through rounding
    L_reg = Σ_l (1 − |2 r_l − 1|^α)                α annealed from 20 to 2

A converted layer is one whose rounded score is 0. :func:`finalize_selection` rounds the
scores and re-patches only the converted layers without gates, keeping their trained
weights, so the saved adapter records exactly those layers.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ..patch import mark_base_params_trained, patch_model, patch_record, unpatch_model


def straight_through_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def alpha_schedule(step: int, total: int, start: float = 20.0, end: float = 2.0) -> float:
    """Linear anneal of the polarising exponent α from ``start`` to ``end`` over ``total`` steps."""
    frac = min(1.0, step / max(1, total - 1))
    return start + (end - start) * frac


def reg_ramp(step: int, total: int, warmup: float = 0.3) -> float:
    """Weight of L_reg: 0 → 1 over the first ``warmup`` fraction of training.

    Scores start at exactly 1, where the polarising term pushes hardest towards 1; ramping it
    in lets the count constraint move the scores first.
    """
    return min(1.0, step / max(1.0, warmup * total))


def scores_of(gates: dict[str, dict[str, torch.nn.Parameter]]) -> torch.Tensor:
    """All gate scores as one (L,) tensor, clamped to [0, 1] with a straight-through gradient."""
    raw = torch.stack([p for component in sorted(gates) for _, p in sorted(gates[component].items())])
    return raw + (raw.clamp(0.0, 1.0) - raw).detach()


def selection_losses(scores: torch.Tensor, target: int, alpha: float) -> dict[str, torch.Tensor]:
    """{"con": L_con, "reg": L_reg} for scores r (L,) and a target number of converted layers.

    ``L_con`` has the paper's value; its straight-through gradient is routed to the layers at
    the margin only (when too few are converted: the lowest-scored unconverted ones; when too
    many: the highest-scored converted ones; ties go to earlier layers). A plain straight-through
    gradient is identical for every layer, so layers with equal scores would move in lockstep
    and oscillate around 0.5 instead of splitting into converted and kept.
    """
    hard = torch.round(1.0 - scores.detach())
    count = hard.sum()
    deficit = float(target) - float(count)
    order = torch.arange(scores.numel(), device=scores.device, dtype=scores.dtype) * 1e-6
    route = torch.zeros_like(scores)
    if deficit > 0:  # convert more: push down the unconverted layers with the lowest scores
        candidates = torch.where(hard == 0, scores.detach() + order, torch.full_like(scores, float("inf")))
        route[torch.topk(candidates, int(deficit), largest=False).indices] = 1.0
    elif deficit < 0:  # convert fewer: push up the converted layers with the highest scores
        candidates = torch.where(hard == 1, scores.detach() - order, torch.full_like(scores, -float("inf")))
        route[torch.topk(candidates, int(-deficit), largest=True).indices] = 1.0
    converted = count + ((1.0 - scores) * route - ((1.0 - scores) * route).detach()).sum()
    con = (converted - float(target)) ** 2
    reg = (1.0 - (2.0 * scores - 1.0).abs().clamp_min(1e-6).pow(alpha)).sum()
    return {"con": con, "reg": reg}


@torch.no_grad()
def project_scores(gates: dict[str, dict[str, torch.nn.Parameter]]) -> None:
    """Clamp stored scores into [0, 1] after an optimiser step (projected gradient)."""
    for component in gates.values():
        for param in component.values():
            param.clamp_(0.0, 1.0)


def converted_layers(model) -> list[str]:
    """Layers of a gated patched model whose rounded score is 0 (new attention)."""
    return [name for name, proc in patch_record(model).processors().items() if proc.gate is not None and float(proc.gate.r) < 0.5]


def finalize_selection(models: dict[str, torch.nn.Module], target: int | None = None) -> dict[str, list[str]]:
    """Round the scores and re-patch only the converted layers, gate-free, with their trained weights.

    Returns component -> converted layer names. A component with no converted layer is unpatched.
    Warns when the rounded count differs from ``target``.
    """
    result: dict[str, list[str]] = {}
    for component, model in models.items():
        record = patch_record(model)
        if record is None or record.config.gate is False:
            continue
        keep = converted_layers(model)
        methods = {name: proc.method.state_dict() for name, proc in record.processors().items() if name in keep}
        named = dict(model.named_parameters())
        trained_base = {name: named[name].detach().clone() for name in record.original_base_params}
        config = record.config
        if not keep:
            unpatch_model(model)
            result[component] = []
            continue
        patch_model(model, dataclasses.replace(config, layers=keep, gate=False))  # restores base weights first
        if trained_base:
            mark_base_params_trained(model, list(trained_base))
            named = dict(model.named_parameters())
            for name, value in trained_base.items():
                named[name].data.copy_(value)
        for name, proc in patch_record(model).processors().items():
            proc.method.load_state_dict(methods[name])
        result[component] = keep
    total = sum(len(v) for v in result.values())
    if target is not None and total != target:
        warnings.warn(f"selective transfer converted {total} layers, not the target {target}", stacklevel=2)
    return result
