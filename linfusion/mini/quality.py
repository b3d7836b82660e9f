"""The LinFusion-Mini quality benchmark: prompt adherence and fidelity to the teacher.

For the teacher, the zero-shot patched pipelines (linear, local; no distillation) and
each distilled student, on a fixed held-out prompt set with fixed seeds (the initial
noise of prompt ``i`` depends only on ``(seed, i)`` and the size): adherence (fraction of
images the analytic checker passes: every claim of the prompt must hold; ``claims_adherence``
gives the mean fraction of claims that hold, as a finer secondary figure, and
``failures_by_attribute`` the share of images failing each attribute: count, shape, relation, ...),
PSNR and SSIM against the teacher's image of the
same prompt and noise, at the base resolution and at 2x and 4x, and seconds per image
(batch 1, median of a few runs). Writes ``quality.json``::

    {"base_resolution", "checker_accuracy", "rows": [{"model", "resolution", "adherence",
     "psnr_vs_teacher", "ssim_vs_teacher", "sec_per_image"}], ...settings}

(the teacher's own rows have ``null`` PSNR/SSIM) and a PNG grid (prompts x models at the
base resolution, with the world's ground-truth render first).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..config import METHOD_OPTIONS
from .model import TEXT_LEN

MODELS = ("teacher", "zero_shot_linear", "zero_shot_local", "linear", "local")


def load_pipeline(folder: str | Path | None, device, dtype: torch.dtype = torch.float32):
    """A LinFusion-Mini pipeline folder (``None``: the bundled one) on ``device``."""
    from diffusers import DiffusionPipeline

    if folder is None:
        from .bundle import load_mini_pipeline

        pipe = load_mini_pipeline(torch_dtype=dtype)
    else:
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def initial_latents(pipe, n: int, size: int, seed: int, start: int = 0) -> torch.Tensor:
    """Noise of prompts ``start..start+n-1``: one seeded CPU generator per prompt."""
    channels = pipe.transformer.config.in_channels
    side = size // pipe.vae_scale_factor
    return torch.stack([
        torch.randn((channels, side, side), generator=torch.Generator("cpu").manual_seed(seed * 1_000_003 + i))
        for i in range(start, start + n)
    ])


@torch.no_grad()
def generate(pipe, prompts: list[str], *, size: int, steps: int, seed: int, batch: int = 16,
             guidance_scale: float = 4.5) -> list[np.ndarray]:
    """uint8 HxWx3 images of ``prompts`` at ``size``x``size``, batch-independent noise."""
    device = pipe._execution_device
    dtype = pipe.transformer.dtype
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        latents = initial_latents(pipe, len(chunk), size, seed, start).to(device, dtype)
        out = pipe(prompt=chunk, negative_prompt="", latents=latents, height=size, width=size,
                   num_inference_steps=steps, guidance_scale=guidance_scale, use_resolution_binning=False,
                   clean_caption=False, max_sequence_length=TEXT_LEN, output_type="np").images
        images += [(np.clip(np.asarray(im, np.float32), 0, 1) * 255).round().astype(np.uint8) for im in out]
    return images


def time_per_image(pipe, prompt: str, *, size: int, steps: int, runs: int) -> float:
    """Median wall time of a batch-1 generation (synchronised on CUDA)."""
    cuda = pipe._execution_device.type == "cuda"
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(pipe, [prompt], size=size, steps=steps, seed=0, batch=1)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- metrics


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03), mean over RGB."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        f = lambda t: gaussian_filter(t, 1.5, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        values.append(float(s.mean()))
    return float(np.mean(values))


def _check(args: tuple[np.ndarray, str]) -> tuple[bool, float, set[str]]:
    """(every claim of the prompt holds, fraction of its claims that hold, attributes with a failed claim)."""
    from .checker import AdherenceChecker, attribute_kind

    image, prompt = args
    score = AdherenceChecker().score(image, prompt)
    failed = {attribute_kind(claim) for claim, ok in score["attributes"].items() if not ok}
    return bool(score["passed"]), float(score["adherence"]), failed


def failure_rates(failed: list[set[str]]) -> dict[str, float]:
    """Per attribute, the fraction of images where at least one claim of it failed (sorted, worst first)."""
    kinds = sorted({k for f in failed for k in f})
    rates = {k: sum(k in f for f in failed) / max(1, len(failed)) for k in kinds}
    return dict(sorted(rates.items(), key=lambda kv: -kv[1]))


def _checker_accuracy(n: int) -> dict:
    from .checker import validate_checker

    return validate_checker(n=n)


# --------------------------------------------------------------------------- grid


def save_grid(path: Path, prompts: list[str], columns: dict[str, list[np.ndarray]], cell: int = 128) -> None:
    """Rows = prompts, columns = models (ground truth first); labels from PIL's default font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    text_w, header, gap = 190, 18, 4
    names = list(columns)
    width = text_w + len(names) * (cell + gap)
    height = header + len(prompts) * (cell + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((text_w + j * (cell + gap) + 2, 3), name, fill="black", font=font)
    for i, prompt in enumerate(prompts):
        y = header + i * (cell + gap)
        words, lines, line = prompt.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > 30:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines[:9]):
            draw.text((4, y + 4 + 13 * k), text, fill="black", font=font)
        for j, name in enumerate(names):
            img = Image.fromarray(columns[name][i]).resize((cell, cell), Image.LANCZOS)
            canvas.paste(img, (text_w + j * (cell + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# --------------------------------------------------------------------------- benchmark


def apply_patch(pipe, method: str | None, adapter: str | None, options: dict | None = None) -> None:
    """Unpatch, then patch with ``method`` (zero-shot) or ``adapter``, the replacement forced in
    every layer at every size (``dense_fallback=False``: adapters store the users' default,
    which may run dense attention where it is faster -- not what is being measured)."""
    from ..patch import is_patched, patch_pipeline, unpatch_pipeline

    options = dict(options or {})
    if is_patched(pipe):
        unpatch_pipeline(pipe)
    if adapter:
        extra = {"backend": options["backend"]} if options.get("backend") else {}
        patch_pipeline(pipe, adapter=adapter, dense_fallback=False, **extra)
    elif method:
        patch_pipeline(pipe, method=method, **{"layers": "all", "dense_fallback": False, **options})


#: per method, the attention options that define a student's attention function (not its learned
#: parts) and so its zero-shot version: the local window, the linear feature map
ZERO_SHOT_OPTIONS = {"local": METHOD_OPTIONS["local"],
                     "linear": ("feature_map", "hedgehog_features")}


def zero_shot_options(method: str, adapter: str | Path | None, window: int) -> dict:
    """The zero-shot ``method`` row's options: the student's own attention function (local: radius,
    shape, pooled global branch; linear: feature map) read from its adapter, so the row shows what
    distillation adds and nothing else. Without an adapter: ``{"window": window}`` (local), ``{}`` (linear).
    Zero-initialised learned parts (feature MLPs, ``conv_v``) change nothing before training and are left out."""
    if not adapter:
        return {"window": window} if method == "local" else {}
    from ..adapter import read_adapter_config

    components = read_adapter_config(Path(adapter))["components"]
    options = next(iter(components.values()))["options"]
    return {k: options[k] for k in ZERO_SHOT_OPTIONS[method] if options.get(k) is not None}


def run_benchmark(pipeline: str | Path | None = None, adapters: dict[str, str | None] | None = None, *,
                  n_prompts: int = 96, seed: int = 0, steps: int = 20, scales: tuple[int, ...] = (1, 2, 4),
                  batch: int = 32, device: str | torch.device | None = None, window: int = 4,
                  time_runs: int = 3, grid_prompts: int = 6, checker_n: int = 200, workers: int = 0,
                  out_json: str | Path | None = None, out_grid: str | Path | None = None,
                  models: tuple[str, ...] = MODELS, scenes: str = "all") -> dict:
    """Run the benchmark; ``pipeline``/``adapters`` default to the bundled LinFusion-Mini; ``scenes``
    filters the held-out prompts (:data:`linfusion.mini.world.SCENE_FILTERS`, e.g. "counted")."""
    from .world import parse_prompt, prompt_set, render

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if adapters is None:
        adapters = {}
        for method in ("linear", "local"):
            try:
                from .bundle import bundled_adapter

                adapters[method] = bundled_adapter(method)
            except (FileNotFoundError, ValueError):
                adapters[method] = None
    pipe = load_pipeline(pipeline, device)
    base = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    prompts = prompt_set("heldout", n_prompts, seed=seed, scenes=scenes)
    pool = None
    if workers > 0:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
        accuracy_job = pool.apply_async(_checker_accuracy, (checker_n,))
    zero_shot = {m: zero_shot_options(m, adapters.get(m), window) for m in ("linear", "local")}
    started = time.time()
    rows, skipped, backends = [], [], {}
    teacher_images: dict[int, list[np.ndarray]] = {}
    grid: dict[str, list[np.ndarray]] = {"world (truth)": [render(parse_prompt(p), base, base, seed) for p in prompts[:grid_prompts]]}
    for name in models:
        method = {"zero_shot_linear": "linear", "zero_shot_local": "local"}.get(name)
        adapter = adapters.get(name) if name in ("linear", "local") else None
        if name in ("linear", "local") and not adapter:
            skipped.append(name)
            continue
        options = zero_shot[method] if method else {}
        apply_patch(pipe, method, adapter, options)
        if method or adapter:
            try:  # the default kernel backend (Triton on CUDA) must run this model; else the PyTorch one
                generate(pipe, prompts[:1], size=base * max(scales), steps=1, seed=seed, batch=1)
            except Exception as error:  # noqa: BLE001 - any kernel failure: fall back, and say so
                print(f"[quality] {name}: default backend failed ({error!r}); using backend='torch'", flush=True)
                backends[name] = "torch"
                apply_patch(pipe, method, adapter, dict(options, backend="torch"))
        for scale in scales:
            size = base * scale
            images = generate(pipe, prompts, size=size, steps=steps, seed=seed, batch=max(1, batch // scale))
            pairs = list(zip(images, prompts))
            checks = pool.map(_check, pairs, chunksize=4) if pool else [_check(p) for p in pairs]
            passed, claims, failed = [c[0] for c in checks], [c[1] for c in checks], [c[2] for c in checks]
            if name == "teacher":
                teacher_images[scale] = images
                p_t = s_t = None
            else:
                ref = teacher_images.get(scale)
                p_t = float(np.mean([psnr(a, b) for a, b in zip(images, ref)])) if ref else None
                s_t = float(np.mean([ssim(a, b) for a, b in zip(images, ref)])) if ref else None
            sec = time_per_image(pipe, prompts[0], size=size, steps=steps, runs=time_runs)
            rows.append({"model": name, "resolution": size, "adherence": float(np.mean(passed)),
                         "psnr_vs_teacher": p_t, "ssim_vs_teacher": s_t, "sec_per_image": sec,
                         "claims_adherence": float(np.mean(claims)), "failures_by_attribute": failure_rates(failed)})
            print(f"[quality] {json.dumps(rows[-1])} ({time.time() - started:.0f}s)", flush=True)
            if scale == 1:
                grid[name] = images[:grid_prompts]
    apply_patch(pipe, None, None)
    if pool:
        validation = accuracy_job.get()
        pool.close()
    else:
        validation = _checker_accuracy(checker_n)
    result = {
        "base_resolution": base,
        "checker_accuracy": validation["checker_accuracy"],
        "rows": rows,
        "settings": {"n_prompts": n_prompts, "prompt_split": "heldout", "scenes": scenes, "seed": seed, "steps": steps,
                     "guidance_scale": 4.5, "scales": list(scales), "local_window": window, "checker_n": checker_n,
                     "zero_shot_options": zero_shot,
                     "device": str(device), "torch": torch.__version__, "skipped": skipped,
                     "backend_fallbacks": backends,
                     "sec_per_image": f"batch 1, median of {time_runs}"},
        "checker_validation": {k: v for k, v in validation.items() if k not in ("n", "seed")},
        "seconds": round(time.time() - started, 1),
    }
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1) + "\n")
    if out_grid:
        save_grid(Path(out_grid), prompts[:grid_prompts], grid)
    return result


QUICK = dict(n_prompts=2, steps=2, scales=(1,), batch=2, time_runs=1, grid_prompts=2, checker_n=2, workers=0)

#: settings two results must share for their rows to stand in one table
MERGE_KEYS = ("n_prompts", "prompt_split", "scenes", "seed", "steps", "guidance_scale")


def merge_results(new: dict, earlier: dict, source: str) -> dict:
    """``new`` plus the rows of ``earlier`` it does not replace, in :data:`MODELS` order.

    Kept: every row of a model ``new`` did not run, and the teacher's rows at resolutions ``new``
    did not run (the teacher is the same: checked below). A model ``new`` ran loses all its earlier
    rows (its adapter or options changed). Both results must share the base resolution and the
    prompt settings (:data:`MERGE_KEYS`), and their teachers must pass exactly the same share of
    prompts at the base resolution, else ``ValueError`` (a different teacher's images would make
    the kept rows' PSNR/SSIM incomparable). Each row's PSNR/SSIM is against the teacher of its own
    run. ``settings.merged_rows`` says which rows came from where, with the earlier settings."""
    mismatched = [k for k in MERGE_KEYS if new["settings"].get(k) != earlier["settings"].get(k)]
    base = new["base_resolution"]
    if base != earlier["base_resolution"] or mismatched:
        raise ValueError(f"cannot merge results with different settings: {mismatched or ['base_resolution']}")

    def teacher_at(result: dict) -> dict:
        return {r["resolution"]: r["adherence"] for r in result["rows"] if r["model"] == "teacher"}

    now, then = teacher_at(new), teacher_at(earlier)
    if base not in now or now.get(base) != then.get(base):
        raise ValueError(f"the teachers differ at {base} px ({now.get(base)} vs {then.get(base)} strict): not the same "
                         "teacher, so the earlier rows' PSNR/SSIM do not compare (run the teacher row here too)")
    ran = {r["model"] for r in new["rows"]}
    kept = [r for r in earlier["rows"] if r["model"] not in ran or (r["model"] == "teacher" and r["resolution"] not in now)]
    rows = sorted(new["rows"] + kept, key=lambda r: (MODELS.index(r["model"]), r["resolution"]))
    merged = dict(new, rows=rows)
    merged["settings"] = dict(new["settings"], merged_rows={
        "from": source, "rows": [[r["model"], r["resolution"]] for r in kept],
        "teacher_strict_here_and_there": {str(res): [now[res], then.get(res)] for res in sorted(now)},
        "their_settings": earlier["settings"]})
    return merged


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="LinFusion-Mini quality benchmark")
    parser.add_argument("--pipeline", default=None, help="pipeline folder (default: bundled LinFusion-Mini)")
    parser.add_argument("--adapter-linear", default=None, help="adapter folder (default: bundled)")
    parser.add_argument("--adapter-local", default=None, help="adapter folder (default: bundled)")
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    parser.add_argument("--grid", default="benchmarks/results/quality_grid.png")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--scenes", default="all", help="held-out scenes: all, or counted (groups of two or more)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scales", default="1,2,4", help="resolutions as multiples of the base, comma-separated")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=4,
                        help="zero-shot local radius (latent tokens) when no local adapter gives its own")
    parser.add_argument("--workers", type=int, default=0, help="checker processes (0: in this process)")
    parser.add_argument("--checker-n", type=int, default=200, help="prompts for validate_checker")
    parser.add_argument("--device", default=None)
    parser.add_argument("--models", default=",".join(MODELS), help=f"rows to run, comma-separated, from {','.join(MODELS)} "
                        "(PSNR/SSIM need the teacher's row)")
    parser.add_argument("--merge", default=None, metavar="JSON",
                        help="an earlier result of the same pipeline, prompts and seed: its rows of models not run "
                             "here are kept (e.g. re-run teacher,zero_shot_linear,linear after a new linear adapter)")
    parser.add_argument("--quick", "--tiny", dest="quick", action="store_true",
                        help="2 prompts, 2 steps, base resolution only: a CPU smoke test of the code path")
    args = parser.parse_args(argv)
    adapters = None
    if args.adapter_linear or args.adapter_local:
        adapters = {"linear": args.adapter_linear, "local": args.adapter_local}
    settings = dict(n_prompts=args.prompts, steps=args.steps, scales=tuple(int(s) for s in args.scales.split(",")),
                    batch=args.batch, checker_n=args.checker_n, workers=args.workers)
    if args.quick:
        settings.update(QUICK)
    models = tuple(m for m in args.models.split(",") if m)
    if not models or set(models) - set(MODELS):
        parser.error(f"--models takes a comma-separated subset of {','.join(MODELS)}, got {args.models!r}")
    earlier = json.loads(Path(args.merge).read_text()) if args.merge else None
    result = run_benchmark(args.pipeline, adapters, seed=args.seed, device=args.device, window=args.window,
                           scenes=args.scenes, models=models,
                           out_json=None if earlier else args.out, out_grid=args.grid, **settings)
    if earlier:
        result = merge_results(result, earlier, source=args.merge)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "checker_validation"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
