#!/usr/bin/env bash
# GPU checks and end-to-end benchmarks (issues #3 and #6) on one H200, one device call (<= 600 s)
# per phase. From the developer machine (.whl/ holds the diffusers + importlib_metadata wheels):
#   run(command="PHASE=gaps bash scripts/gpu_e2e_run.sh", carry=[".whl"], timeout_s=600)
# PHASE=tests:   every test that needs CUDA (kernels, RoPE, real-size pipelines), -rfE summary.
# PHASE=matrix:  (ran in the 7th session) FlexAttention on tile-ordered tokens (local_flex_tiled, the strongest
#                flex route) beside dense and the same circle in Triton (local_circle) for SDXL / PixArt-Σ /
#                SD3.5-m at 1K, 2K and 4K, Wan at 480p and SDXL / PixArt at 8K, with the layers="auto" rows
#                again, timed for >= 1 s each; appended to the committed e2e.json.
# PHASE=gaps:    local_circle_auto for SDXL (settles the auto_unverified row), Wan 720p circle vs FlexAttention,
#                FLUX 1K / 2K tile-ordered FlexAttention.
# PHASE=flex:    only the FlexAttention (tile-ordered) rows for SD3.5-m / PixArt-Σ / SDXL (E2E_DEADLINE caps it).
# PHASE=circles: FLUX 4K / 8K circle rows with the current circle kernel, beside dense and FlexAttention.
# PHASE=pixart:  PixArt-Σ 2K / 4K / 8K circle and tile rows with the current kernels, beside dense (not at 8K:
#                59 s a step) and FlexAttention.
# PHASE=highres: the 16384² SDXL-size run with its per-pass timer (benchmarks/highres16k.py), with the
#                latent upscale (no VAE pass between stages) and then the pixel-space one.
# Earlier phases (circle diagnosis, FLUX overhead work, auto rows, first 16K run) are in git history.
# Everything lands in $OUT (e2e.json, e2e.png, gpu_tests.txt, highres16k.json, log.txt).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/e2e-out}
PHASE=${PHASE:-gaps}
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

# e2e KEEP ARGS...: one benchmarks/e2e.py call under `timeout -s INT` that leaves KEEP seconds of the
# phase for what follows; e2e.py writes $OUT/e2e.json after every row (appended to the committed
# rows; a skipped row never replaces an earlier measurement)
E2E=(python3 benchmarks/e2e.py --append --out "$OUT/e2e.json" --repeats 2 --single-call-seconds 30 --row-seconds 120)
e2e() { local keep=$1; shift; local t=$(( $(left) - keep )); [ "$t" -gt 20 ] || { say "no time for: $*"; return; }
        timeout -s INT "$t" "${E2E[@]}" --max-minutes "$(mins "$keep")" "$@" 2>&1 | grep -v -i warn | tee -a "$LOG"; }

case "$PHASE" in
tests)
  say "GPU tests"
  timeout -s INT $(( $(left) - 15 )) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_kernels_linear.py \
    tests/test_kernels_local.py tests/test_kernels_rope.py tests/test_gpu_pipelines.py >"$OUT/gpu_tests.txt" 2>&1
  grep -E "passed|failed|FAILED|Interrupted" "$OUT/gpu_tests.txt" | tee -a "$LOG"
  ;;
matrix)
  # each call runs under `timeout -s INT` so the phase ends inside the device call's 600 s; e2e.py writes
  # e2e.json after every row, and a skipped row never replaces an earlier measurement
  cp benchmarks/results/e2e.json "$OUT/e2e.json" 2>/dev/null
  say "SDXL / PixArt-Σ / SD3.5-m: dense, layers=auto (timed >= 1 s each: 2 steps left SDXL 1K at 0.97x, inside"
  say "the spread), the Triton circle and FlexAttention on tile-ordered tokens, all in one call"
  e2e 330 --models sdxl pixart sd35m --resolutions 1024 2048 4096 --impls cudnn linear_auto local_circle local_flex_tiled
  say "Wan 480p: FlexAttention on tile-ordered tokens (3D window)"
  e2e 200 --models wan13b --video-resolutions 480p --impls cudnn local_circle local_flex_tiled
  say "SDXL / PixArt-Σ at 8K: FlexAttention on tile-ordered tokens beside the circle kernel"
  e2e 10 --models sdxl pixart --resolutions 8192 --impls local_circle local_flex_tiled
  ;;
flex)
  # FlexAttention rows again after the 7th session's matrix: flex_attention had hit dynamo's recompile
  # limit of 8 shapes and fallen back to eager (PixArt 4096² out of memory, SD3.5-m 1024² 13x slow);
  # flex_baseline.py now allows 256 compiled shapes and fails loudly past them
  cp benchmarks/results/e2e.json "$OUT/e2e.json" 2>/dev/null
  # shellcheck disable=SC2086 # FLEX_RES is a list of sizes
  e2e 10 --models sd35m pixart sdxl --resolutions ${FLEX_RES:-1024 2048 4096} --impls local_flex_tiled
  ;;
gaps)
  # what the 7th session left unmeasured: layers="auto" with circles where every-layer circles were
  # slower (SDXL 2048², crossover_vs_e2e.py's auto_unverified), Wan 720p circles beside FlexAttention,
  # FLUX's tile-ordered FlexAttention at 1K / 2K
  cp benchmarks/results/e2e.json "$OUT/e2e.json" 2>/dev/null
  say "SDXL: layers=auto with circles beside stock cuDNN"
  e2e 420 --models sdxl --resolutions 1024 2048 4096 --impls cudnn local_circle_auto local_circle
  say "Wan 720p x 81 f: circles beside FlexAttention on tile-ordered tokens"
  e2e 200 --models wan13b --video-resolutions 720p --impls cudnn local_circle local_flex_tiled
  say "FLUX 1K / 2K: FlexAttention on tile-ordered tokens"
  e2e 10 --models flux --resolutions 1024 2048 --impls cudnn_fused local_circle local_flex_tiled
  ;;
circles)
  # the 14th session: FLUX's circle rows again with the 13th session's tensor-core circle test (the
  # committed rows came from an earlier circle kernel), beside the same call's dense and FlexAttention rows
  cp benchmarks/results/e2e.json "$OUT/e2e.json" 2>/dev/null
  say "FLUX 4K: dense (LinFusion's processor), circle, tile window, FlexAttention on tile-ordered tokens"
  e2e 90 --models flux --resolutions 4096 --impls cudnn_fused local_circle local_tile local_flex_tiled
  say "FLUX 8K: circle beside FlexAttention on tile-ordered tokens"
  e2e 5 --models flux --resolutions 8192 --impls local_circle local_flex_tiled
  ;;
pixart)
  # the 17th session: PixArt-Σ's rows again with its head dim 72 on TMA loads (16th and 17th sessions, about
  # 2x the kernel of the committed rows), beside the same call's dense and FlexAttention rows
  cp benchmarks/results/e2e.json "$OUT/e2e.json" 2>/dev/null
  say "PixArt-Σ 2K / 4K: dense, circle, tile window, FlexAttention on tile-ordered tokens"
  e2e 150 --models pixart --resolutions 2048 4096 --impls cudnn local_circle local_tile local_flex_tiled
  say "PixArt-Σ 8K: circle, tile window, FlexAttention on tile-ordered tokens"
  e2e 5 --models pixart --resolutions 8192 --impls local_circle local_tile local_flex_tiled
  ;;
highres)
  # the latent upscale first (no VAE encode/decode between stages: where the pixel run's time is
  # expected to go), then the pixel-space run with its per-pass timer, each under the call's deadline
  say "16K high-resolution run, latent upscale ($(left)s left)"
  timeout $(( $(left) - 200 )) python3 benchmarks/highres16k.py --out "$OUT/highres16k_latent.json" --steps 20 \
    --refine-steps 10 --strength 0.5 --upscale latent 2>&1 | grep -v -i "warn" | tail -20 | tee -a "$LOG"
  say "16K high-resolution run, pixel upscale ($(left)s left)"
  timeout $(( $(left) - 10 )) python3 benchmarks/highres16k.py --out "$OUT/highres16k.json" --steps 20 \
    --refine-steps 10 --strength 0.4 2>&1 | grep -v -i "warn" | tail -20 | tee -a "$LOG"
  ;;
*)
  say "unknown PHASE=$PHASE (tests, matrix, gaps, flex, circles, pixart or highres)"; exit 2 ;;
esac
say "done; \$OUT: $(ls "$OUT" | tr '\n' ' ')"
