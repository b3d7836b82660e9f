#!/usr/bin/env bash
# One device call on one H200 (13th session): the tensor-core circle test of the local kernels
# (config key "mask_dot", local_configs._circle_dot_config) against the formula, and the forward's
# blocks around it, at flux-4k (head dim 128) and sdxl-4k (head dim 64): a forward sweep per case
# (circle and tile variants; every record's max_rel_err compares its outputs with the defaults' of
# the same call, an exact mask gives 0), then the backward kinds with and without the dot.
# Earlier calls of the session (results/kernels_local_flags_*_13th_{1,2}.json): "merged" (one loop
# over text and window chunks, 0.80-0.96x, removed) and the dot's column features loaded from a
# table (Triton 3.6's pipeliner failed to compile it, removed).
#   run(command="bash scripts/gpu_kernels_flags.sh", carry=[".whl"], timeout_s=600)
source scripts/gpu_env.sh  # pipefail, $OUT, left(); diffusers from carry=[".whl"], PYTHONPATH
nvidia-smi -L | tee "$OUT/flags.log"
FWD='[{"mask_dot": false}, {"num_stages": 4}, {"num_stages": 2}, {"BN": 32, "num_stages": 4},
      {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 3}, {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 4},
      {"num_warps": 4}, {"num_warps": 8}]'
BWD='[{"mask_dot": false}, {"mask_dot": true}]'
for kinds in "fwd" "dkdv dq dkdv_fused"; do
  for case in flux-4k sdxl-4k; do
    tag="${case}_${kinds// /_}"
    echo "== sweep $case $kinds (at ${SECONDS} s)" | tee -a "$OUT/flags.log"
    # shellcheck disable=SC2086 # kinds is a list
    timeout -k 10 "$(( $(left) > 150 ? 150 : $(left) ))" python3 benchmarks/kernels_local.py --sweep-only \
      --sweep-case "$case" --sweep-kinds $kinds --sweep-configs "{\"fwd\": $FWD, \"dkdv\": $BWD, \"dq\": $BWD, \"dkdv_fused\": $BWD}" \
      --sweep-deadline 120 --out "$OUT/kernels_local_flags_$tag.json" 2>&1 | tee -a "$OUT/flags.log" | grep -v "^sweep " | tail -12
  done
done
echo "done at ${SECONDS} s"
