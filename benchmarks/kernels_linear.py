"""Benchmark: linear attention (Triton vs PyTorch eager vs torch.compile) and dense baselines.

Run on a CUDA GPU::

    python benchmarks/kernels_linear.py --out benchmarks/results/kernels_linear.json [--sweep]

``run_linear_cases(rows)`` appends one dict per measurement (the merged
``benchmarks/kernels.py`` calls it)::

    {"case", "op": "linear"|"dense", "variant": "elu1"|"relu"|"-", "impl", "pass": "fwd"|"bwd",
     "shape", "ms", "tflops", "tbps", ...extras}

impl: "torch" (eager reference), "torch_compile" (the reference under torch.compile),
"triton" (this package's kernels) for op "linear"; "cudnn" (SDPA forced to cuDNN) and
"sdpa_default" (torch's own SDPA backend choice) for op "dense".

Shapes (B × H × N × D, bf16, self-attention, M = N):

* ``flux-{1,2,4,8}k``: 1 × 24 × (res/16)² × 128 (FLUX latent /8, 2×2 patches).
* ``sdxl-4k``: 2 × 10 × 16384 × 64. Taken literally from the issue: N = (4096/32)², the
  32× down-sampled level of a 4096-px SDXL image (the latent is 512², its highest
  attention level is 64 channels… we keep the issue's shape so numbers stay comparable).
* ``sd15-2k``: 2 × 8 × (2048/8)² × 40 = 2 × 8 × 65536 × 40 (the top UNet level).
* ``wan-480p``: 1 × 12 × (21·30·52) × 128 = 1 × 12 × 32760 × 128.

Timing: ``triton.testing.do_bench`` (median; it flushes L2 before every call), with
inputs rotated over several sets when one set is smaller than 4× the L2. Very slow
calls (dense attention at high resolution) are timed with CUDA events over 2–3 calls.
HBM floor = bytes(q, k, v read once + o written once; bwd: q, k, v, dO read + dq, dk, dv
written) / measured device-to-device copy bandwidth (read + write bytes counted).
Useful FLOPs: linear fwd 4·B·H·N·Dk·Dv, bwd 10·B·H·N·Dk·Dv (the algorithm's matmuls);
dense fwd 4·B·H·N²·D, bwd 10·B·H·N²·D (FlashAttention convention).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import SLOW_MS, bench_ms, copy_bandwidth_tbps, environment  # noqa: E402,F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from linfusion.kernels.linear_reference import linear_attention_reference  # noqa: E402

CASES = [
    # name, B, H, N, D
    ("flux-1k", 1, 24, (1024 // 16) ** 2, 128),
    ("flux-2k", 1, 24, (2048 // 16) ** 2, 128),
    ("flux-4k", 1, 24, (4096 // 16) ** 2, 128),
    ("flux-8k", 1, 24, (8192 // 16) ** 2, 128),
    ("sdxl-4k", 2, 10, (4096 // 32) ** 2, 64),
    ("sd15-2k", 2, 8, (2048 // 8) ** 2, 40),
    ("wan-480p", 1, 12, 21 * 30 * 52, 128),
]
RELU_CASES = ("flux-4k",)  # the relu variant is timed here too (all impls)
DENSE_BWD_MAX_N = 16384  # dense backward only where it costs < ~50 ms a call
L2_BYTES = 60 * 2**20

_COPY_TBPS: float | None = None


class Rotating:
    """Calls fn(*inputs[i]) with i cycling, so repeated calls don't hit the L2 with old data."""

    def __init__(self, fn, sets):
        self.fn, self.sets, self.i = fn, sets, 0

    def __call__(self):
        args = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*args)


def make_inputs(B, H, N, D, variant, dtype=torch.bfloat16, requires_grad=False, seed=0):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed)
    phi = (lambda x: F.elu(x) + 1) if variant == "elu1" else F.relu
    q = phi(torch.randn(B, H, N, D, device="cuda", generator=gen)).to(dtype)
    k = phi(torch.randn(B, H, N, D, device="cuda", generator=gen)).to(dtype)
    v = torch.randn(B, H, N, D, device="cuda", generator=gen).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def n_sets_for(bytes_per_set: int) -> int:
    return max(1, min(4, math.ceil(4 * L2_BYTES / bytes_per_set)))


def host_us(fn, calls: int = 50) -> float:
    """Host microseconds per call, enqueueing without synchronising (GPU work runs behind)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return t


def launch_costs(impl, inputs, fwd) -> dict:
    """GPU-only time of the forward (CUDA graph replay, no L2 flush) and host time per call."""
    from triton.testing import do_bench_cudagraph

    out = {"host_us": host_us(fwd)}
    q, k, v = (t.detach() for t in inputs)
    try:
        out["ms_cudagraph"] = float(do_bench_cudagraph(lambda: impl(q, k, v), rep=50, return_mode="median"))
    except Exception as exc:  # noqa: BLE001
        out["ms_cudagraph_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def linear_impls():
    from linfusion.kernels.linear_triton import linear_attention_triton

    compiled = torch.compile(linear_attention_reference, dynamic=False)
    return {
        "torch": linear_attention_reference,
        "torch_compile": compiled,
        "triton": linear_attention_triton,
    }


def fwd_and_bwd_fns(impl, sets, dout_sets):
    """(forward fn, backward fn) rotating over input sets; backward reuses one graph per set.

    The forward runs on inputs that require grad (as in training, and so that
    torch.compile builds one graph per shape, not an inference and a training one).
    """
    fwd = Rotating(impl, sets)
    graphs = []
    for s, dout in zip(sets, dout_sets):
        out = impl(*s)
        graphs.append((out, s, dout))

    def bwd_one(out, s, dout):
        return torch.autograd.grad(out, s, dout, retain_graph=True)

    bwd = Rotating(bwd_one, graphs)
    return fwd, bwd


def row(case, op, variant, impl, pss, shape, ms, flops, nbytes, **extra):
    return {
        "case": case, "op": op, "variant": variant, "impl": impl, "pass": pss,
        "shape": "x".join(str(s) for s in shape), "ms": ms,
        "tflops": flops / (ms * 1e-3) / 1e12, "tbps": nbytes / (ms * 1e-3) / 1e12, **extra,
    }


def run_linear_cases(out_rows: list[dict], cases=None, dense: bool = True, log=print) -> None:
    """Time every case (linear: torch / torch_compile / triton, fwd and bwd; dense baselines)."""
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    bw = copy_bandwidth_tbps()
    log(f"copy bandwidth {bw:.2f} TB/s")
    impls = linear_impls()
    for name, B, H, N, D in CASES:
        if cases and name not in cases:
            continue
        shape = (B, H, N, D)
        elem = 2
        tensor_bytes = B * H * N * D * elem
        fwd_bytes, bwd_bytes = 4 * tensor_bytes, 7 * tensor_bytes
        fwd_floor, bwd_floor = fwd_bytes / (bw * 1e12) * 1e3, bwd_bytes / (bw * 1e12) * 1e3
        lin_fwd_flops, lin_bwd_flops = 4 * B * H * N * D * D, 10 * B * H * N * D * D
        n_sets = n_sets_for(3 * tensor_bytes)
        variants = ("elu1", "relu") if name in RELU_CASES else ("elu1",)
        for variant in variants:
            sets = [make_inputs(B, H, N, D, variant, requires_grad=True, seed=i) for i in range(n_sets)]
            douts = [torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
            for impl_name, impl in impls.items():
                t0 = time.time()
                try:
                    fwd, bwd = fwd_and_bwd_fns(impl, sets, douts)
                    fwd()
                    bwd()  # warm-up / compile
                    torch.cuda.synchronize()
                    ms_f = bench_ms(fwd)
                    ms_b = bench_ms(bwd)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    log(f"{name} {variant} {impl_name}: FAILED {type(exc).__name__}: {exc}")
                    continue
                extra_f = {"floor_ms": fwd_floor, "ratio_to_floor": ms_f / fwd_floor}
                extra_b = {"floor_ms": bwd_floor, "ratio_to_floor": ms_b / bwd_floor}
                if impl_name == "triton":
                    extra_f.update(launch_costs(impl, sets[0], fwd))
                    extra_b["host_us"] = host_us(bwd)
                out_rows.append(row(name, "linear", variant, impl_name, "fwd", shape, ms_f,
                                    lin_fwd_flops, fwd_bytes, **extra_f))
                out_rows.append(row(name, "linear", variant, impl_name, "bwd", shape, ms_b,
                                    lin_bwd_flops, bwd_bytes, **extra_b))
                log(f"{name:9s} {variant:4s} {impl_name:13s} fwd {ms_f:9.3f} ms ({ms_f / fwd_floor:5.2f}x floor)"
                    f"  bwd {ms_b:9.3f} ms ({ms_b / bwd_floor:5.2f}x floor)  [{time.time() - t0:.1f}s]"
                    + (f"  graph fwd {extra_f.get('ms_cudagraph', float('nan')):.3f} ms, host fwd "
                       f"{extra_f['host_us']:.0f} us bwd {extra_b['host_us']:.0f} us" if impl_name == "triton" else ""))
                del fwd, bwd
            del sets, douts
            torch.cuda.empty_cache()

        if not dense:
            continue
        from torch.nn.attention import SDPBackend, sdpa_kernel

        dense_fwd_flops, dense_bwd_flops = 4 * B * H * N * N * D, 10 * B * H * N * N * D
        sets = [make_inputs(B, H, N, D, "elu1", requires_grad=True, seed=i) for i in range(n_sets)]
        douts = [torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
        for impl_name in ("cudnn", "sdpa_default"):
            if impl_name == "sdpa_default" and N > 65536:
                log(f"{name} dense {impl_name}: skipped (> 2 s a call)")
                continue

            def sdpa(q, k, v, _impl=impl_name):
                if _impl == "cudnn":
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v)
                return F.scaled_dot_product_attention(q, k, v)

            t0 = time.time()
            try:
                fwd = Rotating(lambda q, k, v: sdpa(q.detach(), k.detach(), v.detach()), sets)
                fwd()
                torch.cuda.synchronize()
                ms_f = bench_ms(fwd)
                out_rows.append(row(name, "dense", "-", impl_name, "fwd", shape, ms_f, dense_fwd_flops, fwd_bytes))
                msg = f"{name:9s} dense {impl_name:12s} fwd {ms_f:9.3f} ms"
                if N <= DENSE_BWD_MAX_N:
                    _, bwd = fwd_and_bwd_fns(sdpa, sets, douts)
                    bwd()
                    ms_b = bench_ms(bwd)
                    out_rows.append(row(name, "dense", "-", impl_name, "bwd", shape, ms_b,
                                        dense_bwd_flops, bwd_bytes))
                    msg += f"  bwd {ms_b:9.3f} ms"
                    del bwd
                log(msg + f"  [{time.time() - t0:.1f}s]")
            except Exception as exc:  # noqa: BLE001
                log(f"{name} dense {impl_name}: FAILED {type(exc).__name__}: {exc}")
        del sets, douts
        torch.cuda.empty_cache()


def summarize(rows: list[dict]) -> dict:
    """Per case: triton vs floor, vs torch.compile, vs cuDNN dense; the crossover case."""
    def find(case, op, impl, pss, variant="elu1"):
        for r in rows:
            if (r["case"], r["op"], r["impl"], r["pass"]) == (case, op, impl, pss) and (
                op == "dense" or r["variant"] == variant
            ):
                return r
        return None

    table = {}
    crossover = None
    for name, B, H, N, D in sorted(CASES, key=lambda c: c[1] * c[2] * c[3] ** 2 * c[4]):
        entry = {}
        for pss in ("fwd", "bwd"):
            tri = find(name, "linear", "triton", pss)
            if tri is None:
                continue
            comp = find(name, "linear", "torch_compile", pss)
            eager = find(name, "linear", "torch", pss)
            cud = find(name, "dense", "cudnn", pss)
            entry[pss] = {
                "triton_ms": tri["ms"], "tbps": tri["tbps"], "floor_ms": tri["floor_ms"],
                "ratio_to_floor": tri["ratio_to_floor"],
                "speedup_vs_torch": eager["ms"] / tri["ms"] if eager else None,
                "speedup_vs_torch_compile": comp["ms"] / tri["ms"] if comp else None,
                "speedup_vs_cudnn_dense": cud["ms"] / tri["ms"] if cud else None,
            }
        if "fwd" in entry and "bwd" in entry:
            entry["bwd_over_fwd"] = entry["bwd"]["triton_ms"] / entry["fwd"]["triton_ms"]
        sp = entry.get("fwd", {}).get("speedup_vs_cudnn_dense")
        if crossover is None and sp is not None and sp > 1:
            crossover = name
        table[name] = entry
    return {"cases": table, "crossover_fwd_linear_beats_cudnn": crossover}


def sweep(log=print) -> list[dict]:
    """Tile-config sweep of the Triton kernels (fwd at flux-4k and sd15-2k, bwd at flux-4k)."""
    from triton.testing import do_bench

    from linfusion.kernels.linear_configs import linear_config, padded_dim
    from linfusion.kernels.linear_triton import linear_attention_triton

    # run 1 (H200) swept the first defaults; this list explores around the tuned ones
    fwd_changes = [
        {}, {"state_block_n": 128, "state_stages": 2}, {"programs_per_sm": 2}, {"state_stages": 4},
    ]
    bwd_changes = [
        {}, {"bwdq_stages": 3}, {"bwdq_block_m": 32}, {"programs_per_sm": 2}, {"bwdkv_stages": 3},
    ]
    results = []
    for name, B, H, N, D in CASES:
        if name not in ("flux-4k", "sd15-2k"):
            continue
        q, k, v = make_inputs(B, H, N, D, "elu1", requires_grad=True)
        dout = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        base = linear_config(padded_dim(D), padded_dim(D), 2, False)
        todo = [("fwd", c) for c in (fwd_changes if name == "flux-4k" else fwd_changes[:2])]
        if name == "flux-4k":
            todo += [("bwd", c) for c in bwd_changes]
        for pss, change in todo:
            cfg = dataclasses.replace(base, **change)
            try:
                if pss == "fwd":
                    fn = lambda: linear_attention_triton(q.detach(), k.detach(), v.detach(), 1e-6, cfg)  # noqa: E731
                else:
                    out = linear_attention_triton(q, k, v, 1e-6, cfg)
                    fn = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
                fn()
                ms = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            except Exception as exc:  # noqa: BLE001
                ms = float("nan")
                log(f"sweep {name} {pss} {change}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
            results.append({"case": name, "pass": pss, "change": change, "ms": ms})
            log(f"sweep {name:8s} {pss} {ms:8.4f} ms  {change}")
        q = k = v = dout = None  # free the case's tensors before the next one (the lambdas are done)
        torch.cuda.empty_cache()
    return results


def kernel_breakdown(log=print) -> dict:
    """Per-kernel GPU time of the Triton fwd+bwd at flux-4k (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from linfusion.kernels.linear_triton import linear_attention_triton

    _, B, H, N, D = next(c for c in CASES if c[0] == "flux-4k")
    q, k, v = make_inputs(B, H, N, D, "elu1", requires_grad=True)
    dout = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        out = linear_attention_triton(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    reps = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            out = linear_attention_triton(q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t and evt.key.startswith("_"):
            times[evt.key] = t / reps / 1e3
    for key, ms in sorted(times.items(), key=lambda kv: -kv[1]):
        log(f"kernel {key:28s} {ms:8.4f} ms")
    return times


def print_table(rows, summary, log=print):
    log("\n| case | pass | triton ms | TB/s | x floor | vs torch.compile | vs cuDNN dense |")
    log("| --- | --- | --- | --- | --- | --- | --- |")
    for name, entry in summary["cases"].items():
        for pss in ("fwd", "bwd"):
            e = entry.get(pss)
            if not e:
                continue

            def fmt(x):
                return "-" if x is None else f"{x:.2f}x"

            log(f"| {name} | {pss} | {e['triton_ms']:.3f} | {e['tbps']:.2f} | {e['ratio_to_floor']:.2f} | "
                f"{fmt(e['speedup_vs_torch_compile'])} | {fmt(e['speedup_vs_cudnn_dense'])} |")
    log(f"crossover (smallest case where linear fwd beats cuDNN dense): {summary['crossover_fwd_linear_beats_cudnn']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernels_linear.json")
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also sweep tile configs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels_linear.py needs a CUDA GPU")
    t0 = time.time()
    result = {"env": environment(), "copy_tbps": copy_bandwidth_tbps()}
    rows: list[dict] = []
    result["rows"] = rows
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        result["summary"] = summarize(rows)
        result["wall_s"] = time.time() - t0
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for name, *_ in CASES:  # one case at a time, saving as we go
        if args.cases and name not in args.cases:
            continue
        run_linear_cases(rows, cases=[name], dense=not args.no_dense)
        save()
    try:
        result["kernels_flux4k_ms"] = kernel_breakdown()
    except Exception as exc:  # noqa: BLE001
        print(f"kernel breakdown failed: {exc}")
    if args.sweep:
        result["sweep"] = sweep()
    save()
    print_table(rows, result["summary"])
    print(f"wrote {args.out} in {result['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
