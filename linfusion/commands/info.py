"""``linfusion info``: versions, device and kernel backends."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect_info() -> dict:
    import torch

    from .. import __version__
    from ..kernels import available_backends
    from ..pipelines import FAMILIES

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "linfusion": __version__,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in ("torch", "diffusers", "transformers", "triton", "accelerate", "peft")},
        "device": device,
        "kernel_backends": available_backends(),
        "families": {f.name: f.description for f in FAMILIES},
        "methods": ["linear", "local"],
    }


def run(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"linfusion {info['linfusion']} (python {info['python']})")
    for name, version in info["packages"].items():
        print(f"  {name:<13} {version}")
    print(f"device: {info['device']}")
    print("kernel backends:")
    for name, state in info["kernel_backends"].items():
        print(f"  {name:<7} {state}")
    print("families: " + ", ".join(f"{k} ({v})" for k, v in info["families"].items()))
    print("methods: " + ", ".join(info["methods"]))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="print versions, device and available kernel backends")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=run)
