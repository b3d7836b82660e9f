"""``linfusion bench e2e|kernels|highres16k|calibrate ...``: run the repository's benchmark scripts.

The benchmarks live in ``benchmarks/`` of a source checkout (they need GPUs and write results
into ``benchmarks/results/``), not in the installed package: this command finds the checkout
beside the ``linfusion`` package (an editable install or running from the repository) or in
``$LINFUSION_BENCHMARKS``, and runs the script's ``main(argv)`` with the remaining arguments::

    linfusion bench e2e --models flux sdxl --resolutions 1024 4096
    linfusion bench kernels --out benchmarks/results/kernels.json
    linfusion bench highres16k
    linfusion bench calibrate --from-results benchmarks/results/kernels*.json --write
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

SCRIPTS = {
    "e2e": ("e2e.py",),
    "kernels": ("kernels.py", "kernels_linear.py"),
    "highres16k": ("highres16k.py",),
    "calibrate": ("calibrate_crossover.py",),
}


def benchmarks_dir() -> Path | None:
    """The ``benchmarks/`` folder of a source checkout, or None."""
    candidates = []
    if os.environ.get("LINFUSION_BENCHMARKS"):
        candidates.append(Path(os.environ["LINFUSION_BENCHMARKS"]))
    candidates += [Path(__file__).resolve().parents[2] / "benchmarks", Path.cwd() / "benchmarks"]
    for path in candidates:
        if path.is_dir():
            return path
    return None


def find_script(name: str) -> Path:
    folder = benchmarks_dir()
    if folder is None:
        raise SystemExit(
            "linfusion bench needs a source checkout (the benchmarks are not installed with the package): "
            "run it from the repository root, or set LINFUSION_BENCHMARKS=/path/to/linfusion/benchmarks"
        )
    for filename in SCRIPTS[name]:
        if (folder / filename).is_file():
            return folder / filename
    raise SystemExit(f"no {' or '.join(SCRIPTS[name])} in {folder}")


def run(args: argparse.Namespace) -> int:
    script = find_script(args.benchmark)
    root = str(script.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"linfusion_bench_{args.benchmark}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(list(args.args)) or 0)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="run a benchmark (e2e, kernels, highres16k, calibrate); arguments go to the script",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("benchmark", choices=sorted(SCRIPTS), help="which benchmark script")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script (see its --help)")
    parser.set_defaults(run=run)
