"""Explicit backend selection for the attention kernels (NATTEN style).

``backend=None`` walks the capability checks in order of preference and picks the
first that fits; ``backend="triton"`` or ``"torch"`` forces one and raises a
clear error when it cannot run. ``linfusion info`` prints what is available.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_is_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_triton_cannot_run(tensor: torch.Tensor) -> str | None:
    """None when Triton kernels can run on this tensor's device and dtype, else the reason."""
    if not triton_is_installed():
        return "triton is not installed"
    if tensor.dtype not in TRITON_DTYPES:
        return f"dtype {tensor.dtype} is not supported by the Triton kernels (use fp16, bf16 or fp32)"
    if tensor.device.type == "cuda":
        return None
    if tensor.device.type == "cpu" and triton_interpreter_enabled():
        return None
    return f"tensors on {tensor.device.type} need CUDA, or TRITON_INTERPRET=1 on CPU"


def choose_backend(op: str, tensor: torch.Tensor, backend: str | None) -> str:
    """Pick the backend for ``op`` ("linear", "local" or "rope").

    None: Triton on CUDA when it can run, else the PyTorch reference. An explicit
    choice that cannot run raises ``RuntimeError`` saying why.
    """
    if backend is not None and backend not in BACKENDS:
        extra = ' ("fa4" serves local attention only)' if backend == "fa4" else ""
        raise ValueError(f"backend must be None or one of {BACKENDS} for {op} attention{extra}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = why_triton_cannot_run(tensor)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"{op} kernel: the Triton backend cannot run here: {reason}")
        return "triton"
    if tensor.device.type == "cuda" and reason is None:
        logger.debug("%s attention: using Triton", op)
        return "triton"
    logger.debug("%s attention: using the PyTorch reference (%s)", op, reason or "not on CUDA")
    return "torch"


def available_backends() -> dict[str, str]:
    """Human-readable availability of each backend, for ``linfusion info``."""
    if not triton_is_installed():
        triton_state = "unavailable (triton not installed)"
    elif torch.cuda.is_available():
        triton_state = f"available (CUDA: {torch.cuda.get_device_name()})"
    elif triton_interpreter_enabled():
        triton_state = "available on CPU through TRITON_INTERPRET=1 (slow, for tests)"
    else:
        triton_state = "installed, but no CUDA device (set TRITON_INTERPRET=1 to run it on CPU)"
    from .local_fa4 import fa4_is_installed

    fa4_state = ("installed (local attention, tile windows of 128-token tiles, Hopper/Blackwell; opt-in: "
                 'backend="fa4")' if fa4_is_installed() else "not installed (optional: pip install flash-attn-4)")
    return {"torch": "available (reference, any device)", "triton": triton_state, "fa4": fa4_state}
