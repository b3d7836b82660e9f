#!/usr/bin/env bash
# One device call on a 2-GPU H200 machine: CUDA tests, then context-parallel scaling (1 vs 2 GPUs).
#   run(command="bash scripts/gpu_multigpu.sh", kind="nvidia-h200-x2", carry=[".whl"], timeout_s=600)
# Results under $OUT: gpu_tests.log, multigpu.json (+ .png), multigpu.log.
set -o pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# NVLink multicast stays off (the lent machine's rule).
export PYTHONPATH="$PWD:${PYTHONPATH:-}" NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
       PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L | tee "$OUT/gpu_tests.log"
[ -n "$SKIP_TESTS" ] || timeout 200 python3 -m pytest tests/test_kernels_local.py tests/test_gpu_pipelines.py -q -p no:cacheprovider 2>&1 | tail -25 | tee -a "$OUT/gpu_tests.log"
timeout ${MULTIGPU_SECONDS:-360} python3 benchmarks/multigpu.py --gpus 1 2 --resolutions 4096 8192 --repeats 2 \
  --no-distill --out "$OUT/multigpu.json" 2>&1 | tail -40 | tee "$OUT/multigpu.log"
