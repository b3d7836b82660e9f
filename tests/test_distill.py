"""Distillation toolkit: CLI runs on tiny offline pipelines, resume, faults, ADM, selective transfer."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny_pipelines import call_kwargs, save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
ENV.pop("LINFUSION_DISTILL_FAULT", None)

#: per family: generation flags for the tiny pipelines
GEN = {
    "sd15": ["--resolution", "32x48"],
    "pixart_sigma": ["--resolution", "32x48", "--max-sequence-length", "16"],
    "flux": ["--resolution", "32x48", "--max-sequence-length", "16"],
    "wan21": ["--resolution", "64x96", "--num-frames", "9", "--max-sequence-length", "16"],
}
DATA = ["--num-prompts", "4", "--data-steps", "4", "--no-progress"]


def cli(*args: str, fault: str | None = None, check: bool = True, launcher: list[str] | None = None,
        env: dict[str, str] | None = None):
    env = dict(ENV, **(env or {}))
    if fault:
        env["LINFUSION_DISTILL_FAULT"] = fault
    command = (launcher or [sys.executable]) + ["-m", "linfusion", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """family -> (saved pipeline folder, teacher data folder), built once per session."""
    root = tmp_path_factory.mktemp("distill")
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            model = Path(save_tiny_pipeline(family, root / family))
            data = root / f"{family}-data"
            cli("generate-data", "--model", str(model), "--output", str(data), *GEN[family], *DATA)
            made[family] = (model, data)
        return made[family]

    return get


def distill(model: Path, data: Path, output: Path, family: str, *extra: str, **kw):
    return cli("distill", "--model", str(model), "--data", str(data), "--output", str(output), *GEN[family],
               "--no-progress", *extra, **kw)


# ---------------------------------------------------------------------------------------------
# end to end per family
# ---------------------------------------------------------------------------------------------

FAMILY_RUNS = {
    "sd15": ["--method", "linear", "--losses", "kd=1", "attn=1"],
    "pixart_sigma": ["--method", "linear", "--losses", "kd=1", "attn=1", "var=0.05"],
    "flux": ["--method", "local", "--patch-option", "window=2", "--losses", "kd=1", "attn=1"],  # CLEAR: q/k/v/out
    "wan21": ["--method", "linear", "--trainable", "new+qkvo", "--losses", "kd=1", "attn=1"],
}


@pytest.mark.parametrize("family", list(FAMILY_RUNS))
def test_distill_cli_family(family, tiny, tmp_path):
    from diffusers import DiffusionPipeline

    import linfusion

    model, data = tiny(family)
    output = tmp_path / "run"
    distill(model, data, output, family, "--steps", "30", "--lr", "1e-2", "--batch-size", "2",
            "--checkpoint-every", "10", *FAMILY_RUNS[family])
    log = metrics(output)
    assert [m["step"] for m in log] == list(range(1, 31))
    first = sum(m["loss"] for m in log[:5]) / 5
    last = sum(m["loss"] for m in log[-5:]) / 5
    print(f"{family}: first {log[0]['loss']:.6g} last {log[-1]['loss']:.6g} (mean5 {first:.6g} -> {last:.6g})")
    assert last < first
    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    linfusion.patch_pipeline(pipe, adapter=str(output))
    assert linfusion.is_patched(pipe)
    kwargs = call_kwargs(family)
    out = pipe(**kwargs)
    images = out.frames if hasattr(out, "frames") else out.images
    assert torch.isfinite(torch.as_tensor(images)).all()


# ---------------------------------------------------------------------------------------------
# resume, faults, bad input
# ---------------------------------------------------------------------------------------------

# a warm-up and a decaying learning rate, so the resume must restore the schedule's position too; a
# timestep focus, so it must restore the interleaved sample streams
RESUME = ["--warmup-steps", "2", "--lr-decay", "cosine", "--focus-timesteps", "0:500:0.5", "--steps", "12",
          "--checkpoint-every", "4", "--lr", "1e-2", "--batch-size", "2"]


def test_lr_multiplier_warms_up_then_decays_to_zero():
    from linfusion.distill.config import DistillConfig
    from linfusion.distill.trainer import lr_multiplier

    warm = [lr_multiplier(s, warmup=4, total=20) for s in range(8)]
    assert warm == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]  # constant after the warm-up, as before the option
    for decay in ("cosine", "linear"):
        f = [lr_multiplier(s, warmup=4, total=20, decay=decay) for s in range(21)]
        assert f[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]  # the first step after the warm-up runs at the peak
        assert all(a > b for a, b in zip(f[4:], f[5:])) and f[20] == 0.0 and f[19] > 0.0
    assert lr_multiplier(12, warmup=4, total=20, decay="cosine") == pytest.approx(0.5)  # half way: cos(pi/2)
    assert lr_multiplier(12, warmup=4, total=20, decay="linear") == pytest.approx(0.5)
    assert lr_multiplier(0, warmup=0, total=10, decay="cosine") == 1.0
    with pytest.raises(ValueError, match="--lr-decay must be one of"):
        DistillConfig(model="m", output="o", lr_decay="step")
    # a decaying rate depends on --steps, so a resume must keep it; a constant one does not record the option
    assert DistillConfig(model="m", output="o", lr_decay="cosine").resume_identity()["steps"] == 1000
    assert "lr_decay" not in DistillConfig(model="m", output="o").resume_identity()


def test_kill_and_resume_equals_uninterrupted(tiny, tmp_path):
    model, data = tiny("sd15")
    straight = tmp_path / "straight"
    distill(model, data, straight, "sd15", *RESUME)
    killed = tmp_path / "killed"
    # killed while writing checkpoint 8: only a .tmp- folder, step 4 stays the newest
    result = distill(model, data, killed, "sd15", *RESUME, fault="kill-in-checkpoint-8", check=False)
    assert result.returncode == 137
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names[0].startswith(".tmp-") and names[1:] == ["step-00000004"]
    # resumed, then killed between checkpoints (after step 10)
    result = distill(model, data, killed, "sd15", *RESUME, "--resume", fault="kill-at-10", check=False)
    assert result.returncode == 137
    distill(model, data, killed, "sd15", *RESUME, "--resume")
    a = load_file(straight / "linfusion_adapter.safetensors")
    b = load_file(killed / "linfusion_adapter.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(straight)] == [m["loss"] for m in metrics(killed)]
    assert [m["lr"] for m in metrics(straight)] == [m["lr"] for m in metrics(killed)]
    # a resume with another configuration is refused, naming the differing key
    result = distill(model, data, killed, "sd15", *RESUME[:-4], "--lr", "0.5", "--batch-size", "2", "--resume",
                     check=False)
    assert result.returncode == 2
    assert "different configuration" in result.stderr and "lr" in result.stderr
    # an output folder with checkpoints is not silently overwritten
    again = distill(model, data, killed, "sd15", *RESUME, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_full_disk_leaves_no_partial_checkpoint(tiny, tmp_path):
    model, data = tiny("sd15")
    output = tmp_path / "run"
    result = distill(model, data, output, "sd15", "--steps", "6", "--checkpoint-every", "2",
                     fault="enospc-checkpoint-4", check=False)
    assert result.returncode == 2
    assert "disk is full" in result.stderr and "step-00000002" in result.stderr
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000002"]


def test_unsupported_family_and_foreign_data(tiny, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    result = cli("distill", "--model", str(tmp_path / "ddpm"), "--output", str(tmp_path / "o1"), "--steps", "2",
                 check=False)
    assert result.returncode == 2 and "does not support UNet2DModel" in result.stderr
    flux, _ = tiny("flux")
    _, sd_data = tiny("sd15")
    result = distill(flux, sd_data, tmp_path / "o2", "flux", "--steps", "2", check=False)
    assert result.returncode == 2 and "another model" in result.stderr


# ---------------------------------------------------------------------------------------------
# selective transfer, config file
# ---------------------------------------------------------------------------------------------


def test_selective_transfer_meets_target(tiny, tmp_path):
    import yaml
    from diffusers import DiffusionPipeline

    import linfusion

    model, data = tiny("sd15")
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump({"steps": 40, "lr": 1e-2, "batch-size": 2, "select_layers": 2,
                                      "losses": ["kd=1", "attn=1"], "checkpoint_every": 100}))
    output = tmp_path / "run"
    distill(model, data, output, "sd15", "--config", str(config))
    log = metrics(output)
    scores = log[-1]["scores"]
    assert len(scores) == 6  # 7 self-attention layers, the first kept softmax
    assert all(min(s, 1 - s) < 0.01 for s in scores)
    assert sum(s < 0.5 for s in scores) == 2
    meta = json.loads((output / "linfusion_adapter.json").read_text())
    layers = meta["components"]["unet"]["layers"]
    assert len(layers) == 2 and meta["components"]["unet"]["options"]["gate"] is False
    pipe = DiffusionPipeline.from_pretrained(str(model))
    linfusion.patch_pipeline(pipe, adapter=str(output))
    assert linfusion.describe(pipe)["components"]["unet"]["patched_layers"] == layers


# ---------------------------------------------------------------------------------------------
# data: images with captions, reuse
# ---------------------------------------------------------------------------------------------


def test_image_folder_and_lora(tiny, tmp_path):
    from PIL import Image

    model, _ = tiny("sd15")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        pixels = (torch.rand(32, 48, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"a random picture number {i}")
    output = tmp_path / "run"
    cli("distill", "--model", str(model), "--data", str(images), "--output", str(output), "--resolution", "32x48",
        "--data-steps", "3", "--steps", "4", "--trainable", "lora", "--lora-rank", "4", "--no-progress")
    manifest = json.loads((output / "data" / "manifest.json").read_text())
    assert manifest["images"] == ["img0.png", "img1.png", "img2.png"]
    meta = json.loads((output / "linfusion_adapter.json").read_text())
    assert meta["components"]["unet"]["base_params"]  # merged LoRA stored as trained base weights
    assert not any("lora" in key for key in load_file(output / "linfusion_adapter.safetensors"))


# ---------------------------------------------------------------------------------------------
# units: ADM, schedule, data stream
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flow", "epsilon", "v_prediction"])
def test_adm_gradient_vanishes_when_student_is_teacher(kind):
    from linfusion.distill.adm import adm_direction, adm_surrogate
    from linfusion.distill.schedule import deterministic_step

    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    x_t = torch.randn(2, 4, 6, 6)
    a, s = torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6])
    a2, s2 = torch.tensor([0.8, 0.9]), torch.tensor([0.6, 0.43589])
    if kind == "flow":
        a, s, a2, s2 = 1 - s, s, 1 - s2, s2
    x_hat = deterministic_step(kind, x_t, net(x_t), a, s, a2, s2)
    with torch.no_grad():
        same = net(x_hat)
    loss = adm_surrogate(x_hat, adm_direction(kind, x_hat.detach(), same, same, a2, s2))
    loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net.parameters())
    net.zero_grad()
    x_hat = deterministic_step(kind, x_t, net(x_t), a, s, a2, s2)
    with torch.no_grad():
        teacher = net(x_hat) + 0.1
    adm_surrogate(x_hat, adm_direction(kind, x_hat.detach(), teacher, net(x_hat).detach(), a2, s2)).backward()
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


def test_flow_adm_direction_matches_formula():
    from linfusion.distill.adm import adm_direction

    sigma = torch.tensor([0.3])
    x = torch.randn(1, 4)
    u_teacher, u_student = torch.randn(1, 4), torch.randn(1, 4)
    g = adm_direction("flow", x, u_teacher, u_student, 1 - sigma, sigma)
    # s_real − s_fake = −((1−t)/t)(u_T − u_S) and g = s_fake − s_real
    assert torch.allclose(g, (1 - sigma) / sigma * (u_teacher - u_student), atol=1e-6)


def test_task_target_round_trip():
    from linfusion.distill.schedule import task_target, to_x0_eps

    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    alpha_bar = torch.tensor([0.2, 0.5, 0.9])
    for kind, a, s in (("epsilon", alpha_bar.sqrt(), (1 - alpha_bar).sqrt()),
                       ("v_prediction", alpha_bar.sqrt(), (1 - alpha_bar).sqrt()),
                       ("flow", 1 - alpha_bar, alpha_bar)):
        x_t = a[:, None] * x0 + s[:, None] * eps
        target = task_target(kind, x_t, x0, a, s)
        got_x0, got_eps = to_x0_eps(kind, x_t, target, a, s)
        assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, eps, atol=1e-4)


def test_index_stream_splits_global_batch():
    from linfusion.distill.trainer import IndexStream

    one = IndexStream(10, seed=3, batch_size=4, world=1, accum=1)
    two = IndexStream(10, seed=3, batch_size=2, world=2, accum=1)
    for step in range(6):
        assert one.indices(step, 0, 0) == two.indices(step, 0, 0) + two.indices(step, 0, 1)


def test_index_stream_without_focus_keeps_its_sample_order():
    """Checkpoints written before --focus-timesteps existed resume with the same samples."""
    from linfusion.distill.trainer import IndexStream

    stream = IndexStream(7, seed=5, batch_size=3, world=1, accum=1)
    drawn = [i for step in range(5) for i in stream.indices(step, 0, 0)]
    expected = [int(torch.randperm(7, generator=torch.Generator().manual_seed(5 * 7919 + p // 7))[p % 7])
                for p in range(15)]
    assert drawn == expected


def test_index_stream_focus_share_and_split():
    from linfusion.distill.trainer import IndexStream

    focus = [2, 5, 11, 17]
    one = IndexStream(20, seed=1, batch_size=8, world=1, accum=1, focus=focus, share=0.25)
    two = IndexStream(20, seed=1, batch_size=4, world=2, accum=1, focus=focus, share=0.25)
    drawn = []
    for step in range(10):
        batch = one.indices(step, 0, 0)
        assert batch == two.indices(step, 0, 0) + two.indices(step, 0, 1)
        assert sum(i in focus for i in batch) == 2  # exactly the share in every batch of 8
        drawn += batch
    focused = [i for i in drawn if i in focus]
    others = [i for i in drawn if i not in focus]
    # each pool is walked in epoch-wise permutations: every member once per epoch
    assert all(sorted(focused[k:k + 4]) == focus for k in range(0, len(focused), 4))
    assert sorted(others[:16]) == sorted(set(range(20)) - set(focus))
    with pytest.raises(ValueError, match="no sample"):
        IndexStream(20, seed=1, batch_size=8, world=1, accum=1, focus=[], share=0.5)
    # a focus holding every sample is the plain stream
    assert IndexStream(6, 0, 3, 1, 1, focus=range(6), share=0.5).indices(1, 0, 0) == IndexStream(6, 0, 3, 1, 1).indices(1, 0, 0)


def test_focus_timesteps_option_and_data(tiny):
    from linfusion.distill.config import DistillConfig
    from linfusion.distill.data import DistillDataset
    from linfusion.distill.trainer import DistillError, focused_samples

    assert DistillConfig(focus_timesteps="550:750:0.5").focus_timesteps == [550.0, 750.0, 0.5]
    for bad, message in (("550:750", "LO:HI:SHARE"), ("750:550:0.5", "LO <= HI"), ("1:2:0", r"\(0, 1\]")):
        with pytest.raises(ValueError, match=message):
            DistillConfig(focus_timesteps=bad)
    assert "focus_timesteps" not in DistillConfig().resume_identity()  # older checkpoints still resume
    assert DistillConfig(focus_timesteps="1:2:1").resume_identity()["focus_timesteps"] == [1.0, 2.0, 1.0]
    _, data = tiny("sd15")
    dataset = DistillDataset(data)
    timesteps = dataset.row_timesteps()
    assert timesteps.shape == (len(dataset),) and len(set(timesteps.tolist())) == 4  # --data-steps 4
    for i in (0, len(dataset) - 1):  # the same values the training batches carry
        assert float(dataset.batch([i])[0].kwargs["timestep"].flatten()[0]) == float(timesteps[i])
    lo, hi = float(timesteps.min()), float(timesteps.median())
    inside, share = focused_samples(dataset, [lo, hi, 0.5])
    assert share == 0.5 and inside and all(lo <= float(timesteps[i]) <= hi for i in inside)
    assert len(inside) == int(((timesteps >= lo) & (timesteps <= hi)).sum())
    with pytest.raises(DistillError, match="range from"):
        focused_samples(dataset, [5000.0, 6000.0, 0.5])
    assert focused_samples(dataset, None) == (None, 0.0)


# ---------------------------------------------------------------------------------------------
# two processes (gloo on CPU)
# ---------------------------------------------------------------------------------------------


def test_two_process_data_parallel(tiny, tmp_path):
    model, data = tiny("sd15")
    common = ["--steps", "4", "--checkpoint-every", "2", "--lr", "1e-2"]
    single = tmp_path / "single"
    distill(model, data, single, "sd15", *common, "--batch-size", "2")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env_cpu = {"ACCELERATE_USE_CPU": "1"}
    os.environ.update(env_cpu)
    ENV.update(env_cpu)
    try:
        double = tmp_path / "double"
        distill(model, data, double, "sd15", *common, "--batch-size", "1", launcher=launcher)
    finally:
        ENV.pop("ACCELERATE_USE_CPU", None)
        os.environ.pop("ACCELERATE_USE_CPU", None)
    one, two = metrics(single), metrics(double)
    assert [m["world_size"] for m in two] == [2] * 4
    assert [m["global_batch"] for m in two] == [2] * 4 and two[-1]["samples"] == 8
    # the two processes together see exactly the single process's batch of 2
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-5)
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
    assert (double / "linfusion_adapter.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# FSDP, resume across process counts, ADM end to end, bf16 + gradient checkpointing
# ---------------------------------------------------------------------------------------------

TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
       "--mixed_precision", "no", "--dynamo_backend", "no"]
#: N-process and 1-process runs differ only in float summation order (an all-reduce of two per-process
#: means vs one batch-of-2 mean, other GEMM blockings): ~1e-7 relative in the gradients. Adam's first
#: steps divide by |g|, which amplifies that for elements with tiny gradients, but a step moves an
#: element by at most ~lr (1e-2 here); 1e-4 is 1% of one step (measured: ≤ 1e-5 after 6 steps).
WEIGHT_ATOL = 1e-4


def assert_weights_close(a_file: Path, b_file: Path, atol: float = WEIGHT_ATOL) -> float:
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"{a_file} vs {b_file}: max |diff| {worst:.3g} > {atol}"
    return worst


def load_and_generate(model: Path, adapter: Path, family: str) -> None:
    from diffusers import DiffusionPipeline

    import linfusion

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    linfusion.patch_pipeline(pipe, adapter=str(adapter))
    assert linfusion.is_patched(pipe)
    assert np.isfinite(np.asarray(pipe(**call_kwargs(family)).images)).all()


CROSS = ["--steps", "6", "--checkpoint-every", "3", "--lr", "1e-2"]


def test_resume_across_process_counts_with_fsdp(tiny, tmp_path):
    """2 processes (FSDP, shared teacher) → killed → resumed in 1; and 1 → 2 (FSDP): both end where an
    uninterrupted 1-process run ends, to float summation order."""
    model, data = tiny("sd15")
    straight = tmp_path / "straight"
    distill(model, data, straight, "sd15", *CROSS, "--batch-size", "2")
    # 2 → 1: FSDP run killed after its step-3 checkpoint
    two = tmp_path / "two"
    result = distill(model, data, two, "sd15", *CROSS, "--batch-size", "1", "--fsdp", fault="kill-at-4", check=False,
                     launcher=TWO, env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode != 0
    ckpt3 = Path("checkpoints") / "step-00000003"
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [ckpt3.name]
    state = json.loads((two / ckpt3 / "state.json").read_text())
    assert state["world_size"] == 2 and state["identity"]["global_batch"] == 2
    # gathered from the shards: the same full tensors (names, shapes) a 1-process run writes
    assert_weights_close(straight / ckpt3 / "trainable.safetensors", two / ckpt3 / "trainable.safetensors")
    refused = distill(model, data, two, "sd15", *CROSS, "--batch-size", "1", "--resume", check=False)
    assert refused.returncode == 2 and "global batch 2" in refused.stderr and "--batch-size 2" in refused.stderr
    distill(model, data, two, "sd15", *CROSS, "--batch-size", "1", "--grad-accum", "2", "--resume")  # same 2 samples
    # 1 → 2: the uninterrupted run's step-3 checkpoint resumed by two FSDP processes
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / ckpt3, one / ckpt3)
    shutil.copy(straight / "metrics.jsonl", one / "metrics.jsonl")
    distill(model, data, one, "sd15", *CROSS, "--batch-size", "1", "--fsdp", "--resume", launcher=TWO,
            env={"ACCELERATE_USE_CPU": "1"})
    adapter = "linfusion_adapter.safetensors"
    worst = [assert_weights_close(straight / adapter, run / adapter) for run in (two, one)]
    reference = [m["loss"] for m in metrics(straight)]
    for run, worlds in ((two, [2, 2, 2, 1, 1, 1]), (one, [1, 1, 1, 2, 2, 2])):
        log = metrics(run)
        assert [m["world_size"] for m in log] == worlds and [m["step"] for m in log] == list(range(1, 7))
        assert [m["loss"] for m in log] == pytest.approx(reference, rel=1e-4)
    print(f"max |adapter diff| vs uninterrupted: 2→1 {worst[0]:.3g}, 1→2 {worst[1]:.3g}")


def test_adm_flux_and_fsdp_teacher_copy(tiny, tmp_path):
    """ADM alone on a flow model, end to end; the same under FSDP with trained q/k/v/out and a (sharded)
    teacher copy ends at the same weights, and its adapter (gathered) loads and generates."""
    model, data = tiny("flux")
    common = ["--steps", "4", "--lr", "1e-2", "--losses", "adm=1", "--trainable", "new+qkvo"]
    single = tmp_path / "single"
    distill(model, data, single, "flux", *common, "--batch-size", "2")
    sharded = tmp_path / "fsdp"  # global batch 2 = 1 x 2 processes x 1 (accumulation: see the resume test)
    distill(model, data, sharded, "flux", *common, "--batch-size", "1", "--fsdp", launcher=TWO,
            env={"ACCELERATE_USE_CPU": "1"})
    one, two = metrics(single), metrics(sharded)
    assert all(math.isfinite(m["adm"]) and set(m) >= {"adm", "loss"} and "kd" not in m for m in one)
    assert [m["world_size"] for m in two] == [2] * 4
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-3, abs=1e-9)
    meta = json.loads((sharded / "linfusion_adapter.json").read_text())
    assert meta["components"]["transformer"]["base_params"]  # trained projections, gathered from shards
    assert_weights_close(single / "linfusion_adapter.safetensors", sharded / "linfusion_adapter.safetensors")
    load_and_generate(model, sharded, "flux")


def test_adm_epsilon_model_bf16_and_gradient_checkpointing(tiny, tmp_path):
    """ADM on an ε model (sd15) in fp32, then bf16 autocast with gradient checkpointing: finite, and the
    attention-matching term (linear attention vs softmax, normalisers in fp32) within 5% of fp32's."""
    model, data = tiny("sd15")
    common = ["--steps", "4", "--lr", "1e-2", "--batch-size", "2", "--losses", "adm=1", "attn=1"]
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    distill(model, data, fp32, "sd15", *common)
    distill(model, data, bf16, "sd15", *common, "--mixed-precision", "bf16", "--gradient-checkpointing")
    a, b = metrics(fp32), metrics(bf16)
    assert all(math.isfinite(m[k]) for m in a + b for k in ("adm", "attn", "loss"))
    assert a[0]["adm"] > 0
    # ADM and KD here are differences of two near-equal predictions, dominated by bf16 rounding; attention
    # matching compares the linear attention to softmax, a real difference bf16 must not disturb
    assert b[0]["attn"] == pytest.approx(a[0]["attn"], rel=5e-2)
    load_and_generate(model, bf16, "sd15")


def test_fsdp_and_resume_options():
    import yaml

    from linfusion.distill.checkpoint import CheckpointError, check_global_batch
    from linfusion.distill.config import DistillConfig

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fsdp-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump({"fsdp": True, "steps": 2}))
    try:
        cfg = DistillConfig.from_sources(path, model="m", output="o")
    finally:
        path.unlink()
    assert cfg.fsdp and "fsdp" not in cfg.resume_identity() and "batch_size" not in cfg.resume_identity()
    with pytest.raises(ValueError, match="--teacher offload"):
        DistillConfig(fsdp=True, teacher="offload")
    with pytest.raises(ValueError, match="lora"):
        DistillConfig(fsdp=True, trainable="lora")
    check_global_batch({"global_batch": 4}, 4, 2, 2, 1, Path("ck"))
    old = {"batch_size": 1, "world_size": 2, "grad_accum": 2, "lr": 1e-4}  # a checkpoint from before
    check_global_batch(old, 4, 4, 1, 1, Path("ck"))
    assert old == {"global_batch": 4, "lr": 1e-4}
    with pytest.raises(CheckpointError, match="global batch 4.*--batch-size 2"):
        check_global_batch({"global_batch": 4}, 2, 1, 2, 1, Path("ck"))


def test_patch_options_are_checked_before_any_work():
    """A patch option of the other method or a typo stops the run when it is configured, not after
    the teacher data has been generated."""
    from linfusion.distill.config import DistillConfig

    assert DistillConfig(method="local", patch={"window": 8}).patch == {"window": 8}
    with pytest.raises(ValueError, match=r"\['window'\] do not apply to method='linear'"):
        DistillConfig(method="linear", patch={"window": 8})
    with pytest.raises(ValueError, match=r"--patch-option: unknown option\(s\) \['windw'\]"):
        DistillConfig(method="local", patch={"windw": 8})


def test_key_value_options_read_json_and_python_literals():
    from linfusion.distill.cli import parse_key_values

    parsed = parse_key_values(["window=4", "shape=tile", "conv_v=False", "gate=true", "tile=[8, 16]", "x=None"],
                              "--patch-option")
    assert parsed == {"window": 4, "shape": "tile", "conv_v": False, "gate": True, "tile": [8, 16], "x": None}
    assert parse_key_values(None, "--patch-option") is None
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_key_values(["conv_v"], "--patch-option")
