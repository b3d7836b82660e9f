"""When does the patched attention beat dense? A small roofline cost model.

Attention replacement only pays when a layer's dense softmax costs more than the
replacement *and everything the replacement adds* (feature maps, LinFusion's feature
MLPs, text-query softmax, concatenations, a few extra kernel launches). At 1K on FLUX
the dense layer is ~0.4 ms and the overheads are of the same order; at 4K dense is
~86 ms and the replacement ~1 ms. This module says which side of that line a layer is
on, per device class, so ``layers="auto"`` can keep dense attention where it is faster.

The model (one formula per GPU kernel the method runs)::

    time = max(flops / throughput, bytes / bandwidth) / wave_efficiency + launch

* dense: FlashAttention-style SDPA, ``4·B·H·M·K·D`` FLOPs over ``L = text + image`` tokens,
  at ``dense_tflops`` (cuDNN on Hopper) scaled by a head-dim factor.
* linear: the two-pass kernel reads q, k, v and writes o once (``bytes / bandwidth``), plus
  ``4·B·H·L·Dk·Dv`` FLOPs; a fixed ``linear_launch_us`` (two passes and a reduction); the
  feature map and concatenations are memory-bound element-wise passes; text queries keep
  a softmax over every key (a small SDPA).
* local: image queries visit the tile window (``keys_per_query``) and every text key at
  ``local_tile_tflops`` (``shape="tile"``) or ``local_circle_tflops`` (``"circle"``: same
  key tiles, per-token masks on the edge tiles; on the H200 about 1.2-1.35x the tile time).
* patched layer extras (:func:`patched_layer_ms`): LinFusion's feature MLPs (two GEMMs of
  ``C×m`` plus norms), LiT's depthwise conv, the hedgehog map, the global pooled branch,
  and for ``gate=True`` the dense branch too; plus a fixed per-layer ``layer_overhead_us``
  per method, fitted to measured end-to-end steps (``benchmarks/crossover_vs_e2e.py --fit``):
  at 1K the kernels are tiny and what decides is this fixed cost, which kernel benchmarks
  cannot see (SDXL at 1024² with every layer linear measured 88 ms a step slower than dense
  while the kernel-level terms predicted +4 ms).

``wave_efficiency`` accounts for the last partial wave of thread blocks on ``sms``
multiprocessors (matters for small grids). Constants live in ``crossover_profiles.json``
(one profile per device class: ``cuda-sm90`` from the H200 measurements in the project's
reference notes, ``cuda-default`` for other GPUs, ``cpu`` measured with the PyTorch
references); ``benchmarks/calibrate_crossover.py`` re-fits them from kernel benchmarks.
A patch "pays off" when dense is at least ``margin`` times slower than the patched layer:
the model is approximate, and a user must never be made slower.

Public API: :func:`estimate_attention_ms`, :func:`patched_layer_ms`,
:func:`patched_pays_off`, :func:`crossover_tokens`, :func:`window_keys`,
:func:`profile_for`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import PatchConfig

PROFILES_PATH = Path(__file__).with_name("crossover_profiles.json")
#: environment variable naming a JSON file whose profiles replace the shipped ones
PROFILES_ENV = "LINFUSION_CROSSOVER_PROFILES"
KINDS = ("dense", "linear", "local")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Effective throughputs and fixed costs of one device class (see module docstring)."""

    name: str
    dense_tflops: float
    linear_tflops: float
    local_tile_tflops: float
    local_circle_tflops: float
    gemm_tflops: float
    bandwidth_tbps: float
    launch_us: float
    linear_launch_us: float
    local_launch_us: float
    linear_bw_efficiency: float = 1.0
    sms: int = 0
    block_m: int = 128
    head_dim_scale: dict[str, float] = dataclasses.field(default_factory=dict)
    dtype_scale: dict[str, float] = dataclasses.field(default_factory=dict)
    local_visits_all_keys: bool = False
    #: fixed cost per patched layer and call, per method ("linear", "local"), in µs: the patched
    #: processor's host-side work and small kernels, invisible to kernel benchmarks; it decides
    #: the crossover at small sizes. Fitted to end-to-end rows by benchmarks/crossover_vs_e2e.py.
    layer_overhead_us: dict[str, float] = dataclasses.field(default_factory=dict)
    margin: float = 1.0
    #: the local kernels (Triton) compute at the head dim padded to a power of two, so a head dim
    #: between two powers costs what the padded one costs (see :meth:`local_compute_scale`)
    local_pads_head_dim: bool = False
    source: str = ""

    def compute_scale(self, head_dim: int, dtype: torch.dtype) -> float:
        """Throughput multiplier for a head dim (nearest listed dim at or below) and a dtype."""
        scale = 1.0
        if self.head_dim_scale:
            dims = sorted(int(d) for d in self.head_dim_scale)
            below = [d for d in dims if d <= head_dim] or dims[:1]
            scale = self.head_dim_scale[str(below[-1])]
        return scale * self.dtype_scale.get(str(dtype).removeprefix("torch."), 1.0)

    def local_compute_scale(self, head_dim: int, dtype: torch.dtype) -> float:
        """:meth:`compute_scale` of the local kernels. With ``local_pads_head_dim`` the useful
        throughput is the padded dim's times ``head_dim / padded``. On the H200 (16th and 17th
        sessions, 4K grids, forward) head dims 72, 80 and 96 reached about 0.54, 0.64 and 0.76 of
        head dim 128's useful rate with the tile window (circles 0.48, 0.60, 0.73), against 0.56,
        0.63 and 0.75 from this rule; the nearest listed dim below (64: 0.75) had made PixArt-Σ's
        72 look 1.4x cheaper than it is."""
        if not self.local_pads_head_dim:
            return self.compute_scale(head_dim, dtype)
        padded = max(16, 1 << (int(head_dim) - 1).bit_length())
        return self.compute_scale(padded, dtype) * head_dim / padded


@functools.lru_cache(maxsize=4)
def _load_profiles(path: str) -> dict[str, DeviceProfile]:
    with open(path) as f:
        data = json.load(f)
    fields = {f.name for f in dataclasses.fields(DeviceProfile)}
    return {
        name: DeviceProfile(name=name, **{k: v for k, v in values.items() if k in fields and k != "name"})
        for name, values in data["profiles"].items()
    }


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, DeviceProfile]:
    """Profiles from ``path``, else ``$LINFUSION_CROSSOVER_PROFILES``, else the shipped JSON."""
    return dict(_load_profiles(str(path or os.environ.get(PROFILES_ENV) or PROFILES_PATH)))


def device_class(device: torch.device | str) -> str:
    """``"cuda-sm90"`` for Hopper (H100/H200), ``"cuda-default"`` for other GPUs, ``"cpu"``."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and torch.cuda.is_available():
        if torch.cuda.get_device_capability(device) == (9, 0):
            return "cuda-sm90"
    return "cuda-default"


def profile_for(device: torch.device | str, profile: DeviceProfile | str | None = None) -> DeviceProfile:
    """The profile to use: an explicit one (object or name), else the device's class."""
    if isinstance(profile, DeviceProfile):
        return profile
    profiles = load_profiles()
    name = profile or device_class(device)
    if name not in profiles:
        raise KeyError(f"no crossover profile {name!r}; known: {sorted(profiles)}")
    return profiles[name]


# --------------------------------------------------------------------------------------------
# One kernel
# --------------------------------------------------------------------------------------------


def _elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _kernel_ms(p: DeviceProfile, flops: float, nbytes: float, tflops: float, launch_us: float, ctas: int = 0) -> float:
    """Roofline time of one kernel in ms, with wave quantisation over ``ctas`` thread blocks."""
    t = max(flops / (tflops * 1e12), nbytes / (p.bandwidth_tbps * 1e12))
    if ctas and p.sms:
        waves = math.ceil(ctas / p.sms)
        t /= ctas / (waves * p.sms)
    return t * 1e3 + launch_us * 1e-3


def _elementwise_ms(p: DeviceProfile, nbytes: float, launches: int = 1) -> float:
    """Memory-bound element-wise work (feature maps, concatenations, residual adds)."""
    return nbytes / (p.bandwidth_tbps * 1e12) * 1e3 + launches * p.launch_us * 1e-3


def _sdpa_ms(p: DeviceProfile, b: int, h: int, m: int, k: int, d: int, dtype: torch.dtype) -> float:
    """Dense softmax attention of m queries over k keys (FlashAttention-style, one kernel)."""
    if m <= 0:
        return 0.0
    flops = 4.0 * b * h * m * k * d
    nbytes = _elem_bytes(dtype) * b * h * d * (2 * m + 2 * k)
    ctas = b * h * math.ceil(m / p.block_m)
    return _kernel_ms(p, flops, nbytes, p.dense_tflops * p.compute_scale(d, dtype), p.launch_us, ctas)


def estimate_attention_ms(
    kind: str,
    *,
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    text_len: int = 0,
    keys_per_query: int | None = None,
    feature_dim: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    shape: str = "tile",
    profile: DeviceProfile | str | None = None,
) -> float:
    """Estimated forward time (ms) of one attention layer's core.

    Args:
        kind: "dense" (softmax over all ``text_len + tokens`` tokens), "linear" or "local".
        batch, heads, head_dim: the layer's layout (batch includes the CFG doubling).
        tokens: image (or video) tokens; ``text_len`` joint-attention text tokens beside them.
        keys_per_query: local only: image keys each image query visits (see :func:`window_keys`).
        feature_dim: linear only: feature-mapped q/k width (default ``head_dim``; hedgehog 2×).
        dtype, device: pick the throughput (``device`` selects the profile).
        shape: local only: "tile" or "circle".
        profile: override the device's profile (a :class:`DeviceProfile` or a profile name).

    "linear" includes the feature map, the text/image concatenations and the text queries'
    softmax; "local" includes the [text | image] concatenation. Neither includes the extras
    of :func:`patched_layer_ms` (feature MLPs, conv, gate).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if min(batch, heads, tokens, head_dim) <= 0 or text_len < 0:
        raise ValueError("batch, heads, tokens and head_dim must be positive and text_len >= 0")
    p = profile_for(device, profile)
    b, h, n, t, d = batch, heads, tokens, text_len, head_dim
    total = n + t
    e = _elem_bytes(dtype)
    if kind == "dense":
        return _sdpa_ms(p, b, h, total, total, d, dtype)
    if kind == "linear":
        dk = feature_dim or d
        ms = _elementwise_ms(p, e * b * h * (n + total) * (d + dk), launches=2)  # φ(q), φ(k)
        if t:
            # keys/values of text and image concatenated for the linear sum, and again for the
            # text queries' softmax over every key
            ms += _elementwise_ms(p, 2 * e * b * h * total * (dk + d), launches=2)
            ms += _elementwise_ms(p, 2 * e * b * h * total * 2 * d, launches=2)
            ms += _sdpa_ms(p, b, h, t, total, d, dtype)
        flops = 2.0 * b * h * dk * d * (total + n)  # state Σ kᵀv over keys, apply to queries
        nbytes = e * b * h * (n * dk + total * dk + total * d + n * d)
        tflops = p.linear_tflops * p.dtype_scale.get(str(dtype).removeprefix("torch."), 1.0)
        return ms + _kernel_ms(p, flops, nbytes / p.linear_bw_efficiency, tflops, p.linear_launch_us)
    # local
    if shape not in ("tile", "circle"):
        raise ValueError(f"shape must be 'tile' or 'circle', got {shape!r}")
    if keys_per_query is None:
        raise ValueError("local attention needs keys_per_query (see linfusion.crossover.window_keys)")
    # the reference (CPU) visits every key
    kpq = n if p.local_visits_all_keys else min(int(keys_per_query), n)
    ms = _elementwise_ms(p, 2 * 3 * e * b * h * total * d, launches=3) if t else 0.0  # [text | image]
    flops = 4.0 * b * h * d * (n * (kpq + t) + t * total)
    nbytes = e * b * h * total * d * 4
    rate = p.local_tile_tflops if shape == "tile" else p.local_circle_tflops
    ctas = b * h * math.ceil(total / p.block_m)
    return ms + _kernel_ms(p, flops, nbytes, rate * p.local_compute_scale(d, dtype), p.local_launch_us, ctas)


# --------------------------------------------------------------------------------------------
# A patched layer
# --------------------------------------------------------------------------------------------


def window_keys(config: PatchConfig, grid: Sequence[int]) -> int:
    """Image keys an image query visits under ``config``'s local window on ``grid``.

    The kernels process whole (query tile, key tile) pairs, so both shapes visit the
    tile window: ``Π_d min(g_d, (2·ceil(r_d/t_d) + 1)·t_d)`` (``"circle"`` masks inside it).
    """
    from .kernels.local_reference import default_tile, tile_radius

    grid = tuple(int(g) for g in grid)
    radii = config.radii(len(grid))
    tile = tuple(config.tile) if config.tile else default_tile(len(grid))
    if len(tile) != len(grid):
        raise ValueError(f"tile {tile} does not match the {len(grid)}-D grid {grid}")
    reach = tile_radius(radii, tile, grid)
    return math.prod(min(g, (2 * r + 1) * t) for g, r, t in zip(grid, reach, tile))


def _pooled_tokens(grid: Sequence[int], factor: int) -> int:
    spatial = grid[-2:]
    frames = math.prod(grid[:-2]) if len(grid) > 2 else 1
    return frames * math.ceil(spatial[0] / factor) * math.ceil(spatial[1] / factor)


def patched_layer_ms(
    config: PatchConfig,
    *,
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    text_len: int = 0,
    grid: Sequence[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    channels: int | None = None,
    mlp_ratio: float | None = None,
    profile: DeviceProfile | str | None = None,
) -> float:
    """Estimated forward time (ms) of what a patched layer runs *instead of* the dense SDPA.

    Includes the method's attention (:func:`estimate_attention_ms`) and its extras: feature
    MLPs (``channels`` default ``heads·head_dim``; ``mlp_ratio`` default the config's, else
    1/16 — pass 1.0 for SD 1.x/2.x), LiT's conv of V, hedgehog's map, the pooled global
    branch and, with ``gate=True``, the dense softmax branch and the mix.
    """
    p = profile_for(device, profile)
    b, h, n, t, d = batch, heads, tokens, text_len, head_dim
    e = _elem_bytes(dtype)
    grid = tuple(grid) if grid is not None else (1, n)
    if math.prod(grid) != n:
        raise ValueError(f"grid {grid} holds {math.prod(grid)} tokens, not {n}")
    common = dict(batch=b, heads=h, tokens=n, head_dim=d, text_len=t, dtype=dtype, device=device, profile=p)
    # joint attention: the patched processor splits [text | image] and concatenates the outputs
    extra = _elementwise_ms(p, 2 * e * b * h * (n + t) * d, launches=3) if t else 0.0
    if config.method == "linear":
        hedgehog = config.feature_map == "hedgehog"
        ms = estimate_attention_ms("linear", feature_dim=2 * d if hedgehog else d, **common)
        if hedgehog:  # (B,H,N,D)×(H,D,D) projection and two softmaxes, for q and k
            extra += 2 * _kernel_ms(p, 2.0 * b * h * n * d * d, 0.0, p.gemm_tflops, p.launch_us)
            extra += _elementwise_ms(p, 2 * e * b * h * n * (d + 4 * d), launches=6)
        if config.feature_mlp:
            c = channels or h * d
            ratio = config.mlp_ratio if config.mlp_ratio is not None else (mlp_ratio if mlp_ratio is not None else 1 / 16)
            m = max(1, round(c * ratio))
            per_mlp = 2 * _kernel_ms(p, 2.0 * b * n * c * m, e * b * n * (c + m), p.gemm_tflops, p.launch_us)
            per_mlp += _elementwise_ms(p, e * b * n * (4 * m + 3 * c), launches=3)  # norm, act, residual
            extra += 2 * per_mlp
        if config.conv_v:
            extra += _elementwise_ms(p, 4 * e * b * h * n * d, launches=3)
    else:
        keys = window_keys(config, grid)
        prefix = t
        if config.global_pool:
            pooled = _pooled_tokens(grid, int(config.global_pool))
            prefix += pooled
            extra += _elementwise_ms(p, 2 * e * b * h * n * d, launches=2)  # pool k and v
            if t:  # text queries go through a separate softmax over every key
                extra += _sdpa_ms(p, b, h, t, n + t, d, dtype)
        common["text_len"] = prefix
        ms = estimate_attention_ms("local", keys_per_query=keys, shape=config.shape, **common)
    if config.gate:
        extra += estimate_attention_ms("dense", **{**common, "text_len": t})
        extra += _elementwise_ms(p, 3 * e * b * h * (n + t) * d, launches=3)
    extra += p.layer_overhead_us.get(config.method, 0.0) * 1e-3
    return ms + extra


def patched_pays_off(
    config: PatchConfig,
    *,
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    text_len: int = 0,
    grid: Sequence[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    channels: int | None = None,
    mlp_ratio: float | None = None,
    margin: float | None = None,
    profile: DeviceProfile | str | None = None,
) -> bool:
    """True when the patched layer is estimated at least ``margin``× faster than dense.

    ``margin`` defaults to the profile's (a safety factor for the model's error). Arguments
    as in :func:`patched_layer_ms`; ``grid`` is needed for ``method="local"``.
    """
    p = profile_for(device, profile)
    kw = dict(batch=batch, heads=heads, tokens=tokens, head_dim=head_dim, text_len=text_len, dtype=dtype,
              device=device, profile=p)
    dense = estimate_attention_ms("dense", **kw)
    patched = patched_layer_ms(config, grid=grid, channels=channels, mlp_ratio=mlp_ratio, **kw)
    return dense >= (p.margin if margin is None else margin) * patched


def speedup(config: PatchConfig, **kwargs: Any) -> float:
    """Estimated dense / patched time ratio of one layer (kwargs as :func:`patched_pays_off`)."""
    p = profile_for(kwargs.get("device", "cpu"), kwargs.pop("profile", None))
    kwargs.pop("margin", None)
    grid, channels, ratio = kwargs.pop("grid", None), kwargs.pop("channels", None), kwargs.pop("mlp_ratio", None)
    dense = estimate_attention_ms("dense", profile=p, **kwargs)
    return dense / patched_layer_ms(config, grid=grid, channels=channels, mlp_ratio=ratio, profile=p, **kwargs)


def crossover_tokens(
    config: PatchConfig,
    heads: int,
    head_dim: int,
    *,
    batch: int = 1,
    text_len: int = 0,
    frames: int = 1,
    aspect: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    channels: int | None = None,
    mlp_ratio: float | None = None,
    margin: float | None = None,
    profile: DeviceProfile | str | None = None,
    max_tokens: int = 1 << 22,
) -> int | None:
    """Smallest image-token count where the patched layer pays off (None: never up to ``max_tokens``).

    Grids searched: ``rows × round(rows·aspect)`` (times ``frames`` for video, a 3D grid).
    The cost model is monotonic in the token count, so everything larger pays off too.
    """

    def grid_of(rows: int) -> tuple[int, ...]:
        cols = max(1, round(rows * aspect))
        return (frames, rows, cols) if frames > 1 else (rows, cols)

    def pays(rows: int) -> bool:
        grid = grid_of(rows)
        return patched_pays_off(
            config, batch=batch, heads=heads, tokens=math.prod(grid), head_dim=head_dim, text_len=text_len,
            grid=grid, dtype=dtype, device=device, channels=channels, mlp_ratio=mlp_ratio, margin=margin,
            profile=profile,
        )

    hi = 1
    while math.prod(grid_of(hi)) <= max_tokens and not pays(hi):
        hi *= 2
    if math.prod(grid_of(hi)) > max_tokens:
        return None
    lo = hi // 2  # pays(lo) is False (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pays(mid) else (mid, hi)
    return math.prod(grid_of(hi))


def tokens_to_pixels(tokens: int, pixels_per_token: int, frames: int = 1) -> int:
    """Side in pixels of a square image with ``tokens`` tokens (FLUX/SD3/PixArt: 16 px a token)."""
    return round(math.sqrt(tokens / frames) * pixels_per_token)


__all__ = [
    "DeviceProfile",
    "crossover_tokens",
    "device_class",
    "estimate_attention_ms",
    "load_profiles",
    "patched_layer_ms",
    "patched_pays_off",
    "profile_for",
    "speedup",
    "tokens_to_pixels",
    "window_keys",
]
