"""``linfusion demo``: a local web page comparing the original and the accelerated pipeline.

Register with ``linfusion.cli.COMMAND_MODULES`` (``"linfusion.app.cli"``); meanwhile
``python -m linfusion.app [options]`` runs the same command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", default=False,
                        help="also open a public *.gradio.live link (off by default)")
    parser.add_argument("--model", default=None,
                        help="diffusers pipeline: hub id or local folder (default: the bundled LinFusion-Mini)")
    parser.add_argument("--adapter", default=None, help="adapter folder or hub id written by save_adapter")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="largest width*height a request may ask for (default: 2048*2048 on CPU; on CUDA "
                             "the limit comes from free memory)")
    parser.set_defaults(run=run)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="web demo: original and accelerated side by side",
        description="Start a local Gradio page that runs a prompt through the original and the LinFusion-patched "
                    "pipeline and shows both images with their times.",
    )
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the demo needs Gradio: pip install 'linfusion[app]' (or pip install 'gradio>=5')", file=sys.stderr)
        return 2
    from ..mini.bundle import MiniNotBundledError
    from .engine import DemoEngine
    from .ui import launch

    try:
        engine = DemoEngine.load(args.model, adapter=args.adapter, device=args.device, dtype=args.dtype,
                                 max_pixels=args.max_pixels)
    except MiniNotBundledError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"error: cannot load {args.model or 'LinFusion-Mini'}: {error}", file=sys.stderr)
        return 2
    print(f"LinFusion demo: {engine.model_name} on {engine.device}", flush=True)
    launch(engine, host=args.host, port=args.port, share=args.share)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="linfusion demo", description="LinFusion web demo")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
