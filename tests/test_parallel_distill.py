"""Two-process data-parallel distillation through the CLI (``accelerate launch``, CPU, gloo), then the
adapter it wrote loads with ``patch_pipeline(pipe, adapter=DIR)`` and generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GEN = ["--resolution", "32x48", "--max-sequence-length", "16"]


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **env)
    full_env.pop("LINFUSION_DISTILL_FAULT", None)
    result = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stderr[-4000:]}"
    return result


def test_two_process_distillation_writes_a_loadable_adapter(tmp_path):
    from linfusion import is_patched, patch_pipeline
    from linfusion.testing.tiny_pipelines import build_tiny_pipeline, call_kwargs, save_tiny_pipeline

    model = save_tiny_pipeline("pixart_sigma", tmp_path / "model")
    data, output = tmp_path / "data", tmp_path / "adapter"
    _run([sys.executable, "-m", "linfusion", "generate-data", "--model", model, "--output", str(data), *GEN,
          "--num-prompts", "4", "--data-steps", "3", "--no-progress"])
    # accelerate 1.15: `--cpu --num_processes 2` starts ONE process; two CPU processes (gloo) are
    # `--multi_gpu` with ACCELERATE_USE_CPU=1, as linfusion.distill's own tests do
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    _run([*launcher, "-m", "linfusion", "distill", "--model", model, "--data", str(data), "--output", str(output),
          *GEN, "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--no-progress"], ACCELERATE_USE_CPU="1")
    assert (output / "linfusion_adapter.safetensors").is_file()
    import json

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert records and all(r["world_size"] == 2 for r in records)  # really two processes
    pipe = build_tiny_pipeline("pixart_sigma")
    patch_pipeline(pipe, adapter=str(output))
    assert is_patched(pipe)
    images = pipe(**call_kwargs("pixart_sigma")).images
    assert np.isfinite(np.asarray(images)).all()
