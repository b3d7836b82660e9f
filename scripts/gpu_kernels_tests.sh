#!/usr/bin/env bash
# One device call: the CUDA tests of the local kernels (real sizes with the defaults, the fused and
# TMA paths forced on small cases), then the linear kernels' tests if time is left.
#   run(command="bash scripts/gpu_kernels_tests.sh", carry=[".whl"], timeout_s=600)
source scripts/gpu_env.sh  # pipefail, $OUT, left(); diffusers from carry=[".whl"], PYTHONPATH
nvidia-smi -L | tee "$OUT/gpu_tests.txt"
echo "commit $(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$OUT/gpu_tests.txt"
timeout -k 10 ${TEST_TIMEOUT:-420} python3 -m pytest -q tests/test_kernels_local.py \
  -k "${TEST_K:-gpu or fused_dq or tma or auto or own_tile or mask_dot}" -rs --durations=10 2>&1 | tail -30 | tee -a "$OUT/gpu_tests.txt"
echo "== linear at ${SECONDS} s" | tee -a "$OUT/gpu_tests.txt"
timeout -k 10 $(( 570 - SECONDS )) python3 -m pytest -q tests/test_kernels_linear.py -k gpu -rs 2>&1 | tail -8 | tee -a "$OUT/gpu_tests.txt"
echo "done at ${SECONDS} s"
