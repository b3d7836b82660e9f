#!/usr/bin/env bash
# One device call: benchmarks/ab_local.py, the local kernels of an earlier revision (extracted into
# _old/ beforehand, untracked: `git archive REV linfusion/kernels | tar -x -C _old`) against the
# working tree, interleaved in one process.   run(command="bash scripts/gpu_ab_local.sh TAG IMPLS...")
tag=$1; shift
source scripts/gpu_env.sh  # pipefail, $OUT, PYTHONPATH
nvidia-smi -L | tee "$OUT/ab_$tag.log"
timeout -k 10 ${AB_TIMEOUT:-540} python3 benchmarks/ab_local.py --old _old/linfusion/kernels --cases ${AB_CASES:-flux-4k} \
  --repeats ${AB_REPEATS:-3} --out "$OUT/ab_local_$tag.json" --impls "$@" 2>&1 | tee -a "$OUT/ab_$tag.log"
echo "done at ${SECONDS} s"
