#!/usr/bin/env bash
# GPU checks and end-to-end benchmarks (issues #3 and #6) on one H200, one device call (<= 600 s)
# per phase. From the developer machine (.whl/ holds the diffusers + importlib_metadata wheels):
#   run(command="PHASE=matrix bash scripts/gpu_e2e_run.sh", carry=[".whl"], timeout_s=600)
# PHASE=tests:   every test that needs CUDA (kernels, RoPE, real-size pipelines), -rfE summary.
# PHASE=matrix:  the e2e rows still missing from benchmarks/results/e2e.json: FLUX exact-circle rows
#                (the Triton circle path is on since 2026-11-29), FlexAttention at 8192², then SDXL,
#                PixArt-Σ and SD3.5-medium at 1024², 2048² and 8192², default SDPA and FlexAttention
#                at 4096², Wan default SDPA; appended to the committed e2e.json.
# PHASE=highres: the 16384² SDXL-size run with its per-pass timer (benchmarks/highres16k.py).
# Earlier phases (circle diagnosis, FLUX overhead work, auto rows, first 16K run) are in git history.
# Everything lands in $OUT (e2e.json, e2e.png, gpu_tests.txt, highres16k.json, log.txt).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/e2e-out}
PHASE=${PHASE:-matrix}
DEADLINE=${E2E_DEADLINE:-575}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
say() { echo "[gpu_e2e +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
# minutes left for a benchmark call that must leave $1 seconds for what follows it
mins() { awk -v s="$(( $(left) - $1 ))" 'BEGIN { printf "%.2f", (s > 0 ? s : 0) / 60 }'; }
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >>"$LOG" 2>&1

case "$PHASE" in
tests)
  say "GPU tests"
  timeout -s INT $(( $(left) - 15 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_kernels_linear.py \
    tests/test_kernels_local.py tests/test_kernels_rope.py tests/test_gpu_pipelines.py >"$OUT/gpu_tests.txt" 2>&1
  grep -E "passed|failed|FAILED|Interrupted" "$OUT/gpu_tests.txt" | tee -a "$LOG"
  ;;
matrix)
  cp benchmarks/results/e2e.json "$OUT/e2e.json" 2>/dev/null
  E2E=(python3 benchmarks/e2e.py --append --out "$OUT/e2e.json" --repeats 2 --single-call-seconds 30 --row-seconds 120)
  say "FLUX circle and FlexAttention rows"
  "${E2E[@]}" --models flux --resolutions 1024 2048 4096 8192 --impls local_circle \
    --max-minutes "$(mins 420)" 2>&1 | grep -v -i warn | tee -a "$LOG"
  "${E2E[@]}" --models flux --resolutions 8192 --impls local_flex --max-minutes "$(mins 360)" 2>&1 \
    | grep -v -i warn | tee -a "$LOG"
  say "image families at 1K / 2K / 8K"
  "${E2E[@]}" --models sdxl pixart sd35m --resolutions 1024 2048 --impls cudnn sdpa_default linear local_tile \
    --max-minutes "$(mins 240)" 2>&1 | grep -v -i warn | tee -a "$LOG"
  "${E2E[@]}" --models sdxl pixart sd35m --resolutions 4096 --impls sdpa_default local_flex \
    --max-minutes "$(mins 170)" 2>&1 | grep -v -i warn | tee -a "$LOG"
  "${E2E[@]}" --models wan13b --video-resolutions 480p 720p --impls sdpa_default \
    --max-minutes "$(mins 130)" 2>&1 | grep -v -i warn | tee -a "$LOG"
  "${E2E[@]}" --models sdxl pixart sd35m --resolutions 8192 --impls linear local_tile cudnn \
    --max-minutes "$(mins 5)" 2>&1 | grep -v -i warn | tee -a "$LOG"
  ;;
highres)
  say "16K high-resolution run ($(left)s left)"
  timeout $(( $(left) - 10 )) python3 benchmarks/highres16k.py --out "$OUT/highres16k.json" --steps 20 \
    --refine-steps 10 --strength 0.4 2>&1 | grep -v -i "warn" | tail -20 | tee -a "$LOG"
  ;;
*)
  say "unknown PHASE=$PHASE (tests, matrix or highres)"; exit 2 ;;
esac
say "done; \$OUT: $(ls "$OUT" | tr '\n' ' ')"
