"""benchmarks/multigpu.py on CPU: the PixArt-Σ-size distillation backbone, and the --tiny distillation rows."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_multigpu", ROOT / "benchmarks" / "multigpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mini_dir() -> Path:
    from linfusion.mini.bundle import PIPELINE_DIR, mini_is_bundled

    if not mini_is_bundled():
        pytest.skip("LinFusion-Mini is not bundled")
    return PIPELINE_DIR


def _mini_widths() -> tuple[int, int]:
    """(Mini's text width, Mini's latent channels) from its text encoder and VAE configs."""
    folder = _mini_dir()
    text = json.loads((folder / "text_encoder" / "config.json").read_text())["d_model"]
    latent = json.loads((folder / "vae" / "config.json").read_text())["latent_channels"]
    return text, latent


def test_multigpu_pixart_sigma_size_full_geometry_on_meta():
    """The full-size transformer is ~0.6B parameters: counted on the meta device, nothing allocated."""
    from diffusers import PixArtTransformer2DModel

    mg = _load()
    text, latent = _mini_widths()
    config = mg.pixart_sigma_size_config()
    with torch.device("meta"):
        model = PixArtTransformer2DModel(**config)
    params = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert 0.55e9 < params < 0.65e9, params
    c = model.config
    assert (c.num_layers, c.num_attention_heads, c.attention_head_dim, c.patch_size) == (28, 16, 72, 2)
    assert c.num_attention_heads * c.attention_head_dim == c.cross_attention_dim == 1152
    assert c.caption_channels == text and c.in_channels == latent
    assert c.out_channels == c.in_channels  # Mini's convention: no learned-variance half


def test_multigpu_pixart_sigma_size_builder_shrunk(tmp_path):
    """A 2-layer build of the same head geometry: a real PixArtSigmaPipeline folder that runs."""
    from diffusers import PixArtSigmaPipeline

    mg = _load()
    text, latent = _mini_widths()
    folder = mg.build_pixart_sigma_size(tmp_path / "pixart", num_layers=2)
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = PixArtSigmaPipeline.from_pretrained(str(folder))
    c = pipe.transformer.config
    assert (c.num_layers, c.num_attention_heads, c.attention_head_dim) == (2, 16, 72)
    assert c.caption_channels == text == pipe.text_encoder.config.d_model
    assert c.in_channels == latent == pipe.vae.config.latent_channels
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", height=64, width=64, num_inference_steps=1, output_type="np",
                 use_resolution_binning=False, clean_caption=False).images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.as_tensor(image)).all())
    facts = mg.denoiser_facts(folder, "512")
    assert facts["denoiser"] == "PixArtTransformer2DModel"
    assert facts["tokens"] == 64 * 64  # Mini's VAE /4, patch 2
    assert facts["params_m"] == pytest.approx(sum(p.numel() for p in pipe.transformer.parameters()) / 1e6)
    assert mg.denoiser_facts(folder, "64x128")["tokens"] == 8 * 16
    # the same seed builds the same weights
    again = mg.build_pixart_sigma_size(tmp_path / "again", num_layers=2)
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (again / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_multigpu_distill_settings_defaults():
    mg = _load()
    base = dict(distill_resolution=None, distill_steps=None, distill_batch=None, distill_prompts=None,
                distill_data_steps=None, distill_precision="bf16")
    big = mg.distill_settings(argparse.Namespace(**base, distill_model=mg.PIXART_SIGMA_SIZE))
    assert big == dict(resolution="512", steps=12, batch=8, prompts=8, data_steps=4, precision="bf16")
    tiny = mg.distill_settings(argparse.Namespace(**{**base, "distill_batch": 3}, distill_model=None))
    assert (tiny["resolution"], tiny["batch"], tiny["steps"]) == ("32x48", 3, 6)


def test_multigpu_tiny_distill_end_to_end(tmp_path, monkeypatch):
    """--tiny --only distill: 1 and 2 CPU processes (gloo), the same batch per process; then --merge.

    The first launch is answered with a fake CUDA out-of-memory: the batch per process is halved
    (2 -> 1) and every launch after it uses the halved batch.
    """
    import subprocess

    mg = _load()
    real, calls = mg._launch_distill, []

    def launch(args, gpus, model, data, out, settings, batch):
        calls.append((gpus, batch))
        if len(calls) == 1:
            return subprocess.CompletedProcess([], 1, "", "torch.OutOfMemoryError: CUDA out of memory."), 0.1
        return real(args, gpus, model, data, out, settings, batch)

    monkeypatch.setattr(mg, "_launch_distill", launch)
    out = tmp_path / "distill.json"
    mg.main(["--tiny", "--only", "distill", "--gpus", "1", "2", "--distill-batch", "2", "--out", str(out)])
    assert calls == [(1, 2), (1, 1), (2, 1)]
    result = json.loads(out.read_text())
    assert "partial" not in result["env"]
    rows = result["rows"]
    assert [r["gpus"] for r in rows] == [1, 2] and all(r["task"] == "distill" for r in rows)
    for r in rows:
        assert r["status"] == "ok" and r["precision"] == "no"  # no CUDA / --tiny
        assert r["batch_per_process"] == 1 and r["global_batch"] == r["gpus"]
        assert r["samples_per_s"] > 0 and r["step_ms"] > 0 and r["timed_steps"] >= 2
        assert r["tokens"] == rows[0]["tokens"] > 0 and r["params_m"] > 0
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert out.with_suffix(".png").is_file()
    merged = tmp_path / "merged.json"
    mg.main(["--merge", str(out), str(tmp_path / "missing.json"), "--out", str(merged)])
    joined = json.loads(merged.read_text())
    assert joined["rows"] == rows
    assert [p["file"] for p in joined["env"]["parts"]] == ["distill.json"]


def test_multigpu_tiny_inference_end_to_end(tmp_path):
    """--tiny --only inference: a tiny FLUX on 1 and 2 CPU processes (gloo), linear and local; the
    2-process output matches the 1-process one within the fp32 tolerance, and every row carries its
    traffic and exposed communication time (none on 1 process)."""
    mg = _load()
    out = tmp_path / "cp.json"
    mg.main(["--tiny", "--only", "inference", "--gpus", "1", "2", "--resolutions", "128", "--repeats", "1",
             "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["gpus"], r["method"]) for r in rows) == [(1, "linear"), (1, "local"), (2, "linear"), (2, "local")]
    for r in rows:
        assert r["task"] == "inference" and r["step_ms"] > 0 and r["tolerance"] == mg.MATCH_TOLERANCE["fp32"]
        assert r["matches_1gpu"] and r["max_err"] <= r["tolerance"]
        if r["gpus"] == 1:
            assert r["comm_mb"] == 0 and r["comm_ms"] == 0 and r["max_err"] == 0
        else:
            kinds = r["comm"]
            assert r["comm_mb"] > 0 and r["comm_ms"] > 0 and all(k["ms"] >= 0 for k in kinds.values())
            assert ("halo" in kinds) == (r["method"] == "local") and ("linear_state" in kinds) == (r["method"] == "linear")
