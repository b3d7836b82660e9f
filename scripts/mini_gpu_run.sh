#!/usr/bin/env bash
# LinFusion-Mini on one H200, in ONE device call (<= 600 s):
#   teacher training -> distillation of the linear and local students -> quality benchmark
#   -> weights (tar in <= 15 MiB parts), quality.json, grid PNG and logs under $OUT.
#
# From the developer machine (the .whl/ folder holds the diffusers + importlib_metadata wheels):
#   run(command="bash scripts/mini_gpu_run.sh", carry=[".whl"], timeout_s=600)
# then, here:
#   python -m linfusion.mini.package unpack <files_at> --results     # -> linfusion/mini/weights, benchmarks/results
#
# Recommended (one call does not fit the teacher's 8.6 minutes, the students and the benchmark): two calls,
#   run(command="MINI_STAGE=teacher bash scripts/mini_gpu_run.sh", carry=[".whl"], timeout_s=600)
#   (attempt 8: 575 s of the 600; the teacher stage fixes the VAE and text encoder at 2700 / 600 steps, ~140 s,
#   gives the transformer 0.67 x 8.6 min = 346 s and ships its EMA weights without the ~20 s read-out)
#   python -m linfusion.mini.package unpack <files_at>            # -> linfusion/mini/weights/pipeline
#   run(command="MINI_STAGE=students bash scripts/mini_gpu_run.sh", carry=[".whl", "linfusion/mini/weights"], timeout_s=600)
#   (the weights are tracked files: an unpacked attempt shows in `git status` until committed or restored)
# The bundled weights are these two calls with the defaults of this script and of linfusion/mini/train.py
# (teacher: attempt 8, benchmarks/results/mini_attempt8/; local student: attempt 9, mini_attempt9/, linear
# student: attempt 10, mini_attempt10/): timestep band
# 550..750 at share 0.5, from benchmarks/results/mini_attempt4/analysis.md: counts are decided at t = 600..700;
# small objects weighted 3x, textured ones 2x on top; students 2500 steps on KD + attention losses with a
# cosine LR, the linear one with conv_v=True and the hedgehog feature map of 128 features per sign, lr 1e-3,
# attention loss 1, 1024 prompts; the local one with the pooled global branch, global_pool=4, lr 2e-4, 512
# prompts (MINI_STUDENTS=local MINI_DISTILL_PROMPTS=512 reproduces it); and of linfusion/mini/world.py
# (canonical cells for objects the prompt does not place).
# Knobs (environment): MINI_MINUTES (teacher training, default 8.6 with MINI_STAGE=teacher, else 5),
# MINI_STAGE=all|teacher|students|benchmark ("benchmark": the quality benchmark of the unpacked weights alone, ~200 s)
# (two-call variant: "teacher" first, unpack here, then "students" distils + benchmarks the
# pipeline unpacked into linfusion/mini/weights/pipeline, which travels with the tree),
# MINI_DISTILL_STEPS, MINI_DISTILL_PROMPTS (default: DISTILL_STEPS / DISTILL_PROMPTS of linfusion/mini/train.py),
# MINI_BENCH_PROMPTS (96), MINI_DEADLINE (570 s), MINI_LOCAL_OPTIONS (the local student's attention,
# default "window=4,global_pool=4": the radius-4 window plus a global branch pooled 4x; "window=4" for attempt 7's
# plain window), MINI_LINEAR_OPTIONS
# (the linear student's, default "conv_v=True,feature_map=hedgehog": LiT's depthwise conv of V, for small objects,
# and Hedgehog's learned feature map; "conv_v=True" for attempt 8's ELU+1 features),
# MINI_DISTILL_ARGS (more `linfusion distill` flags for the students, after DEFAULT_DISTILL_ARGS and DEFAULT_METHOD_ARGS of train.py,
# "--losses task=0 kd=1 attn=0.5 --lr-decay cosine" since attempt 9; a flag given again wins, e.g.
# "--focus-timesteps 550:750:0.5", or "--losses task=1 kd=0.5 attn=0.5 var=0.05 --lr-decay constant" for attempt 8's),
# MINI_STUDENTS ("linear local", the default, or one of them: the other keeps the adapter unpacked in
# linfusion/mini/weights, and the benchmark scores both; variants "linear-TAG" train in parallel beside them,
# travel in the tar under variants/ (unpack --variants DIR) and are not benchmarked here),
# MINI_STUDENT_ARGS (flags for single students, "linear-long: --steps 3500; linear-wide: --lr 1e-3"),
# MINI_TRAIN_ARGS (extra flags for linfusion.mini.train, e.g. "--textured-object-scale 1" for attempt 7's loss,
# "--small-object-scale 1 --textured-object-scale 1" for attempt 6's;
# note: MINI_DEADLINE < 200 divides the distill steps by 3),
# MINI_SMOKE=1 with MINI_DEVICE=cpu: the whole script at tiny sizes on a CPU (a test of the plumbing).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/mini-out}
WORK=${MINI_WORK:-/tmp/mini-train}
STAGE=${MINI_STAGE:-all}
case "$STAGE" in all|teacher|students|benchmark) ;; *) echo "MINI_STAGE must be all, teacher, students or benchmark, got '$STAGE'" >&2; exit 2 ;; esac
MINUTES=${MINI_MINUTES:-$([ "$STAGE" = teacher ] && echo 8.6 || echo 5)}  # one call (all) must leave time for the students
DEADLINE=${MINI_DEADLINE:-570}
DEVICE=${MINI_DEVICE:-cuda}
SMOKE=${MINI_SMOKE:-}
TRAIN_FLAGS=(); BENCH_FLAGS=(--workers 12 --checker-n 100); DISTILL=(default default 20 64)  # steps, prompts: train.py's
# the teacher call: VAE and text encoder at attempt 7's step counts (the rest of the time is the transformer's)
if [ "$STAGE" = teacher ]; then TRAIN_FLAGS=(--vae-steps 2700 --text-steps 600 --keep ema); fi
if [ -n "$SMOKE" ]; then TRAIN_FLAGS=(--smoke); BENCH_FLAGS=(--quick); DISTILL=(2 2 2 2); fi
mkdir -p "$OUT" "$WORK"
LOG="$OUT/run_log.txt"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
say() { echo "[mini_gpu_run +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
# copy parts of the unpacked weights (linfusion/mini/weights, carried to the device) into $WORK
take_unpacked() {
  for part in "$@"; do
    rm -rf "${WORK:?}/$part" && cp -r "linfusion/mini/weights/$part" "$WORK/$part" || { say "no unpacked $part"; exit 1; }
  done
}

if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >>"$LOG" 2>&1
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

if [ "$STAGE" = all ] || [ "$STAGE" = teacher ]; then
  say "teacher: $MINUTES min"
  # shellcheck disable=SC2086 # MINI_TRAIN_ARGS is a list of extra flags, e.g. "--batch-sizes 64,1024,1024"
  python3 -m linfusion.mini.train --out "$WORK" --minutes "$MINUTES" --device "$DEVICE" --no-distill "${TRAIN_FLAGS[@]}" \
    ${MINI_TRAIN_ARGS:-} 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || { say "teacher training failed"; exit 1; }
  python3 -m linfusion.mini.package pack "$WORK" "$OUT" >>"$LOG" 2>&1   # weights come back even if later stages run out of time
  cp "$WORK/train_summary.json" "$OUT/" 2>/dev/null
fi
STUDENTS=${MINI_STUDENTS:-linear local}
if [ "$STAGE" = students ]; then
  take_unpacked pipeline
  for m in linear local; do  # a student not retrained keeps its unpacked adapter (packed and benchmarked with the new one)
    case " $STUDENTS " in *" $m "*) ;; *) take_unpacked "adapter-$m" ;; esac
  done
fi
if [ "$STAGE" = all ] || [ "$STAGE" = students ]; then
  SHORT=0; if [ "$(left)" -lt 200 ]; then SHORT=1; fi   # little time left: a third of the steps
  say "students ($(left)s left)"
  python3 - "$WORK" "${MINI_DISTILL_STEPS:-${DISTILL[0]}}" "${MINI_DISTILL_PROMPTS:-${DISTILL[1]}}" "${DISTILL[2]}" \
    "${DISTILL[3]}" "$DEVICE" "$SHORT" "$STUDENTS" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, shlex, sys, torch
from pathlib import Path
from linfusion.mini.train import (DISTILL_PROMPTS, DISTILL_STEPS, distill_students, parse_student_args,
                                  parse_student_options)
out = Path(sys.argv[1])
steps = DISTILL_STEPS if sys.argv[2] == "default" else int(sys.argv[2])
prompts = DISTILL_PROMPTS if sys.argv[3] == "default" else int(sys.argv[3])
steps = max(1, steps // 3) if sys.argv[7] == "1" else steps
print(f"students {sys.argv[8]}: {steps} steps each on {prompts} prompts", flush=True)
summary = distill_students(out, steps=steps, prompts=prompts, data_steps=int(sys.argv[4]),
                           batch_size=int(sys.argv[5]), parallel=True, device=torch.device(sys.argv[6]),
                           local_options=parse_student_options(os.environ.get("MINI_LOCAL_OPTIONS")),
                           linear_options=parse_student_options(os.environ.get("MINI_LINEAR_OPTIONS")),
                           distill_args=shlex.split(os.environ.get("MINI_DISTILL_ARGS", "")),
                           students=tuple(sys.argv[8].split()),
                           student_args=parse_student_args(os.environ.get("MINI_STUDENT_ARGS")))
path = out / "train_summary.json"
data = json.loads(path.read_text()) if path.exists() else {}
data["distill"] = summary
path.write_text(json.dumps(data, indent=1, default=str))
print(json.dumps(summary))
PY
  [ "${PIPESTATUS[0]}" = 0 ] || say "distillation failed"
  for m in $STUDENTS; do [ -f "$WORK/distill-$m.log" ] && { echo "--- distill-$m.log (tail)"; tail -c 3000 "$WORK/distill-$m.log"; } >>"$LOG"; done
  # loss curves, one file (at most 8 files come back from the device): {"student": m, ...metrics} per line
  for m in $STUDENTS; do [ -f "$WORK/adapter-$m/metrics.jsonl" ] && sed "s/^{/{\"student\": \"$m\", /" "$WORK/adapter-$m/metrics.jsonl"; done \
    > "$OUT/distill_metrics.jsonl"
  python3 -m linfusion.mini.package pack "$WORK" "$OUT" >>"$LOG" 2>&1
  cp "$WORK/train_summary.json" "$OUT/" 2>/dev/null
fi
if [ "$STAGE" = benchmark ]; then take_unpacked pipeline adapter-linear adapter-local; fi  # the weights as they are
VARIANTS_TRAINED=0; case " $STUDENTS " in *-*) [ "$STAGE" = students ] || [ "$STAGE" = all ] && VARIANTS_TRAINED=1 ;; esac
if [ "$VARIANTS_TRAINED" = 1 ]; then
  say "student variants trained: no benchmark in this call (compare them with benchmarks/mini_failures.py --adapter)"
elif [ "$STAGE" != teacher ]; then
  LEFT=$(left)
  PROMPTS=${MINI_BENCH_PROMPTS:-96}
  # 96 prompts took 182-200 s on the H200 (attempt 9); a call killed at 600 s returns no quality.json
  if [ "$LEFT" -lt 210 ]; then PROMPTS=$(( PROMPTS / 2 )); fi
  if [ "$LEFT" -gt 45 ]; then
    say "quality benchmark: $PROMPTS prompts (${LEFT}s left)"
    python3 benchmarks/quality.py --pipeline "$WORK/pipeline" --adapter-linear "$WORK/adapter-linear" \
      --adapter-local "$WORK/adapter-local" --prompts "$PROMPTS" --device "$DEVICE" "${BENCH_FLAGS[@]}" \
      --out "$OUT/quality.json" --grid "$OUT/quality_grid.png" 2>&1 | grep -v -i "warn" | tee -a "$LOG"
  else
    say "no time left for the benchmark"
  fi
fi
say "done; \$OUT: $(ls "$OUT" | tr '\n' ' ')"
