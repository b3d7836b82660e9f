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
  combination: each rank attends to its own keys (PyTorch's fused attention with
  log-sum-exp where available, checked once against the fp32 reference), then an
  all-reduce (max) of the log-sum-exps and one (sum) of the weighted outputs and
  weights: ``B·H·T·(D+2)`` floats, independent of the resolution.
* dense layers (unpatched, or the softmax branch of a gate): all-gather of image K/V.

The fast kernels are used unchanged: the state reduction and the halo exchange wrap
around them (``linear`` through the kernels' separate state and apply entry points,
``linear_attention_state`` / ``linear_attention_apply``: Triton on CUDA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels import local_attention
from ..kernels import linear_attention_apply, linear_attention_state
from ..kernels.linear_reference import accumulation_dtype
from ..kernels.local_reference import default_tile, normalize_window, tile_radius
from ..methods.base import QKV, AttentionMethod
from . import comm
from .split import ContextParallelError, Shard

#: key chunk of the text-query softmax (bounds the T×keys score matrix)
TEXT_KEY_CHUNK = 16384


def _partial_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q kᵀ/√D) v, logsumexp) over these keys only, in fp32 chunks (any device, slow)."""
    acc = accumulation_dtype(q.dtype)
    qs = q.to(acc) * (1.0 / math.sqrt(q.shape[-1]))
    b, h, t, _ = q.shape
    m = torch.full((b, h, t), float("-inf"), dtype=acc, device=q.device)
    for s in range(0, k.shape[2], TEXT_KEY_CHUNK):
        m = torch.maximum(m, torch.einsum("bhtd,bhnd->bhtn", qs, k[:, :, s : s + TEXT_KEY_CHUNK].to(acc)).amax(-1))
    num = torch.zeros(b, h, t, v.shape[-1], dtype=acc, device=q.device)
    den = torch.zeros(b, h, t, dtype=acc, device=q.device)
    for s in range(0, k.shape[2], TEXT_KEY_CHUNK):
        p = torch.exp(torch.einsum("bhtd,bhnd->bhtn", qs, k[:, :, s : s + TEXT_KEY_CHUNK].to(acc)) - m.unsqueeze(-1))
        num += p @ v[:, :, s : s + TEXT_KEY_CHUNK].to(acc)
        den += p.sum(-1)
    return num / den.unsqueeze(-1), m + den.log()


def _fused_op(device_type: str):
    """A fused attention op that also returns the log-sum-exp (PyTorch's own kernels), or None."""
    ops = torch.ops.aten
    if device_type == "cuda" and hasattr(ops, "_scaled_dot_product_efficient_attention"):
        def run(q, k, v):
            out, lse = ops._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
            return out, lse[..., : q.shape[2]]  # the LSE may be padded along the queries
        return run
    if device_type == "cpu" and hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        def run(q, k, v):
            out, lse = ops._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
            return out, lse
        return run
    return None


_FUSED_CHECKED: dict[tuple, object] = {}


def _partial_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The fused op for this device/dtype/head dim if it agrees with the reference on a small
    random problem (checked once per process), else None: these are private PyTorch ops."""
    key = (q.device.type, q.dtype, q.shape[-1], v.shape[-1])
    if key not in _FUSED_CHECKED:
        op, verdict = _fused_op(q.device.type), None
        if op is not None:
            gen = torch.Generator(device="cpu").manual_seed(0)
            probe = [torch.randn(1, 2, n, d, generator=gen).to(q.device, q.dtype)
                     for n, d in ((5, q.shape[-1]), (37, q.shape[-1]), (37, v.shape[-1]))]
            try:
                out, lse = op(*probe)
                ref_out, ref_lse = _partial_reference(*probe)
                tol = 1e-4 if q.dtype == torch.float32 else 3e-2
                good = (out.float() - ref_out).norm() <= tol * ref_out.norm() and \
                    (lse.float() - ref_lse).abs().max() <= tol * 10
                verdict = op if bool(good) else None
            except (RuntimeError, TypeError, ValueError):
                verdict = None
        _FUSED_CHECKED[key] = verdict
    return _FUSED_CHECKED[key]


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over these keys only, with its log-sum-exp, both fp32:
    (B, H, T, Dv) and (B, H, T). Fused (tensor cores) where PyTorch provides it, else chunked fp32."""
    if k.shape[2] == 0:  # no keys here: zero weight in the merge
        b, h, t, _ = q.shape
        return (torch.zeros(b, h, t, v.shape[-1], device=q.device),
                torch.full((b, h, t), float("-inf"), device=q.device))
    fused = _partial_fused(q, k, v)
    if fused is not None:
        out, lse = fused(q, k, v)
        return out.float(), lse.float()
    return _partial_reference(q, k, v)


def text_attention(shard: Shard, txt: QKV | None, img_k: torch.Tensor, img_v: torch.Tensor) -> torch.Tensor | None:
    """Exact softmax of the (replicated) text queries over text keys and every rank's image keys:
    each rank attends to its own keys, then the partial results are merged by log-sum-exp."""
    if txt is None:
        return None
    out, lse = partial_attention(txt.q, img_k, img_v)
    if shard.rank == 0:  # the replicated text keys are counted once
        out_t, lse_t = partial_attention(txt.q, txt.k, txt.v)
        top = torch.maximum(lse, lse_t)
        w, w_t = torch.exp(lse - top), torch.exp(lse_t - top)
        out = (out * w.unsqueeze(-1) + out_t * w_t.unsqueeze(-1)) / (w + w_t).unsqueeze(-1)
        lse = top + torch.log(w + w_t)
    m = lse.clone()
    comm.all_reduce(shard.cp, m, op="max", kind="text_softmax")
    weight = torch.exp(lse - m)
    packed = torch.cat([out * weight.unsqueeze(-1), weight.unsqueeze(-1)], dim=-1).contiguous()
    comm.all_reduce(shard.cp, packed, kind="text_softmax")
    dv = img_v.shape[-1]
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
    # local sums Σ φ(k)ᵀv and Σ φ(k) (the kernels return means; × local count), fp32
    kv, k_mean = linear_attention_state(phi_k, img.v, backend=method.backend)
    n_local = phi_k.shape[2]
    kv, k_sum = kv * n_local, k_mean * n_local
    n_total = shard.n_global
    if txt is not None:
        n_total += txt.k.shape[2]
        if shard.rank == 0:  # replicated text keys join the sum once
            kv_t, k_mean_t = linear_attention_state(method.feature_map(txt.k), txt.v, backend=method.backend)
            kv = kv + kv_t * txt.k.shape[2]
            k_sum = k_sum + k_mean_t * txt.k.shape[2]
    dk, dv = kv.shape[-2:]
    packed = torch.cat([kv.flatten(-2), k_sum], dim=-1).contiguous()  # one all-reduce per layer
    comm.all_reduce(shard.cp, packed, kind="linear_state")
    packed = packed / n_total
    kv, k_mean = packed[..., : dk * dv].unflatten(-1, (dk, dv)), packed[..., dk * dv :]
    out_img = linear_attention_apply(phi_q, kv, k_mean, method.eps, backend=method.backend)
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
