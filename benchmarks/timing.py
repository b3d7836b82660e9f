"""Shared timing helpers of the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import statistics
import time

import torch

SLOW_MS = 20.0  # above this, time with a few CUDA-event calls instead of do_bench


def environment() -> dict:
    """GPU name and the torch / triton / CUDA versions a result was measured with."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }


_COPY_TBPS: float | None = None


def copy_bandwidth_tbps() -> float:
    """Measured HBM bandwidth (TB/s): a device-to-device copy of 2 GiB, read and write bytes counted;
    measured once per process. The floor a memory-bound kernel is held against."""
    global _COPY_TBPS
    if _COPY_TBPS is None:
        from triton.testing import do_bench

        src = torch.randn(2**29, device="cuda")  # 2 GiB of fp32
        dst = torch.empty_like(src)
        ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
        _COPY_TBPS = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12
        del src, dst
        torch.cuda.empty_cache()
    return _COPY_TBPS


def bench_ms(fn, slow_ms: float = SLOW_MS) -> float:
    """Median milliseconds of fn() on the GPU (already warmed up): do_bench for fast calls, a few
    event-timed calls for slow ones."""
    from triton.testing import do_bench

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    if first < slow_ms:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(2 if first > 500 else 3):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return float(times[len(times) // 2])


def cpu_ms(fn, repeat: int = 5) -> float:
    """Median wall milliseconds of ``repeat`` calls of fn() after one warm-up call (CPU timing)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def interleaved_rounds(fns: dict, repeats: int, deadline_s: float, start: float, res: dict) -> dict:
    """Warm every callable up, then time them in ``repeats`` interleaved rounds (``bench_ms``), so
    clock and power drift spread over all of them alike; rounds stop starting ``deadline_s`` after
    ``start`` (a note in ``res["notes"]``). Fills ``res["rounds"]`` and returns the medians (ms)."""
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    for r in range(repeats):
        if time.time() - start > deadline_s:
            res["notes"].append(f"stopped after {r} rounds (deadline)")
            break
        for key, fn in fns.items():
            res.setdefault("rounds", {}).setdefault(key, []).append(bench_ms(fn))
    return {k: statistics.median(v) for k, v in res.get("rounds", {}).items()}
