"""Cross-rank forms of the attention methods, run on one rank's slice of image tokens.

What crosses ranks per layer (B batch, H heads, D head dim, T text tokens):

* ``linear``: one all-reduce of the fp32 state ``Σ φ(K)ᵀV`` and key sum ``Σ φ(K)``,
  ``B·H·(Dk·Dv + Dk)`` floats (LASP-2's observation: independent of the resolution).
  Each rank sums its own image keys (rank 0 adds the replicated text keys once),
  and the sum is divided by the global token count, so the mean-normalised
  output equals the single-process one up to the order of the reduction.
* ``local``: the halo: rows of K and V within the window's reach along the split
  axis, from the neighbours that own them (point-to-point); the kernel then runs on
  ``[text | halo-extended box]`` and the owned rows are kept. Tile windows use the
  tile-aligned reach, and the split is tile-aligned.
* text queries (joint attention): exact softmax over all keys by log-sum-exp
  combination: all-reduce (max) of the per-rank row maxima, then all-reduce (sum)
  of numerators and denominators: ``B·H·T·(D+2)`` floats, independent of the resolution.
* dense layers (unpatched, or the softmax branch of a gate): all-gather of image K/V.

The fast kernels are used unchanged: the state reduction and the halo exchange wrap
around them. (For ``linear`` the state is computed with the reference einsum,
O(N·D²), because the Triton module does not expose separate state/apply kernels.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels import local_attention
from ..kernels.linear_reference import accumulation_dtype, linear_attention_apply
from ..kernels.local_reference import default_tile, normalize_window, tile_radius
from ..methods.base import QKV, AttentionMethod
from . import comm
from .split import ContextParallelError, Shard

#: key chunk of the text-query softmax (bounds the T×keys score matrix)
TEXT_KEY_CHUNK = 16384


def text_attention(shard: Shard, txt: QKV | None, img_k: torch.Tensor, img_v: torch.Tensor) -> torch.Tensor | None:
    """Exact softmax of the (replicated) text queries over text keys and every rank's image keys."""
    if txt is None:
        return None
    acc = accumulation_dtype(txt.q.dtype)
    q = txt.q.to(acc) * (1.0 / math.sqrt(txt.q.shape[-1]))
    keys = [(img_k, img_v)] + ([(txt.k, txt.v)] if shard.rank == 0 else [])  # text keys counted once
    b, h, t, _ = q.shape
    m = torch.full((b, h, t), float("-inf"), dtype=acc, device=q.device)
    for k, _v in keys:
        for s in range(0, k.shape[2], TEXT_KEY_CHUNK):
            m = torch.maximum(m, torch.einsum("bhtd,bhnd->bhtn", q, k[:, :, s : s + TEXT_KEY_CHUNK].to(acc)).amax(-1))
    comm.all_reduce(shard.cp, m, op="max", kind="text_softmax")
    dv = img_v.shape[-1]
    packed = torch.zeros(b, h, t, dv + 1, dtype=acc, device=q.device)
    for k, v in keys:
        for s in range(0, k.shape[2], TEXT_KEY_CHUNK):
            scores = torch.einsum("bhtd,bhnd->bhtn", q, k[:, :, s : s + TEXT_KEY_CHUNK].to(acc))
            p = torch.exp(scores - m.unsqueeze(-1))
            packed[..., :dv] += p @ v[:, :, s : s + TEXT_KEY_CHUNK].to(acc)
            packed[..., dv] += p.sum(-1)
    comm.all_reduce(shard.cp, packed, kind="text_softmax")
    return (packed[..., :dv] / packed[..., dv:]).to(txt.q.dtype)


def dense(shard: Shard, img: QKV, txt: QKV | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact softmax attention of this rank's image queries (and the text queries) over all keys."""
    sizes = [shard.split.tokens(r) for r in range(shard.world)]
    kv = torch.stack([img.k, img.v])  # (2, B, H, N_local, D): one message
    gathered = torch.cat(comm.all_gather(shard.cp, kv, sizes, dim=3, kind="dense_kv"), dim=3)
    keys, values = gathered[0], gathered[1]
    if txt is not None:
        keys, values = torch.cat([txt.k, keys], dim=2), torch.cat([txt.v, values], dim=2)
        queries = torch.cat([txt.q, img.q], dim=2)
    else:
        queries = img.q
    out = F.scaled_dot_product_attention(queries, keys, values)
    if txt is None:
        return out, None
    n_txt = txt.q.shape[2]
    return out[:, :, n_txt:], out[:, :, :n_txt]


def linear(shard: Shard, method, img: QKV, txt: QKV | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:class:`~linfusion.methods.linear.LinearAttention` with the state all-reduced across ranks."""
    phi_q, phi_k = method.feature_map(img.q), method.feature_map(img.k)
    acc = accumulation_dtype(phi_q.dtype)
    kv = torch.einsum("bhnk,bhnv->bhkv", phi_k.to(acc), img.v.to(acc))
    k_sum = phi_k.to(acc).sum(dim=2)
    n_total = shard.n_global
    if txt is not None:
        n_total += txt.k.shape[2]
        if shard.rank == 0:  # replicated text keys join the sum once
            phi_kt = method.feature_map(txt.k).to(acc)
            kv = kv + torch.einsum("bhnk,bhnv->bhkv", phi_kt, txt.v.to(acc))
            k_sum = k_sum + phi_kt.sum(dim=2)
    dk, dv = kv.shape[-2:]
    packed = torch.cat([kv.flatten(-2), k_sum], dim=-1).contiguous()  # one all-reduce per layer
    comm.all_reduce(shard.cp, packed, kind="linear_state")
    packed = packed / n_total
    kv, k_mean = packed[..., : dk * dv].unflatten(-1, (dk, dv)), packed[..., dk * dv :]
    out_img = linear_attention_apply(phi_q, kv, k_mean, method.eps)
    if method.conv is not None:
        reach = method.conv.kernel // 2 if shard.axis >= len(shard.global_grid) - 2 else 0  # frames: no halo
        v_ext, ext_grid, offset = shard.halo(img.v, dim=2, before=reach, after=reach, kind="conv_halo")
        out_img = out_img + shard.crop(method.conv(v_ext, ext_grid), 2, ext_grid, offset)
    return out_img, text_attention(shard, txt, img.k, img.v)


def local_reach(shard: Shard, method) -> int:
    """Rows of K/V needed beyond the owned box along the split axis (tile-aligned for tile windows)."""
    grid = shard.global_grid
    radii = normalize_window(method.radii_for(grid), len(grid))
    r = radii[shard.axis]
    if method.shape == "tile":
        tile = tuple(method.tile or default_tile(len(grid)))
        return tile_radius(radii, tile, grid)[shard.axis] * tile[shard.axis]
    return grid[shard.axis] if math.isinf(r) else math.floor(r)


def local(shard: Shard, method, img: QKV, txt: QKV | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:class:`~linfusion.methods.local.LocalAttention` on the halo-extended box of this rank."""
    if method.pool is not None:
        raise ContextParallelError(
            "local attention with global_pool is not supported under context parallelism (pooling windows "
            "straddle rank boundaries); patch without global_pool"
        )
    reach = local_reach(shard, method)
    kv = torch.stack([img.k, img.v])  # (2, B, H, N, D): one halo message per neighbour
    kv_ext, ext_grid, offset = shard.halo(kv, dim=3, before=reach, after=reach)
    # queries outside the owned rows are never kept: zeros are enough
    q_ext = img.q.new_zeros(kv_ext.shape[1:])
    q_ext = shard_uncrop(shard, img.q, q_ext, ext_grid, offset)
    n_txt = 0 if txt is None else txt.q.shape[2]
    q, k, v = q_ext, kv_ext[0], kv_ext[1]
    if txt is not None:
        q, k, v = (torch.cat([t, x], dim=2) for t, x in zip(txt, (q, k, v)))
    grid = shard.global_grid
    out = local_attention(
        q, k, v, ext_grid, method.radii_for(grid), text_len=n_txt,
        shape=method.shape, tile=method.tile, backend=method.backend,
    )
    out_img = shard.crop(out[:, :, n_txt:], 2, ext_grid, offset)
    return out_img, text_attention(shard, txt, img.k, img.v)


def shard_uncrop(shard: Shard, owned: torch.Tensor, ext: torch.Tensor, ext_grid, offset: int) -> torch.Tensor:
    """Write the owned rows into an extended-box tensor (the inverse of :meth:`Shard.crop`)."""
    box = ext.unflatten(2, tuple(ext_grid))
    rows = shard.bounds[1] - shard.bounds[0]
    box.narrow(2 + shard.axis, offset, rows).copy_(owned.unflatten(2, shard.local_grid))
    return box.flatten(2, 2 + len(ext_grid) - 1)


def method_forward(shard: Shard, method: AttentionMethod, img: QKV, txt: QKV | None, grid):
    """Dispatch a method to its cross-rank form (``grid`` is this rank's local grid)."""
    name = getattr(method, "name", "")
    if name == "linear":
        return linear(shard, method, img, txt)
    if name == "local":
        return local(shard, method, img, txt)
    if name == "dense":
        return dense(shard, img, txt)
    raise ContextParallelError(f"attention method {name!r} has no context-parallel form")


class DenseAttention(AttentionMethod):
    """Exact softmax for layers left dense while the model runs context parallel.

    Installed by :func:`~linfusion.parallel.enable_context_parallel` on self-attention
    layers that LinFusion did not patch, so their keys/values are gathered across ranks.
    """

    name = "dense"

    def forward(self, img: QKV, txt: QKV | None, grid):
        from ..methods.base import dense_attention

        return dense_attention(img, txt)
