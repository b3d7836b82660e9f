"""A/B timing of the Triton local-attention kernels: an earlier revision against the working tree,
in one process on one GPU, interleaved repeats (single backward timings differ by up to 7% between
calls, so only same-call, interleaved comparisons decide small changes).

    git archive REV linfusion/kernels | tar -x -C /tmp/old        # the earlier kernels, plain files
    python benchmarks/ab_local.py --old /tmp/old/linfusion/kernels --out ab.json \
        --impls old:fwd new:fwd old:fused_dq new:fused_dq new:fused_dq+dq_tma old:split new:split

An impl is ``{old|new}:{fwd|split|fused_dq}`` with optional ``+key`` / ``+key=int`` flags that set a
config key of the backward's dK/dV kernel ("dkdv_fused" for fused_dq, "dkdv" for split) or of the
forward (``new:fused_dq+dq_t+BM=32``); ``+kind.key`` sets one of another kernel kind
(``new:split+tma_loads+dq.tma_loads``: the split backward's dQ kernel too).
Records: per case, window and impl the median of the repeats' times, every repeat, the kernels'
registers / spills / shared memory, and the largest relative error against the first impl of the
same pass (outputs for fwd, dq/dk/dv for the backward), the GPU memory one call allocates beyond
what was allocated before it (``extra_peak_mib``); with ``--kernel-times`` also each impl's
GPU time per kernel (torch.profiler, mean of 3 back-to-back calls: where a backward's time goes).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench_ms, cpu_ms, environment  # noqa: E402

CASES = {  # name: (B, H, D, grid, text)
    "flux-1k": (1, 24, 128, (64, 64), 512),
    "flux-2k": (1, 24, 128, (128, 128), 512),
    "flux-4k": (1, 24, 128, (256, 256), 512),
    "flux-8k": (1, 24, 128, (512, 512), 512),
    "sdxl-4k": (2, 10, 64, (128, 128), 0),
    "pixart-4k": (1, 16, 72, (256, 256), 0),  # head dims padded to 128: PixArt-Σ's 72, and 96
    "d96-4k": (1, 16, 96, (256, 256), 0),
    "d80-4k": (1, 16, 80, (256, 256), 0),
    "wan-480p": (1, 12, 128, (21, 30, 52), 0),
    "wan-720p": (1, 12, 128, (21, 45, 80), 0),  # an even count of 8-token tile columns (480p's is odd)
    "tiny": (1, 2, 64, (16, 24), 8),  # a CPU check of this script under TRITON_INTERPRET=1
}
WINDOWS = {  # variant name: (2D window, 3D window, shape, kernel tile (2D, 3D); None: the default)
    "circle": (16, (2, 8, 8), "circle", None),  # circle-r16 / circle-r2x8x8: kernels_local.py's variants
    "tile": (16, (2, 8, 8), "tile", None),  # tile-8x16-r2x1 / tile-2x8x8-r1x1x1
    "circle-t8": (16, (2, 8, 8), "circle", ((8, 8), (1, 8, 8))),  # the same circles on 64-token tiles
}


def load_kernels(path: str, name: str = "old_kernels"):
    """The ``linfusion/kernels`` package at ``path`` imported as ``name`` (its imports are relative)."""
    spec = importlib.util.spec_from_file_location(name, f"{path}/__init__.py", submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.local_triton"), importlib.import_module(f"{name}.local_configs")


class KernelStats:
    """Registers, spills and shared memory of every kernel launched through the wrapped JIT functions."""

    def __init__(self):
        self.seen: dict[str, dict] = {}
        self.impl = ""  # the impl being launched: the record's key

    def wrap(self, jit_fn, tag: str):
        run = jit_fn.run

        def recording_run(*args, **kwargs):
            kernel = run(*args, **kwargs)
            if kernel is not None and hasattr(kernel, "n_regs"):
                ttgir = getattr(kernel, "asm", {}).get("ttgir", "")
                self.seen[f"{self.impl} {tag}"] = {"regs": kernel.n_regs, "spills": kernel.n_spills,
                                  "shared": getattr(kernel.metadata, "shared", None),
                                  "tma_loads": "async_tma_copy_global_to_local" in ttgir,
                                  "warp_specialized": "ttg.warp_specialize" in ttgir}
            return kernel

        jit_fn.run = recording_run


def parse_flags(flags, kind: str) -> dict:
    """Config overrides per kernel kind: ``("dq_t", "BM=32", "dq.tma_loads")`` with kind "dkdv" →
    ``{"dkdv": {"dq_t": True, "BM": 32}, "dq": {"tma_loads": True}}``."""
    out: dict[str, dict] = {}
    for flag in flags:
        key, eq, value = flag.partition("=")
        target, dot, name = key.rpartition(".")
        out.setdefault(target if dot else kind, {})[name] = int(value) if eq else True
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def kernel_times(fn, calls: int = 3) -> dict[str, float]:
    """Mean GPU milliseconds per call of each kernel ``fn`` launches (by kernel name), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.split("(")[0][:60]
            totals[name] = totals.get(name, 0.0) + getattr(event, "device_time", 0.0) / 1e3 / calls
    return {name: round(ms, 4) for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])}


def extra_peak_mib(fn, device: str) -> float | None:
    """GPU memory one call of ``fn`` allocates at its peak beyond what was allocated before (MiB)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="path of the earlier linfusion/kernels package")
    parser.add_argument("--impls", nargs="+", required=True)
    parser.add_argument("--cases", nargs="+", default=["flux-4k"], choices=sorted(CASES))
    parser.add_argument("--windows", nargs="+", default=["circle", "tile"], choices=sorted(WINDOWS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel-times", action="store_true",
                        help="also record each impl's per-kernel GPU times (torch.profiler, 3 calls)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import linfusion.kernels.local_configs as new_cfg
    import linfusion.kernels.local_triton as new_lt

    old_lt, old_cfg = load_kernels(args.old)
    trees = {"old": (old_lt, old_cfg), "new": (new_lt, new_cfg)}
    stats = KernelStats()
    for lt, _ in trees.values():
        for kern in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"):
            stats.wrap(getattr(lt, kern), kern)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timer = bench_ms if device == "cuda" else cpu_ms

    records = []
    for case in args.cases:
        B, H, D, grid, text = CASES[case]
        L = text + math.prod(grid)
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, L, D, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(4))
        for wname in args.windows:
            w2, w3, shape, tiles = WINDOWS[wname]
            window = w3 if len(grid) == 3 else w2
            tile = None if tiles is None else tiles[len(grid) == 3]
            fns, outs = {}, {}
            for impl in args.impls:
                tree, _, rest = impl.partition(":")
                kind, *flags = rest.split("+")
                lt, cfg_mod = trees[tree]
                layout, _ = lt._prepare(q, k, v, grid, window, text, shape, tile)
                o, lse = lt._forward(q, k, v, layout, text, False)
                cfg_kind = {"fwd": "fwd", "split": "dkdv", "fused_dq": "dkdv_fused"}[kind]

                def call(lt=lt, layout=layout, o=o, lse=lse, kind=kind, cfg_mod=cfg_mod, cfg_kind=cfg_kind,
                         flags=tuple(flags)):
                    overrides = parse_flags(flags, cfg_kind)
                    for name, cfg in overrides.items():
                        cfg_mod.set_config_override(name, cfg)
                    stats.impl = impl
                    try:
                        if kind == "fwd":
                            return lt._forward(q, k, v, layout, text, False)[:1]
                        return lt._backward(do, q, k, v, o, lse, layout, text, False, kind)
                    finally:
                        for name in overrides:
                            cfg_mod.set_config_override(name, None)

                try:
                    outs[impl] = [t.clone() for t in call()]
                except Exception as exc:  # noqa: BLE001  (e.g. a config out of shared memory: skip it)
                    records.append({"case": case, "window": wname, "impl": impl,
                                    "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                    print(f"{case:9s} {wname:7s} {impl:28s} FAILED {records[-1]['error']}", flush=True)
                    continue
                fns[impl] = call
            times = {impl: [] for impl in fns}
            for _ in range(args.repeats):
                for impl in fns:
                    times[impl].append(timer(fns[impl]))
            first = {}
            for impl in fns:
                kind = impl.partition(":")[2].split("+")[0]
                pss = "fwd" if kind == "fwd" else "bwd"
                first.setdefault(pss, impl)
                err = max(rel(a, b) for a, b in zip(outs[impl], outs[first[pss]]))
                ms = sorted(times[impl])[len(times[impl]) // 2]
                records.append({"case": case, "window": wname, "impl": impl, "pass": pss, "ms": ms,
                                "repeats": times[impl], "max_rel_err_vs": first[pss], "max_rel_err": err,
                                "extra_peak_mib": extra_peak_mib(fns[impl], device)})
                print(f"{case:9s} {wname:7s} {impl:28s} {ms:8.3f} ms  {['%.3f' % t for t in times[impl]]}"
                      f"  err {err:.1e} vs {first[pss]}  +{records[-1]['extra_peak_mib']} MiB", flush=True)
                if args.kernel_times and device == "cuda":
                    records[-1]["kernel_ms"] = kernel_times(fns[impl])
                    print(f"{'':47s} kernels {records[-1]['kernel_ms']}", flush=True)
            # after every window: a call cut short by its time limit keeps what it measured
            Path(args.out).write_text(json.dumps({"env": environment(), "kernels": stats.seen, "records": records},
                                                 indent=1))
    for tag, s in sorted(stats.seen.items()):
        print(f"{tag:40s} {s}")


if __name__ == "__main__":
    main()
