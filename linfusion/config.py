"""Patch options: one validated, serialisable dataclass.

Every knob of ``patch_pipeline``/``patch_model`` is a keyword argument that ends up
here. Validation happens before anything in the model changes, so a bad option
never leaves a half-patched model behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Union

METHODS = ("linear", "local")
FEATURE_MAPS = ("elu1", "relu", "hedgehog")
WINDOW_SHAPES = ("circle", "tile")
BACKENDS = (None, "triton", "torch", "fa4")
#: Bumped when the adapter file layout changes incompatibly.
ADAPTER_FORMAT_VERSION = 1

LayerSelector = Union[str, Sequence[str], Callable[[str], bool]]


#: options only one method reads (``methods.build_method``); the rest (layers, dense_fallback, gate,
#: backend) apply to both
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "linear": ("feature_map", "hedgehog_features", "feature_mlp", "mlp_ratio", "conv_v", "conv_kernel", "eps"),
    "local": ("window", "temporal_window", "shape", "tile", "global_pool"),
}


@dataclasses.dataclass
class PatchConfig:
    """What to put in place of softmax self-attention.

    Common:
        method: "linear" (LinFusion / LiT / SANA style) or "local" (CLEAR / sliding-tile style).
        layers: "auto" (default: every self-attention layer, but at inference each layer runs
            dense softmax wherever :mod:`linfusion.crossover` estimates dense to be faster at the
            current resolution, so a patch never makes a user slower), "all", a list of layer
            names, or a predicate ``f(name) -> bool``. Names are module paths inside the denoiser, e.g.
            ``"down_blocks.1.attentions.0.transformer_blocks.0.attn1"``.
        dense_fallback: run dense attention where it is faster (None: only with ``layers="auto"``).
            Stored in adapters; pass ``dense_fallback=False`` to force the replacement everywhere.
        gate: add a learnable score r per layer: ``r·softmax + (1-r)·new``; r starts
            at 1 (pure softmax). Used by selective layer transfer.
        backend: None (Triton on CUDA, PyTorch elsewhere), "triton", "torch", or "fa4" (local tile
            windows through FlashAttention-4 on Hopper/Blackwell, opt-in: ``kernels.local_fa4``).

    ``linear``:
        feature_map: "elu1" (LinFusion), "relu" (SANA/LiT) or "hedgehog" (learnable softmax map).
        hedgehog_features: projected features per sign of the hedgehog map (None: the head dim;
            φ then has twice this many dims, ≤ 256 for the Triton kernel).
        feature_mlp: LinFusion's residual feature MLPs before the q/k projections
            (last layer zero-initialised, so the patch starts as plain ``feature_map``).
        mlp_ratio: hidden width of the feature MLPs relative to the channels
            (None: the family's default, 1 for SD 1.x/2.x, 1/16 otherwise).
        conv_v: add a depthwise convolution of V to the output (LiT), zero-initialised.
        conv_kernel: its spatial kernel size (odd).
        eps: denominator guard of the mean-normalised linear attention.

    ``local``:
        window: radius in latent tokens (int, or one radius per grid dimension).
        temporal_window: radius along time for video (default: ``window``).
        shape: "circle" (exact ellipse) or "tile" (tile-aligned, fastest).
        tile: tile size per grid dimension for ``shape="tile"`` (None: kernel default).
        global_pool: add a down-sampled global K/V branch pooled by this factor
            (learnable pooling initialised to average pooling), or None.
    """

    method: str = "linear"
    layers: LayerSelector = "auto"
    dense_fallback: bool | None = None
    gate: bool = False
    backend: str | None = None
    # linear
    feature_map: str = "elu1"
    hedgehog_features: int | None = None
    feature_mlp: bool = True
    mlp_ratio: float | None = None
    conv_v: bool = False
    conv_kernel: int = 5
    eps: float = 1e-6
    # local
    window: int | tuple[int, ...] = 16
    temporal_window: int | None = None
    shape: str = "circle"
    tile: tuple[int, ...] | None = None
    global_pool: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "fa4" and self.method != "local":
            raise ValueError('backend="fa4" (FlashAttention-4 block-sparse kernels) serves method="local" with '
                             f'shape="tile" only, got method={self.method!r}; use None, "triton" or "torch"')
        if isinstance(self.layers, str):
            if self.layers not in ("auto", "all"):
                raise ValueError(f"layers must be 'auto', 'all', a list of names or a predicate, got {self.layers!r}")
        elif not callable(self.layers):
            names = list(self.layers)
            if not names or not all(isinstance(n, str) for n in names):
                raise ValueError("layers given as a list must be a non-empty list of module names")
            self.layers = names
        if self.dense_fallback is None:
            self.dense_fallback = self.layers == "auto"
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if self.hedgehog_features is not None:
            if self.feature_map != "hedgehog":
                raise ValueError(f"hedgehog_features applies to feature_map='hedgehog', not {self.feature_map!r}")
            if int(self.hedgehog_features) != self.hedgehog_features or self.hedgehog_features < 1:
                raise ValueError(f"hedgehog_features must be a positive integer, got {self.hedgehog_features!r}")
            self.hedgehog_features = int(self.hedgehog_features)
        if self.mlp_ratio is not None and not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be a positive odd integer, got {self.conv_kernel}")
        if not (self.eps > 0):
            raise ValueError(f"eps must be > 0, got {self.eps}")
        radii = self.window if isinstance(self.window, (tuple, list)) else (self.window,)
        if not radii or any(not isinstance(r, (int, float)) or not r > 0 for r in radii):
            raise ValueError(f"window must be a positive radius or a tuple of positive radii, got {self.window!r}")
        if isinstance(self.window, list):
            self.window = tuple(self.window)
        if self.temporal_window is not None and not self.temporal_window > 0:
            raise ValueError(f"temporal_window must be > 0, got {self.temporal_window}")
        if self.shape not in WINDOW_SHAPES:
            raise ValueError(f"shape must be one of {WINDOW_SHAPES}, got {self.shape!r}")
        if self.backend == "fa4" and self.shape != "tile":
            raise ValueError(f'backend="fa4" serves tile windows only (shape="tile"), got shape={self.shape!r}')
        if self.tile is not None:
            self.tile = tuple(int(t) for t in self.tile)
            if any(t <= 0 for t in self.tile):
                raise ValueError(f"tile sizes must be positive, got {self.tile}")
        if self.global_pool is not None and (int(self.global_pool) != self.global_pool or self.global_pool < 2):
            raise ValueError(f"global_pool must be an integer >= 2 or None, got {self.global_pool}")

    def radii(self, ndim: int) -> tuple[float, ...]:
        """Window radius per grid dimension for a 2D (H, W) or 3D (T, H, W) grid."""
        if isinstance(self.window, tuple):
            if len(self.window) != ndim:
                raise ValueError(f"window {self.window} has {len(self.window)} radii but the token grid has {ndim} dims")
            return tuple(float(r) for r in self.window)
        spatial = (float(self.window),) * 2
        if ndim == 2:
            return spatial
        return (float(self.temporal_window or self.window),) + spatial

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict. A predicate ``layers`` is stored as the names it selected (see adapter)."""
        data = dataclasses.asdict(self)
        if callable(self.layers):
            data["layers"] = "<predicate>"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown patch options {sorted(unknown)}; known options: {sorted(known)}")
        data = dict(data)
        for key in ("window", "tile"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_kwargs(cls, **options: Any) -> PatchConfig:
        """Build from user keyword arguments with a helpful error for typos and for an option of
        the other method (``METHOD_OPTIONS``: it would be ignored, so it is a mistake)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; supported options: {sorted(known)}")
        method = options.get("method", cls.method)
        if method in METHOD_OPTIONS:
            misplaced = sorted(k for m, names in METHOD_OPTIONS.items() if m != method for k in names if k in options)
            if misplaced:
                raise ValueError(f"option(s) {misplaced} do not apply to method={method!r} (its own options: "
                                 f"{list(METHOD_OPTIONS[method])}); did you mean the other method?")
        return cls(**options)

