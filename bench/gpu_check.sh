#!/usr/bin/env bash
# The one prepared script for a GPU machine (no network; torch, triton, nvcc, ninja and
# pytest already installed). In one call it:
#   1. builds the CUDA extension in place with every core,
#   2. runs the tests marked `gpu` (CUDA kernels and compiled Triton),
#   3. runs every kernel benchmark,
#   4. prints a short table of the fastllm rows last.
# Logs and JSON-lines results go under $OUT (default ./gpu_out). Ends well inside 8 minutes:
# each step has its own time limit, and a failing step does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT/results"
export FASTLLM_BENCH_RESULTS="$OUT/results"
export TRITON_INTERPRET=0
PY=${PYTHON:-python3}
exec > >(tee "$OUT/gpu_check.log") 2>&1
t0=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - t0 )) s)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
git rev-parse --short HEAD 2>/dev/null || true

step "build (CUDA extension, in place)"
MAX_JOBS=$(nproc) timeout 270 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build exit $? (log: build.log)"; tail -5 "$OUT/build.log"
"$PY" -c "import fastllm, torch; print('extension loaded:', fastllm.extension_available(), fastllm._extension.load_error() or ''); print('cuda rms_norm kernel:', fastllm.ops._backend.native_has('rms_norm_fwd', torch.device('cuda')))"

step "gpu tests"
timeout 150 "$PY" -m pytest -m gpu -q -x -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
echo "tests exit $? (log: tests.log)"; tail -15 "$OUT/tests.log"

step "benchmarks"
# Each bench gets BENCH_TIMEOUT seconds; none starts after BENCH_DEADLINE seconds in total.
for b in bench/bench_*.py; do
  name=$(basename "$b" .py)
  if [ $(( $(date +%s) - t0 )) -gt "${BENCH_DEADLINE:-380}" ]; then echo "$name skipped (time)"; continue; fi
  limit=${BENCH_TIMEOUT:-40}
  # generation runs whole rollouts (two models, Hugging Face generate beside ours)
  [ "$name" = bench_generate ] && limit=${GENERATE_TIMEOUT:-90}
  timeout "$limit" "$PY" "$b" --device cuda > "$OUT/$name.log" 2>&1
  echo "$name exit $? (log: $name.log)"
done

step "summary"
"$PY" bench/summarize.py "$OUT"/results/*.jsonl
echo "total $(( $(date +%s) - t0 )) s"
