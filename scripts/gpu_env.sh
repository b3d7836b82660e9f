# Sourced by the scripts/gpu_*.sh device scripts: diffusers from the carried wheels (run(...,
# carry=[".whl"]); the lent GPU machine has no diffusers), this checkout first on PYTHONPATH.
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
