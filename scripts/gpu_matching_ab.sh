#!/usr/bin/env bash
# A/B of the CUDA matching kernels on a lent GPU, in one call: the working tree's csrc/ against a
# baseline csrc/ (a folder, e.g. `git archive OLD csrc | tar -x -C .old_csrc --strip-components=1`,
# carried). The baseline builds while `scripts/gpu_check.sh matching` builds, times, tests and
# benchmarks the working tree; then the baseline is timed on the same card and both are compared.
# Results go to $OUT. Usage on the device machine: bash scripts/gpu_matching_ab.sh .old_csrc
set -uo pipefail
cd "$(dirname "$0")/.."
baseline="${1:?usage: gpu_matching_ab.sh BASELINE_CSRC_DIR}"
export OUT="${OUT:-results}" PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
mkdir -p "$OUT"
t0=$(date +%s)
old=/tmp/collat_baseline
rm -rf "$old" && mkdir -p "$old" && cp -r collat kernels scripts setup.py "$old"/ && rm -f "$old"/collat/_C*.so
cp -r "$baseline" "$old/csrc" && ln -s ../kernels "$old/collat/kernels"
(cd "$old" && MAX_JOBS=8 python3 setup.py build_ext --inplace > "$OUT/build_baseline.log" 2>&1; echo "rc $?" >> "$OUT/build_baseline.log") &
GPU_CHECK_SECONDS=0 MAX_JOBS=8 bash scripts/gpu_check.sh matching  # 0: no time left for the Triton tests
status=$?
wait
echo "baseline build: $(tail -1 "$OUT/build_baseline.log")"
[ -f "$OUT/matching_kernels.json" ] || { echo "no timing of the working tree"; exit 1; }
echo "=== baseline"
(cd "$old" && timeout 90 python3 scripts/time_matching_kernels.py --out "$OUT/kernels_baseline.json" 2>&1)
echo "=== A/B, kernel medians in microseconds (same card, same call)"
python3 - "$OUT/kernels_baseline.json" "$OUT/matching_kernels.json" <<'PY'
import json, sys
old, new = (json.load(open(p)) for p in sys.argv[1:3])
print(new["device"])
print(f"{'case':<32}{'greedy old':>11}{'new':>8}{'speedup':>9}{'optimal old':>13}{'new':>8}{'speedup':>9}{'opt/greedy new':>16}")
for a, b in zip(old["rows"], new["rows"]):
    case = f"B={b['B']} D={b['D']} {b['metric']} {b['dtype']}" + (f" L={b['L']}" if b.get("L", b["N"]) != b["N"] else "")
    g0, g1 = a["greedy_kernel_us"], b["greedy_kernel_us"]
    o0, o1 = a["optimal_register_kernel_us"], b["optimal_register_kernel_us"]
    print(f"{case:<32}{g0:>11.1f}{g1:>8.1f}{g0 / g1:>8.2f}x{o0:>13.1f}{o1:>8.1f}{o0 / o1:>8.2f}x{o1 / g1:>15.2f}x")
PY
echo "total: $(( $(date +%s) - t0 )) s"
exit $status
