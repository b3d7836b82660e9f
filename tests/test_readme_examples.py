"""The README's Python examples run as written, on tiny offline pipelines at tiny sizes.

Each example is found by its first line among the README's ```python blocks and executed with the
names it assumes (``pipe``, ``q``, ``k``, ``v`` ...) bound to tiny CPU objects. The only edits are
sizes (``_shrink``: a 4096² image becomes 64², 30 steps become 2), so a renamed function, a changed
signature or a removed option in the README fails here.
"""

from __future__ import annotations

import ast

import torch
from readme_blocks import README, fenced_blocks

from linfusion import describe, patch_pipeline, save_adapter, unpatch_model, unpatch_pipeline
from linfusion.testing.tiny_pipelines import build_tiny_pipeline


def _python_blocks() -> list[str]:
    return fenced_blocks(README.read_text(), "python")


def _example(first_line_start: str) -> str:
    """The README block whose first line starts with ``first_line_start`` (exactly one)."""
    found = [b for b in _python_blocks() if b.lstrip().startswith(first_line_start)]
    assert len(found) == 1, f"README: {len(found)} python blocks start with {first_line_start!r}"
    return found[0]


def _shrink(source: str, **replacements: str) -> str:
    for old, new in replacements.items():
        assert old in source, f"the README example no longer contains {old!r}: update this test"
        source = source.replace(old, new)
    return source


def test_quick_start_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # save_adapter(pipe, "my-adapter") writes into the working directory
    pipe = build_tiny_pipeline("sd15")
    source = _shrink(_example("from linfusion import patch_pipeline, unpatch_pipeline, save_adapter"),
                     **{"height=4096, width=4096": "height=64, width=64, num_inference_steps=2"})
    namespace = {"pipe": pipe}
    exec(compile(source, "README quick start", "exec"), namespace)
    assert namespace["image"].size == (64, 64)
    assert (tmp_path / "my-adapter").is_dir() and any((tmp_path / "my-adapter").glob("*.safetensors"))
    assert describe(pipe)["patched"] is False  # the example ends with unpatch_pipeline(pipe)


def _methods(pipe) -> set[str]:
    return {c["method"] for c in describe(pipe)["components"].values() if c["patched"]}


def _family_of(statement: str) -> str:
    """The tiny family a line of the options example is written for."""
    if "single_" in statement:
        return "flux"
    if "temporal_window" in statement:
        return "wan21"
    if "pipe.transformer" in statement:
        return "pixart_sigma"
    return "sd15"  # the UNet layer names (down_blocks...) and every family-free option


def test_every_option_line_of_the_options_example(tmp_path, monkeypatch):
    """Each line of the options block is an alternative: run each on a fresh tiny pipeline of the
    family it names, then undo it."""
    monkeypatch.chdir(tmp_path)
    source = _example("from linfusion import (patch_pipeline, unpatch_pipeline, patch_model")
    tree = ast.parse(source)
    namespace: dict = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), "README options", "exec"), namespace)
    # the adapter line loads "my-adapter": one saved from the same family beforehand
    adapter_source = build_tiny_pipeline("sd15")
    patch_pipeline(adapter_source, method="linear")
    save_adapter(adapter_source, "my-adapter")
    calls = [node for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom))]
    assert len(calls) >= 10, "the options example lost its lines"
    ran = 0
    pipes: dict[str, object] = {}
    for node in calls:
        statement = ast.get_source_segment(source, node)
        if statement.startswith("print(describe"):
            continue  # run after the adapter line below, while that pipeline is patched
        family = _family_of(statement)
        pipe = pipes.setdefault(family, build_tiny_pipeline(family))
        namespace["pipe"] = pipe
        exec(compile(ast.Module([node], []), f"README options: {statement}", "exec"), namespace)
        if "adapter=" in statement:
            assert _methods(pipe) == {"linear"}
        if statement.startswith("patch_model"):
            unpatch_model(pipe.transformer)
        else:
            unpatch_pipeline(pipe)
        ran += 1
    assert ran == len(calls) - 1


def test_kernel_api_example():
    torch.manual_seed(0)
    B, H, L, D = 1, 2, 512 + 64 * 64, 32
    q, k = torch.rand(B, H, L, D), torch.rand(B, H, L, D)  # feature-mapped: non-negative
    v = torch.randn(B, H, L, D)
    x, cos, sin = torch.randn(1, 16, 2, 8), torch.randn(16, 8), torch.randn(16, 8)
    namespace = {"q": q, "k": k, "v": v, "x": x, "cos": cos, "sin": sin}
    exec(compile(_example("from linfusion.kernels import linear_attention, local_attention"), "README kernels",
                 "exec"), namespace)
    assert namespace["o"].shape == (B, H, L, D) and torch.isfinite(namespace["o"]).all()
    assert namespace["x"].shape == x.shape


def test_tile_order_example_equals_row_major():
    """The tile-order entry point (shrunk to a 16×32 grid and 128 text tokens) gives the row-major
    result once the output is put back in row-major order."""
    from linfusion.kernels import local_attention

    source = _shrink(_example("from linfusion.kernels.local_layout import from_tile_order, to_tile_order"),
                     **{"(64, 64), (8, 16), 512": "(16, 32), (8, 16), 128"})
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128 + 16 * 32, 64) for _ in range(3))
    namespace = {"q": q, "k": k, "v": v}
    exec(compile(source, "README tile order", "exec"), namespace)
    expected = local_attention(q.double(), k.double(), v.double(), (16, 32), 16, 128, "tile", (8, 16),
                               backend="torch")
    torch.testing.assert_close(namespace["o"].double(), expected, rtol=1e-4, atol=1e-4)


def test_highres_example():
    pipe = build_tiny_pipeline("sd15")
    source = _shrink(_example("from linfusion.pipelines.highres import generate_highres"),
                     **{"4096, 4096": "64, 64", "steps=30": "steps=2"})
    namespace = {"pipe": pipe, "patch_pipeline": patch_pipeline}
    exec(compile(source, "README high resolution", "exec"), namespace)
    assert namespace["out"].images[0].size == (64, 64)


def test_bundled_model_example():
    source = _example("from linfusion import patch_pipeline\nfrom linfusion.mini import")
    namespace: dict = {}
    exec(compile(source, "README bundled model", "exec"), namespace)
    assert _methods(namespace["pipe"]) == {"local"}
