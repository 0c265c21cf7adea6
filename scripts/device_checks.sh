#!/usr/bin/env bash
# The GPU checks, in one call on a lent device machine (no network there; jax comes with the machine),
# within ~9 minutes, each step bounded and writing under $OUT (default ./device-out) as it goes:
#   1. the compiled kernels against the reference (test_linear_triton.py's and, for the block-dot GEMM,
#      test_linear_triton_blocks.py's compiled cases, a pairwise handful each) and the synthetic models
#      decoding on the triton kernels against llama.cpp's recorded logits (both files, every position),
#      110 s at most;
#   2. the decode kernel table: device time (CUPTI) of each Triton path (GEMV, tensor-core GEMM, XLA on the
#      lanes; and the `triton_blocks` backend's block-dot GEMM, which takes each of these formats) against
#      XLA's dequantize+dot and the dense bf16 dot, M = 1, 8, 16, at the 8B shapes of issue 13's acceptance
#      (4096x4096, 14336x4096, 4096x14336) for its six formats, with the copy bandwidth measured in the same
#      run (kernels.md; kernels.json is written after each format and shape, so a cut step keeps what it
#      timed: a Q4_K_M file's two formats come first), 185 s at most;
#   3. the prefill table: the same at M = 512, 2048 (the GEMM's prefill tiles against XLA), 70 s at most;
#      steps 2 and 3 record the fastest path per format and M in $OUT/routes.json (commit it as
#      realm_jax/linear/routes.json: the registry then routes by it on this device kind); then the Mosaic
#      GPU GEMM on the same lanes at one prefill shape (mosaic.md: against step 3's Triton tile, and its
#      compile seconds in the log), 35 s at most;
#   4. the 8B-shaped Q4_K_M model end to end, kernels against dense bf16 weights, prompts of 128, 512 and
#      2048 tokens (gpu_8b.json), ~2.5 min;
#   5. the first token of a new process once the compilation cache is warm (first_token.json), 45 s at most.
# The steps' bounds add up to 595 s.
# Set-up here first: `make device-wheels` fetches the pure-Python dependencies the machine lacks into .whl/,
# which the device tool carries (carry=[".whl"]). Usage there: bash scripts/device_checks.sh
# A step that runs past its bound is cut (its log says so) and the next one starts.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
status=0
step() {  # step NAME SECONDS COMMAND...: run it bounded, its output in $OUT/NAME.log, the tail shown
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "(cut after ${limit} s)" >> "$OUT/$name.log"
  echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
  tail -25 "$OUT/$name.log"
  [ $rc -ne 0 ] && status=1
  return 0
}
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv 2>/dev/null | tee -a "$OUT/env.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/env.txt"
cp realm_jax/linear/routes.json "$OUT/routes.json"
step tests 110 python3 -m pytest -q -p no:cacheprovider tests/test_linear_triton.py tests/test_decode_attention.py \
  tests/test_linear_triton_blocks.py -k "compiled_on_device or agrees_with_llama_cpp or matches_attention" \
  --durations=10
step kernels 185 python3 benchmarks/kernels.py --impls triton,triton_blocks --formats Q4_K,Q6_K,Q8_0,Q4_0,Q5_K,Q5_0 \
  --shapes 4096x4096,14336x4096,4096x14336 --m 1,8,16 --runs 3 --json "$OUT/kernels.json" \
  --markdown "$OUT/kernels.md" --write-routes "$OUT/routes.json"
step prefill 70 python3 benchmarks/kernels.py --impls triton --formats Q4_K,Q6_K,Q8_0 \
  --shapes 4096x4096,14336x4096 --m 512,2048 --runs 3 --json "$OUT/prefill.json" --markdown "$OUT/prefill.md" \
  --write-routes "$OUT/routes.json"
step mosaic 35 python3 benchmarks/kernels.py --impls mosaic_gpu --formats Q4_K --shapes 4096x4096 --m 512 \
  --runs 2 --json "$OUT/mosaic.json" --markdown "$OUT/mosaic.md"
step gpu_8b 150 python3 benchmarks/gpu_8b.py --impls auto,xla --prompt-tokens 128,512,2048 --decode-tokens 64 \
  --runs 2 --json "$OUT/gpu_8b.json"
step first_token 45 python3 benchmarks/gpu_8b.py --impls auto --prompt-tokens 128 --decode-tokens 4 --runs 1 \
  --second-process --json "$OUT/first_token.json"
exit $status
