"""Kernel benchmark: linear and local attention against dense baselines, one JSON and one plot.

Run on a GPU (both halves in one process, baselines measured in the same run)::

    python benchmarks/kernels.py --out benchmarks/results/kernels.json

or merge the halves measured by ``kernels_linear.py`` and ``kernels_local.py``::

    python benchmarks/kernels.py --merge benchmarks/results/kernels_linear.json \
        benchmarks/results/kernels_local.json --out benchmarks/results/kernels.json

Output: ``{"env": {gpu, torch, triton, cuda}, "cases": [{case, op, variant, impl, pass, shape, ms,
tflops, tbps, ...}]}`` and a PNG of each implementation's speedup over cuDNN dense attention
versus resolution (FLUX-size cases), next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLUX_CASES = ("flux-1k", "flux-2k", "flux-4k", "flux-8k")


def merge(paths: list[Path]) -> dict:
    """One result from several files of the same GPU/torch/triton; rows are concatenated."""
    env, cases, extra = None, [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if env is None:
            env = data["env"]
        elif {k: data["env"].get(k) for k in ("gpu", "torch", "triton")} != {k: env.get(k) for k in ("gpu", "torch", "triton")}:
            raise SystemExit(f"{path} was measured on {data['env']}, not {env}: refusing to merge")
        rows = data.get("cases") or data.get("rows") or []
        for row in rows:
            cases.append(dict(row, source=Path(path).name))
        extra[Path(path).stem] = {k: v for k, v in data.items() if k not in ("env", "cases", "rows")}
    return {"env": env, "cases": cases, "sources": extra}


def speedups(cases: list[dict]) -> dict[tuple, dict[str, float]]:
    """(op, variant, impl) -> {case: speedup over cuDNN dense from the same source file} (forward)."""
    dense = {(r["source"], r["case"]): r["ms"] for r in cases
             if r["op"] == "dense" and r["impl"] == "cudnn" and r["pass"] == "fwd" and r.get("ms")}
    out: dict[tuple, dict[str, float]] = {}
    for r in cases:
        if r["op"] == "dense" or r["pass"] != "fwd" or not r.get("ms"):
            continue
        base = dense.get((r["source"], r["case"]))
        if base:
            out.setdefault((r["op"], r["variant"], r["impl"]), {})[r["case"]] = base / r["ms"]
    return out


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (op, variant, impl), values in sorted(speedups(result["cases"]).items()):
        xs = [c for c in FLUX_CASES if c in values]
        if len(xs) < 2 or impl not in ("triton", "flex", "torch_compile"):
            continue
        ax.plot(xs, [values[c] for c in xs], marker="o", label=f"{op} {variant} ({impl})")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_ylabel("speedup over cuDNN dense SDPA (forward)")
    ax.set_xlabel("FLUX-size attention, 1×24×N×128 (N = (res/16)²)")
    env = result["env"]
    ax.set_title(f"{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def run_all() -> dict:
    sys.path.insert(0, str(HERE))
    from kernels_linear import environment, run_linear_cases  # noqa: PLC0415
    from kernels_local import run_local_cases  # noqa: PLC0415

    rows: list[dict] = []
    run_linear_cases(rows)
    run_local_cases(rows)
    return {"env": environment(), "cases": [dict(r, source="run") for r in rows]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merge", nargs="+", type=Path, help="merge these result files instead of running")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "kernels.json")
    args = parser.parse_args(argv)
    result = merge(args.merge) if args.merge else run_all()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    try:
        plot(result, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    for (op, variant, impl), values in sorted(speedups(result["cases"]).items()):
        print(f"{op:6} {variant:16} {impl:13} " + "  ".join(f"{c}: {v:7.1f}x" for c, v in values.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
