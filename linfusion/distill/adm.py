"""LinVideo's anytime distribution matching (ADM), with the student scoring itself.

The student takes a deterministic step from a stored trajectory point ``x_t`` to the next
noise level, ``x̂ = a'·x̂0 + s'·ε̂`` (differentiable in the student's parameters), and the
reverse KL between student and teacher marginals at that level is descended along the
DMD direction. Scores are ``s(x) = −ε̂(x)/s'``; the *fake* score is the student's own
prediction at x̂ (detached) instead of a separate fake-score network, so::

    s_real − s_fake = −(ε̂_teacher(x̂) − ε̂_student(x̂)) / s'
    (rectified flow: = −((1−t)/t)·(u_teacher(x̂) − u_student(x̂)),  t = s' = σ)

and the generator gradient w.r.t. x̂ is ``g = s_fake − s_real``. The surrogate
``½·mean((x̂ − sg(x̂ − g))²)`` has exactly that gradient direction (``g / numel``), and
it is exactly zero when the student equals the teacher.
"""

from __future__ import annotations

import torch

from .schedule import _view, to_x0_eps


def adm_direction(
    kind: str,
    x_hat: torch.Tensor,
    pred_teacher: torch.Tensor,
    pred_student: torch.Tensor,
    a_next: torch.Tensor,
    s_next: torch.Tensor,
) -> torch.Tensor:
    """g = s_fake − s_real at x̂ (B, ...), from the two (detached) predictions at x̂ with coefficients (a', s')."""
    _, eps_teacher = to_x0_eps(kind, x_hat, pred_teacher, a_next, s_next)
    _, eps_student = to_x0_eps(kind, x_hat, pred_student, a_next, s_next)
    return (eps_teacher - eps_student) / _view(s_next, x_hat).clamp_min(1e-3)


def adm_surrogate(x_hat: torch.Tensor, direction: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """½·mean((x̂ − sg(x̂ − g))²) with rows where ``mask`` (B,) is 0 counting as zero; d/dx̂ = g·mask/numel.

    The mean is over all B rows (not only the masked-in ones), so a batch split over processes or
    micro-batches gives the same loss and gradient as the whole batch; a batch without any next
    point gives an exact zero that is still part of the graph.
    """
    x_hat = x_hat.float()
    target = (x_hat - direction.float()).detach()
    per_row = 0.5 * (x_hat - target).pow(2).flatten(1).mean(1)
    if mask is None:
        return per_row.mean()
    return (per_row * mask.float()).mean()
