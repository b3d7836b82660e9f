"""Benchmark: context-parallel scaling of patched attention, and data-parallel distillation.

Run where several GPUs are available (each configuration is its own ``torchrun``)::

    python benchmarks/multigpu.py                    # FLUX.1-dev size, 4096² and 8192², 1..N GPUs
    python benchmarks/multigpu.py --tiny --gpus 1 2  # CPU smoke test: tiny FLUX, gloo

Inference rows: a FLUX.1-dev-size transformer (its config, random weights, bf16),
patched with ``linear`` and ``local`` (every layer), one denoiser step (transformer
forward) timed per GPU count: ``step_ms`` (median), ``speedup`` over 1 GPU,
``comm_mb`` (MiB one rank sends per step, counted by linfusion.parallel.comm) and
``max_err`` (max |output - 1-GPU output| / max |1-GPU output|).
Distillation rows: ``linfusion distill`` under ``accelerate launch --num_processes g``
on a tiny pipeline (``--distill-model`` for another), samples/s from its metrics.

Writes ``benchmarks/results/multigpu.json`` ``{"env": {...}, "rows": [...]}`` and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
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


# ------------------------------------------------------------------------------------------------
# worker (one torchrun job: one GPU count, every resolution and method)
# ------------------------------------------------------------------------------------------------


def worker(args) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    from linfusion import patch_pipeline, unpatch_pipeline
    from linfusion.parallel import enable_context_parallel, disable_context_parallel, init_context_parallel

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
                                "comm": cp.stats.summary()})
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


def _env(tiny: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p), HF_HUB_OFFLINE="1")
    if tiny:
        env["OMP_NUM_THREADS"] = "1"
    return env


def inference_rows(args) -> list[dict]:
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for gpus in args.gpus:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                   __file__, "--worker", "--scratch", scratch, *sys.argv[1:]]
            proc = subprocess.run(cmd, env=_env(args.tiny), capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"the {gpus}-process run failed")
            rows += json.loads((Path(scratch) / f"rows_{gpus}.json").read_text())
        base = {(r["resolution"], r["method"]): r for r in rows if r["gpus"] == min(args.gpus)}
        for row in rows:
            ref = base[(row["resolution"], row["method"])]
            row["speedup"] = ref["step_ms"] / row["step_ms"] * min(args.gpus)
            a = torch.load(Path(scratch) / f"out_{row['resolution']}_{row['method']}_{row['gpus']}.pt")
            b = torch.load(Path(scratch) / f"out_{ref['resolution']}_{ref['method']}_{ref['gpus']}.pt")
            row["max_err"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    return rows


def distill_rows(args) -> list[dict]:
    """samples/s of data-parallel distillation: (samples of the later steps) / (their time)."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model = args.distill_model
        if model is None:
            sys.path.insert(0, str(REPO))
            from linfusion.testing.tiny_pipelines import save_tiny_pipeline

            model = save_tiny_pipeline("sd15", Path(scratch) / "model")
        data = Path(scratch) / "data"
        gen = ["--resolution", args.distill_resolution]
        subprocess.run([sys.executable, "-m", "linfusion", "generate-data", "--model", str(model), "--output", str(data),
                        *gen, "--num-prompts", "4", "--data-steps", "4", "--no-progress"],
                       env=_env(args.tiny), check=True, capture_output=True)
        for gpus in args.gpus:
            launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
            launcher += ["--multi_gpu"] if gpus > 1 else []  # on CPU with ACCELERATE_USE_CPU=1 (--tiny)
            out = Path(scratch) / f"out{gpus}"
            cmd = [*launcher, "-m", "linfusion", "distill", "--model", str(model), "--data", str(data),
                   "--output", str(out), *gen, "--steps", str(args.distill_steps), "--log-every", "1",
                   "--batch-size", str(args.distill_batch * gpus), "--no-progress"]
            env = _env(args.tiny) | ({"ACCELERATE_USE_CPU": "1"} if args.tiny else {})
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"distillation on {gpus} processes failed")
            metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
            first, last = metrics[len(metrics) // 2], metrics[-1]  # skip warm-up steps
            rate = (last["samples"] - first["samples"]) / max(last["time"] - first["time"], 1e-9)
            rows.append({"task": "distill", "model": Path(str(model)).name, "resolution": args.distill_resolution,
                         "method": "linear", "gpus": gpus, "step_ms": None, "samples_per_s": rate, "comm_mb": None})
    base = next(r for r in rows if r["gpus"] == min(args.gpus))
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base["samples_per_s"] * min(args.gpus)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Speedup vs GPUs per (task, resolution, method), drawn with PIL (no matplotlib needed)."""
    from PIL import Image, ImageDraw

    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['task']} {r['resolution']} {r['method']}", []).append((r["gpus"], r["speedup"]))
    max_g = max(r["gpus"] for r in rows)
    w, h, m = 640, 420, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    top = max(max_g, max(s for pts in series.values() for _, s in pts))
    x = lambda g: m + (w - 2 * m) * (g - 1) / max(max_g - 1, 1)  # noqa: E731
    y = lambda s: h - m - (h - 2 * m) * s / top  # noqa: E731
    d.line([(x(1), y(1)), (x(max_g), y(max_g))], fill=(200, 200, 200))  # ideal
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for i, (name, pts) in enumerate(sorted(series.items())):
        pts = sorted(pts)
        c = colors[i % len(colors)]
        d.line([(x(g), y(s)) for g, s in pts], fill=c, width=2) if len(pts) > 1 else None
        d.text((w - m - 200, m + 14 * i), name, fill=c)
    d.text((m, h - m + 10), f"GPUs 1..{max_g}   (y: speedup, grey: ideal)", fill="black")
    img.save(path)


def main() -> None:
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
    parser.add_argument("--no-distill", action="store_true")
    parser.add_argument("--distill-model", default=None, help="pipeline folder for the distillation rows")
    parser.add_argument("--distill-resolution", default="32x48")
    parser.add_argument("--distill-steps", type=int, default=6)
    parser.add_argument("--distill-batch", type=int, default=1, help="per process")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/multigpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resolutions is None:
        args.resolutions = [128, 256] if args.tiny else [4096, 8192]
    if args.tiny:  # small grids (8x8, 16x16 tokens): short text, a circle window of 2
        args.text, args.window, args.shape = min(args.text, 8), min(args.window, 2), "circle"
    if args.worker:
        return worker(args)
    import torch

    if args.gpus is None:
        n = 2 if args.tiny else torch.cuda.device_count()
        args.gpus = [g for g in (1, 2, 4, 8) if g <= n] or [1]
    rows = inference_rows(args)
    if not args.no_distill:
        rows += distill_rows(args)
    from timing import environment  # benchmarks/ is on sys.path when run as a script

    env = {**environment(), "python": platform.python_version(), "tiny": args.tiny,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "gpus_available": torch.cuda.device_count(), "argv": sys.argv[1:]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "comm"})
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
