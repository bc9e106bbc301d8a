#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200 (see README "GPU checks"): builds the extension in place,
# runs the GPU-marked tests and the benchmarks, and prints a short table. Results go to $OUT (or results/).
# Usage on the device machine: bash scripts/gpu_check.sh [matching|sanitize|tests|bench|all]
#   matching: the matching ops' kernel timing (both optimal solvers), GPU tests and bench_matching, then the
#   Triton kernels' GPU tests in what is left of GPU_CHECK_SECONDS (default 400)
#   sanitize: scripts/sanitize_matching.py (every path of the CUDA matching kernels, checked against the CPU op)
#   under compute-sanitizer's memcheck, racecheck, synccheck and initcheck
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
python3 -c "import collat._ext as e; print('extension', e.HAS_EXTENSION, 'cuda kernels', e.has_kernel('greedy_match','cuda'), e.has_kernel('optimal_match','cuda'))"
status=0
left() { echo $(( ${GPU_CHECK_SECONDS:-400} - ($(date +%s) - t0) )); }  # the whole call's budget
if [ "$what" = matching ]; then
  echo "=== kernel-level timing (raw ops, CUDA events; register vs shared-memory optimal solver)"
  timeout 90 python3 scripts/time_matching_kernels.py --out "$OUT/matching_kernels.json" 2>&1
  echo "=== GPU tests of the matching ops"
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_matching.py tests/test_optimal_match.py \
    > "$OUT/gpu_tests_matching.log" 2>&1
  status=$?
  tail -25 "$OUT/gpu_tests_matching.log"
  echo "=== bench_matching (what a user calls)"
  timeout 120 python3 benchmarks/bench_matching.py --device cuda --out "$OUT/bench_matching.json" 2>&1 | tail -40
  if [ "$(left)" -gt 45 ]; then
    echo "=== GPU tests of the Triton kernels, in the $(left) s left"
    timeout "$(( $(left) - 10 ))" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_token_l1.py \
      tests/test_attention.py tests/test_interaction.py > "$OUT/gpu_tests_triton.log" 2>&1
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
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  echo "=== bench_matching, optimal solver state in shared memory (A/B against the register solver above)"
  COLLAT_CUDA_OPTIMAL_SOLVER=shared timeout 100 python3 benchmarks/bench_matching.py --device cuda --quick \
    --out "$OUT/bench_matching_shared_solver.json" 2>&1 | tail -12
fi
exit $status
