"""Triton linear attention (forward and backward) against the float64 reference.

Without CUDA the kernels run under the Triton CPU interpreter (TRITON_INTERPRET=1, set
here before the kernel module is imported) on tiny shapes; the GPU-only tests use real
sizes and skip cleanly without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import linfusion.kernels as kernels  # noqa: E402
from linfusion.kernels import linear_triton  # noqa: E402
from linfusion.kernels.linear_reference import linear_attention_reference  # noqa: E402
from linfusion.kernels.linear_triton import linear_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def needs_cuda(test):
    """GPU-only test at real sizes (marked ``gpu``; skipped without CUDA)."""
    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")(test))


if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark = pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET is not 1")

HEAD_DIMS = (40, 64, 72, 80, 96, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# relative L2 error ‖out − ref‖ / ‖ref‖ allowed per input dtype (fp32 uses IEEE fp32 dots)
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an unwritten element fails."""

    def full_of_nan(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(linear_triton, "_empty", full_of_nan)


def features(*shape, dtype, gen, scale=1.0):
    """Non-negative feature-mapped inputs: elu(x) + 1 of a standard normal."""
    x = torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32)
    return (scale * (torch.nn.functional.elu(x) + 1)).to(dtype)


def values(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def make_gen(seed=None):
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed)
    return gen


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values (unwritten, overflowed or NaN)"
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(q, k, v, eps=1e-6, tol=None, grads=True):
    """Forward and input gradients of the Triton kernel vs the float64 reference."""
    tol = TOL[q.dtype] if tol is None else tol
    qt, kt, vt = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out = linear_attention_triton(qt, kt, vt, eps)
    assert out.shape == (*q.shape[:3], v.shape[3]) and out.dtype == q.dtype
    qr, kr, vr = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    ref = linear_attention_reference(qr, kr, vr, eps)
    errors = {"out": rel_err(out, ref)}
    if grads:
        gen = make_gen()
        dout = torch.randn(out.shape, generator=gen, device=DEVICE, dtype=torch.float32).to(q.dtype)
        out.backward(dout)
        ref.backward(dout.double())
        for name, a, b in (("dq", qt, qr), ("dk", kt, kr), ("dv", vt, vr)):
            errors[name] = rel_err(a.grad, b.grad)
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative errors above {tol}: {errors}"
    return errors


# ----------------------------------------------------------------- interpreter or GPU, small


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_matches_reference(head_dim, dtype):
    gen = make_gen()
    B, H, L = 1, 2, 77  # 77 is not a multiple of any block size
    q = features(B, H, L, head_dim, dtype=dtype, gen=gen)
    k = features(B, H, L, head_dim, dtype=dtype, gen=gen)
    v = values(B, H, L, head_dim, dtype=dtype, gen=gen)
    check(q, k, v)


@pytest.mark.parametrize(
    "dv, dtype",
    [(64, torch.float32), (64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float16)],
    ids=["64-fp32", "64-bf16", "128-bf16", "128-fp16"],
)
def test_hedgehog_dk_twice_dv(dv, dtype):
    """Hedgehog feature maps double the key dim: Dk = 2·Dv (up to 256)."""
    gen = make_gen()
    q = features(1, 1, 50, 2 * dv, dtype=dtype, gen=gen)
    k = features(1, 1, 70, 2 * dv, dtype=dtype, gen=gen)
    v = values(1, 1, 70, dv, dtype=dtype, gen=gen)
    check(q, k, v)


@pytest.mark.parametrize("m, n", [(45, 150), (150, 20), (1, 33), (33, 3)])
def test_queries_and_keys_of_different_lengths(m, n):
    """Image queries attending to [text | image] keys: M ≠ N, with batch > 1."""
    gen = make_gen()
    q = features(2, 2, m, 64, dtype=torch.float32, gen=gen)
    k = features(2, 2, n, 64, dtype=torch.float32, gen=gen)
    v = values(2, 2, n, 48, dtype=torch.float32, gen=gen)
    check(q, k, v)


def test_batch_and_strided_inputs():
    """(B, L, H, D) tensors viewed as (B, H, L, D) run without a copy and give the same result."""
    gen = make_gen()
    B, H, L, D = 3, 2, 40, 32
    q = features(B, L, H, D, dtype=torch.bfloat16, gen=gen).transpose(1, 2)
    k = features(B, L, H, D, dtype=torch.bfloat16, gen=gen).transpose(1, 2)
    v = values(B, L, H, D, dtype=torch.bfloat16, gen=gen).transpose(1, 2)
    assert not q.is_contiguous()
    check(q, k, v)
    out_strided = linear_attention_triton(q, k, v)
    out_contig = linear_attention_triton(q.contiguous(), k.contiguous(), v.contiguous())
    torch.testing.assert_close(out_strided, out_contig, rtol=0, atol=0)


def test_fp16_state_beyond_fp16_range():
    """Mean state entries ~1e5 > fp16 max: the kernels scale before every fp16 cast.

    v is built from k (centred), so the state is large but dq stays well conditioned
    (a large common offset in v would make dq a difference of two nearly equal terms).
    """
    gen = make_gen()
    q = features(1, 2, 40, 64, dtype=torch.float16, gen=gen)
    k = features(1, 2, 90, 64, dtype=torch.float16, gen=gen, scale=300.0)
    v = (2 * (k.float() - 300)).to(torch.float16)
    check(q, k, v)
    s = torch.einsum("bhnk,bhnv->bhkv", k.double(), v.double()) / k.shape[2]
    assert s.abs().max() > 65504


def test_eps_is_used():
    gen = make_gen()
    q = features(1, 1, 20, 16, dtype=torch.float32, gen=gen) * 1e-3
    k = features(1, 1, 20, 16, dtype=torch.float32, gen=gen) * 1e-3
    v = values(1, 1, 20, 16, dtype=torch.float32, gen=gen)
    check(q, k, v, eps=1e-4)


def test_deterministic():
    gen = make_gen()
    q = features(2, 2, 100, 64, dtype=torch.bfloat16, gen=gen).requires_grad_()
    k = features(2, 2, 130, 64, dtype=torch.bfloat16, gen=gen).requires_grad_()
    v = values(2, 2, 130, 64, dtype=torch.bfloat16, gen=gen).requires_grad_()
    runs = []
    for _ in range(2):
        out = linear_attention_triton(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        runs.append((out, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dispatch_routes_to_triton(monkeypatch):
    gen = make_gen()
    q = features(1, 1, 10, 16, dtype=torch.float32, gen=gen)
    k = features(1, 1, 10, 16, dtype=torch.float32, gen=gen)
    v = values(1, 1, 10, 16, dtype=torch.float32, gen=gen)
    calls = []
    original = linear_triton.linear_attention_triton

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(linear_triton, "linear_attention_triton", spy)
    out = kernels.linear_attention(q, k, v, eps=1e-6, backend="triton")
    assert len(calls) == 1
    ref = linear_attention_reference(q.double(), k.double(), v.double(), 1e-6)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize(
    "shapes, dtype, match",
    [
        (((1, 1, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16)), torch.float64, "dtype"),
        (((1, 1, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16)), torch.int32, "dtype"),
        (((1, 8, 16), (1, 8, 16), (1, 8, 16)), torch.float32, "4-D"),
        (((1, 1, 8, 16), (1, 1, 8, 32), (1, 1, 8, 16)), torch.float32, "head dim"),
        (((1, 1, 8, 16), (1, 1, 8, 16), (1, 1, 9, 16)), torch.float32, "same length"),
        (((1, 2, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16)), torch.float32, r"\(B, H\)"),
        (((1, 1, 8, 16), (1, 1, 0, 16), (1, 1, 0, 16)), torch.float32, "at least one token"),
        (((1, 1, 8, 512), (1, 1, 8, 512), (1, 1, 8, 16)), torch.float32, "head dims"),
        (((1, 1, 8, 16), (1, 1, 8, 16), (1, 1, 8, 256)), torch.float32, "head dims"),
        (((1, 1, 8, 256), (1, 1, 8, 256), (1, 1, 8, 128)), torch.float32, "fp32"),
    ],
)
def test_bad_inputs_raise(shapes, dtype, match):
    q, k, v = (torch.ones(s, device=DEVICE).to(dtype) for s in shapes)
    with pytest.raises(ValueError, match=match):
        linear_attention_triton(q, k, v)


def test_mixed_dtypes_raise():
    q = torch.ones(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one dtype"):
        linear_attention_triton(q, q.half(), q)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(linear_triton, "triton_interpreter_enabled", lambda: False)
    q = torch.ones(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="CUDA"):
        linear_attention_triton(q, q, q)


# ----------------------------------------------------------------- GPU, real sizes


@needs_cuda
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_gpu_real_size_bf16(head_dim):
    """Every head dim at a real token count that is not a multiple of the blocks."""
    gen = make_gen()
    B, H, L = 2, 4, 5000
    q = features(B, H, L, head_dim, dtype=torch.bfloat16, gen=gen)
    k = features(B, H, L, head_dim, dtype=torch.bfloat16, gen=gen)
    v = values(B, H, L, head_dim, dtype=torch.bfloat16, gen=gen)
    check(q, k, v)


@needs_cuda
@pytest.mark.parametrize(
    "B, H, M, N, dk, dv, dtype",
    [
        (1, 24, 4096, 4096, 128, 128, torch.bfloat16),  # flux-1k
        (1, 24, 4096, 4096 + 512, 128, 128, torch.bfloat16),  # image queries, [text | image] keys
        (2, 8, 16384, 16384, 40, 40, torch.float16),  # SD1.5 1K
        (2, 10, 4096, 4096, 64, 64, torch.float16),
        (1, 4, 8192, 8192, 256, 128, torch.bfloat16),  # hedgehog
        (1, 4, 3000, 3001, 256, 128, torch.float16),  # hedgehog, fp16
        (1, 4, 4096, 4096, 80, 80, torch.float32),
    ],
)
def test_gpu_real_shapes(B, H, M, N, dk, dv, dtype):
    gen = make_gen()
    q = features(B, H, M, dk, dtype=dtype, gen=gen)
    k = features(B, H, N, dk, dtype=dtype, gen=gen)
    v = values(B, H, N, dv, dtype=dtype, gen=gen)
    check(q, k, v)


@needs_cuda
def test_gpu_fp16_large_n_no_overflow():
    """N = 262144 keys of magnitude ~1: raw fp16 sums would overflow (> 65504).

    v is zero-mean: with a large common offset in v and N this large, every output row
    is nearly mean(v), and dq becomes a difference of two nearly equal terms that any
    16-bit copy of the state cannot resolve (see benchmarks/NOTES_linear.md).
    """
    gen = make_gen()
    q = features(1, 2, 262144, 64, dtype=torch.float16, gen=gen)
    k = features(1, 2, 262144, 64, dtype=torch.float16, gen=gen)
    v = values(1, 2, 262144, 64, dtype=torch.float16, gen=gen)
    check(q, k, v)


@needs_cuda
def test_gpu_fp16_state_beyond_fp16_range_large():
    gen = make_gen()
    q = features(1, 2, 8192, 128, dtype=torch.float16, gen=gen)
    k = features(1, 2, 65536, 128, dtype=torch.float16, gen=gen, scale=300.0)
    v = (2 * (k.float() - 300)).to(torch.float16)
    check(q, k, v)


# ------------------------------------------------------------------ state / apply entry points


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(40, 40), (72, 72), (128, 64)], ids=["d40", "d72", "dk128-dv64"])
def test_state_and_apply_match_reference(dtype, dims):
    """linear_state_triton / linear_apply_triton against float64, and a state combined from two
    halves (what context parallelism does) equals the whole sequence's attention."""
    from linfusion.kernels.linear_reference import linear_attention_state
    from linfusion.kernels.linear_triton import linear_apply_triton, linear_state_triton

    dk, dv = dims
    gen = make_gen()
    B, H, M, N = 2, 3, 37, 53  # odd lengths, batch > 1
    q = features(B, H, M, dk, dtype=dtype, gen=gen)
    k = features(B, H, N, dk, dtype=dtype, gen=gen)
    v = values(B, H, N, dv, dtype=dtype, gen=gen)
    kv, k_mean = linear_state_triton(k, v)
    kv_ref, k_mean_ref = linear_attention_state(k.double(), v.double())
    assert kv.dtype == k_mean.dtype == torch.float32 and kv.shape == (B, H, dk, dv) and k_mean.shape == (B, H, dk)
    assert rel_err(kv, kv_ref) < TOL[dtype] and rel_err(k_mean, k_mean_ref) < TOL[dtype]
    # two "ranks": sums of the halves' states, divided by the total count
    n1 = 20
    (kv1, km1), (kv2, km2) = linear_state_triton(k[:, :, :n1], v[:, :, :n1]), linear_state_triton(k[:, :, n1:], v[:, :, n1:])
    kv_all = (kv1 * n1 + kv2 * (N - n1)) / N
    km_all = (km1 * n1 + km2 * (N - n1)) / N
    out = linear_apply_triton(q, kv_all, km_all, 1e-6)
    assert out.dtype == dtype and out.shape == (B, H, M, dv)
    assert rel_err(out, linear_attention_reference(q.double(), k.double(), v.double())) < TOL[dtype]


def test_apply_fp16_large_state_does_not_overflow():
    """A state far above fp16's range (large keys and values) still applies exactly."""
    from linfusion.kernels.linear_reference import linear_attention_apply
    from linfusion.kernels.linear_triton import linear_apply_triton

    gen = make_gen(3)
    q = features(1, 2, 33, 64, dtype=torch.float16, gen=gen)
    kv = torch.randn(1, 2, 64, 64, generator=gen, device=DEVICE) * 3e5  # > fp16 max 65504
    k_mean = torch.rand(1, 2, 64, generator=gen, device=DEVICE) * 10
    out = linear_apply_triton(q, kv, k_mean, 1e-6)
    ref = linear_attention_apply(q.double(), kv.double(), k_mean.double(), 1e-6)
    assert rel_err(out.float(), ref) < TOL[torch.float16]


def test_state_apply_dispatch_and_errors():
    from linfusion.kernels import linear_attention_apply, linear_attention_state

    gen = make_gen(5)
    q = features(1, 2, 9, 40, dtype=torch.float32, gen=gen)
    k = features(1, 2, 11, 40, dtype=torch.float32, gen=gen)
    v = values(1, 2, 11, 40, dtype=torch.float32, gen=gen)
    for backend in ("torch", "triton"):
        kv, km = linear_attention_state(k, v, backend=backend)
        out = linear_attention_apply(q, kv, km, backend=backend)
        assert rel_err(out, linear_attention_reference(q.double(), k.double(), v.double())) < 1e-4
    # gradients needed: backend=None takes the differentiable reference
    kr = k.clone().requires_grad_()
    kv, km = linear_attention_state(kr, v)
    assert kv.requires_grad
    # empty query set is fine; mismatched state shapes are a clear error
    assert linear_attention_apply(q[:, :, :0], kv.detach(), km.detach(), backend="triton").shape == (1, 2, 0, 40)
    from linfusion.kernels.linear_triton import linear_apply_triton

    with pytest.raises(ValueError, match="state shapes"):
        linear_apply_triton(q, kv.detach()[..., :8, :], km.detach())
