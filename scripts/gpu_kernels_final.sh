#!/usr/bin/env bash
# One device call (14th session): the CUDA tests of the local kernels with the session's defaults
# (dQ by TMA reductions in the fused backward, "auto" fused for circles at head dims 64 and 128),
# then the one-call benchmark (benchmarks/kernels.py: every case and baseline in one process).
#   run(command="bash scripts/gpu_kernels_final.sh", carry=[".whl"], timeout_s=600)
# Knobs: TESTS_K (the pytest -k expression, default "gpu or fused_dq"), TEST_TIMEOUT (s, default 230).
source scripts/gpu_env.sh  # pipefail, $OUT, left(); diffusers from carry=[".whl"], PYTHONPATH
nvidia-smi -L | tee "$OUT/gpu_tests.txt"
timeout -k 10 ${TEST_TIMEOUT:-230} python3 -m pytest -q tests/test_kernels_local.py -k "${TESTS_K:-gpu or fused_dq}" -rs 2>&1 \
  | tail -25 | tee -a "$OUT/gpu_tests.txt"
echo "== kernels.py at ${SECONDS} s" | tee -a "$OUT/gpu_tests.txt"
timeout -k 10 $(( 585 - SECONDS )) python3 benchmarks/kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels_log.txt" | tail -60
echo "done at ${SECONDS} s"
