"""Benchmark: context-parallel scaling of patched attention, and data-parallel distillation.

Run where several GPUs are available (each configuration is its own ``torchrun``)::

    python benchmarks/multigpu.py                    # FLUX.1-dev size, 4096² and 8192², 1..N GPUs
    python benchmarks/multigpu.py --tiny --gpus 1 2  # CPU smoke test: tiny FLUX, gloo

Inference rows: a FLUX.1-dev-size transformer (its config, random weights, bf16),
patched with ``linear`` and ``local`` (every layer), one denoiser step (transformer
forward) timed per GPU count: ``step_ms`` (median), ``speedup`` over 1 GPU,
``comm_mb`` (MiB one rank sends per step, counted by linfusion.parallel.comm), ``comm_ms``
(rank 0's exposed communication time in the last timed step: CUDA events around each
collective, so waiting for the peer counts; per kind under ``comm``) and
``max_err`` (max |output - 1-GPU output| / max |1-GPU output|) with ``matches_1gpu``: within
MATCH_TOLERANCE (bf16: sums reduced in another order round differently; fp32 for ``--tiny``).
Distillation rows: ``linfusion distill`` under ``accelerate launch --num_processes g``
(data parallel, the same per-process batch on every g), samples/s from its metrics (the later
half of the steps). ``--distill-model pixart-sigma-size`` builds a PixArt-Σ-size pipeline (see
:func:`build_pixart_sigma_size`; 512² = 4096 image tokens, bf16 autocast, batch 8 per GPU);
the default is a tiny SD1.5 (CPU smoke test). Rows carry ``tokens`` (image tokens per sample)
and ``params_m`` (denoiser parameters, millions).

Writes ``benchmarks/results/multigpu.json`` ``{"env": {...}, "rows": [...]}`` and a PNG plot.
``--only distill`` / ``--only inference`` run one part; ``--merge A.json B.json --out X.json``
joins the rows of parts run separately (a missing or unreadable part is skipped)::

    python benchmarks/multigpu.py --only inference --out cp.json
    python benchmarks/multigpu.py --only distill --distill-model pixart-sigma-size --out distill.json
    python benchmarks/multigpu.py --merge cp.json distill.json --out multigpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                 guidance_embeds=True, axes_dims_rope=(4, 6, 6))
#: PixArt-Σ-XL-2-1024-MS transformer geometry (its published config); the channels that meet
#: the VAE and the text encoder come from LinFusion-Mini instead (see build_pixart_sigma_size)
PIXART_SIGMA_1024 = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2,
                         cross_attention_dim=1152, attention_bias=True, activation_fn="gelu-approximate",
                         norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                         num_embeds_ada_norm=1000, use_additional_conditions=False, attention_type="default")
PIXART_SIGMA_SIZE = "pixart-sigma-size"
#: distillation defaults per model kind: resolution, optimizer steps, batch per process, prompts, data steps
DISTILL_DEFAULTS = {
    PIXART_SIGMA_SIZE: dict(resolution="512", steps=12, batch=8, prompts=8, data_steps=4),
    "tiny": dict(resolution="32x48", steps=6, batch=1, prompts=4, data_steps=4),
}


# ------------------------------------------------------------------------------------------------
# worker (one torchrun job: one GPU count, every resolution and method)
# ------------------------------------------------------------------------------------------------


def worker(args) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    from linfusion import patch_pipeline, unpatch_pipeline
    from linfusion.parallel import disable_context_parallel, enable_context_parallel, init_context_parallel

    torch.set_num_threads(1) if args.tiny else None
    cp = init_context_parallel(timeout=600)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = FLUX_TINY if args.tiny else FLUX_DEV
    torch.manual_seed(0)
    with torch.device(cp.device):  # same seed on every rank: same random weights
        model = FluxTransformer2DModel(**config).to(dtype).eval()
    holder = type("Pipe", (), {})()
    holder.transformer = model
    results = []
    for pixels in args.resolutions:
        side = pixels // 16  # VAE /8, 2x2 packing
        gen = torch.Generator("cpu").manual_seed(1)
        inputs = dict(
            hidden_states=torch.randn(1, side * side, config["in_channels"], generator=gen).to(cp.device, dtype),
            encoder_hidden_states=torch.randn(1, args.text, config["joint_attention_dim"], generator=gen).to(cp.device, dtype),
            pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=gen).to(cp.device, dtype),
            timestep=torch.tensor([0.5], device=cp.device, dtype=dtype),
            guidance=torch.tensor([3.5], device=cp.device, dtype=dtype),
            img_ids=_img_ids(side).to(cp.device), txt_ids=torch.zeros(args.text, 3, device=cp.device),
            return_dict=False,
        )
        for method in args.methods:
            options = {"window": args.window, "shape": args.shape} if method == "local" else {}
            patch_pipeline(holder, method=method, layers="all", **options)
            if cp.world > 1:
                enable_context_parallel(holder, cp)
            times = []
            with torch.no_grad():
                for i in range(args.warmup + args.repeats):
                    cp.stats.reset()
                    _sync(cp.device)
                    start = time.perf_counter()
                    out = model(**inputs)[0]
                    _sync(cp.device)
                    if i >= args.warmup:
                        times.append((time.perf_counter() - start) * 1e3)
            if cp.world > 1:
                disable_context_parallel(holder)
            unpatch_pipeline(holder)
            if cp.rank == 0:
                torch.save(out.float().cpu(), Path(args.scratch) / f"out_{pixels}_{method}_{cp.world}.pt")
                results.append({"task": "inference", "model": "flux-tiny" if args.tiny else "flux-dev",
                                "resolution": pixels, "method": method, "gpus": cp.world,
                                "step_ms": statistics.median(times), "comm_mb": cp.stats.total_bytes / 2**20,
                                "comm_ms": cp.stats.total_ms, "comm": cp.stats.summary()})
    if cp.rank == 0:
        (Path(args.scratch) / f"rows_{cp.world}.json").write_text(json.dumps(results))
    cp.close()


def _img_ids(side: int):
    import torch

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def _repo_on_path() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def _env(tiny: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p), HF_HUB_OFFLINE="1")
    if tiny:
        env["OMP_NUM_THREADS"] = "1"
    return env


#: relative max error under which a multi-GPU output counts as equal to the 1-GPU one
MATCH_TOLERANCE = {"bf16": 2e-2, "fp32": 1e-4}


def inference_rows(args, argv: list[str], save=None) -> list[dict]:
    """One torchrun per process count; ``save(rows)`` after each (rows without speedup / max_err yet)."""
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for gpus in args.gpus:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                   __file__, "--worker", "--scratch", scratch, *argv]
            proc = subprocess.run(cmd, env=_env(args.tiny), capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"the {gpus}-process run failed")
            rows += json.loads((Path(scratch) / f"rows_{gpus}.json").read_text())
            save(rows) if save else None
        base = {(r["resolution"], r["method"]): r for r in rows if r["gpus"] == min(args.gpus)}
        for row in rows:
            ref = base[(row["resolution"], row["method"])]
            row["speedup"] = ref["step_ms"] / row["step_ms"] * min(args.gpus)
            a = torch.load(Path(scratch) / f"out_{row['resolution']}_{row['method']}_{row['gpus']}.pt", weights_only=True)
            b = torch.load(Path(scratch) / f"out_{ref['resolution']}_{ref['method']}_{ref['gpus']}.pt", weights_only=True)
            row["max_err"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            row["tolerance"] = MATCH_TOLERANCE["fp32" if args.tiny else "bf16"]
            row["matches_1gpu"] = row["max_err"] <= row["tolerance"]
            if not row["matches_1gpu"]:
                print(f"MISMATCH: {row['gpus']} GPUs, {row['resolution']} {row['method']}: max_err "
                      f"{row['max_err']:.2e} > {row['tolerance']:.0e}", file=sys.stderr)
    return rows


def pixart_sigma_size_config(mini_config: dict | None = None, **overrides) -> dict:
    """PixArtTransformer2DModel kwargs: PixArt-Σ 1024 geometry, Mini's in/out/caption channels and sample size.

    ``mini_config``: LinFusion-Mini's transformer config (read from the bundled folder when None).
    ``overrides`` replace any key (the tests shrink ``num_layers``).
    """
    if mini_config is None:
        _repo_on_path()
        from linfusion.mini.bundle import PIPELINE_DIR, mini_is_bundled

        if not mini_is_bundled():
            raise SystemExit(f"{PIXART_SIGMA_SIZE} needs the bundled LinFusion-Mini (text encoder, VAE)")
        mini_config = json.loads((PIPELINE_DIR / "transformer" / "config.json").read_text())
    sigma = mini_config["out_channels"] // mini_config["in_channels"]  # 2 with a learned-variance half; Mini: 1
    config = dict(PIXART_SIGMA_1024, in_channels=mini_config["in_channels"],
                  out_channels=mini_config["in_channels"] * sigma, caption_channels=mini_config["caption_channels"],
                  sample_size=mini_config["sample_size"], interpolation_scale=mini_config.get("interpolation_scale"))
    config.update(overrides)
    return config


def build_pixart_sigma_size(folder: str | Path, *, seed: int = 0, **overrides) -> Path:
    """Write a diffusers ``PixArtSigmaPipeline`` folder with a PixArt-Σ-size transformer; returns ``folder``.

    Real size: the transformer (what ``linfusion distill`` patches and trains, and nearly all of
    a step's cost): PixArt-Σ 1024's 28 blocks of 16 heads × 72 (width 1152), patch 2, cross-attention
    to 1152, adaLN-single; about 0.6B parameters, random weights from ``torch.manual_seed(seed)``,
    fp32, saved as safetensors.

    Borrowed from the bundled LinFusion-Mini: the T5 text encoder (width 192) with its tokenizer, the
    VAE (8 latent channels, /4) and the scheduler. They are not trained and their size does not change
    the transformer's cost, except through the number of caption tokens (the tokenizer pads to 300,
    as PixArt-Σ's does). So the transformer takes Mini's ``in_channels`` / ``caption_channels`` (and
    its ``out_channels`` convention: no learned-variance half) and ``sample_size``; with Mini's /4 VAE,
    512² is 64×64 = 4096 image tokens, PixArt-Σ's count at 1024².

    ``overrides``: transformer config keys to replace (the tests build a 2-layer variant).
    """
    import torch
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    _repo_on_path()
    from linfusion.mini import load_mini_pipeline

    mini = load_mini_pipeline(torch.float32)
    config = pixart_sigma_size_config(dict(mini.transformer.config), **overrides)
    if config["caption_channels"] != mini.text_encoder.config.d_model:
        raise ValueError(f"caption_channels {config['caption_channels']} != Mini's text width "
                         f"{mini.text_encoder.config.d_model}")
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**config)
    pipe = PixArtSigmaPipeline(tokenizer=mini.tokenizer, text_encoder=mini.text_encoder, vae=mini.vae,
                               transformer=transformer, scheduler=mini.scheduler)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def denoiser_facts(folder: str | Path, resolution: str) -> dict:
    """``{"denoiser", "params_m", "tokens"}`` of a pipeline folder, read from its configs and safetensors headers.

    ``tokens``: image tokens per sample at ``resolution`` ("N" or "HxW" pixels): latent size (VAE
    downsampling 2^(blocks-1)) over the denoiser's patch size (1 for UNets: their first level).
    """
    from safetensors import safe_open

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    name = next(n for n in ("transformer", "unet") if n in index)
    config = json.loads((folder / name / "config.json").read_text())
    params = 0
    for file in sorted((folder / name).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                params += math.prod(shape)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    down = 2 ** (len(vae["block_out_channels"]) - 1)
    patch = config.get("patch_size") or 1
    height, _, width = resolution.lower().partition("x")
    height, width = int(height), int(width or height)
    return {"denoiser": config.get("_class_name", name), "params_m": params / 1e6,
            "tokens": (height // down // patch) * (width // down // patch)}


def distill_settings(args) -> dict:
    """Resolved distillation settings: explicit flags over the defaults of the model kind."""
    kind = PIXART_SIGMA_SIZE if args.distill_model == PIXART_SIGMA_SIZE else "tiny"
    values = dict(DISTILL_DEFAULTS[kind])
    for key in values:
        given = getattr(args, f"distill_{key}")
        values[key] = given if given is not None else values[key]
    values["precision"] = args.distill_precision
    return values


def distill_rows(args, save=None) -> list[dict]:
    """samples/s of data-parallel distillation: (samples of the later steps) / (their time).

    A launch that fails gives a row with ``status: failed`` and the error's tail (the other process
    counts still run); CUDA out of memory on the first launch halves the batch per process and retries.
    ``save(rows)`` is called after every launch (partial results survive a timeout).
    """
    settings = distill_settings(args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model = args.distill_model
        started = time.perf_counter()
        if model is None:
            _repo_on_path()
            from linfusion.testing.tiny_pipelines import save_tiny_pipeline

            model = save_tiny_pipeline("sd15", Path(scratch) / "model")
        elif model == PIXART_SIGMA_SIZE:
            model = build_pixart_sigma_size(Path(scratch) / PIXART_SIGMA_SIZE)
        build_s = time.perf_counter() - started
        resolution = settings["resolution"]
        facts = denoiser_facts(model, resolution)
        print(f"distill: {Path(str(model)).name} {facts['denoiser']} {facts['params_m']:.1f}M params, "
              f"{resolution} px = {facts['tokens']} image tokens, precision {settings['precision']}, "
              f"batch {settings['batch']} per process, {settings['steps']} steps (built in {build_s:.1f} s)", flush=True)
        data = Path(scratch) / "data"
        gen = ["--resolution", resolution]
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "linfusion", "generate-data", "--model", str(model), "--output", str(data), *gen,
               "--num-prompts", str(settings["prompts"]), "--data-steps", str(settings["data_steps"]), "--no-progress"]
        proc = subprocess.run(cmd, env=_env(args.tiny), capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit("generate-data failed")
        data_s = time.perf_counter() - started
        shards = json.loads((data / "manifest.json").read_text())["shards"]
        samples = sum(sum(shard["rows"].values()) for shard in shards)
        print(f"distill: data {samples} samples ({settings['prompts']} prompts x {settings['data_steps']} steps) "
              f"in {data_s:.1f} s", flush=True)
        precision, batch = settings["precision"], settings["batch"]
        common = dict(task="distill", model=Path(str(model)).name, resolution=resolution, method="linear",
                      comm_mb=None, tokens=facts["tokens"], params_m=round(facts["params_m"], 1), precision=precision,
                      steps=settings["steps"], data_samples=samples, data_s=round(data_s, 1), build_s=round(build_s, 1))
        for gpus in args.gpus:
            while True:
                out = Path(scratch) / f"out{gpus}_b{batch}"
                proc, wall_s = _launch_distill(args, gpus, model, data, out, settings, batch)
                # per-process memory is the same for every process count: halve the batch on the first launch only
                if proc.returncode != 0 and not rows and batch > 1 and "out of memory" in proc.stderr.lower():
                    batch //= 2
                    print(f"distill: out of memory on {gpus} process(es); batch per process now {batch}", flush=True)
                    continue
                break
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                print(f"distill: {gpus} process(es) failed (exit {proc.returncode})", flush=True)
                rows.append({**common, "gpus": gpus, "batch_per_process": batch, "status": "failed",
                             "wall_s": round(wall_s, 1), "error": proc.stderr[-1500:]})
                save(rows) if save else None
                continue
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            first, last = metrics[len(metrics) // 2], metrics[-1]  # skip warm-up steps
            seconds = max(last["time"] - first["time"], 1e-9)
            rate = (last["samples"] - first["samples"]) / seconds
            timed = max(last["step"] - first["step"], 1)
            rows.append({**common, "gpus": gpus, "status": "ok", "step_ms": seconds / timed * 1e3,
                         "samples_per_s": rate, "batch_per_process": batch, "global_batch": last["global_batch"],
                         "timed_steps": timed, "wall_s": round(wall_s, 1), "loss": last.get("loss")})
            print(f"distill: {gpus} process(es): {rate:.2f} samples/s, {rows[-1]['step_ms']:.0f} ms/step "
                  f"(launch to exit {wall_s:.1f} s)", flush=True)
            _speedups(rows)
            save(rows) if save else None
    return rows


def _speedups(rows: list[dict]) -> None:
    """``speedup`` of the rows that ran: samples/s over those of the fewest GPUs that ran, times that count."""
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        base = min(ok, key=lambda r: r["gpus"])
        for row in ok:
            row["speedup"] = row["samples_per_s"] / base["samples_per_s"] * base["gpus"]


def _launch_distill(args, gpus: int, model, data: Path, out: Path, settings: dict, batch: int):
    """One ``accelerate launch ... -m linfusion distill`` on ``gpus`` processes; (CompletedProcess, seconds)."""
    precision = settings["precision"]
    # the same value to the launcher and to the trainer (the trainer's Accelerator takes its own flag's)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
                "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no"]
    launcher += ["--multi_gpu"] if gpus > 1 else []  # on CPU with ACCELERATE_USE_CPU=1 (--tiny)
    cmd = [*launcher, "-m", "linfusion", "distill", "--model", str(model), "--data", str(data),
           "--output", str(out), "--resolution", settings["resolution"], "--steps", str(settings["steps"]),
           "--log-every", "1", "--batch-size", str(batch), "--mixed-precision", precision, "--no-progress"]
    env = _env(args.tiny) | ({"ACCELERATE_USE_CPU": "1"} if args.tiny else {})
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return proc, time.perf_counter() - started


def merge(paths: list[str]) -> tuple[dict, list[dict]]:
    """env and rows of several result files (parts run separately); missing or unreadable ones are skipped."""
    env: dict = {"parts": []}
    rows: list[dict] = []
    for path in paths:
        try:
            part = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            print(f"merge: skipping {path}: {error}", file=sys.stderr)
            continue
        parts = [*env["parts"], {"file": Path(path).name, "argv": part["env"].get("argv"),
                                 "partial": bool(part["env"].get("partial"))}]
        env = {**part["env"], **env, "parts": parts}
        rows += part["rows"]
    env.pop("partial", None)
    env.pop("argv", None)  # each part's is under "parts"
    return env, rows


def _series(rows: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """(task resolution method) -> sorted [(gpus, speedup, step_ms)] of the rows with a speedup."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        if r.get("speedup") is not None:
            series.setdefault(f"{r['task']} {r['resolution']} {r['method']}", []).append(
                (r["gpus"], r["speedup"], r["step_ms"]))
    return {name: sorted(pts) for name, pts in sorted(series.items())}


def plot(rows: list[dict], path: Path) -> None:
    """Speedup over one GPU against GPUs, one line per (task, resolution, method), ideal dashed;
    matplotlib when installed, else a plain PIL drawing (the GPU machines may lack matplotlib)."""
    series = _series(rows)
    if not series:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(series, path)
        return
    max_g = max(g for pts in series.values() for g, _, _ in pts)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([1, max_g], [1, max_g], "--", color="grey", label="ideal")
    for name, pts in series.items():
        gpus, speedups = [g for g, _, _ in pts], [s for _, s, _ in pts]
        ax.plot(gpus, speedups, "o-", label=name)
        ax.annotate(f"{speedups[-1]:.2f}×", (gpus[-1], speedups[-1]), textcoords="offset points", xytext=(6, -3),
                    fontsize=8)
    ax.set_xticks(sorted({g for pts in series.values() for g, _, _ in pts}))
    ax.set_xlabel("GPUs")
    ax.set_ylabel("speedup over 1 GPU")
    ax.set_title("LinFusion multi-GPU scaling (H200): context-parallel inference, data-parallel distillation",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_pil(series: dict[str, list[tuple[int, float, float]]], path: Path) -> None:
    from PIL import Image, ImageDraw

    max_g = max(g for pts in series.values() for g, _, _ in pts)
    w, h, m = 640, 420, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    top = max(max_g, max(s for pts in series.values() for _, s, _ in pts))
    x = lambda g: m + (w - 2 * m) * (g - 1) / max(max_g - 1, 1)  # noqa: E731
    y = lambda s: h - m - (h - 2 * m) * s / top  # noqa: E731
    d.line([(x(1), y(1)), (x(max_g), y(max_g))], fill=(200, 200, 200))  # ideal
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for i, (name, pts) in enumerate(series.items()):
        c = colors[i % len(colors)]
        if len(pts) > 1:
            d.line([(x(g), y(s)) for g, s, _ in pts], fill=c, width=2)
        d.text((w - m - 200, m + 14 * i), f"{name}: {pts[-1][1]:.2f}x", fill=c)
    d.text((m, h - m + 10), f"GPUs 1..{max_g}   (y: speedup, 0..{top:.0f}; grey: ideal)", fill="black")
    img.save(path)


def write(out: Path, env: dict, rows: list[dict], final: bool = True) -> None:
    """The result file (atomically); when ``final``, also the PNG and a printout of the rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"env": env if final else {**env, "partial": True}, "rows": rows}, indent=1))
    os.replace(tmp, out)
    if not final:
        return
    plot(rows, out.with_suffix(".png"))
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("comm", "error")})
    print(f"wrote {out} and {out.with_suffix('.png')}" if rows else f"wrote {out} (no rows)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny FLUX, gloo, small sizes")
    parser.add_argument("--gpus", type=int, nargs="+", default=None, help="process counts (default 1 2 4 8 ≤ GPUs)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=None, help="pixels (default 4096 8192)")
    parser.add_argument("--methods", nargs="+", default=["linear", "local"])
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--shape", default="tile")
    parser.add_argument("--text", type=int, default=512, help="text tokens")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("inference", "distill"), default=None, help="run one part (default both)")
    parser.add_argument("--distill-model", default=None,
                        help=f"pipeline folder for the distillation rows, or {PIXART_SIGMA_SIZE!r} (built in the "
                             "scratch folder: PixArt-Σ-size transformer, LinFusion-Mini text encoder and VAE); "
                             "default: a tiny SD1.5")
    parser.add_argument("--distill-precision", choices=("no", "bf16", "fp16"), default=None,
                        help="accelerate / linfusion distill mixed precision "
                             "(default bf16 with CUDA, no otherwise or with --tiny)")
    parser.add_argument("--distill-resolution", default=None, help="pixels, N or HxW (default 512 for "
                        f"{PIXART_SIGMA_SIZE}, else 32x48)")
    parser.add_argument("--distill-steps", type=int, default=None, help="optimizer steps (default 12, tiny 6); "
                        "samples/s from the later half")
    parser.add_argument("--distill-batch", type=int, default=None, help="samples per process (default 8, tiny 1)")
    parser.add_argument("--distill-prompts", type=int, default=None,
                        help="generate-data --num-prompts (default 8, tiny 4)")
    parser.add_argument("--distill-data-steps", type=int, default=None, help="generate-data --data-steps (default 4)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="join the rows of these result files into --out (and its PNG); nothing is run")
    parser.add_argument("--plot-only", default=None, metavar="JSON",
                        help="redraw the PNG beside this result file (e.g. with matplotlib here); nothing is run")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/multigpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plot_only:
        result = Path(args.plot_only)
        return plot(json.loads(result.read_text())["rows"], result.with_suffix(".png"))
    if args.merge:
        env, rows = merge(args.merge)
        return write(Path(args.out), env, rows)
    if args.resolutions is None:
        args.resolutions = [128, 256] if args.tiny else [4096, 8192]
    if args.tiny:  # small grids (8x8, 16x16 tokens): short text, a circle window of 2
        args.text, args.window, args.shape = min(args.text, 8), min(args.window, 2), "circle"
    if args.worker:
        return worker(args)
    import torch

    if args.distill_precision is None:
        args.distill_precision = "bf16" if torch.cuda.is_available() and not args.tiny else "no"
    if args.gpus is None:
        n = 2 if args.tiny else torch.cuda.device_count()
        args.gpus = [g for g in (1, 2, 4, 8) if g <= n] or [1]
    argv = argv if argv is not None else sys.argv[1:]
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (there already when run as a script)
    from timing import environment

    env = {**environment(), "python": platform.python_version(), "tiny": args.tiny,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "gpus_available": torch.cuda.device_count(), "argv": argv}
    out = Path(args.out)
    rows: list[dict] = []
    if args.only in (None, "inference"):
        rows += inference_rows(args, argv, save=lambda part: write(out, env, rows + part, final=False))
    if args.only in (None, "distill"):
        rows += distill_rows(args, save=lambda part: write(out, env, rows + part, final=False))
    write(out, env, rows)
    failed = [r["gpus"] for r in rows if r.get("status") == "failed"]
    if failed:
        raise SystemExit(f"distillation failed on {failed} process(es); see the rows' 'error'")


if __name__ == "__main__":
    main()
