"""End-to-end benchmark: one denoiser step of real-size backbones, dense vs patched attention.

Run on a CUDA GPU (bf16, random weights built from the published configurations)::

    python benchmarks/e2e.py --out benchmarks/results/e2e.json [--models flux sdxl ...]
        [--resolutions 1024 2048 4096 8192] [--impls cudnn linear ...] [--max-minutes 25]

CPU smoke mode (tiny configs, two sizes; what ``tests/test_benchmarks_cpu.py`` runs)::

    python benchmarks/e2e.py --tiny --out /tmp/e2e.json

Models (``--models``): ``flux`` (FLUX.1-dev transformer, 11.9B), ``sdxl`` (SDXL UNet, 2.6B),
``sd35m`` (SD3.5-medium transformer, 2.2B), ``pixart`` (PixArt-Σ transformer, 0.6B), ``wan13b``
(Wan 2.1 T2V 1.3B), ``wan14b`` (Wan 2.1 14B, only when asked). One step = one denoiser call,
batch 2 (CFG) for SDXL / SD3.5 / PixArt / Wan, batch 1 for FLUX (guidance-distilled).
Resolutions: images "1024" … "8192" (square px); Wan "480p" and "720p" at 81 frames.

Impls (``--impls``):

* ``cudnn``: dense SDPA forced to cuDNN (``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``), the
  strongest dense baseline on Hopper;
* ``cudnn_fused``: dense cuDNN SDPA inside LinFusion's own processor (``layers="auto"`` with every
  layer held dense): the stock model plus the processor's fused RoPE and contiguous text|image
  concatenation, i.e. the strongest dense baseline, so speedups are not credited to those;
* ``sdpa_default``: torch's own SDPA backend choice;
* ``xformers``: diffusers' xformers attention, where importable;
* ``linear``: ``patch_model(method="linear", layers="all")`` (Triton kernels on CUDA), with
  LinFusion's residual feature MLPs (two extra C×C GEMMs each for q and k);
* ``linear_relu``: SANA / LiT style, ``feature_map="relu", feature_mlp=False``;
* ``linear_auto``: ``patch_model(method="linear")`` with the default ``layers="auto"`` (dense kept
  wherever the cost model finds it faster: should never be slower than ``cudnn``);
* ``local_tile`` / ``local_circle``: ``patch_model(method="local", window=16, shape=...)``
  (Triton kernels; video: temporal radius 3 latent frames);
* ``local_circle_auto``: the same circle with the default ``layers="auto"``: measures the subsets
  ``auto`` picks where every-layer patching is slower (``crossover_vs_e2e.py``'s ``auto_unverified``);
* ``local_flex``: the same circle window through ``torch.nn.attention.flex_attention`` on
  row-major tokens (CLEAR's implementation). The core has no flex backend, so this script
  routes ``LocalAttention``'s kernel call to a FlexAttention function for the duration of
  the row; block masks are built once per resolution and their build time is recorded;
* ``local_flex_tiled``: the same circle through FlexAttention on tile-ordered tokens with a
  table-lookup mask (``flex_baseline.py``, as in the kernel benchmark): the strongest FlexAttention
  setup, the baseline for ``local_circle``; the two token gathers around it are timed too.

Timing: one warm-up call, then ``--repeats`` timed steps, and more (up to 50) until they add up
to ``--min-timed-seconds`` (default 1 s; fast 1K steps vary by several percent over 2 steps);
the median is reported with ``timed_calls``.

Skips: a row whose predicted time (from the previous resolution of the same model and impl,
quadratic for dense, linear for patched) exceeds ``--row-seconds``, or that would overrun
``--max-minutes``, is recorded with ``status: "skipped"`` and the reason; failures (e.g. OOM)
are recorded with ``status: "failed"``.

Output: ``{"env": {...}, "rows": [{"model", "resolution", "impl", "step_ms", "peak_gb",
"status", ...}]}`` plus a PNG plot beside it (when matplotlib is installed;
``--plot-only FILE`` re-draws it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flex_baseline  # noqa: E402

IMAGE_RESOLUTIONS = ("1024", "2048", "4096", "8192")
VIDEO_RESOLUTIONS = ("480p", "720p")
VIDEO_SIZES = {"480p": (480, 832), "720p": (720, 1280), "tiny-v": (64, 64)}
IMPLS = ("cudnn", "cudnn_fused", "sdpa_default", "xformers", "linear", "linear_relu", "linear_auto", "local_tile",
         "local_circle", "local_circle_auto", "local_flex", "local_flex_tiled")
DENSE_IMPLS = ("cudnn", "cudnn_fused", "sdpa_default", "xformers")
DEFAULT_MODELS = ("flux", "sdxl", "sd35m", "pixart", "wan13b")

# ------------------------------------------------------------------------------------------
# Published configurations (diffusers constructor arguments)
# ------------------------------------------------------------------------------------------

CONFIGS = {
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "sdxl": ("UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
    "sd35m": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    "pixart": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=False, interpolation_scale=2)),
    "wan13b": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    "wan14b": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
}
# text tokens and pooled widths per model: (text_len, text_dim, pooled_dim)
TEXT = {"flux": (512, 4096, 768), "sdxl": (77, 2048, 1280), "sd35m": (333, 4096, 2048), "pixart": (300, 4096, 0),
        "wan13b": (512, 4096, 0), "wan14b": (512, 4096, 0)}

TINY_CONFIGS = {
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))),
    "sdxl": ("UNet2DConditionModel", dict(
        sample_size=16, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        transformer_layers_per_block=(1, 2), norm_num_groups=8, attention_head_dim=(2, 4), cross_attention_dim=64,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)),
    "sd35m": ("SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")),
    "pixart": ("PixArtTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, caption_channels=32, sample_size=16, patch_size=2, norm_num_groups=8,
        use_additional_conditions=False)),
    "wan13b": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)),
}
TINY_TEXT = {"flux": (16, 32, 32), "sdxl": (16, 64, 32), "sd35m": (16, 32, 32), "pixart": (16, 32, 0),
             "wan13b": (16, 32, 0)}
TINY_RESOLUTIONS = ("64", "128")
TINY_VIDEO_RESOLUTIONS = ("tiny-v",)


def is_video(model: str) -> bool:
    return model.startswith("wan")


def build_model(model: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    import diffusers

    cls_name, config = (TINY_CONFIGS if tiny else CONFIGS)[model]
    cls = getattr(diffusers, cls_name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def make_inputs(model: str, resolution: str, tiny: bool, device, dtype) -> tuple[dict, tuple[int, ...], int]:
    """(denoiser kwargs, token grid, batch) for one step at ``resolution``."""
    text_len, text_dim, pooled = (TINY_TEXT if tiny else TEXT)[model]
    batch = 1 if model == "flux" else 2
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    t = torch.full((batch,), 500.0, device=device, dtype=dtype)
    if is_video(model):
        h, w = VIDEO_SIZES[resolution]
        frames = 9 if tiny else 81
        lat = ((frames - 1) // 4 + 1, h // 8, w // 8)
        kw = dict(hidden_states=randn(batch, 4 if tiny else 16, *lat), timestep=t,
                  encoder_hidden_states=randn(batch, text_len, text_dim), return_dict=False)
        return kw, (lat[0], lat[1] // 2, lat[2] // 2), batch
    side = int(resolution) // 8
    if model == "flux":
        rows = cols = side // 2
        ids = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        img_ids = torch.cat([torch.zeros(rows * cols, 1), ids.float()], 1).to(device=device, dtype=dtype)
        kw = dict(hidden_states=randn(batch, rows * cols, TINY_CONFIGS["flux"][1]["in_channels"] if tiny else 64),
                  encoder_hidden_states=randn(batch, text_len, text_dim), pooled_projections=randn(batch, pooled),
                  timestep=t / 1000, img_ids=img_ids, txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
                  guidance=torch.full((batch,), 3.5, device=device, dtype=dtype), return_dict=False)
        return kw, (rows, cols), batch
    channels = 16 if model == "sd35m" and not tiny else 4
    sample = randn(batch, channels, side, side)
    if model == "sdxl":
        kw = dict(sample=sample, timestep=t, encoder_hidden_states=randn(batch, text_len, text_dim),
                  added_cond_kwargs={"text_embeds": randn(batch, pooled),
                                     "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * batch,
                                                              device=device, dtype=dtype)},
                  return_dict=False)
        return kw, (side, side), batch
    if model == "sd35m":
        kw = dict(hidden_states=sample, timestep=t, encoder_hidden_states=randn(batch, text_len, text_dim),
                  pooled_projections=randn(batch, pooled), return_dict=False)
        return kw, (side // 2, side // 2), batch
    kw = dict(hidden_states=sample, timestep=t, encoder_hidden_states=randn(batch, text_len, text_dim),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    return kw, (side // 2, side // 2), batch


def max_side(model: str, tiny: bool) -> int | None:
    """SD3's positional embedding limits the image side."""
    cls_name, config = (TINY_CONFIGS if tiny else CONFIGS)[model]
    if cls_name == "SD3Transformer2DModel":
        return config["pos_embed_max_size"] * config["patch_size"] * 8
    return None


# ------------------------------------------------------------------------------------------
# FlexAttention routes for `local_flex` and `local_flex_tiled`
# ------------------------------------------------------------------------------------------


#: impl -> the function that replaces LocalAttention's kernel call (benchmarks/flex_baseline.py)
FLEX_ROUTES = {"local_flex": flex_baseline.flex_local_attention_rowmajor,
               "local_flex_tiled": flex_baseline.flex_local_attention_tiled}


@contextlib.contextmanager
def flex_route(attention):
    """Route LocalAttention's kernel call to ``attention`` (a FlexAttention function; benchmark only)."""
    import linfusion.methods.local as local_module

    original = local_module.local_attention
    local_module.local_attention = attention
    try:
        yield
    finally:
        local_module.local_attention = original


# ------------------------------------------------------------------------------------------
# One row
# ------------------------------------------------------------------------------------------


def hold_dense(net) -> None:
    """Make every patched layer of ``net`` take its own dense branch (exact softmax in LinFusion's
    processor, with its fused RoPE), whatever the cost model says. The layers forget the processor
    they replaced, or ``layers="auto"`` would hand the dense calls back to it (the stock baseline)."""
    from linfusion.processor import LinFusionProcessor

    held = 0
    for processor in net.attn_processors.values():
        if isinstance(processor, LinFusionProcessor) and processor.dense_fallback is not None:
            processor.dense_fallback.patched_is_faster = lambda *args, **kwargs: False
            processor.bind_original(None)
            held += 1
    if not held:
        raise RuntimeError("cudnn_fused: no patched layer with a dense branch found")


@contextlib.contextmanager
def impl_context(impl: str, net, model: str, circle_backend: str = "auto"):
    """Patch / select the attention implementation for the duration of the row."""
    from linfusion import patch_model, unpatch_model

    patched = False
    backend_set = False
    stack = contextlib.ExitStack()
    try:
        if impl == "cudnn":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.CUDNN_ATTENTION))
        elif impl == "cudnn_fused":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.CUDNN_ATTENTION))
            patch_model(net, method="linear")
            patched = True
            hold_dense(net)
        elif impl == "xformers":
            import xformers  # noqa: F401

            if hasattr(net, "set_attention_backend") and model in ("flux", "wan13b", "wan14b"):
                net.set_attention_backend("xformers")
                backend_set = True
            else:
                net.enable_xformers_memory_efficient_attention()
        elif impl == "linear":
            patch_model(net, method="linear", layers="all")
            patched = True
        elif impl == "linear_auto":  # the library default: layers="auto" keeps dense where it is faster
            patch_model(net, method="linear")
            patched = True
        elif impl == "linear_relu":  # SANA / LiT style: ReLU features, no LinFusion feature MLPs
            patch_model(net, method="linear", layers="all", feature_map="relu", feature_mlp=False)
            patched = True
        elif impl.startswith("local_"):
            shape = "tile" if impl == "local_tile" else "circle"
            options = dict(method="local", window=16, shape=shape,
                           layers="auto" if impl.endswith("_auto") else "all")
            if impl.startswith("local_circle") and circle_backend == "triton":
                options["backend"] = "triton"
            if is_video(model):
                options["temporal_window"] = 3
            patch_model(net, **options)
            patched = True
            if impl in FLEX_ROUTES:
                stack.enter_context(flex_route(FLEX_ROUTES[impl]))
        yield
    finally:
        stack.close()
        if patched:
            unpatch_model(net)
        if impl == "xformers":
            if backend_set:
                net.reset_attention_backend()
            elif hasattr(net, "set_default_attn_processor"):
                with contextlib.suppress(Exception):
                    net.set_default_attn_processor()


def time_step(net, kwargs: dict, repeats: int, device: torch.device, min_seconds: float = 0.0,
              max_repeats: int = 50) -> tuple[float, float, float, int]:
    """(median step ms, first-call seconds, peak GB, timed calls) of ``net(**kwargs)``.

    After one warm-up call, at least ``repeats`` timed calls, and more (up to ``max_repeats``)
    until they add up to ``min_seconds``: a 70 ms step timed twice moves by several percent
    between calls, which is the size of the differences the 1K rows are about.
    ``repeats=0`` times the single first call (used for rows whose one step takes tens of
    seconds, where warm-up costs are negligible next to the step)."""
    cuda = device.type == "cuda"

    def timed_call() -> float:
        t0 = time.perf_counter()
        net(**kwargs)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.no_grad():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        first_s = timed_call()
        times: list[float] = []
        while repeats and len(times) < max_repeats and (len(times) < repeats or sum(times) < min_seconds):
            times.append(timed_call())
    if not times:
        times = [first_s]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return statistics.median(times) * 1e3, first_s, peak, len(times)


def tokens_of(grid: tuple[int, ...]) -> int:
    return math.prod(grid)


def predict_ms(prev: dict | None, grid: tuple[int, ...], impl: str) -> float | None:
    """Scale the previous resolution's time: quadratic in tokens for dense, linear for patched."""
    if prev is None or prev.get("step_ms") is None:
        return None
    ratio = tokens_of(grid) / prev["tokens"]
    return prev["step_ms"] * (ratio**2 if impl in DENSE_IMPLS else ratio * 1.2)


def impl_unavailable(impl: str, device: torch.device, circle_backend: str = "auto") -> str | None:
    if impl in ("cudnn", "cudnn_fused") and device.type != "cuda":
        return "cuDNN SDPA needs CUDA"
    if impl == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            return "xformers is not installed"
        if device.type != "cuda":
            return "xformers needs CUDA"
    if impl in FLEX_ROUTES:
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return "this torch has no FlexAttention"
    return None


def environment(device: torch.device) -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": version("diffusers"),
        "xformers": version("xformers"),
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
    }


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"env": environment(device), "rows": []}
    deadline = time.time() + args.max_minutes * 60
    models = args.models or (tuple(TINY_CONFIGS) if args.tiny else DEFAULT_MODELS)
    for model in models:
        if model not in (TINY_CONFIGS if args.tiny else CONFIGS):
            raise SystemExit(f"unknown model {model!r}; known: {sorted(CONFIGS)}")
        if is_video(model):
            resolutions = args.video_resolutions or (TINY_VIDEO_RESOLUTIONS if args.tiny else VIDEO_RESOLUTIONS)
        else:
            resolutions = args.resolutions or (TINY_RESOLUTIONS if args.tiny else IMAGE_RESOLUTIONS)
        net = build_model(model, args.tiny, device, dtype)
        prev: dict[str, dict] = {}
        for resolution in resolutions:
            res_label = f"{resolution}x{resolution}" if resolution.isdigit() else (
                f"{resolution}-{9 if args.tiny else 81}f")
            limit = max_side(model, args.tiny)
            for impl in args.impls:
                row = {"model": model, "resolution": res_label, "impl": impl, "step_ms": None, "peak_gb": None}
                reason = impl_unavailable(impl, device, args.circle_backend)
                if reason is None and limit is not None and resolution.isdigit() and int(resolution) > limit:
                    reason = f"{model} positional embedding covers at most {limit} px"
                if reason is None and time.time() > deadline:
                    reason = "--max-minutes budget used up"
                kwargs = grid = None
                if reason is None:
                    kwargs, grid, batch = make_inputs(model, resolution, args.tiny, device, dtype)
                    predicted = predict_ms(prev.get(impl), grid, impl)
                    repeats = args.repeats
                    if predicted is not None and predicted / 1e3 > args.single_call_seconds:
                        repeats = 0  # one long call: warm-up is negligible next to the step
                    # warm-up + timed calls (at least --repeats, and --min-timed-seconds in all)
                    row_s = None if predicted is None else predicted / 1e3 + (
                        max(predicted / 1e3 * repeats, args.min_timed_seconds) if repeats else 0.0)
                    if row_s is not None and row_s > args.row_seconds:
                        reason = f"predicted {predicted / 1e3:.1f} s a step > --row-seconds {args.row_seconds}"
                    elif row_s is not None and time.time() + row_s > deadline:
                        reason = f"predicted {predicted / 1e3:.1f} s a step would overrun --max-minutes"
                if reason is not None:
                    row.update(status="skipped", reason=reason)
                    result["rows"].append(row)
                    args.log(f"{model:7s} {res_label:12s} {impl:13s} skipped: {reason}")
                    args.on_row(result)
                    continue
                flex_baseline.STATS["mask_build_s"] = 0.0
                try:
                    with impl_context(impl, net, model, args.circle_backend):
                        step_ms, first_s, peak, timed = time_step(net, kwargs, repeats, device, args.min_timed_seconds)
                    row.update(step_ms=round(step_ms, 3), peak_gb=round(peak, 3), status="ok", tokens=tokens_of(grid),
                               first_call_s=round(first_s, 3), batch=batch, timed_calls=timed,
                               warmup=repeats > 0)
                    if impl in FLEX_ROUTES:
                        row["mask_build_s"] = round(flex_baseline.STATS["mask_build_s"], 3)
                    prev[impl] = row
                    args.log(f"{model:7s} {res_label:12s} {impl:13s} {step_ms:10.1f} ms/step  peak {peak:6.1f} GB")
                except Exception as exc:  # noqa: BLE001 - record and go on
                    row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                    args.log(f"{model:7s} {res_label:12s} {impl:13s} FAILED {row['reason']}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                result["rows"].append(row)
                args.on_row(result)
                del kwargs
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def resolution_order(label: str) -> tuple[int, str]:
    """Sort key of a row's resolution: pixels per frame times frames ("4096x4096", "720p-81f")."""
    if "x" in label and all(part.isdigit() for part in label.split("x")):
        return math.prod(int(part) for part in label.split("x")), label
    size, _, frames = label.partition("-")  # "720p-81f"
    h, w = VIDEO_SIZES.get(size, (0, 0))
    count = frames.removesuffix("f")
    return h * w * (int(count) if count.isdigit() else 1), label


def plot(result: dict, path: str) -> bool:
    """Step time per resolution, one panel per model, one line per impl (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib; then --plot-only)")
        return False
    rows = [r for r in result["rows"] if r.get("step_ms")]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        resolutions = sorted({r["resolution"] for r in mrows}, key=resolution_order)
        for impl in dict.fromkeys(r["impl"] for r in mrows):
            pts = sorted((resolutions.index(r["resolution"]), r["step_ms"]) for r in mrows if r["impl"] == impl)
            color = plt.get_cmap("tab20")(IMPLS.index(impl) % 20) if impl in IMPLS else None  # same colour in every panel
            ax.plot(*zip(*pts), marker="o", label=impl, color=color, linestyle="--" if impl in DENSE_IMPLS else "-")
        ax.set_xticks(range(len(resolutions)), [r.split("x")[0] for r in resolutions])
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_ylabel("ms / denoiser step")
        ax.grid(True, alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=6)
    fig.suptitle(f"one denoising step, {result['env'].get('gpu')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help=f"of {sorted(CONFIGS)}")
    parser.add_argument("--resolutions", nargs="*", default=None, help="image sides in px (1024 2048 4096 8192)")
    parser.add_argument("--video-resolutions", nargs="*", default=None, help="480p 720p")
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), help=f"of {IMPLS}")
    parser.add_argument("--out", default="benchmarks/results/e2e.json")
    parser.add_argument("--max-minutes", type=float, default=25.0, help="total time budget")
    parser.add_argument("--row-seconds", type=float, default=120.0, help="skip rows predicted to take longer")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per row (after one warm-up)")
    parser.add_argument("--min-timed-seconds", type=float, default=1.0,
                        help="keep timing steps (beyond --repeats, up to 50) until they add up to this")
    parser.add_argument("--single-call-seconds", type=float, default=30.0,
                        help="rows predicted slower than this per step are timed by one call, no warm-up")
    parser.add_argument("--circle-backend", default="auto", choices=("auto", "triton"),
                        help="local_circle: the library default (auto) or force the Triton kernel")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --out, replacing those this run measures again")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke test)")
    parser.add_argument("--plot-only", default=None, help="re-draw the plot of an existing JSON")
    return parser


def main(argv=None, log=print) -> int:
    args = build_parser().parse_args(argv)
    args.log = log
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.splitext(args.plot_only)[0] + ".png")
        return 0
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown impls {sorted(unknown)}; known: {IMPLS}")
    if args.tiny:
        args.repeats = min(args.repeats, 1)
        args.min_timed_seconds = 0.0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    earlier = []
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)["rows"]

    def merged(rows: list[dict]) -> list[dict]:
        """Earlier rows, each replaced by this run's row of the same (model, resolution, impl),
        unless this run skipped or failed a row that was measured before (keep the measurement)."""
        key = lambda r: (r["model"], r["resolution"], r["impl"])  # noqa: E731
        measured_before = {key(r) for r in earlier if r.get("step_ms") is not None}
        rows = [r for r in rows if r.get("step_ms") is not None or key(r) not in measured_before]
        new = {key(r) for r in rows}
        return [r for r in earlier if key(r) not in new] + rows

    def write(partial: dict) -> None:
        """Written after every row (atomically) so a killed run keeps what it measured."""
        from pathlib import Path

        from linfusion.adapter import _atomic_write

        text = json.dumps({**partial, "rows": merged(partial["rows"])}, indent=1)
        _atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text))

    args.on_row = write
    result = run(args)
    write(result)
    result = {**result, "rows": merged(result["rows"])}
    log(f"wrote {args.out} ({len(result['rows'])} rows)")
    plot(result, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
