"""Context-parallel inference on CPU with gloo and 2 processes (torchrun), tiny pipelines.

Baseline (single process) vs context parallel (2 ranks): equal within a stated
tolerance (only the order of the reductions differs) for ``linear`` and ``local``
on an image family (FLUX) and a video family (Wan 2.1), plus SD3, PixArt and
CogVideoX, unequal splits, tile windows, layers left dense, gate and conv branches;
and a rank that dies makes torchrun fail fast with the failing rank named.

This file is also the worker torchrun runs (``python tests/test_parallel.py worker OUT``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest

#: name -> (family, patch options or None for unpatched, call overrides, split axis)
CASES: dict[str, tuple[str, dict | None, dict, int | None]] = {
    "flux_linear": ("flux", {"method": "linear", "layers": "all"}, {}, None),
    "flux_local": ("flux", {"method": "local", "window": 2, "layers": "all"}, {}, None),
    "flux_local_tile": ("flux", {"method": "local", "window": 2, "shape": "tile", "tile": (2, 4), "layers": "all"}, {}, None),
    # the Triton state/apply entry points under CP (interpreter on CPU; the fused kernels on CUDA)
    "flux_linear_triton": ("flux", {"method": "linear", "layers": "all", "backend": "triton"}, {}, None),
    "flux_linear_unequal": ("flux", {"method": "linear", "layers": "all"}, {"height": 36}, None),  # 9 rows: 5 + 4
    # layers="auto": the dense/patched choice is made on the global grid, alike on every rank
    "flux_auto_unequal": ("flux", {"method": "linear"}, {"height": 36}, None),
    "flux_local_unequal": ("flux", {"method": "local", "window": 3, "layers": "all"}, {"height": 36}, None),
    "flux_dense": ("flux", None, {}, None),
    "flux_partial_gate_conv": ("flux", {"method": "linear", "layers": ["transformer_blocks.0.attn"],
                                        "gate": True, "conv_v": True, "conv_kernel": 3}, {}, None),
    "wan21_linear": ("wan21", {"method": "linear", "layers": "all"}, {}, None),  # 3 frames: 2 + 1
    "wan21_local": ("wan21", {"method": "local", "window": 2, "temporal_window": 1, "layers": "all"}, {}, None),
    "wan21_local_rows": ("wan21", {"method": "local", "window": 1, "layers": "all"}, {}, 1),  # split rows of every frame
    "sd3_local": ("sd3", {"method": "local", "window": 2, "layers": "all"}, {}, None),
    "pixart_linear": ("pixart_sigma", {"method": "linear", "layers": "all"}, {}, None),
    "cogvideox_local": ("cogvideox", {"method": "local", "window": 2, "layers": "all"}, {}, None),
}
#: max |CP - single| over the output (values in [0, 1]); fp32, reduction order only
TOLERANCE = 1e-4


def run_case(name: str, cp=None) -> np.ndarray:
    import torch

    from linfusion import patch_pipeline
    from linfusion.testing.tiny_pipelines import build_tiny_pipeline, call_kwargs

    family, options, overrides, axis = CASES[name]
    pipe = build_tiny_pipeline(family)
    if options is not None:
        patch_pipeline(pipe, **options)
        torch.manual_seed(1)
        from linfusion.patch import iter_processors

        with torch.no_grad():  # non-trivial gate and conv so both branches matter
            for _, _, proc in iter_processors(pipe):
                if proc.gate is not None:
                    proc.gate.score.fill_(0.5)
                conv = getattr(proc.method, "conv", None)
                if conv is not None:
                    conv.weight.normal_(0, 0.1)
    if cp is not None:
        from linfusion.parallel import enable_context_parallel

        enable_context_parallel(pipe, cp, axis=axis)
    out = pipe(**call_kwargs(family, **overrides))
    frames = out.frames if hasattr(out, "frames") else out.images
    return np.asarray(frames, dtype=np.float32)


def worker(out_dir: str, names: list[str] | None = None) -> None:
    """Run every case context parallel; rank 0 writes the outputs and the traffic per case."""
    import torch

    torch.set_num_threads(1)
    from linfusion.parallel import init_context_parallel

    cp = init_context_parallel(timeout=60)
    results, traffic = {}, {}
    for name in names or CASES:
        cp.stats.reset()
        results[name] = run_case(name, cp)
        traffic[name] = cp.stats.summary()
    if cp.rank == 0:
        np.savez(Path(out_dir) / "cp.npz", **results)
        (Path(out_dir) / "traffic.json").write_text(json.dumps(traffic, indent=1))
    cp.close()


def dying_worker() -> None:
    """Rank 1 dies in the middle of a context-parallel generation; rank 0 is left waiting on it."""
    import torch

    torch.set_num_threads(1)
    from linfusion import patch_pipeline
    from linfusion.parallel import enable_context_parallel, init_context_parallel
    from linfusion.testing.tiny_pipelines import build_tiny_pipeline, call_kwargs

    cp = init_context_parallel(timeout=20)
    pipe = build_tiny_pipeline("flux")
    patch_pipeline(pipe, method="linear")
    enable_context_parallel(pipe, cp)
    if cp.rank == 1:
        pipe.transformer.x_embedder.register_forward_hook(lambda *a: os._exit(3))
    pipe(**call_kwargs("flux"))


def torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cp_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    proc = torchrun([__file__, "worker", str(out)], timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return dict(np.load(out / "cp.npz")), json.loads((out / "traffic.json").read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_equals_single_process(name, cp_outputs):
    outputs, traffic = cp_outputs
    single = run_case(name)
    parallel = outputs[name]
    assert parallel.shape == single.shape
    error = float(np.abs(parallel - single).max())
    print(f"{name}: max |cp - single| = {error:.2e}; traffic {traffic[name]}")
    assert error < TOLERANCE, f"{name}: max abs error {error}"


def test_traffic_is_what_each_method_needs(cp_outputs):
    _, traffic = cp_outputs
    assert "linear_state" in traffic["flux_linear"] and "halo" not in traffic["flux_linear"]
    assert "halo" in traffic["flux_local"] and "linear_state" not in traffic["flux_local"]
    assert "dense_kv" in traffic["flux_dense"]
    assert "dense_kv" not in traffic["flux_linear"]  # every layer patched: no K/V gathered
    for case in traffic.values():  # every kind is timed too (wall clock under gloo)
        assert all(kind["calls"] > 0 and kind["ms"] > 0 for kind in case.values()), case


def test_comm_stats_read_cuda_events_only_when_summarised():
    """Events are resolved (waited for) in summary()/total_ms, not at record time; reset drops them."""
    from linfusion.parallel import CommStats

    class Event:
        def __init__(self, t):
            self.t, self.waited = t, False

        def synchronize(self):
            self.waited = True

        def elapsed_time(self, end):
            return end.t - self.t

    stats = CommStats()
    stats.add("halo", 100)
    start, end = Event(1.0), Event(3.5)
    stats.pending.append(("halo", start, end))
    assert not end.waited
    assert stats.summary() == {"halo": {"bytes": 100, "calls": 1, "ms": 2.5}} and end.waited
    stats.pending.append(("halo", Event(0.0), Event(1.0)))
    assert stats.total_ms == 3.5 and not stats.pending
    stats.reset()
    assert stats.total_ms == 0 and stats.summary() == {}


def test_dead_rank_fails_the_launcher_quickly(tmp_path):
    start = time.monotonic()
    proc = torchrun([__file__, "die"], timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "exitcode" in proc.stderr and "3" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_split_is_by_whole_rows_and_tiles():
    from linfusion.parallel import ContextParallelError, choose_split

    assert choose_split((9, 12), 2).bounds == ((0, 5), (5, 9))
    assert choose_split((3, 4, 6), 2).axis == 0  # video: frames first
    assert choose_split((1, 4, 6), 2).axis == 1  # one latent frame: rows
    assert choose_split((8, 12), 2, units=(2, 4)).bounds == ((0, 4), (4, 8))
    assert choose_split((9, 12), 2, units=(2, 4)).bounds == ((0, 6), (6, 9))  # tile-aligned starts
    with pytest.raises(ContextParallelError, match="too small"):
        choose_split((1, 12), 2)


def test_unet_is_refused_clearly():
    from linfusion.parallel import ContextParallel, ContextParallelError, enable_context_parallel
    from linfusion.testing.tiny_pipelines import build_tiny_pipeline

    import torch

    pipe = build_tiny_pipeline("sd15")
    with pytest.raises(ContextParallelError, match="UNet"):
        enable_context_parallel(pipe, ContextParallel(None, 0, 2, torch.device("cpu")))


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "die":
        dying_worker()


@pytest.mark.parametrize("family,method", [("flux", "local")])
def test_generate_cli_under_torchrun_equals_single_process(family, method, tmp_path):
    from PIL import Image

    from linfusion.testing.tiny_pipelines import save_tiny_pipeline

    model = save_tiny_pipeline(family, tmp_path / "model")
    h, w = (32, 48) if family == "flux" else (64, 96)
    common = ["generate", "a red cube", "--model", model, "--method", method, "--window", "2",
              "--height", str(h), "--width", str(w), "--steps", "2", "--dtype", "fp32", "--device", "cpu"]
    if family == "wan21":
        common += ["--num-frames", "9"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    single = subprocess.run([sys.executable, "-m", "linfusion", *common, "--out", str(tmp_path / "single.png")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    parallel = torchrun(["-m", "linfusion", *common, "--context-parallel", "--out", str(tmp_path / "cp.png")],
                        timeout=180)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout.count("wrote") == 1  # rank 0 only
    a = np.asarray(Image.open(tmp_path / "single.png").convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "cp.png").convert("RGB"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # 8-bit images: at most one level of rounding


def test_partial_attention_with_lse_matches_reference_and_guards_the_fused_op(monkeypatch):
    """The text-query merge needs (out, logsumexp) per rank: fused where PyTorch's op agrees with the
    fp32 reference (checked once), the reference otherwise."""
    from linfusion.parallel import attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (7, 50, 50))
    scores = q @ k.transpose(-1, -2) / 4.0
    out, lse = attention.partial_attention(q, k, v)
    torch.testing.assert_close(out, scores.softmax(-1) @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)

    # a fused op that returns a wrong log-sum-exp is rejected by the one-time check
    monkeypatch.setattr(attention, "_FUSED_CHECKED", {})
    monkeypatch.setattr(attention, "_fused_op", lambda device_type: lambda q, k, v: (
        torch.nn.functional.scaled_dot_product_attention(q, k, v), torch.zeros(q.shape[:3])))
    assert attention._partial_fused(q, k, v) is None
    out2, lse2 = attention.partial_attention(q, k, v)
    torch.testing.assert_close(lse2, lse, rtol=1e-5, atol=1e-5)
    empty_out, empty_lse = attention.partial_attention(q, k[:, :, :0], v[:, :, :0])
    assert torch.isneginf(empty_lse).all() and (empty_out == 0).all()
