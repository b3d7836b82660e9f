"""``linfusion generate`` on tiny pipelines saved to folders (offline)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from linfusion.testing.tiny_pipelines import save_tiny_pipeline

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def linfusion(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linfusion", *args], cwd=cwd, env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("models") / "sd15")


def test_generate_compare_writes_side_by_side(tmp_path, sd15_dir):
    result = linfusion("generate", "a red circle", "--model", sd15_dir, "--height", "64", "--width", "96",
                       "--steps", "2", "--method", "local", "--window", "4", "--compare", "--out", "cmp.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout and "wrote" in result.stdout
    image = Image.open(tmp_path / "cmp.png")
    assert image.size == (96 * 2 + 8, 64)


def test_generate_rejects_impossible_resolution(tmp_path, sd15_dir):
    result = linfusion("generate", "x", "--model", sd15_dir, "--height", "60", "--width", "96", "--steps", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "divisible by 8" in result.stderr and "64x96" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "steps must be a positive integer, got 0"),
    (["--method", "linear", "--window", "8"], "['window'] do not apply to method='linear'"),
    (["--window", "8"], "--window and --shape apply to --method local"),
    (["--method", "local", "--window", "0"], "window must be a positive radius"),
])
def test_generate_rejects_bad_options_with_a_clear_error(tmp_path, sd15_dir, args, message):
    result = linfusion("generate", "x", "--model", sd15_dir, "--height", "64", "--width", "64", *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_generate_names_a_missing_model_folder_and_a_window_beside_an_adapter(tmp_path, sd15_dir):
    result = linfusion("generate", "x", "--model", str(tmp_path / "no-such-model"), cwd=tmp_path)
    assert result.returncode == 2 and "no model folder at" in result.stderr and "Traceback" not in result.stderr
    from linfusion import patch_pipeline, save_adapter
    from linfusion.testing.tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15")
    save_adapter(patch_pipeline(pipe, method="local", window=4), tmp_path / "adapter")
    result = linfusion("generate", "x", "--model", sd15_dir, "--adapter", str(tmp_path / "adapter"), "--window", "8",
                       "--height", "64", "--width", "64", "--steps", "1", cwd=tmp_path)
    assert result.returncode == 2 and "cannot be set with an adapter" in result.stderr, result.stderr


def test_info_and_help_run(tmp_path):
    assert "kernel backends" in linfusion("info", cwd=tmp_path).stdout
    assert "generate" in linfusion("--help", cwd=tmp_path).stdout


def test_generate_highres_reaches_the_target_size(tmp_path, sd15_dir):
    result = linfusion("generate", "a red circle", "--model", sd15_dir, "--height", "96", "--width", "128",
                       "--steps", "2", "--highres", "--method", "linear", "--out", "hr.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "hr.png").size == (128, 96)
    result = linfusion("generate", "a red circle", "--model", sd15_dir, "--height", "96", "--width", "128",
                       "--steps", "2", "--highres", "--upscale", "latent", "--out", "hr-latent.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "hr-latent.png").size == (128, 96)


@pytest.mark.parametrize("family", ["sd15", "pixart_sigma"])
def test_step_callback_reaches_every_step_in_either_pipeline_api(family):
    """SD takes callback_on_step_end; PixArt (LinFusion-Mini's class) only the legacy callback and
    would swallow callback_on_step_end in **kwargs: no progress bar, no cancel in the demo."""
    from linfusion.generation import run_pipeline, run_highres
    from linfusion.testing.tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def on_step_end(p, step_index, timestep, callback_kwargs):
        assert "latents" in callback_kwargs
        seen.append(step_index)
        return callback_kwargs

    size = 32 if family == "sd15" else 64
    run_pipeline(pipe, "a red circle", height=size, width=size, steps=3, callback=on_step_end)
    assert seen == [0, 1, 2]
    seen.clear()
    run_highres(pipe, "a red circle", height=2 * size, width=2 * size, steps=2, strength=0.5, callback=on_step_end)
    assert len(seen) >= 3  # native pass and the refinement pass both report
