"""The circle window's definition is decided exactly and the same way on every device."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from linfusion.kernels.local_reference import circle_visibility, grid_coordinates, window_mask


def _exact(offsets, radii) -> bool:
    return sum((Fraction(o) / Fraction(r)) ** 2 for o, r in zip(offsets, radii) if not math.isinf(r)) <= 1


@pytest.mark.parametrize("radii", [(5, 5), (13, 13), (25, 25), (2.5, 6.0), (math.inf, 2), (1.5, 3, 3), (2, 3, 3),
                                   (0.75, 4.25)])
def test_circle_visibility_is_exact(radii):
    caps = tuple(4 if math.isinf(r) else int(r) for r in radii)
    table = circle_visibility(radii, caps)
    for idx in itertools.product(*(range(c + 1) for c in caps)):
        assert bool(table[idx]) == _exact(idx, radii), idx


def test_boundary_points_are_visible():
    # (3, 4) at r = 5 and (5, 12) at r = 13 lie exactly on the circle; a multiplication by the
    # reciprocal radius (what CUDA does for division by a scalar) would push them outside
    assert 3 * (1 / 5) != 0.6 and (3 * (1 / 5)) ** 2 + (4 * (1 / 5)) ** 2 > 1
    assert circle_visibility((5, 5), (5, 5))[3, 4] and circle_visibility((13, 13), (13, 13))[5, 12]


def test_window_mask_matches_the_exact_definition_on_a_grid():
    grid, radii = (13, 21), (5.0, 5.0)
    coords = grid_coordinates(grid)
    mask = window_mask(coords, coords, radii, "circle", (8, 8), grid)
    deltas = (coords[None, :, :] - coords[:, None, :]).abs()
    expected = torch.tensor([[_exact(d.tolist(), radii) for d in row] for row in deltas])
    assert torch.equal(mask, expected)
