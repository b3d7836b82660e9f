"""Move trained LinFusion-Mini weights into the package, through the device tool's limits.

The GPU machine returns at most 8 files of 16 MiB each, so the weights travel as one
tar split into parts::

    python -m linfusion.mini.package pack TRAIN_DIR DEST        # on the GPU machine, DEST=$OUT
    python -m linfusion.mini.package unpack SRC [--results]     # here: SRC = the fetched files

``pack`` stages ``TRAIN_DIR/pipeline`` and ``TRAIN_DIR/adapter-{linear,local}`` in the
``linfusion/mini/weights`` layout (only the files loading needs), checks the size budget
(each file < 16 MB, about 30 MB in all), and writes ``mini_weights.tar.partNN`` plus
``mini_weights.json`` (sha256 of every part and of the whole tar, the file list). Student
variants (``TRAIN_DIR/adapter-linear-TAG``, recipes compared in one call) travel in the same
tar under ``variants/``, outside the budget.
``unpack`` verifies the checksums, joins the parts and extracts into
``linfusion/mini/weights`` (replacing what was there); variants go only where ``--variants DIR``
says (never into the package); with ``--results`` it also copies ``quality.json`` and
``quality_grid.png`` from SRC into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

from .bundle import WEIGHTS_DIR

PART_BYTES = 15 * 2**20
FILE_LIMIT_MB = 16.0
TOTAL_BUDGET_MB = 32.0
NAME = "mini_weights"
ADAPTER_FILES = ("linfusion_adapter.json", "linfusion_adapter.safetensors")
BUNDLED_ADAPTERS = ("adapter-linear", "adapter-local")
VARIANTS = "variants"  # tar folder of the student variants' adapters


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stage(train_dir: str | Path, dest: str | Path) -> dict[str, float]:
    """Copy what loading needs into ``dest`` (weights layout); returns {relative path: MB}."""
    train_dir, dest = Path(train_dir), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    pipeline = train_dir / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        raise FileNotFoundError(f"{pipeline} is not a saved pipeline (no model_index.json)")
    shutil.copytree(pipeline, dest / "pipeline", ignore=shutil.ignore_patterns("*.tmp", ".cache"))
    for src in sorted(train_dir.glob("adapter-*")):
        if (src / ADAPTER_FILES[0]).is_file():
            target = dest / src.name if src.name in BUNDLED_ADAPTERS else dest / VARIANTS / src.name
            target.mkdir(parents=True)
            for name in ADAPTER_FILES:
                shutil.copy2(src / name, target / name)
    sizes = {str(p.relative_to(dest)): round(p.stat().st_size / 2**20, 3) for p in sorted(dest.rglob("*")) if p.is_file()}
    too_big = {k: v for k, v in sizes.items() if v >= FILE_LIMIT_MB}
    if too_big:
        raise ValueError(f"files over {FILE_LIMIT_MB} MB cannot ship: {too_big}")
    shipped = sum(v for k, v in sizes.items() if not k.startswith(VARIANTS + "/"))
    if shipped > TOTAL_BUDGET_MB:
        print(f"warning: weights take {shipped:.1f} MB (budget about 30 MB)", file=sys.stderr)
    return sizes


def pack(train_dir: str | Path, out: str | Path, part_bytes: int = PART_BYTES) -> dict:
    """Stage, tar and split into ``out``; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".{NAME}-staging"
    sizes = stage(train_dir, staging)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for rel in sorted(sizes):
            tar.add(staging / rel, arcname=rel)
    shutil.rmtree(staging)
    data = buffer.getvalue()
    for old in out.glob(f"{NAME}.tar.part*"):
        old.unlink()
    parts = []
    for i in range(0, len(data), part_bytes):
        name = f"{NAME}.tar.part{i // part_bytes:02d}"
        (out / name).write_bytes(data[i : i + part_bytes])
        parts.append({"name": name, "bytes": len(data[i : i + part_bytes]), "sha256": _sha256(data[i : i + part_bytes])})
    manifest = {"format": 1, "tar_sha256": _sha256(data), "tar_bytes": len(data), "parts": parts, "files_mb": sizes,
                "total_mb": round(sum(sizes.values()), 3)}
    (out / f"{NAME}.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def unpack(src: str | Path, dest: str | Path = WEIGHTS_DIR, results: str | Path | None = None,
           variants: str | Path | None = None) -> dict:
    """Verify and extract the parts in ``src`` into ``dest``, the student variants (if any) into
    ``variants`` (skipped without it); optionally copy the benchmark results."""
    src, dest = Path(src), Path(dest)
    manifest = json.loads((src / f"{NAME}.json").read_text())
    chunks = []
    for part in manifest["parts"]:
        data = (src / part["name"]).read_bytes()
        if _sha256(data) != part["sha256"]:
            raise ValueError(f"{part['name']} is corrupt (sha256 mismatch)")
        chunks.append(data)
    data = b"".join(chunks)
    if _sha256(data) != manifest["tar_sha256"]:
        raise ValueError("joined tar does not match its sha256")
    tmp = dest.with_name(dest.name + ".new")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            target = (tmp / member.name).resolve()
            if not member.isfile() or not str(target).startswith(str(tmp.resolve()) + "/"):
                raise ValueError(f"refusing tar member {member.name!r}")
        # every member was checked above (regular files inside tmp); the "data" filter adds the same
        # guarantee where this Python has it (3.11.4+, 3.12), e.g. not Debian's 3.11.2
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, **safe)
    if (tmp / VARIANTS).exists():
        if variants is not None:
            variants = Path(variants)
            variants.mkdir(parents=True, exist_ok=True)
            for folder in sorted((tmp / VARIANTS).iterdir()):
                if (variants / folder.name).exists():
                    shutil.rmtree(variants / folder.name)
                shutil.move(str(folder), str(variants / folder.name))
        shutil.rmtree(tmp / VARIANTS)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    if results is not None:
        results = Path(results)
        results.mkdir(parents=True, exist_ok=True)
        for name in ("quality.json", "quality_grid.png"):
            if (src / name).is_file():
                shutil.copy2(src / name, results / name)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linfusion.mini.package", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="stage + tar + split TRAIN_DIR's weights into DEST")
    p.add_argument("train_dir")
    p.add_argument("dest")
    u = sub.add_parser("unpack", help="verify + extract SRC's parts into linfusion/mini/weights")
    u.add_argument("src")
    u.add_argument("--dest", default=str(WEIGHTS_DIR))
    u.add_argument("--variants", default=None, help="extract the student variants' adapters here (default: skip them)")
    u.add_argument("--results", nargs="?", const="benchmarks/results", default=None,
                   help="also copy quality.json / quality_grid.png here (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.command == "pack":
        manifest = pack(args.train_dir, args.dest)
    else:
        manifest = unpack(args.src, args.dest, args.results, args.variants)
    print(json.dumps({k: v for k, v in manifest.items() if k != "parts"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
