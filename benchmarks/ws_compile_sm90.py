"""Compile the warp-specialised Hopper kernels (``linfusion/kernels/local_dkdv_hopper.py``) for
sm_90 without a GPU and report what ptxas says: registers, spills, whether the loop was
specialised. Needs the Triton the H200 runs (3.6) and ``ptxas`` on PATH; Triton's own compiler
entry points with a ``GPUTarget("cuda", 90, 32)``, nothing launched.

    python benchmarks/ws_compile_sm90.py            # both kernels, every block size the launchers take
    python benchmarks/ws_compile_sm90.py dq         # the dQ kernel only
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from linfusion.kernels import local_dkdv_hopper as hopper  # noqa: E402

POINTERS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")


def compile_report(kernel, constexprs: dict, num_stages: int) -> str:
    """One line (and ptxas's own): the kernel compiled for sm_90 with bf16 inputs."""
    sig = {}
    for name in kernel.arg_names:
        sig[name] = ("constexpr" if name in constexprs else "*fp32" if name in ("LSE", "DELTA")
                     else "*bf16" if name in POINTERS else "fp32" if name in ("qk_scale", "sm_scale") else "i32")
    src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    head = f"{kernel.__name__} BM={constexprs['BM']} BN={constexprs['BN']} stages={num_stages}"
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "num_stages": num_stages})
    except Exception as exc:  # the compile failures are the finding
        return f"{head}: FAILED to compile ({str(exc).splitlines()[-1][:120] if str(exc) else type(exc).__name__})"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    ptxas = subprocess.run(["ptxas", "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    info = " | ".join(line.split(":", 1)[-1].strip() for line in ptxas.stderr.splitlines()
                      if "registers" in line or "spill" in line)
    specialised = "ttg.warp_specialize" in compiled.asm["ttgir"]
    regs = sorted(set(re.findall(r"setmaxnreg\S* (\d+)", compiled.asm["ptx"])))
    return f"{head}: warp-specialised {specialised}, setmaxnreg {regs or '-'}; {info}"


def main(argv=None) -> None:
    which = (argv if argv is not None else sys.argv[1:]) or ["dkdv", "dq"]
    base = {"D": hopper.HEAD_DIM, "TV": hopper.BN, "WS": True, "UPCAST": False}
    print("triton", triton.__version__)
    if "dkdv" in which:
        for stages in (2, 3):
            print(compile_report(hopper._dkdv_ws_kernel, {**base, "BM": hopper.BM, "BN": hopper.BN}, stages))
    if "dq" in which:
        for bm, bn in ((128, 64), (128, 128), (64, 64), (64, 128)):
            for stages in (2, 3):
                print(compile_report(hopper._dq_ws_kernel, {**base, "BM": bm, "BN": bn}, stages))


if __name__ == "__main__":
    main()
