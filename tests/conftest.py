"""Test-wide settings: offline, steady CPU timings, tests/ importable."""

import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# Triton decides between compiled and interpreted kernels when a kernel module is imported; any test
# module may import one (benchmarks, pipelines), so the CPU interpreter is chosen here, before all.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
