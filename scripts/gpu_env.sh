# Sourced first by the scripts/gpu_*.sh device scripts: pipefail, the results folder $OUT (created),
# left() = seconds to the call's DEADLINE (default 570 s), diffusers from the carried wheels (run(...,
# carry=[".whl"]); the lent GPU machine has no diffusers), this checkout first on PYTHONPATH.
set -o pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-570}
left() { echo $(( DEADLINE - SECONDS )); }
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
