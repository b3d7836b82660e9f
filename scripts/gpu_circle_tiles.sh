#!/usr/bin/env bash
# One device call (15th session): the CUDA tests of the TMA dQ path and "auto", then
# benchmarks/circle_tiles.py (circle windows on 8×8 / 4×16 kernel tiles against the default 8×16
# and FlexAttention's circle at blocks 128 and 64).
#   run(command="bash scripts/gpu_circle_tiles.sh [CASES...]", carry=[".whl"], timeout_s=600)
source scripts/gpu_env.sh  # pipefail, $OUT, left(); diffusers from carry=[".whl"], PYTHONPATH
nvidia-smi -L | tee "$OUT/gpu_tests.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout -k 10 ${TEST_TIMEOUT:-150} python3 -m pytest -q tests/test_kernels_local.py -k "${TEST_K:-fused_dq_tma or auto}" -rs 2>&1 \
    | tail -15 | tee -a "$OUT/gpu_tests.txt"
fi
echo "== circle_tiles.py at ${SECONDS} s" | tee -a "$OUT/gpu_tests.txt"
timeout -k 10 $(( 590 - SECONDS )) python3 benchmarks/circle_tiles.py --out "$OUT/circle_tiles.json" \
  --deadline $(( $(left) - 10 )) ${CASES:+--cases $CASES} 2>&1 | tee "$OUT/circle_tiles_log.txt" | tail -80
echo "done at ${SECONDS} s"
