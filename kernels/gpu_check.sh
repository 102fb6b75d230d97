#!/usr/bin/env bash
# FP8 kernels on one GPU (made for an H200; well inside 10 minutes), from the repository root:
#     OUT=/tmp/gpu_check bash kernels/gpu_check.sh
# 1. compiled Triton kernels vs their torch twins on CUDA, V3-sized: identical e4m3 bytes and scales
#    for the quantizers, FP32-rounding agreement for the GEMMs, FP8Linear and the FP8 experts forward
#    and backward (allocator poisoned with NaN before each check)   -> $OUT/twin_check.json
# 2. the benchmark (fp8_gemm, grouped, torch BF16 matmul, torch._scaled_mm, quantization GB/s vs
#    copy) on DeepSeek-V3 shapes                                       -> $OUT/kernels.json, bench.txt
# Needs python3 with torch (CUDA) and triton; no Hydra, no install: the moeforge namespace is
# exposed through symlinks. Exit status 1 if a check failed or a step ran out of time.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SHIM=$(mktemp -d)
mkdir -p "$SHIM/moeforge"
for part in kernels model platform jobs conf; do ln -s "$ROOT/$part" "$SHIM/moeforge/$part"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
start=$SECONDS
timeout 240 $PY -m moeforge.kernels.twin_check --size gpu --device cuda --json "$OUT/twin_check.json" \
  > /dev/null 2> "$OUT/twin_check.txt" || status=1
cat "$OUT/twin_check.txt"
echo "twin check: $((SECONDS - start)) s"

start=$SECONDS
timeout 300 $PY -m moeforge.kernels.bench_kernels --device cuda --output "$OUT/kernels.json" \
  > "$OUT/bench.txt" 2>&1 || status=1
echo "benchmark: $((SECONDS - start)) s"
cat "$OUT/bench.txt"
exit $status
