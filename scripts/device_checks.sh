#!/usr/bin/env bash
# The GPU/TPU checks, in one call on a lent device machine (no network there; jax comes with the machine):
#   1. the compiled kernels against the reference (the shared cases' `test_compiled_on_device` of every
#      backend that runs here, tests/test_linear_*.py), 2. the kernel benchmark, written under $OUT
#      (default ./device-out).
# Set-up here first: `make device-wheels` fetches the pure-Python dependencies the machine lacks into .whl/,
# which the device tool carries (carry=[".whl"]). Usage there: bash scripts/device_checks.sh [benchmark args]
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv 2>/dev/null
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_linear_*.py -k "compiled_on_device" \
  2>&1 | tee "$OUT/tests.log" | tail -25
python3 benchmarks/kernels.py --json "$OUT/kernels.json" --markdown "$OUT/kernels.md" "$@" > "$OUT/bench.log" 2>&1
status=$?
tail -60 "$OUT/bench.log"
exit $status
