"""The ``linfusion`` command line: one sub-command per product area.

Each area module exposes ``add_parser(subparsers)`` that registers its command
with ``set_defaults(run=...)``; heavy imports happen inside ``run`` so
``linfusion --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: sub-command modules, in the order ``--help`` lists them
COMMAND_MODULES = (
    "linfusion.commands.info",
    "linfusion.commands.generate",
    "linfusion.commands.bench",
    "linfusion.app.cli",
    "linfusion.distill.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linfusion",
        description="Fast high-resolution diffusion: patch diffusers pipelines with linear or local attention.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
