"""Where the time of a patched FLUX-size layer goes: CUDA-kernel breakdown of one double-stream
and one single-stream block at real width (3072 channels, 24×128 heads), dense cuDNN vs patched.

    python benchmarks/profile_layers.py --side 4096 --out /tmp/profile.json
    python benchmarks/profile_layers.py --tiny --out /tmp/profile.json     # CPU smoke test

Prints, per variant, the step time of the two blocks and the top CUDA kernels (self time),
so per-layer overhead around the attention kernels (copies, concatenations, feature maps,
text-query softmax) can be read off directly. Needs CUDA (``--tiny``: tiny config, CPU ops).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = {
    "cudnn": None,
    "linear": {"method": "linear"},
    "linear_relu": {"method": "linear", "feature_map": "relu", "feature_mlp": False},
    "local_tile": {"method": "local", "window": 16, "shape": "tile"},
}


def main(argv=None) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.e2e import CONFIGS, TINY_CONFIGS, make_inputs
    from benchmarks.timing import bench_ms, cpu_ms, environment
    from linfusion import patch_model, unpatch_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", default="4096")
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--out", default="benchmarks/results/profile_layers.json")
    parser.add_argument("--tiny", action="store_true", help="tiny FLUX config on the CPU (smoke test)")
    args = parser.parse_args(argv)
    import diffusers

    if args.tiny:
        device, dtype, args.side = torch.device("cpu"), torch.float32, "64"
    elif not torch.cuda.is_available():
        raise SystemExit("profile_layers needs CUDA (or --tiny)")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    config = dict((TINY_CONFIGS if args.tiny else CONFIGS)["flux"][1], num_layers=1, num_single_layers=1)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        net = diffusers.FluxTransformer2DModel(**config).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    kwargs, grid, _ = make_inputs("flux", args.side, args.tiny, device, dtype)
    activity = ProfilerActivity.CPU if args.tiny else ProfilerActivity.CUDA
    result = {"env": environment(), "side": args.side, "grid": grid, "variants": {}}
    for name, options in VARIANTS.items():
        if options is not None:
            patch_model(net, layers="all", **options)
        ctx = sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if options is None and not args.tiny else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            ms = cpu_ms(lambda: net(**kwargs), repeat=3) if args.tiny else bench_ms(lambda: net(**kwargs))
            with profile(activities=[activity]) as prof:
                net(**kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        self_us = (lambda e: e.self_cpu_time_total) if args.tiny else (lambda e: e.self_device_time_total)
        events = sorted(prof.key_averages(), key=self_us, reverse=True)
        total = sum(self_us(e) for e in events) / 1e3
        top = [{"kernel": e.key[:110], "calls": e.count, "ms": round(self_us(e) / 1e3, 3)} for e in events[: args.top]]
        result["variants"][name] = {"two_blocks_ms": round(ms, 3), "gpu_kernel_ms": round(total, 3), "top": top}
        print(f"== {name}: two blocks {ms:.2f} ms (GPU kernels {total:.2f} ms)")
        for row in top:
            print(f"   {row['ms']:8.3f} ms  {row['calls']:3d}×  {row['kernel']}")
        if options is not None:
            unpatch_model(net)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
