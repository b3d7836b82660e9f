#!/usr/bin/env bash
# One device call on one H200 (14th session): the fused-dQ backward with dQ added by TMA reductions
# ("dq_tma" in the "dkdv_fused" config) against per-element atomics and the split backward.
# 1) the CUDA tests of the fused backward (TMA forced on, and the defaults), 2) sweeps of the fused
# backward's config at flux-4k (head dim 128) and sdxl-4k (head dim 64), both windows; every record
# compares its gradients with the default configs' of the same call.
#   run(command="bash scripts/gpu_dq_tma.sh", carry=[".whl"], timeout_s=600)
source scripts/gpu_env.sh  # pipefail, $OUT, left(); diffusers from carry=[".whl"], PYTHONPATH
nvidia-smi -L | tee "$OUT/dq_tma.log"
timeout -k 10 200 python3 -m pytest -q -x tests/test_kernels_local.py -k "fused_dq" 2>&1 | tail -15 | tee -a "$OUT/dq_tma.log"
FUSED='[{"dq_tma": false}, {"dq_tma": true}, {"dq_tma": true, "num_stages": 3}, {"dq_tma": true, "BM": 32},
        {"dq_tma": true, "BM": 128, "BN": 64}, {"dq_tma": true, "BN": 64, "num_warps": 4}, {"dq_tma": true, "mask_dot": true}]'
for case in flux-4k sdxl-4k; do
  echo "== sweep $case (at ${SECONDS} s)" | tee -a "$OUT/dq_tma.log"
  timeout -k 10 "$(( $(left) > 170 ? 170 : $(left) ))" python3 benchmarks/kernels_local.py --sweep-only \
    --sweep-case "$case" --sweep-kinds dkdv_fused dkdv --sweep-configs "{\"dkdv_fused\": $FUSED, \"dkdv\": [{}]}" \
    --sweep-deadline 150 --out "$OUT/kernels_local_dq_tma_$case.json" 2>&1 | tee -a "$OUT/dq_tma.log" | tail -30
done
echo "done at ${SECONDS} s"
