"""FLUX's token grid is read from img_ids, which pipelines pass in the model dtype."""

from __future__ import annotations

import pytest
import torch

from linfusion.pipelines.flux import FluxFamily


def _ids(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros(rows * cols), r.reshape(-1).float(), c.reshape(-1).float()], 1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [(512, 512), (300, 7), (1, 5), (6, 1), (64, 96)])
def test_grid_from_ids_in_any_dtype(grid, dtype):
    # bf16 rounds 257 -> 256 etc.: the 8192 px grid (512 x 512) must still be read exactly
    assert FluxFamily().token_grid(None, (), {"img_ids": _ids(*grid, dtype)}) == grid


def test_batched_ids_and_missing_ids():
    assert FluxFamily().token_grid(None, (), {"img_ids": _ids(4, 6, torch.float32)[None]}) == (4, 6)
    with pytest.raises(TypeError, match="img_ids"):
        FluxFamily().token_grid(None, (), {})


def test_two_image_grids_are_refused():
    ids = torch.cat([_ids(4, 6, torch.float32), _ids(4, 6, torch.float32)])  # e.g. a reference image appended
    with pytest.raises(ValueError, match="single image grid"):
        FluxFamily().token_grid(None, (), {"img_ids": ids})
