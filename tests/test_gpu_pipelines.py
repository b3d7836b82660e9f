"""On CUDA, patched pipelines run the Triton kernels by default and match the PyTorch reference.

Skipped without a CUDA device; run on the lent H200.
"""

from __future__ import annotations

import pytest
import torch

from linfusion import patch_pipeline
from linfusion.testing.tiny_pipelines import VIDEO_FAMILIES, build_tiny_pipeline, call_kwargs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(pipe, family):
    kwargs = call_kwargs(family)
    kwargs["output_type"] = "latent"
    out = pipe(**kwargs)
    return (out.frames if family in VIDEO_FAMILIES else out.images).float()


@pytest.mark.parametrize("family", ["sd15", "pixart_sigma", "flux", "wan21", "cogvideox", "sd3"])
@pytest.mark.parametrize("options", [{"method": "linear"}, {"method": "local", "window": 2},
                                     {"method": "local", "window": 3, "shape": "tile", "tile": (2, 4)}])
def test_triton_backend_matches_reference_in_pipelines(family, options):
    if family in VIDEO_FAMILIES and options.get("tile"):
        options = dict(options, tile=(1, 2, 4))
    results = {}
    for backend in ("torch", "triton"):
        pipe = build_tiny_pipeline(family).to("cuda")
        patch_pipeline(pipe, backend=backend, layers="all", **options)
        results[backend] = _run(pipe, family)
    ref, fast = results["torch"], results["triton"]
    assert torch.isfinite(fast).all()
    rel = (fast - ref).norm() / ref.norm()
    assert rel < 2e-2, f"relative difference {rel:.2e}"


def test_default_backend_on_cuda_is_triton(monkeypatch):
    from linfusion import kernels

    calls = []
    import linfusion.kernels.linear_triton as lt

    original = lt.linear_attention_triton
    monkeypatch.setattr(lt, "linear_attention_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    pipe = patch_pipeline(build_tiny_pipeline("flux").to("cuda"), method="linear", layers="all")
    _run(pipe, "flux")
    assert calls, "the patched pipeline on CUDA did not use the Triton linear kernel"
    assert kernels.choose_backend("linear", torch.ones(1, device="cuda"), None) == "triton"
