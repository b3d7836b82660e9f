"""Each method's math against a direct O(N²) float64 formulation of its definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linfusion.config import PatchConfig
from linfusion.methods import QKV, LinearAttention, LocalAttention, build_method


def rand_qkv(b: int, h: int, n: int, d: int, seed: int) -> QKV:
    g = torch.Generator().manual_seed(seed)
    return QKV(*(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)))


def explicit_linear(q, k, v, eps, phi):
    """O_i = Σ_j A_ij v_j / N / (Σ_j A_ij / N + eps) with the explicit N×N kernel matrix A = φ(Q)φ(K)ᵀ."""
    a = phi(q) @ phi(k).transpose(-1, -2)  # (B, H, M, N)
    n = k.shape[-2]
    return (a @ v / n) / (a.sum(-1, keepdim=True) / n + eps)


def explicit_local_mask(grid, radii, text_len, shape, tile):
    """Visibility by direct loops over token pairs (independent of the library's mask code)."""
    coords = [tuple(c) for c in torch.cartesian_prod(*[torch.arange(g) for g in grid]).reshape(-1, len(grid)).tolist()]
    n = text_len + len(coords)
    mask = torch.ones(n, n, dtype=torch.bool)
    for i, p in enumerate(coords):
        for j, r in enumerate(coords):
            if shape == "circle":
                inside = sum(((a - b) / rad) ** 2 for a, b, rad in zip(p, r, radii)) <= 1.0
            else:
                inside = all(
                    abs(a // t - b // t) <= math.ceil(rad / t) for a, b, rad, t in zip(p, r, radii, tile)
                )
            mask[text_len + i, text_len + j] = inside
    return mask


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "hedgehog"])
@pytest.mark.parametrize("with_text", [False, True])
def test_linear_method_equals_explicit_kernel_matrix(feature_map, with_text):
    heads, d, grid = 2, 8, (3, 5)
    method = LinearAttention(16, heads, d, feature_map=feature_map, eps=1e-3).double()
    img = rand_qkv(2, heads, 15, d, seed=1)
    txt = rand_qkv(2, heads, 4, d, seed=2) if with_text else None
    out_img, out_txt = method(img, txt, grid)
    keys = img.k if txt is None else torch.cat([txt.k, img.k], 2)
    values = img.v if txt is None else torch.cat([txt.v, img.v], 2)
    expected = explicit_linear(img.q, keys, values, 1e-3, method.feature_map)
    torch.testing.assert_close(out_img, expected, rtol=1e-10, atol=1e-12)
    if with_text:  # text queries keep exact softmax over every key
        scores = txt.q @ keys.transpose(-1, -2) / math.sqrt(d)
        torch.testing.assert_close(out_txt, scores.softmax(-1) @ values, rtol=1e-10, atol=1e-12)
    else:
        assert out_txt is None


def test_linear_feature_maps_start_as_documented():
    method = LinearAttention(16, 2, 8, feature_map="hedgehog").double()
    u = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    phi = method.feature_map(u)
    assert phi.shape == (1, 2, 5, 16)
    torch.testing.assert_close(phi[..., :8], u.softmax(-1))  # W starts at the identity
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    xq, xk = method.adapt_inputs(x)
    assert torch.equal(xq, x) and torch.equal(xk, x)  # zero-initialised feature MLPs


def test_hedgehog_with_more_features():
    """hedgehog_features M > D: φ has 2M dims, the method still equals its explicit kernel matrix, and
    the near-identity extra blocks start close to the M = D map's attention (copies would be exact)."""
    heads, d, grid = 2, 8, (3, 5)
    torch.manual_seed(0)
    wide = LinearAttention(16, heads, d, feature_map="hedgehog", hedgehog_features=20, eps=1e-3).double()
    base = LinearAttention(16, heads, d, feature_map="hedgehog", eps=1e-3).double()
    assert wide.hedgehog.weight.shape == (heads, d, 20)
    torch.testing.assert_close(wide.hedgehog.weight[:, :, :d], base.hedgehog.weight)
    img = rand_qkv(2, heads, 15, d, seed=1)
    assert wide.feature_map(img.q).shape == (2, heads, 15, 40)
    out, _ = wide(img, None, grid)
    torch.testing.assert_close(out, explicit_linear(img.q, img.k, img.v, 1e-3, wide.feature_map), rtol=1e-10, atol=1e-12)
    ref, _ = base(img, None, grid)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    # two exact copies (M = 2D): the same attention as M = D (the ratio's scale cancels; eps does not)
    wide.hedgehog.weight = torch.nn.Parameter(torch.cat([base.hedgehog.weight] * 2, dim=2))
    wide.eps = base.eps = 1e-15
    torch.testing.assert_close(wide(img, None, grid)[0], base(img, None, grid)[0], rtol=1e-9, atol=1e-9)


def test_hedgehog_features_option_is_validated():
    from linfusion.config import PatchConfig

    assert PatchConfig(feature_map="hedgehog", hedgehog_features=128).hedgehog_features == 128
    with pytest.raises(ValueError, match="hedgehog_features applies"):
        PatchConfig(feature_map="elu1", hedgehog_features=128)
    with pytest.raises(ValueError, match="positive integer"):
        PatchConfig(feature_map="hedgehog", hedgehog_features=0)


def test_linear_conv_v_adds_depthwise_convolution():
    method = LinearAttention(8, 2, 4, conv_v=True, conv_kernel=3, feature_mlp=False).double()
    img = rand_qkv(1, 2, 12, 4, seed=3)
    base, _ = method(img, None, (3, 4))
    with torch.no_grad():
        method.conv.weight.normal_()
    out, _ = method(img, None, (3, 4))
    v_grid = img.v.permute(0, 1, 3, 2).reshape(1, 8, 3, 4)
    conv = F.conv2d(v_grid, method.conv.weight, padding=1, groups=8).reshape(1, 2, 4, 12).permute(0, 1, 3, 2)
    torch.testing.assert_close(out - base, conv)


@pytest.mark.parametrize(
    "grid,window,shape,tile,text_len",
    [
        ((5, 7), (2.0, 2.0), "circle", None, 0),
        ((5, 7), (1.5, 3.0), "circle", None, 3),
        ((6, 9), (2.0, 4.0), "tile", (2, 4), 2),
        ((3, 4, 5), (1.0, 2.0, 2.0), "circle", None, 2),
        ((3, 4, 5), (1.0, 1.0, 3.0), "tile", (2, 2, 2), 0),
    ],
)
def test_local_method_equals_dense_masked_softmax(grid, window, shape, tile, text_len):
    heads, d = 2, 8
    n_img = math.prod(grid)
    method = LocalAttention(window, shape=shape, tile=tile)
    img = rand_qkv(2, heads, n_img, d, seed=4)
    txt = rand_qkv(2, heads, text_len, d, seed=5) if text_len else None
    out_img, out_txt = method(img, txt, grid)
    full = img if txt is None else QKV(*(torch.cat([t, i], 2) for t, i in zip(txt, img)))
    mask = explicit_local_mask(grid, window, text_len, shape, tile)
    scores = (full.q @ full.k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    expected = scores.softmax(-1) @ full.v
    torch.testing.assert_close(out_img, expected[:, :, text_len:], rtol=1e-10, atol=1e-12)
    if text_len:
        torch.testing.assert_close(out_txt, expected[:, :, :text_len], rtol=1e-10, atol=1e-12)


def test_local_global_pool_branch_equals_dense_formulation():
    grid, heads, d, text_len, factor = (4, 6), 2, 8, 3, 2
    method = LocalAttention((1.0, 1.0), global_pool=factor).double()
    with torch.no_grad():
        method.pool.weight.uniform_(0.1, 0.5)  # a learnt, non-average pooling
    img = rand_qkv(1, heads, 24, d, seed=6)
    txt = rand_qkv(1, heads, text_len, d, seed=7)
    out_img, out_txt = method(img, txt, grid)

    def pooled(x):  # explicit weighted sum over each 2×2 block
        g = x.reshape(1, heads, 4, 6, d)
        out = []
        for by in range(2):
            for bx in range(3):
                block = g[:, :, 2 * by : 2 * by + 2, 2 * bx : 2 * bx + 2]
                out.append(torch.einsum("bhyxd,yx->bhd", block, method.pool.weight.double()))
        return torch.stack(out, 2)

    pk, pv = pooled(img.k), pooled(img.v)
    keys = torch.cat([txt.k, pk, img.k], 2)
    values = torch.cat([txt.v, pv, img.v], 2)
    local = explicit_local_mask(grid, (1.0, 1.0), 0, "circle", None)
    mask = torch.cat([torch.ones(24, text_len + 6, dtype=torch.bool), local], 1)
    scores = (img.q @ keys.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out_img, scores.softmax(-1) @ values, rtol=1e-10, atol=1e-12)
    # text queries see text + image keys, never pooled tokens
    t_keys, t_values = torch.cat([txt.k, img.k], 2), torch.cat([txt.v, img.v], 2)
    expected_txt = (txt.q @ t_keys.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ t_values
    torch.testing.assert_close(out_txt, expected_txt, rtol=1e-10, atol=1e-12)


def test_build_method_follows_config():
    linear = build_method(PatchConfig(method="linear", mlp_ratio=0.5), 32, 2, 16, default_mlp_ratio=1.0)
    assert linear.feature_q.fc_in.out_features == 16
    local = build_method(PatchConfig(method="local", window=4, temporal_window=2), 32, 2, 16, 1.0)
    assert local.radii_for((3, 8, 8)) == (2.0, 4.0, 4.0)
    assert local.radii_for((8, 8)) == (4.0, 4.0)


def test_default_backend_falls_back_when_triton_refuses_the_shape(monkeypatch):
    """backend=None must never raise for a shape only the reference covers (e.g. Dv > 128)."""
    pytest.importorskip("triton")
    from linfusion import kernels
    from linfusion.kernels import linear_triton

    monkeypatch.setattr(kernels, "choose_backend", lambda op, t, backend: "triton")
    q = torch.rand(1, 1, 5, 8)
    v = torch.randn(1, 1, 5, linear_triton.MAX_VALUE_DIM + 1)
    out = kernels.linear_attention(q, q, v)
    torch.testing.assert_close(out, kernels.linear_attention_reference(q, q, v))


def test_circle_windows_take_the_triton_kernel_by_default(monkeypatch):
    """backend=None sends exact circles to the Triton kernel wherever Triton can run (the CUDA
    circle cases pass on an H200: benchmarks/results/gpu_tests_circle.txt)."""
    pytest.importorskip("triton")
    from linfusion import kernels
    from linfusion.kernels import local_triton

    calls = []
    monkeypatch.setattr(kernels, "choose_backend", lambda op, t, backend: "triton")
    monkeypatch.setattr(local_triton, "local_attention_triton", lambda *a, **k: calls.append(a[6]) or a[0])
    q = torch.randn(1, 1, 2 + 20, 16)
    kernels.local_attention(q, q, q, (4, 5), 2, text_len=2, shape="circle")
    assert calls == ["circle"]
