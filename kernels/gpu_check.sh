#!/usr/bin/env bash
# FP8 kernels on one GPU (made for an H200; 8.5 minutes at the very most (the three timeouts), a few
# minutes as expected, inside the 10-minute limit),
# from the repository root:
#     OUT=/tmp/gpu_check bash kernels/gpu_check.sh
# 0. what this Triton compiles the GEMMs to for sm_90 (registers, shared memory, QGMMA, TMA,
#    mbarriers, setmaxnreg, spills), read off the cubin                 -> $OUT/sass.txt
# 1. compiled Triton kernels vs their torch twins on CUDA, V3-sized: identical e4m3 bytes and scales
#    for the quantizers; the GEMMs within kernels/tolerance.py's accumulation-error bound (each
#    row prints rel_err <= tol), with every GPU launch config in turn and an odd persistent grid;
#    FP8Linear and the FP8 experts forward and backward (allocator poisoned with NaN before each
#    check)                                                             -> $OUT/twin_check.json, .txt
# 2. the benchmark on DeepSeek-V3 shapes: fp8_gemm (and with each launch config on mlp_up) vs torch
#    BF16 matmul, torch._scaled_mm tensor-/row-/block-wise (each labelled; the error text where this
#    build refuses one) and DeepGEMM where `import deep_gemm` works; grouped experts; quantization
#    GB/s vs copy                                                       -> $OUT/kernels.json, bench.txt
# Needs python3 with torch (CUDA) and triton; no Hydra, no install: the moeforge namespace is
# exposed through symlinks. Exit status 1 if a check failed or a step ran out of time; each step
# runs even when an earlier one failed.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/moeforge"
for part in kernels model platform jobs conf; do ln -s "$ROOT/$part" "$SHIM/moeforge/$part"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $PY -c "import deep_gemm; print('deep_gemm', getattr(deep_gemm, '__version__', '?'))" 2>/dev/null \
    || echo "deep_gemm: not installed"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: run under timeout, report time and status
  local name=$1 limit=$2 start=$SECONDS rc=0
  shift 2
  timeout "$limit" "$@" || rc=$?
  [ "$rc" -eq 0 ] || status=1
  echo "$name: $((SECONDS - start)) s, exit $rc" >&2  # into the step's log, shown below
}

step "sass report" 60 $PY -m moeforge.kernels.sass_report fp8_gemm fp8_grouped_gemm fp8_wgrad_grouped_gemm \
  > "$OUT/sass.txt" 2>&1
cat "$OUT/sass.txt"

step "twin check" 210 $PY -m moeforge.kernels.twin_check --size gpu --device cuda --json "$OUT/twin_check.json" \
  > /dev/null 2> "$OUT/twin_check.txt"
cat "$OUT/twin_check.txt"

step "benchmark" 240 $PY -m moeforge.kernels.bench_kernels --device cuda --output "$OUT/kernels.json" \
  --config-sweep mlp_up > "$OUT/bench.txt" 2>&1
cat "$OUT/bench.txt"
exit $status
