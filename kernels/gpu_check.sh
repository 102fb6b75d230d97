#!/usr/bin/env bash
# The one prepared run for a GPU machine (one H100 or H200): FP8 kernels, one-GPU training of the small
# model in bf16 and fp8, ZeRO-1 on CUDA, MTP speculative generation. From the repository root:
#     bash kernels/gpu_wheels.sh                       # once, on a machine with the package index
#     OUT=/tmp/gpu_check bash kernels/gpu_check.sh     # on the GPU machine, with .whl/ beside
# (.whl/ travels with the working tree). Every step runs under its own `timeout`, and
# every step runs even when an earlier one failed or ran out of time. The limits add up to 497 s
# (8 min 17 s; 8 min 58 s if every step also needed the 3 s between TERM and KILL, with the 5 s
# that deciding on the wheels may take):
#   step        limit  what
#   nvidia-smi     5   the card, driver, clocks                              -> log.txt
#   env           15   device, capability, SMs, versions, the peak used for MFU
#   wheels        20   .whl/*.whl (kernels/gpu_wheels.sh) into a scratch --target dir, put on
#                      PYTHONPATH: DeepSpeed and its needs, for zero (only when .whl/ holds wheels
#                      and python3 lacks DeepSpeed, pydantic or hjson)
#   sass          40   what this Triton compiles the GEMMs to for sm_90: registers, shared memory,
#                      QGMMA, TMA, mbarriers, setmaxnreg, spills             -> sass.txt
#   twin          82   compiled Triton kernels vs their torch twins, V3-sized: first each launch config
#                      of the three FP8 GEMMs named explicitly, warp-specialized ones first (bf16 and
#                      fp32 outputs, no-TMA-store pitch, odd persistent grids, empty groups); then
#                      platform/bench/twin_check.py's suite with MOEFORGE_WARP_SPECIALIZE=1 (the
#                      autotuner may pick the warp-specialized configs too)  -> twin_check.json
#   bench         60   platform/bench/kernel_timing.py shape by shape: fp8_gemm TFLOP/s vs BF16 matmul,
#                      torch._scaled_mm tensor-/row-/block-wise, DeepGEMM where importable, each
#                      launch config on mlp_up; grouped experts; FP8Linear vs BF16 Linear; quantization
#                      GB/s vs copy                                          -> kernels.json
#   train_bf16    70   the small model (1.92B) in the one-process loop, bf16, 30 steps of 8 x 1,024
#                      tokens (seq_len 1,024 instead of 4,096; 2 micro-batches): tokens/s, MFU against
#                      989 TFLOP/s (dense BF16 of an H100/H200 SXM), peak memory, losses
#   train_fp8    105   the same with the fp8 recipe (Triton kernels); fp8 / bf16 loss at the last
#                      step both runs completed
#   zero          35   ZeRO-1 (DeepSpeed) in a one-process NCCL group on CUDA, tiny model, against
#                      the reference's AdamW update on the same gradients; the module stays on CUDA
#   pipeline      25   one pipeline rank's whole run (1F1B pp=1, ZeRO-1, fp8, tiny) in a one-process
#                      NCCL group: the kernel warm-up before step 1, NCCL's waits, the step timeline
#                      from CUDA events
#   generate      35   moeforge-generate's job on CUDA, tiny model briefly trained: greedy speculative
#                      (mtp) equals greedy plain token for token; tokens/s of both
#   report         5   a table of the results, printed last
# Results, each written as soon as it exists: $OUT/results.jsonl, one JSON object per line (the
# Python steps: platform/bench/gpu_check*.py; this script adds {"step": "script", "what": NAME,
# "seconds", "limit", "exit"} after each step); $OUT/log.txt, every step's output; sass.txt,
# twin_check.json, kernels.json: five files in all.
# GPU_CHECK_STEPS="twin report" runs only the steps named (wheels comes with zero); GPU_CHECK_SIZE=tiny
# runs the steps at the CPU test's size (on a CPU, TRITON_INTERPRET=1 for twin). Needs python3 with
# torch and triton; no Hydra, no install: the moeforge namespace is exposed through symlinks.
# Exit status 1 if any step failed or ran out of time.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SIZE=${GPU_CHECK_SIZE:-gpu}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/shim/moeforge"
for part in kernels model platform jobs conf; do ln -s "$ROOT/$part" "$SCRATCH/shim/moeforge/$part"; done
export PYTHONPATH="$SCRATCH/shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
: > "$RESULTS"
: > "$LOG"
GC=("$PY" -m moeforge.platform.bench.gpu_check --out "$RESULTS" --size "$SIZE")

status=0
wanted() {  # wanted NAME: no GPU_CHECK_STEPS, or it names NAME
  [ -z "${GPU_CHECK_STEPS:-}" ] || [[ " $GPU_CHECK_STEPS " == *" $1 "* ]]
}
run_step() {  # run_step NAME SECONDS COMMAND...: under timeout; output to log.txt and here; a results line
  local name=$1 limit=$2 start=$SECONDS rc=0
  shift 2
  echo "=== $name (at most $limit s)" | tee -a "$LOG"
  timeout -k 3 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  printf '{"step": "script", "what": "%s", "seconds": %d, "limit": %d, "exit": %d, "at": %d}\n' \
    "$name" $((SECONDS - start)) "$limit" "$rc" "$(date +%s)" >> "$RESULTS"
  echo "=== $name: $((SECONDS - start)) s, exit $rc$([ "$rc" -eq 124 ] && echo ' (out of time)')" | tee -a "$LOG"
}
step() {  # step NAME SECONDS COMMAND...: run_step, when wanted
  wanted "$1" && run_step "$@"
  return 0
}

step nvidia-smi 5 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
step env 15 "${GC[@]}" env

missing() {  # missing MODULE...: true when one of them cannot be found (nothing is imported)
  timeout 5 "$PY" -c 'import importlib.util as u, sys; sys.exit(all(u.find_spec(m) for m in sys.argv[1:]))' \
    "$@" 2>/dev/null
}
if compgen -G "$ROOT/.whl/*.whl" > /dev/null && { wanted wheels || wanted zero; } \
  && missing deepspeed pydantic hjson; then
  run_step wheels 20 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SCRATCH/site" "$ROOT"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$SCRATCH/site"
fi

step sass 40 bash -c 'set -o pipefail; env -u TRITON_INTERPRET "$0" -m moeforge.platform.bench.sass_report \
  fp8_gemm fp8_grouped_gemm fp8_wgrad_grouped_gemm 2>&1 | tee "$1"' "$PY" "$OUT/sass.txt"
step twin 82 env MOEFORGE_WARP_SPECIALIZE=1 "${GC[@]}" twin --twin-json "$OUT/twin_check.json"
step bench 60 "${GC[@]}" bench --bench-json "$OUT/kernels.json" --rep-ms 50
step train_bf16 70 "${GC[@]}" train_bf16 --budget-s 60
step train_fp8 105 "${GC[@]}" train_fp8 --budget-s 95
step zero 35 "${GC[@]}" zero
step pipeline 25 "${GC[@]}" pipeline
step generate 35 "${GC[@]}" generate
step report 5 "${GC[@]}" report
echo "gpu_check: exit $status; results in $RESULTS"
exit $status
