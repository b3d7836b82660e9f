"""How the image/video tokens are split across ranks, and the per-call shard.

The token grid is ``(H, W)`` or ``(T, H, W)``, row-major. Each rank owns a
contiguous range of one grid dimension (the *axis*) with every other dimension
whole, so its tokens form a box: whole rows of an image; whole frames of a video
(or, when there are fewer latent frames than ranks, whole rows of every frame).
The axis is the outermost dimension with at least one unit per rank; the last
dimension (columns) is never split. Sizes may be unequal (the first ranks get one
unit more). A *unit* is one row/frame, or one tile when local attention uses
tile-aligned windows, so that every rank's rows start on a tile boundary.

Text tokens are never split: every rank holds all of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from . import comm


class ContextParallelError(ValueError):
    """The model, its patch or the resolution cannot be run with context parallelism."""


@dataclasses.dataclass(frozen=True)
class GridSplit:
    """Global grid, the split axis and each rank's ``[start, stop)`` along it."""

    grid: tuple[int, ...]
    axis: int
    bounds: tuple[tuple[int, int], ...]

    @property
    def world(self) -> int:
        return len(self.bounds)

    def local_grid(self, rank: int) -> tuple[int, ...]:
        start, stop = self.bounds[rank]
        return self.grid[: self.axis] + (stop - start,) + self.grid[self.axis + 1 :]

    def tokens(self, rank: int) -> int:
        return math.prod(self.local_grid(rank))

    @property
    def n_tokens(self) -> int:
        return math.prod(self.grid)


def choose_split(grid: Sequence[int], world: int, units: Sequence[int] | None = None, axis: int | None = None) -> GridSplit:
    """Split ``grid`` over ``world`` ranks along ``axis`` (None: the outermost that fits).

    Args:
        grid: (H, W) or (T, H, W).
        world: number of ranks.
        units: granularity per dimension (rows per unit; tile sizes for tiled windows).
        axis: force a dimension (not the last one).
    """
    grid = tuple(int(g) for g in grid)
    units = tuple(units or (1,) * len(grid))
    candidates = range(len(grid) - 1) if axis is None else [axis]
    for ax in candidates:
        if not 0 <= ax < len(grid) - 1:
            raise ContextParallelError(f"split axis {ax} must be one of the leading grid dimensions of {grid}")
        n_units = -(-grid[ax] // units[ax])
        if n_units < world:
            continue
        base, extra = divmod(n_units, world)
        bounds, start = [], 0
        for rank in range(world):
            stop = min(grid[ax], start + (base + (rank < extra)) * units[ax])
            bounds.append((start, stop))
            start = stop
        return GridSplit(grid, ax, tuple(bounds))
    what = "the requested axis" if axis is not None else "any leading dimension"
    raise ContextParallelError(
        f"the token grid {grid} is too small to split over {world} ranks along {what} "
        f"(units of {units} tokens); use fewer processes or a larger resolution"
    )


def _box(x: torch.Tensor, dim: int, grid: Sequence[int]) -> torch.Tensor:
    return x.unflatten(dim, tuple(grid))


@dataclasses.dataclass
class Shard:
    """This rank's part of one denoiser call: the split, the rank, the process group."""

    cp: object  # ContextParallel
    split: GridSplit

    @property
    def rank(self) -> int:
        return self.cp.rank

    @property
    def world(self) -> int:
        return self.cp.world

    @property
    def axis(self) -> int:
        return self.split.axis

    @property
    def bounds(self) -> tuple[int, int]:
        return self.split.bounds[self.rank]

    @property
    def global_grid(self) -> tuple[int, ...]:
        return self.split.grid

    @property
    def local_grid(self) -> tuple[int, ...]:
        return self.split.local_grid(self.rank)

    @property
    def n_global(self) -> int:
        return self.split.n_tokens

    @property
    def n_local(self) -> int:
        return self.split.tokens(self.rank)

    # --- the model boundary ---------------------------------------------------------------------

    def take(self, x: torch.Tensor, dim: int, prefix: int = 0) -> torch.Tensor:
        """Keep the ``prefix`` leading (text) tokens and this rank's image tokens along ``dim``.

        ``x`` holds ``prefix + n_global`` tokens along ``dim``, image tokens row-major.
        """
        dim = dim % x.dim()
        if x.shape[dim] != prefix + self.n_global:
            raise ContextParallelError(
                f"expected {prefix} + {self.n_global} tokens along dim {dim}, got {tuple(x.shape)}"
            )
        start, stop = self.bounds
        img = _box(x.narrow(dim, prefix, self.n_global), dim, self.global_grid)
        img = img.narrow(dim + self.axis, start, stop - start).flatten(dim, dim + len(self.global_grid) - 1)
        return img if prefix == 0 else torch.cat([x.narrow(dim, 0, prefix), img], dim=dim)

    def take_box(self, x: torch.Tensor, first_grid_dim: int) -> torch.Tensor:
        """Slice a tensor laid out as a grid (e.g. a patch-embedding output (B, C, T, H, W))."""
        start, stop = self.bounds
        return x.narrow(first_grid_dim + self.axis, start, stop - start)

    def gather(self, x: torch.Tensor, dim: int, kind: str = "gather_output") -> torch.Tensor:
        """All ranks' image tokens along ``dim`` back in global row-major order (every rank gets all)."""
        dim = dim % x.dim()
        ndim = len(self.global_grid)
        sizes = [self.split.tokens(r) for r in range(self.world)]
        pieces = comm.all_gather(self.cp, x, sizes, dim, kind=kind)
        boxes = [_box(p, dim, self.split.local_grid(r)) for r, p in enumerate(pieces)]
        return torch.cat(boxes, dim=dim + self.axis).flatten(dim, dim + ndim - 1)

    # --- inside attention -----------------------------------------------------------------------

    def halo(self, x: torch.Tensor, dim: int, before: int, after: int, kind: str = "halo") -> tuple[torch.Tensor, tuple[int, ...], int]:
        """Extend this rank's box by up to ``before``/``after`` units of rows along the split axis.

        ``x`` holds this rank's tokens along ``dim`` (row-major local box). Returns
        ``(x_ext, ext_grid, offset)``: the extended tokens, the extended box's grid and
        the index (along the axis) where the owned rows start inside it.
        Rows come from whichever ranks own them (point-to-point), clipped at the grid edge.
        """
        dim = dim % x.dim()
        ndim = len(self.global_grid)
        start, stop = self.bounds
        extent = self.global_grid[self.axis]
        lo, hi = max(0, start - before), min(extent, stop + after)

        def wanted(rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
            s, e = self.split.bounds[rank]
            return (max(0, s - before), s), (e, min(extent, e + after))

        def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
            s, e = max(a[0], b[0]), min(a[1], b[1])
            return (s, e) if s < e else None

        box = _box(x, dim, self.local_grid)
        sends, recvs, recv_rows = {}, {}, {}
        for peer in range(self.world):
            if peer == self.rank:
                continue
            # rows of mine that the peer wants
            parts = [overlap(w, self.bounds) for w in wanted(peer)]
            parts = [p for p in parts if p]
            if parts:
                sends[peer] = torch.cat(
                    [box.narrow(dim + self.axis, s - start, e - s) for s, e in parts], dim=dim + self.axis
                )
            # rows of the peer's that I want
            mine = [overlap(w, self.split.bounds[peer]) for w in ((lo, start), (stop, hi))]
            mine = [p for p in mine if p]
            if mine:
                rows = sum(e - s for s, e in mine)
                shape = list(box.shape)
                shape[dim + self.axis] = rows
                recvs[peer] = (torch.Size(shape), x.dtype)
                recv_rows[peer] = mine
        received = comm.exchange(self.cp, sends, recvs, kind=kind)
        pieces = [((start, stop), box)]
        for peer, ranges in recv_rows.items():
            offset = 0
            for s, e in ranges:
                pieces.append(((s, e), received[peer].narrow(dim + self.axis, offset, e - s)))
                offset += e - s
        pieces.sort(key=lambda item: item[0][0])
        ext = torch.cat([p for _, p in pieces], dim=dim + self.axis)
        ext_grid = self.global_grid[: self.axis] + (hi - lo,) + self.global_grid[self.axis + 1 :]
        return ext.flatten(dim, dim + ndim - 1), ext_grid, start - lo

    def crop(self, x: torch.Tensor, dim: int, ext_grid: Sequence[int], offset: int) -> torch.Tensor:
        """The owned rows of an extended box produced by :meth:`halo`."""
        dim = dim % x.dim()
        box = _box(x, dim, ext_grid).narrow(dim + self.axis, offset, self.bounds[1] - self.bounds[0])
        return box.flatten(dim, dim + len(ext_grid) - 1)

    # --- what the patched processors call (see LinFusionProcessor.attend) -----------------------

    def method_forward(self, method, img, txt, grid):
        """The cross-rank form of ``method`` on this rank's tokens (``linfusion.parallel.attention``)."""
        from .attention import method_forward

        return method_forward(self, method, img, txt, grid)

    def dense(self, img, txt):
        """Exact softmax over every rank's keys (layers left dense, the softmax branch of a gate)."""
        from .attention import dense

        return dense(self, img, txt)
