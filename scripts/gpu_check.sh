#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200 (see README "GPU checks"): builds the extension in place,
# runs the GPU-marked tests and the benchmarks, and prints a short table. Results go to $OUT (or results/).
# Usage on the device machine: bash scripts/gpu_check.sh [matching|tests|bench|all]
#   matching: only what the matching ops need (their GPU tests, bench_matching, the solver A/B), ~5 min
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
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import collat._ext as e; print('extension', e.HAS_EXTENSION, 'cuda kernels', e.has_kernel('greedy_match','cuda'), e.has_kernel('optimal_match','cuda'))"
status=0
if [ "$what" = matching ]; then
  timeout 240 python3 -m pytest -q -m gpu tests/test_matching.py tests/test_optimal_match.py 2>&1 \
    | tee "$OUT/gpu_tests_matching.log" | tail -25
  status=${PIPESTATUS[0]}
  timeout 150 python3 benchmarks/bench_matching.py --device cuda --out "$OUT/bench_matching.json" 2>&1 | tail -40
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
if [ "$what" = matching ] || [ "$what" = bench ] || [ "$what" = all ]; then
  echo "=== bench_matching, optimal solver state in shared memory (A/B against the register solver above)"
  COLLAT_CUDA_OPTIMAL_SOLVER=shared timeout 100 python3 benchmarks/bench_matching.py --device cuda --quick \
    --out "$OUT/bench_matching_shared_solver.json" 2>&1 | tail -12
fi
exit $status
