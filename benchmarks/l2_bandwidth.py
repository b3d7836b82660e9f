"""Read bandwidth of the GPU's L2 cache and of HBM, as the local-attention kernels see them.

Many programs (4 warps each) read 16 KB chunks of one buffer in a scattered order, ITERS chunks
each, and sum them (so the loads cannot be dropped). A buffer well inside the L2 (24 MB of the
H200's 60 MB) measures L2 -> SM bandwidth; a 4 GB buffer measures HBM. Why it matters: a local
attention program re-reads its key and value tiles from L2 (every query tile loads its whole
window), so the bytes a kernel moves from L2, divided by its time, say how close it runs to this
limit (``benchmarks/NOTES_local.md``, 17th session).

    python benchmarks/l2_bandwidth.py --out benchmarks/results/l2_bandwidth.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench_ms, environment  # noqa: E402

CHUNK = 8192  # bf16 elements: 16 KB per program and iteration


@triton.jit
def _read_chunks(X, OUT, n_chunks, ITERS: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], tl.float32)
    for i in range(ITERS):
        chunk = (pid * 7919 + i * 104729) % n_chunks  # scattered over the buffer, different per program
        acc += tl.load(X + chunk.to(tl.int64) * CHUNK + offs).to(tl.float32)
    tl.store(OUT + pid * CHUNK + offs, acc)


def read_bandwidth(buffer_mb: float, programs: int, iters: int) -> dict:
    """TB/s of ``programs`` × ``iters`` chunk reads from a ``buffer_mb`` MB bf16 buffer."""
    n_chunks = max(1, int(buffer_mb * 2**20) // (CHUNK * 2))
    x = torch.randn(n_chunks * CHUNK, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(programs * CHUNK, device="cuda", dtype=torch.float32)

    def run():
        _read_chunks[(programs,)](x, out, n_chunks, ITERS=iters, CHUNK=CHUNK, num_warps=4)

    ms = bench_ms(run)
    nbytes = programs * iters * CHUNK * 2
    return {"buffer_mb": round(n_chunks * CHUNK * 2 / 2**20, 1), "programs": programs, "iters": iters,
            "ms": ms, "tbps": nbytes / (ms * 1e-3) / 1e12}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for buffer_mb in (24, 4096):
        for per_sm in (4, 8, 16):
            row = read_bandwidth(buffer_mb, sms * per_sm, 256)
            rows.append(row)
            print(f"buffer {row['buffer_mb']:7.1f} MB  {row['programs']:5d} programs  {row['ms']:7.3f} ms  "
                  f"{row['tbps']:5.2f} TB/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": environment(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
