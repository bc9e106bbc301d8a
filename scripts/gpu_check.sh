#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200 (see README "GPU checks"): builds the extension in place, runs
# GPU tests and benchmarks, and prints a short table. Results go to $OUT (or results/).
# Usage on the device machine: bash scripts/gpu_check.sh [step|matching|sanitize|tests|bench|all]
#   step:     the op GPU tests, then bench_train_step and the op benches (l1, attention, interaction,
#             matching) with JSON results in $OUT and one summary table; the whole call within
#             GPU_CHECK_SECONDS (default 500) on a fresh machine, stages cut or skipped when time runs out
#   matching: the matching ops' kernel timing (both optimal solvers), GPU tests and bench_matching, then the
#             Triton kernels' GPU tests in what is left of GPU_CHECK_SECONDS (default 400)
#   sanitize: scripts/sanitize_matching.py (every path of the CUDA matching kernels, checked against the CPU op)
#             under compute-sanitizer's memcheck, racecheck, synccheck and initcheck
# open_clip (the CLIP text tower of the paper preset) is not installed there and there is no network:
# run scripts/fetch_wheels.sh here first and name `.whl` in the device run's carry.
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
OUT="${OUT:-results}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # open_clip and friends, carried as wheels (no network there)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "build FAILED after $(( $(date +%s) - t0 )) s"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import collat.ops._ext as e; print('extension', e.HAS_EXTENSION, 'cuda kernels', e.has_kernel('greedy_match','cuda'), e.has_kernel('optimal_match','cuda'))"
python3 -c "import open_clip" 2>/dev/null || echo "WARNING: open_clip is missing (carry .whl, see scripts/fetch_wheels.sh): the CLIP contenders of bench_train_step will fail"
status=0
default_budget=400; [ "$what" = step ] && default_budget=500
left() { echo $(( ${GPU_CHECK_SECONDS:-$default_budget} - ($(date +%s) - t0) )); }  # the whole call's budget
# stage NAME LIMIT_S LOG COMMAND...: runs COMMAND within min(LIMIT_S, time left - 15 s), its output in $OUT/LOG
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local budget=$(( $(left) - 15 )); [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 20 ]; then echo "=== $name: SKIPPED ($(left) s left)"; status=1; return; fi
  echo "=== $name (at most $limit s)"
  timeout "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  tail -"${TAIL:-12}" "$OUT/$log"; echo "--- $name: rc $rc after $(( $(date +%s) - t0 )) s"
}
if [ "$what" = step ]; then
  TAIL=6 stage "GPU tests of the ops" 70 gpu_tests_ops.log python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/kernels tests/ops/test_matching.py tests/ops/test_optimal_match.py tests/model/test_interaction.py
  TAIL=14 stage "bench_train_step (paper preset, B=32)" 230 bench_train_step.log \
    python3 benchmarks/bench_train_step.py --device cuda --iters 10 --out "$OUT/bench_train_step.json"
  TAIL=3 stage "bench_l1 (B=256)" 35 bench_l1.log python3 benchmarks/bench_l1.py --device cuda --quick --out "$OUT/bench_l1.json"
  TAIL=3 stage "bench_attention (B=32 H=8 q77 k1212 d64)" 40 bench_attention.log \
    python3 benchmarks/bench_attention.py --device cuda --out "$OUT/bench_attention.json"
  TAIL=3 stage "bench_interaction (8 blocks, B=32)" 45 bench_interaction.log \
    python3 benchmarks/bench_interaction.py --device cuda --out "$OUT/bench_interaction.json"
  TAIL=3 stage "bench_matching (B=64, 256)" 20 bench_matching.log \
    python3 benchmarks/bench_matching.py --device cuda --quick --out "$OUT/bench_matching.json"
  echo "=== summary (wall: host issue + a sync per call; gpu: back-to-back calls; ratios against each bench's baseline)"
  python3 benchmarks/summary.py "$OUT"
  grep -h "passed\|failed" "$OUT/gpu_tests_ops.log" | tail -1
  echo "total $(( $(date +%s) - t0 )) s"
fi
if [ "$what" = matching ]; then
  echo "=== kernel-level timing (raw ops, CUDA events; register vs shared-memory optimal solver)"
  timeout 90 python3 scripts/time_matching_kernels.py --out "$OUT/matching_kernels.json" 2>&1
  echo "=== GPU tests of the matching ops"
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_matching.py tests/ops/test_optimal_match.py \
    > "$OUT/gpu_tests_matching.log" 2>&1
  status=$?
  tail -25 "$OUT/gpu_tests_matching.log"
  echo "=== bench_matching (what a user calls)"
  timeout 120 python3 benchmarks/bench_matching.py --device cuda --out "$OUT/bench_matching.json" 2>&1 | tail -40
  if [ "$(left)" -gt 45 ]; then
    echo "=== GPU tests of the Triton kernels, in the $(left) s left"
    timeout "$(( $(left) - 10 ))" python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels \
      tests/model/test_interaction.py > "$OUT/gpu_tests_triton.log" 2>&1
    echo "rc $?"; tail -15 "$OUT/gpu_tests_triton.log"
  fi
  echo "=== summary"; tail -1 "$OUT/gpu_tests_matching.log"
  python3 -c "
import json; r = json.load(open('$OUT/matching_kernels.json'))
for x in r['rows']: print(x['B'], x['D'], x['metric'], x['dtype'], 'greedy %.1f us, optimal %.1f us (%.2fx), shared solver %.1f us, python greedy %.1f us' % (x['greedy_kernel_us'], x['optimal_register_kernel_us'], x['optimal_register_kernel_us'] / x['greedy_kernel_us'], x['optimal_shared_kernel_us'], x['greedy_python_us']))
" 2>&1
fi
if [ "$what" = sanitize ]; then
  for tool in memcheck racecheck synccheck initcheck; do
    echo "=== compute-sanitizer --tool $tool"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$CUDA_HOME/bin/compute-sanitizer" --tool "$tool" --error-exitcode 3 \
      --kernel-name kns=match_kernel python3 scripts/sanitize_matching.py > "$OUT/sanitize_$tool.log" 2>&1
    rc=$?; [ $rc -eq 0 ] || status=1
    tail -4 "$OUT/sanitize_$tool.log"; echo "$tool rc $rc after $(( $(date +%s) - t0 )) s"
  done
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 240 python3 -m pytest -q -x -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  status=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for b in matching l1 attention interaction train_step; do
    echo "=== bench_$b"
    timeout 150 python3 benchmarks/bench_$b.py --device cuda --out "$OUT/bench_$b.json" 2>&1 | tail -40
  done
  echo "=== bench_matching, optimal solver state in shared memory (A/B against the register solver above)"
  COLLAT_CUDA_OPTIMAL_SOLVER=shared timeout 100 python3 benchmarks/bench_matching.py --device cuda --quick \
    --out "$OUT/bench_matching_shared_solver.json" 2>&1 | tail -12
  python3 benchmarks/summary.py "$OUT"
fi
exit $status
