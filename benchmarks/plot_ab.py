"""Plot ``ab_local.py`` results: for each (case, window), every impl's backward time divided by the
forward time of the same call (the ratio issue #3 holds at 3), as grouped bars, with the 3x line.

    python benchmarks/plot_ab.py benchmarks/results/ab_storedds_23rd.json --out ab.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def ratios(records: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """{(case, window): {backward impl: backward ms / forward ms}} of one ``ab_local.py`` record list
    (the first forward impl of each (case, window) is the denominator)."""
    timed = [r for r in records if "ms" in r]  # (a failed impl has an "error" instead)
    forward: dict[tuple[str, str], float] = {}
    for r in timed:
        if r["pass"] == "fwd":
            forward.setdefault((r["case"], r["window"]), r["ms"])
    out: dict[tuple[str, str], dict[str, float]] = {}
    for r in timed:
        key = (r["case"], r["window"])
        if r["pass"] == "bwd" and key in forward:
            out.setdefault(key, {})[r["impl"]] = r["ms"] / forward[key]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="ab_local.py JSON files")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], dict[str, float]] = {}
    env = None
    for path in args.results:
        data = json.loads(Path(path).read_text())
        env = env or data.get("env")
        for key, by_impl in ratios(data["records"]).items():
            groups.setdefault(key, {}).update(by_impl)
    impls = sorted({impl for by_impl in groups.values() for impl in by_impl})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups)), 4.0))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs = [g + i * width for g, key in enumerate(groups) if impl in groups[key]]
        ys = [groups[key][impl] for key in groups if impl in groups[key]]
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(3.0, color="black", linestyle="--", linewidth=1, label="target: 3x forward")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{case}\n{window}" for case, window in groups], fontsize=8)
    ax.set_ylabel("backward / forward (same call)")
    title = "local attention backward variants"
    if env:
        title += f" ({env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')})"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
