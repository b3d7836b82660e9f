"""Noise-schedule algebra shared by data capture, the task loss and ADM.

Every trajectory point is stored with coefficients ``(a, s)`` such that the denoiser
input is ``x_t = a·x0 + s·ε``:

* ``"epsilon"`` / ``"v_prediction"`` (DDPM family): ``a = √ᾱ_t``, ``s = √(1-ᾱ_t)``
  (Euler-style schedulers scale their input by ``1/√(σ²+1)``, which lands in the same space);
* ``"flow"`` (rectified flow, FlowMatch schedulers): ``a = 1-σ``, ``s = σ``, and the model
  predicts the velocity ``u = ε - x0``.

With those, any prediction converts to ``(x̂0, ε̂)`` and a deterministic (DDIM / Euler)
step to another noise level is ``a'·x̂0 + s'·ε̂``.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def prediction_type(scheduler) -> str:
    """"flow" for FlowMatch schedulers, else the scheduler's ``prediction_type`` (default epsilon)."""
    if "FlowMatch" in type(scheduler).__name__:
        return "flow"
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler {type(scheduler).__name__} predicts {kind!r}; distillation supports {PREDICTION_TYPES}")
    return kind


def step_coefficients(scheduler, step: int, kind: str) -> tuple[float, float]:
    """(a, s) of the denoiser input at sampling step ``step`` (0-based) of the scheduler's current plan."""
    if kind == "flow":
        sigma = float(scheduler.sigmas[step])
        return 1.0 - sigma, sigma
    t = int(round(float(scheduler.timesteps[step])))
    alpha_bar = float(scheduler.alphas_cumprod[t])
    return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5


def _view(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) coefficients -> (B, 1, ..., 1) broadcastable against ``like``."""
    return c.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def task_target(kind: str, x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The regression target at ``x_t`` for clean sample ``x0``: ε, v or the flow velocity ε - x0.

    Args:
        x_t, x0: (B, ...) in the denoiser's input layout. a, s: (B,).
    """
    a, s = _view(a, x_t), _view(s, x_t)
    eps = (x_t - a * x0) / s.clamp_min(1e-4)
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return a * eps - s * x0
    return eps - x0


def to_x0_eps(kind: str, x_t: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
    """(x̂0, ε̂) from a model prediction at ``x_t`` with input coefficients (a, s), each (B,)."""
    a, s = _view(a, x_t), _view(s, x_t)
    if kind == "epsilon":
        return (x_t - s * pred) / a.clamp_min(1e-4), pred
    if kind == "v_prediction":
        return a * x_t - s * pred, s * x_t + a * pred
    return x_t - s * pred, x_t + a * pred  # flow: a = 1-σ, s = σ, pred = ε - x0


def deterministic_step(
    kind: str, x_t: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, s: torch.Tensor, a_next: torch.Tensor, s_next: torch.Tensor
) -> torch.Tensor:
    """DDIM / Euler step from (a, s) to (a', s'): ``a'·x̂0 + s'·ε̂``. Differentiable in ``pred``."""
    x0, eps = to_x0_eps(kind, x_t, pred, a, s)
    return _view(a_next, x_t) * x0 + _view(s_next, x_t) * eps
