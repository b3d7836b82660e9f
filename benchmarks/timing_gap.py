"""Why a FLUX backward's wall time exceeds the sum of its kernels' profiler times (22nd/23rd-session
A/Bs: flux-4k tile 14.06 ms by ``do_bench`` against 13.06 ms of kernels; PixArt and head dim 96, which
have no text tokens, agree to 0.01 ms).

Per case and pass (``fwd`` inference forward, ``bwd`` split backward) the same call is timed four
ways: ``bench_ms`` (``do_bench`` with its L2 flush, as every benchmark here), CUDA events around each
of 20 back-to-back calls, torch.profiler over 5 back-to-back calls (per kernel instance: start, end;
per call: the span from the first kernel's start to the last one's end, and the gaps between
kernels), and a sustained 3-second loop whose per-call event times are kept in order (a falling
clock shows as calls that get slower). ``nvidia-smi`` samples SM clock, power and throttle reasons
every 20 ms in the background; phase marks in the JSON place each phase on its timeline.

    python benchmarks/timing_gap.py --out gap.json --cases flux-4k flux-4k-notext
    python benchmarks/timing_gap.py --plot gap.json      # gap.png: clock and power, and the sustained calls
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench_ms, environment  # noqa: E402

CASES = {  # name: (B, H, D, grid, text, shape, window)
    "flux-4k": (1, 24, 128, (256, 256), 512, "tile", 16),
    "flux-4k-notext": (1, 24, 128, (256, 256), 0, "tile", 16),
    "flux-4k-circle": (1, 24, 128, (256, 256), 512, "circle", 16),
    "flux-2k": (1, 24, 128, (128, 128), 512, "tile", 16),
    "wan-720p": (1, 12, 128, (21, 45, 80), 0, "tile", (2, 8, 8)),
}


def event_times(fn, calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` back-to-back calls, by CUDA events (no flush between)."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def profiled_calls(fn, calls: int, flush: torch.Tensor | None = None) -> list[dict]:
    """Per call: each kernel's name, start and duration (µs, relative to the call's first kernel),
    the call's span and its kernels' summed duration; with ``flush`` an L2 flush before each call
    (as ``do_bench``), left out of the call's kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    # (no record_function ranges: they show up among the device events and would count as kernels)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            if flush is not None:
                flush.zero_()
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.time_range.start)
    if flush is not None:  # the flushes' memsets (long fills) belong to no call
        kernels = [e for e in kernels if not ("elementwise" in e.name and e.device_time > 20)]
    per_call = len(kernels) // calls  # every call launches the same kernels, in order
    out = []
    for i in range(calls):
        chunk = kernels[i * per_call:(i + 1) * per_call]
        t0 = chunk[0].time_range.start
        end = max(e.time_range.start + e.device_time for e in chunk)
        out.append({"kernels": [{"name": e.name.split("(")[0][:50], "start": round(e.time_range.start - t0, 1),
                                 "us": round(e.device_time, 1)} for e in chunk],
                    "span_us": round(end - t0, 1), "sum_us": round(sum(e.device_time for e in chunk), 1)})
    return out


def measure_case(case: str, lt, flush: torch.Tensor, marks: list, sustain_s: float) -> list[dict]:
    """The forward's and the split backward's records of one case (see the module docstring)."""
    B, H, D, grid, text, shape, window = CASES[case]
    L = text + math.prod(grid)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    layout, _ = lt._prepare(q, k, v, grid, window, text, shape, None)
    o, lse = lt._forward(q, k, v, layout, text, False)
    fns = {"fwd": lambda: lt._forward(q, k, v, layout, text, False),
           "bwd": lambda: lt._backward(do, q, k, v, o, lse, layout, text, False, "split")}
    records = []
    for pss, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        rec = {"case": case, "pass": pss}
        marks.append((f"{case} {pss} bench", time.time()))
        rec["bench_ms"] = [bench_ms(fn) for _ in range(3)]
        marks.append((f"{case} {pss} events", time.time()))
        ev = event_times(fn, 20)
        rec["events_ms"] = [round(t, 4) for t in ev]
        marks.append((f"{case} {pss} profile", time.time()))
        rec["profile"] = profiled_calls(fn, 5)
        rec["profile_flush"] = profiled_calls(fn, 5, flush)
        marks.append((f"{case} {pss} sustain", time.time()))
        n = max(5, int(sustain_s * 1e3 / statistics.median(ev)))
        rec["sustain_ms"] = [round(t, 4) for t in event_times(fn, n)]
        marks.append((f"{case} {pss} end", time.time()))
        spans = [c["span_us"] / 1e3 for c in rec["profile"]]
        sums = [c["sum_us"] / 1e3 for c in rec["profile"]]
        flushed = [c["span_us"] / 1e3 for c in rec["profile_flush"]]
        s = rec["sustain_ms"]
        print(f"{case:15s} {pss} bench {['%.3f' % t for t in rec['bench_ms']]}  events med {statistics.median(ev):.3f}"
              f" min {min(ev):.3f} max {max(ev):.3f}  profile span {statistics.median(spans):.3f} kernels "
              f"{statistics.median(sums):.3f}  flushed span {statistics.median(flushed):.3f}  sustain first/last 10: "
              f"{statistics.median(s[:10]):.3f} / {statistics.median(s[-10:]):.3f} ({len(s)} calls)", flush=True)
        for c in rec["profile"][:2] + rec["profile_flush"][:2]:
            print("   ", [(kk["name"][:24], kk["start"], kk["us"]) for kk in c["kernels"]], flush=True)
        records.append(rec)
    return records


def plot(json_path: str) -> None:
    """``<json>.png``: the SM clock and power ``nvidia-smi`` sampled (the sustained phases marked), and
    each sustained loop's call times relative to its first calls."""
    import csv
    import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = str(Path(json_path).with_suffix(""))
    data = json.loads(Path(json_path).read_text())
    samples = []  # (seconds, SM MHz, W)
    for row in csv.reader(Path(base + ".smi.csv").open()):
        if len(row) >= 6:
            stamp = datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((stamp, int(row[1].split()[0]), float(row[3].split()[0])))
    t0 = data["marks"][0][1]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5))
    seconds = [s[0] - t0 for s in samples]
    top.plot(seconds, [s[1] for s in samples], lw=0.8, color="tab:blue")
    top.set_ylabel("SM clock, MHz")
    top.set_ylim(1300, 2050)
    power = top.twinx()
    power.plot(seconds, [s[2] for s in samples], lw=0.6, color="tab:red", alpha=0.6)
    power.set_ylabel("power, W (cap 700)", color="tab:red")
    for name, t in data["marks"]:
        if name.endswith("sustain"):
            top.axvline(t - t0, color="gray", lw=0.5)
            top.text(t - t0, 1320, name.replace(" sustain", ""), rotation=90, fontsize=7)
    top.set_xlim(0, max(seconds))
    top.set_xlabel("seconds")
    env = data["env"]
    top.set_title(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}: clock under the power cap "
                  "(nvidia-smi, 20 ms)")
    for rec in data["records"]:
        times = rec["sustain_ms"]
        fresh = statistics.median(times[1:11])
        elapsed, total = [], 0.0
        for t in times:
            total += t
            elapsed.append(total / 1e3)
        bottom.plot(elapsed, [t / fresh for t in times], lw=0.8,
                    label=f"{rec['case']} {rec['pass']} ({fresh:.2f} ms fresh)")
    bottom.set_ylim(0.95, 1.2)
    bottom.set_xlabel("seconds of back-to-back calls")
    bottom.set_ylabel("call time / fresh calls' median")
    bottom.legend(fontsize=7, ncol=2)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["flux-4k", "flux-4k-notext"], choices=sorted(CASES))
    parser.add_argument("--sustain-s", type=float, default=3.0)
    parser.add_argument("--out", help="the JSON to write (the nvidia-smi log beside it, .smi.csv)")
    parser.add_argument("--plot", metavar="JSON", help="only plot an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    if not args.out:
        parser.error("--out is required unless --plot is given")

    import linfusion.kernels.local_triton as lt

    smi_path = Path(args.out).with_suffix(".smi.csv")
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,"
         "clocks_event_reasons.active", "--format=csv,noheader", "-lms", "20"],
        stdout=smi_path.open("w"), stderr=subprocess.DEVNULL)
    marks: list[tuple[str, float]] = []
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    records = []
    try:
        for case in args.cases:
            records += measure_case(case, lt, flush, marks, args.sustain_s)
            torch.cuda.empty_cache()
            Path(args.out).write_text(json.dumps({"env": environment(), "marks": marks, "records": records}, indent=1))
    finally:
        smi.terminate()


if __name__ == "__main__":
    main()
