"""The public kernel API refuses inputs the references cannot compute exactly, by name, on every
backend (the references used to truncate integer results, and to fail inside einsum)."""

import pytest
import torch

from linfusion.kernels import linear_attention, linear_attention_state, local_attention, rotary_embedding


def _qkv(L=16 + 64, D=8, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.rand(1, 2, L, D).to(dtype), torch.rand(1, 2, L, D).to(dtype), torch.randn(1, 2, L, D).to(dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_inputs_are_refused(dtype):
    q, k, v = _qkv()
    bad = v.to(dtype)
    with pytest.raises(TypeError, match=f"v has dtype {dtype}"):
        local_attention(q, k, bad, grid=(8, 8), window=2, text_len=16, backend="torch")
    with pytest.raises(TypeError, match=f"v has dtype {dtype}"):
        linear_attention(q, k, bad, backend="torch")
    with pytest.raises(TypeError, match=f"x has dtype {dtype}"):
        rotary_embedding(torch.ones(1, 4, 2, 8, dtype=dtype), torch.ones(4, 8), torch.zeros(4, 8), backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_inputs_still_pass(dtype):
    q, k, v = _qkv(dtype=dtype)
    assert local_attention(q, k, v, grid=(8, 8), window=2, text_len=16, backend="torch").dtype == dtype
    assert linear_attention(q, k, v, backend="torch").dtype == dtype


def test_linear_shape_mismatches_name_the_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q and k must have the same head dim Dk; got q \(1, 2, 80, 8\), k \(1, 2, 80, 4\)"):
        linear_attention(q, k[..., :4], v, backend="torch")
    with pytest.raises(ValueError, match="k and v must have the same length"):
        linear_attention(q, k, v[:, :, :40], backend="torch")
    with pytest.raises(ValueError, match="k and v must hold at least one token"):
        linear_attention_state(k[:, :, :0], v[:, :, :0], backend="torch")
    with pytest.raises(ValueError, match=r"must share \(B, H\)"):
        linear_attention(q, k[:, :1], v[:, :1], backend="torch")
    with pytest.raises(ValueError, match="expected 4-D"):
        linear_attention(q[0], k[0], v[0], backend="torch")
    # queries of another length and values of another width are the API's own cases, not errors
    assert linear_attention(q[:, :, :5], k, v[..., :3], backend="torch").shape == (1, 2, 5, 3)
