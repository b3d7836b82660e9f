"""Plot `linfusion distill` loss curves from metrics.jsonl files (the trainer's log) into one PNG.

    python benchmarks/distill_curves.py out.png LABEL=path/metrics.jsonl [LABEL=path ...]

Each file is one run's ``metrics.jsonl`` (one JSON object per logged step: "step", the loss terms,
"lr"), or the Mini GPU script's ``distill_metrics.jsonl``, whose lines also carry "student": a file
holding several students gives one curve each, labelled ``LABEL/student``. One panel per loss term
found in any run (log scale), plus the learning rate.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

#: keys of a metrics line that are not loss terms
NOT_LOSSES = {"step", "lr", "global_batch", "samples", "world_size", "time", "student", "loss"}


def read_runs(specs: list[str]) -> dict[str, list[dict]]:
    """["LABEL=path", ...] -> {label (or label/student): [metrics line, ...]} in file order."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"expected LABEL=path/metrics.jsonl, got {spec!r}")
        for line in Path(path).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                runs[f"{label}/{record['student']}" if "student" in record else label].append(record)
    return dict(runs)


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = sorted({k for records in runs.values() for r in records for k in r if k not in NOT_LOSSES})
    panels = terms + ["lr"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for label, records in runs.items():
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key != "lr":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("runs", nargs="+", help="LABEL=path/metrics.jsonl")
    args = parser.parse_args(argv)
    plot(read_runs(args.runs), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
