"""Reference (plain PyTorch) bidirectional linear attention.

This is the definition every fast path must equal::

    O_i = q_i · ((1/N) Σ_j k_jᵀ v_j) / (q_i · ((1/N) Σ_j k_j) + eps)

``q`` and ``k`` are already feature-mapped (non-negative). The state ``Σ k_jᵀ v_j``
and the normaliser ``Σ k_j`` are accumulated in float32 (float64 stays float64),
because in fp16 they overflow at high resolution. Dividing by ``N`` keeps the
state's scale independent of the token count, so one ``eps`` serves every
resolution (LinFusion's "attention normalisation").
"""

from __future__ import annotations

import torch

from .input_checks import check_float_dtypes, check_linear_shapes


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for tests); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_attention_state(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean key-value state and mean key of one sequence.

    Args:
        k: (B, H, N, Dk) non-negative keys.
        v: (B, H, N, Dv) values.

    Returns:
        kv: (B, H, Dk, Dv) = (1/N) Σ_j k_jᵀ v_j, in the accumulation dtype.
        k_mean: (B, H, Dk) = (1/N) Σ_j k_j, in the accumulation dtype.
    """
    check_float_dtypes("linear_attention_state", k=k, v=v)
    check_linear_shapes("linear_attention_state", k, v)
    acc = accumulation_dtype(k.dtype)
    n = k.shape[-2]
    kv = torch.einsum("bhnk,bhnv->bhkv", k.to(acc), v.to(acc)) / n
    k_mean = k.to(acc).mean(dim=-2)
    return kv, k_mean


def linear_attention_apply(
    q: torch.Tensor, kv: torch.Tensor, k_mean: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Apply a state to queries: (B, H, M, Dk) -> (B, H, M, Dv) in q's dtype."""
    acc = kv.dtype
    qa = q.to(acc)
    numerator = torch.einsum("bhmk,bhkv->bhmv", qa, kv)
    denominator = torch.einsum("bhmk,bhk->bhm", qa, k_mean).unsqueeze(-1) + eps
    return (numerator / denominator).to(q.dtype)


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Mean-normalised non-causal linear attention.

    Args:
        q: (B, H, M, Dk) non-negative, feature-mapped queries.
        k: (B, H, N, Dk) non-negative, feature-mapped keys.
        v: (B, H, N, Dv) values.
        eps: added to the (mean-normalised) denominator.

    Returns:
        (B, H, M, Dv) in q's dtype.
    """
    check_float_dtypes("linear_attention", q=q, k=k, v=v)
    check_linear_shapes("linear_attention", k, v, q)
    kv, k_mean = linear_attention_state(k, v)
    return linear_attention_apply(q, kv, k_mean, eps)
