"""``linfusion generate``: one prompt → a PNG, original or patched, optionally side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an image (or video) with a patched pipeline",
        description="Generate with a diffusers pipeline, patched with LinFusion attention or original.",
    )
    parser.add_argument("prompt", help="text prompt")
    parser.add_argument("--model", default=None, help="hub id or local folder (default: bundled LinFusion-Mini)")
    parser.add_argument("--adapter", default=None, help="adapter folder or hub id written by save_adapter")
    parser.add_argument("--method", choices=["linear", "local", "none"], default="none",
                        help="attention to patch in (zero-shot unless an adapter is given); default: none")
    parser.add_argument("--window", type=int, default=None,
                        help="zero-shot --method local: radius in latent tokens (default 16)")
    parser.add_argument("--shape", choices=["circle", "tile"], default=None,
                        help="zero-shot --method local: window shape (default circle)")
    parser.add_argument("--backend", choices=["triton", "torch", "fa4"], default=None, help="kernel backend (fa4: local tile windows, FlashAttention-4)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--num-frames", type=int, default=None, help="frames, for video pipelines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="linfusion.png", help="output file (PNG; GIF for videos)")
    parser.add_argument("--highres", action="store_true",
                        help="high-resolution recipe: native-size pass, then upscale + refine stages (image models)")
    parser.add_argument("--strength", type=float, default=0.6, help="refinement strength per --highres stage")
    parser.add_argument("--upscale", choices=["bicubic", "latent"], default="bicubic",
                        help="--highres upscale between stages: bicubic in pixel space (VAE decode + encode), or "
                             "bicubic on the latents (no VAE pass between stages; softer, use more --strength)")
    parser.add_argument("--lean", action="store_true",
                        help="memory-lean --highres: chunked CFG, feed-forward chunking, CPU offload on CUDA")
    parser.add_argument("--compare", action="store_true",
                        help="also run the original pipeline and write both side by side with their timings")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    parser.add_argument("--context-parallel", action="store_true",
                        help="under torchrun: split the image/video tokens over the processes (NCCL on GPUs, "
                             "gloo on CPU); every rank runs, rank 0 writes the output")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..generation import (
        apply_patch, load_pipeline, native_size, run_highres, run_pipeline, save_images, side_by_side,
    )
    from ..mini.bundle import MiniNotBundledError

    device = torch.device(args.device) if args.device else None
    cp = None
    if args.context_parallel:  # linfusion.parallel: one rank per process, same inputs on every rank
        import functools

        from ..parallel import init_context_parallel
        from ..parallel.run import run_pipeline_parallel

        cp = init_context_parallel(device=device)
        device, run_pipeline = cp.device, functools.partial(run_pipeline_parallel, cp)
    try:
        pipe = load_pipeline(args.model, device=device, dtype=args.dtype)
    except (MiniNotBundledError, OSError, ValueError) as error:  # OSError: a missing folder or hub file
        print(f"error: {error}", file=sys.stderr)
        return 2
    native_height, native_width = native_size(pipe)
    height, width = args.height or native_height, args.width or native_width
    method = None if args.method == "none" else args.method
    adapter = args.adapter
    if adapter is None and method and args.model is None:
        from ..mini.bundle import bundled_adapter

        adapter = bundled_adapter(method)  # LinFusion-Mini ships distilled students
    # only what was given: a window given to linear attention or beside an adapter is an error, not ignored
    options = {key: value for key, value in (("window", args.window), ("shape", args.shape)) if value is not None}
    if options and not method and not adapter:
        print("error: --window and --shape apply to --method local", file=sys.stderr)
        return 2
    if args.backend:
        options["backend"] = args.backend
    if args.highres and cp is not None:
        print("error: --highres and --context-parallel cannot be combined yet", file=sys.stderr)
        return 2
    common = dict(height=height, width=width, seed=args.seed, guidance_scale=args.guidance,
                  negative_prompt=args.negative_prompt)

    def generate(steps: int = args.steps):
        if args.highres:
            return run_highres(pipe, args.prompt, steps=steps, strength=args.strength, lean=args.lean,
                               upscale=args.upscale, **common)
        return run_pipeline(pipe, args.prompt, steps=steps, num_frames=args.num_frames, **common)

    try:
        original = None
        if args.compare:  # one-step warm-ups keep start-up costs (kernel compilation, caches) out of both timings
            generate(steps=1)
            original = generate()
        label = "original"
        if method or adapter:
            apply_patch(pipe, method, adapter, options)
            label = f"patched ({method or 'adapter'})"
        if args.compare:
            generate(steps=1)
        result = generate()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if cp is not None and not cp.is_main:
        cp.close()
        return 0
    out = Path(args.out)
    if original is not None:
        combined = [side_by_side(a, b) for a, b in zip(original.images, result.images)]
        save_images(combined, out)
        speedup = original.seconds / result.seconds if result.seconds else float("nan")
        print(f"original: {original.seconds:.2f} s, {label}: {result.seconds:.2f} s, speedup {speedup:.2f}x")
    else:
        save_images(result.images, out)
        print(f"{label}: {result.seconds:.2f} s at {width}x{height}")
    print(f"wrote {out.resolve()}")
    if cp is not None:
        cp.close()
    return 0
