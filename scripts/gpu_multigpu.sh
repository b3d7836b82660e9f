#!/usr/bin/env bash
# One device call on a 2-GPU H200 machine (the whole script <= DEADLINE=570 s):
#   1. context-parallel inference scaling, FLUX.1-dev-size transformer, 4096² and 8192², 1 vs 2 GPUs
#      (timeout CP_SECONDS=300);
#   2. data-parallel distillation throughput, PixArt-Σ-size transformer (0.6B, 512² = 4096 tokens,
#      bf16 autocast, batch 8 per GPU, 12 steps), 1 vs 2 GPUs (timeout DISTILL_SECONDS=210);
#   3. the two parts merged into multigpu.json + .png;
#   4. CUDA tests with the time left (if at least 45 s; SKIP_TESTS=1 skips them).
#   run(command="bash scripts/gpu_multigpu.sh", kind="nvidia-h200-x2", carry=[".whl"], timeout_s=600)
# Results under $OUT: multigpu.json (+ .png), multigpu_cp.json, multigpu_distill.json (each part, written
# after every launch: a timed-out part keeps its finished rows, marked "partial"), multigpu_cp.log,
# multigpu_distill.log, gpu_tests.log. Extra flags for the distillation part: DISTILL_ARGS="--distill-batch 4".
set -o pipefail
OUT=${OUT:-/tmp/gpu-out}
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT"
# seconds for a part: at most $1, and never past DEADLINE less $2 (what the later parts need at least)
budget() { local left=$(( DEADLINE - SECONDS - $2 )); left=$(( $1 < left ? $1 : left )); echo $(( left > 1 ? left : 1 )); }
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# NVLink multicast stays off (the lent machine's rule).
export PYTHONPATH="$PWD:${PYTHONPATH:-}" NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
       PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L | tee "$OUT/gpu_tests.log"

T=$(budget "${CP_SECONDS:-300}" 225)
echo "== context parallel (timeout ${T} s, at ${SECONDS} s)"
timeout -k 15 "$T" python3 benchmarks/multigpu.py --only inference --gpus 1 2 --resolutions 4096 8192 --repeats 2 \
  --out "$OUT/multigpu_cp.json" > "$OUT/multigpu_cp.log" 2>&1
echo "exit $? after ${SECONDS} s"; tail -12 "$OUT/multigpu_cp.log"

T=$(budget "${DISTILL_SECONDS:-210}" 20)
echo "== distillation (timeout ${T} s, at ${SECONDS} s)"
# shellcheck disable=SC2086
timeout -k 15 "$T" python3 benchmarks/multigpu.py --only distill --gpus 1 2 --distill-model pixart-sigma-size \
  ${DISTILL_ARGS:-} --out "$OUT/multigpu_distill.json" > "$OUT/multigpu_distill.log" 2>&1
echo "exit $? after ${SECONDS} s"; tail -12 "$OUT/multigpu_distill.log"

python3 benchmarks/multigpu.py --merge "$OUT/multigpu_cp.json" "$OUT/multigpu_distill.json" \
  --out "$OUT/multigpu.json" 2>&1 | tail -20

T=$(budget 200 10)
if [ -z "$SKIP_TESTS" ] && [ "$T" -ge 45 ]; then
  echo "== CUDA tests (timeout ${T} s, at ${SECONDS} s)"
  timeout -k 10 "$T" python3 -m pytest tests/test_kernels_local.py tests/test_gpu_pipelines.py -q -p no:cacheprovider 2>&1 \
    | tail -25 | tee -a "$OUT/gpu_tests.log"
else
  echo "CUDA tests skipped (${T} s left)" | tee -a "$OUT/gpu_tests.log"
fi
echo "done after ${SECONDS} s"
