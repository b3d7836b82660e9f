"""Re-fit the constants of ``linfusion/crossover_profiles.json`` (the crossover cost model).

Two sources::

    # GPU: fit a profile from kernel benchmark results (rows as written by benchmarks/kernels*.py)
    python benchmarks/calibrate_crossover.py --from-results benchmarks/results/kernels*.json \
        --profile cuda-sm90 [--write]

    # CPU: measure torch SDPA and the linfusion PyTorch references on this machine
    OMP_NUM_THREADS=1 python benchmarks/calibrate_crossover.py --measure --profile cpu [--write]

Without ``--write`` it prints the fitted profile and the crossovers it implies; with it, the
profile in ``linfusion/crossover_profiles.json`` is updated in place (other profiles untouched).

Fits (least squares, each a straight line):

* dense: ``ms = flops / dense_tflops + c`` over rows ``op="dense", impl="cudnn", pass="fwd"``
  (CPU: torch SDPA) with ``flops = 4·B·H·N²·D``.
* linear: ``ms = bytes / (bandwidth · eff) + linear_launch_us`` over rows ``op="linear",
  impl="triton", pass="fwd"`` (CPU: ``linear_attention_reference``); ``bandwidth`` is the copy
  bandwidth (rows' ``floor_ms`` give it) and ``eff`` the kernel's fraction of it. On CPU the
  reference is compute-bound; its fit goes to ``linear_tflops``.
* local: rows ``op="local", impl="triton", pass="fwd"`` with a ``shape``/``variant`` of "tile"
  or "circle" and a ``keys_per_query`` field (else ``useful_tflops``/``tflops``): the median
  useful TFLOP/s of the rows with N ≥ 16384 becomes ``local_{tile,circle}_tflops``.

Rows are ``{"op", "impl", "pass", "variant", "shape": "BxHxNxD", "ms", ...}``; a file is either a
list of rows or ``{"rows": [...]}``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from linfusion.crossover import PROFILES_PATH  # noqa: E402


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a·x + c`` with a > 0 and c ≥ 0 (c refitted to 0 if negative)."""
    n = len(xs)
    if n == 1:
        return ys[0] / xs[0], 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else my / mx
    c = my - a * mx
    if c < 0 or a <= 0:
        a, c = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0
    return a, c


def _shape(row: dict) -> tuple[int, int, int, int]:
    shape = row["shape"]
    dims = [int(s) for s in (shape.split("x") if isinstance(shape, str) else shape)]
    return tuple(dims[:4])  # type: ignore[return-value]


def load_rows(patterns: list[str]) -> list[dict]:
    rows = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            with open(path) as f:
                data = json.load(f)
            rows.extend(data["rows"] if isinstance(data, dict) else data)
    return rows


def fit_from_rows(rows: list[dict], base: dict) -> dict:
    """A profile dict: ``base`` with the constants the rows determine replaced."""
    prof = dict(base)
    fwd = [r for r in rows if r.get("pass", "fwd") == "fwd" and r.get("ms")]
    dense = [r for r in fwd if r.get("op") == "dense" and r.get("impl") == "cudnn"]
    dense = [r for r in dense if _shape(r)[3] == 128] or dense  # the profile's reference head dim
    if dense:
        xs = [4.0 * math.prod(_shape(r)[:2]) * _shape(r)[2] ** 2 * _shape(r)[3] / 1e12 for r in dense]  # TFLOP
        a, c = _fit_line(xs, [r["ms"] / 1e3 for r in dense])
        prof["dense_tflops"] = round(1 / a, 1)
        prof["launch_us"] = round(max(c * 1e6, 2.0), 1)
    linear = [r for r in fwd if r.get("op") == "linear" and r.get("impl") == "triton" and r.get("variant", "elu1") == "elu1"]
    if linear:
        copy = [4 * math.prod(_shape(r)) * 2 / (r["floor_ms"] * 1e-3) / 1e12 for r in linear if r.get("floor_ms")]
        if copy:
            prof["bandwidth_tbps"] = round(statistics.median(copy), 2)
        xs = [4 * math.prod(_shape(r)) * 2 / 1e12 for r in linear]  # TB moved
        a, c = _fit_line(xs, [r["ms"] / 1e3 for r in linear])
        prof["linear_bw_efficiency"] = round(min(1.0, (1 / a) / prof["bandwidth_tbps"]), 3)
        prof["linear_launch_us"] = round(c * 1e6, 1)
    for shape in ("tile", "circle"):
        local = [r for r in fwd if r.get("op") == "local" and r.get("impl") == "triton"
                 and shape in (str(r.get("shape_kind", "")), str(r.get("variant", "")), str(r.get("window_shape", "")))]
        big = [r for r in local if _shape(r)[2] >= 16384] or local
        rates = []
        for r in big:
            b, h, n, d = _shape(r)
            if r.get("keys_per_query"):
                rates.append(4.0 * b * h * n * r["keys_per_query"] * d / (r["ms"] * 1e-3) / 1e12)
            elif r.get("useful_tflops") or r.get("tflops"):
                rates.append(float(r.get("useful_tflops") or r["tflops"]))
        if rates:
            prof[f"local_{shape}_tflops"] = round(statistics.median(rates), 1)
    return prof


# --------------------------------------------------------------------------------------------
# CPU measurement
# --------------------------------------------------------------------------------------------


def measure_cpu(base: dict, log=print) -> dict:
    """Time torch SDPA, the linear and local references, a copy and a GEMM on this CPU (fp32)."""
    from benchmarks.timing import cpu_ms
    import torch
    import torch.nn.functional as F

    from linfusion.kernels import linear_attention_reference, local_attention_reference

    torch.manual_seed(0)
    prof = dict(base)
    b, h, d = 1, 4, 64
    # copy bandwidth (read + write counted)
    x = torch.randn(32 * 2**20 // 4)
    ms = cpu_ms(lambda: x.clone())
    prof["bandwidth_tbps"] = round(2 * x.numel() * 4 / (ms * 1e-3) / 1e12, 4)
    # tiny op: fixed cost
    tiny = torch.randn(16)
    prof["launch_us"] = round(cpu_ms(lambda: tiny + 1, repeat=50) * 1e3, 1)
    # GEMM
    a, w = torch.randn(1024, 512), torch.randn(512, 512)
    ms = cpu_ms(lambda: a @ w)
    prof["gemm_tflops"] = round(2 * 1024 * 512 * 512 / (ms * 1e-3) / 1e12, 4)
    dense_x, dense_y, lin_x, lin_y, local_rates = [], [], [], [], []
    for side in (16, 32, 48, 64):
        n = side * side
        q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
        ms = cpu_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        dense_x.append(4.0 * b * h * n * n * d / 1e12)
        dense_y.append(ms / 1e3)
        qf, kf = q.relu() + 0.1, k.relu() + 0.1
        ms_lin = cpu_ms(lambda: linear_attention_reference(qf, kf, v))
        lin_x.append(4.0 * b * h * n * d * d / 1e12)
        lin_y.append(ms_lin / 1e3)
        ms_loc = cpu_ms(lambda: local_attention_reference(q, k, v, (side, side), 8, shape="tile"), repeat=3)
        local_rates.append(4.0 * b * h * n * n * d / (ms_loc * 1e-3) / 1e12)  # the reference visits all keys
        log(f"cpu N={n:5d}: sdpa {ms:8.2f} ms  linear ref {ms_lin:7.2f} ms  local ref {ms_loc:8.2f} ms")
    a_d, c_d = _fit_line(dense_x, dense_y)
    prof["dense_tflops"] = round(1 / a_d, 4)
    a_l, c_l = _fit_line(lin_x, lin_y)
    prof["linear_tflops"] = round(1 / a_l, 4)
    prof["linear_launch_us"] = round(c_l * 1e6, 1)
    prof["local_tile_tflops"] = prof["local_circle_tflops"] = round(statistics.median(local_rates), 4)
    prof["local_visits_all_keys"] = True
    prof["local_pads_head_dim"] = False  # the PyTorch reference computes at the head dim itself
    prof["head_dim_scale"] = {}
    prof["sms"] = 0
    prof["source"] = (f"measured on this CPU ({os.cpu_count()} cores, OMP_NUM_THREADS="
                      f"{os.environ.get('OMP_NUM_THREADS', 'unset')}) with benchmarks/calibrate_crossover.py --measure, fp32")
    return prof


def summary(profile_name: str, prof: dict) -> list[str]:
    import torch

    from linfusion.config import PatchConfig
    from linfusion.crossover import DeviceProfile, crossover_tokens, tokens_to_pixels

    fields = {k: v for k, v in prof.items() if k in DeviceProfile.__dataclass_fields__ and k != "name"}
    p = DeviceProfile(name=profile_name, **fields)
    dtype = torch.float32 if profile_name == "cpu" else torch.bfloat16
    lines = []
    cases = [("FLUX 24x128, 512 text", 24, 128, 512, 1, 16, 3072), ("SDXL 10x64 (CFG)", 10, 64, 0, 2, 16, 640),
             ("SDXL 20x64 (CFG)", 20, 64, 0, 2, 32, 1280)]
    for label, heads, hd, text, batch, ppt, ch in cases:
        parts = []
        for cfg in (PatchConfig(method="linear"), PatchConfig(method="local", shape="tile"),
                    PatchConfig(method="local", shape="circle")):
            n = crossover_tokens(cfg, heads, hd, batch=batch, text_len=text, channels=ch, dtype=dtype, profile=p)
            name = cfg.method if cfg.method == "linear" else f"local/{cfg.shape}"
            parts.append(f"{name}: " + (f"{n} tokens (~{tokens_to_pixels(n, ppt)} px)" if n else "never"))
        lines.append(f"{profile_name} {label}: " + "; ".join(parts))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cuda-sm90", help="profile name to fit (cuda-sm90, cuda-default, cpu)")
    parser.add_argument("--from-results", nargs="*", default=None, help="kernel benchmark JSON files (globs)")
    parser.add_argument("--measure", action="store_true", help="measure on this machine's CPU")
    parser.add_argument("--write", action="store_true", help="update linfusion/crossover_profiles.json")
    parser.add_argument("--profiles-json", default=str(PROFILES_PATH))
    args = parser.parse_args(argv)
    with open(args.profiles_json) as f:
        data = json.load(f)
    base = data["profiles"].get(args.profile) or data["profiles"]["cuda-default"]
    if args.measure:
        prof = measure_cpu(base)
    elif args.from_results:
        rows = load_rows(args.from_results)
        if not rows:
            parser.error(f"no rows in {args.from_results}")
        prof = fit_from_rows(rows, base)
        prof["source"] = f"fitted by benchmarks/calibrate_crossover.py from {len(rows)} kernel rows"
    else:
        parser.error("give --measure or --from-results")
    print(json.dumps({args.profile: prof}, indent=1))
    for line in summary(args.profile, prof):
        print(line)
    if args.write:
        data["profiles"][args.profile] = prof
        with open(args.profiles_json, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        print(f"wrote profile {args.profile!r} to {args.profiles_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
