"""Fused Triton RoPE (forward and backward) against the float64 reference and diffusers.

Without CUDA the kernel runs under the Triton CPU interpreter (TRITON_INTERPRET=1) on tiny
shapes; the GPU test uses a FLUX-size slice and skips cleanly without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import linfusion.kernels as kernels  # noqa: E402
from linfusion.kernels import rope_triton  # noqa: E402
from linfusion.kernels.rope_reference import rotary_embedding_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark = pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET is not 1")

# max |out - ref| / max |ref| allowed per dtype (one rounding of the fp32 result)
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(rope_triton, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype))


def flux_tables(length: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (L, D) with each angle repeated for both channels of a pair, as FLUX builds them."""
    angles = torch.rand(length, dim // 2, generator=gen, device=DEVICE, dtype=torch.float64) * 50
    return (angles.cos().repeat_interleave(2, 1).float(), angles.sin().repeat_interleave(2, 1).float())


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double() - ref.detach()).abs().max() / ref.detach().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7, 3, 16), (2, 33, 2, 40), (3, 5, 1, 128), (1, 19, 4, 72)])
def test_rope_forward_and_backward_match_float64(shape, dtype):
    gen = torch.Generator(DEVICE).manual_seed(sum(shape) + len(str(dtype)))
    B, L, H, D = shape
    cos, sin = flux_tables(L, D, gen)
    x = torch.randn(shape, generator=gen, device=DEVICE).to(dtype).requires_grad_(True)
    grad = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    out = kernels.rotary_embedding(x, cos, sin, backend="triton")
    (dx,) = torch.autograd.grad(out, x, grad)

    x64 = x.detach().double().requires_grad_(True)
    ref = rotary_embedding_reference(x64, cos.double(), sin.double())
    (dx64,) = torch.autograd.grad(ref, x64, grad.double())
    assert out.dtype == dtype and out.shape == shape and torch.isfinite(out).all()
    assert relative_error(out, ref) < TOL[dtype]
    assert relative_error(dx, dx64) < TOL[dtype]


def test_rope_handles_strided_inputs_and_distinct_pair_tables():
    """A heads-first view of token-major memory, and tables whose pair entries differ (the kernel
    must not assume cos[2i] == cos[2i+1])."""
    gen = torch.Generator(DEVICE).manual_seed(3)
    base = torch.randn(2, 4, 11, 32, generator=gen, device=DEVICE)  # (B, H, L, D)
    x = base.transpose(1, 2)  # (B, L, H, D), not contiguous
    cos = torch.randn(11, 32, generator=gen, device=DEVICE)
    sin = torch.randn(11, 32, generator=gen, device=DEVICE)
    out = kernels.rotary_embedding(x, cos, sin, backend="triton")
    ref = rotary_embedding_reference(x.double(), cos.double(), sin.double())
    assert relative_error(out, ref) < 1e-6
    xg = x.detach().clone().requires_grad_(True)
    g = torch.randn(x.shape, generator=gen, device=DEVICE)
    (dx,) = torch.autograd.grad(kernels.rotary_embedding(xg, cos, sin, backend="triton"), xg, g)
    x64 = x.detach().double().requires_grad_(True)
    (dx64,) = torch.autograd.grad(rotary_embedding_reference(x64, cos.double(), sin.double()), x64, g.double())
    assert relative_error(dx, dx64) < 1e-6


def test_reference_is_diffusers_apply_rotary_emb_bit_for_bit():
    from diffusers.models.embeddings import apply_rotary_emb

    gen = torch.Generator("cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 9, 3, 24, generator=gen).to(dtype)
        cos, sin = torch.randn(9, 24, generator=gen), torch.randn(9, 24, generator=gen)
        assert torch.equal(rotary_embedding_reference(x, cos, sin), apply_rotary_emb(x, (cos, sin), sequence_dim=1))


def test_rope_dispatch_and_errors():
    gen = torch.Generator(DEVICE).manual_seed(1)
    x = torch.randn(1, 5, 2, 8, generator=gen, device=DEVICE)
    cos, sin = flux_tables(5, 8, gen)
    expected = "triton" if ON_GPU else "torch"
    assert kernels.choose_backend("rope", x, None) == expected
    # the reference on request, and for what the kernel does not cover (fp64 tables), without error
    torch.testing.assert_close(kernels.rotary_embedding(x, cos, sin, backend="torch"),
                               rotary_embedding_reference(x, cos, sin))
    torch.testing.assert_close(kernels.rotary_embedding(x, cos.double(), sin.double()),
                               rotary_embedding_reference(x, cos.double(), sin.double()))
    with pytest.raises(ValueError, match="float32"):
        kernels.rotary_embedding(x, cos.double(), sin.double(), backend="triton")
    with pytest.raises(ValueError, match="even D"):
        kernels.rotary_embedding(x[..., :7], cos[:, :7], sin[:, :7], backend="triton")
    with pytest.raises(ValueError, match=r"\(L, D\)"):
        kernels.rotary_embedding(x, cos[:4], sin[:4], backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_rope_flux_size_on_gpu():
    gen = torch.Generator(DEVICE).manual_seed(2)
    cos, sin = flux_tables(16384 + 512, 128, gen)
    x = torch.randn(1, 16384 + 512, 24, 128, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    out = kernels.rotary_embedding(x, cos, sin)
    ref = rotary_embedding_reference(x.double(), cos.double(), sin.double())
    assert relative_error(out, ref) < TOL[torch.bfloat16]
    # the stock arithmetic rounds the same fp32 value: nearly every element is identical
    stock = rotary_embedding_reference(x, cos, sin)
    assert float((out != stock).float().mean()) < 1e-3
