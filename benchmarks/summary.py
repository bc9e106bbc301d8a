"""One table from the JSON results of the benches: python benchmarks/summary.py DIR [DIR ...]

Per bench, case and contender: wall time per call (host issue included), GPU time (back-to-back
calls), both ratios against the bench's baseline, and peak memory.
"""
from __future__ import annotations

import glob
import json
import os
import sys


def _fmt(ms) -> str:
    if ms is None or ms != ms:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


def _ratio(x) -> str:
    return "-" if x is None or x != x else f"{x:.2f}x"


def main(dirs: list[str]) -> int:
    paths = sorted(p for d in dirs for p in glob.glob(os.path.join(d, "bench_*.json")))
    if not paths:
        print(f"no bench_*.json in {dirs}")
        return 1
    header = f"{'bench':<16} {'case':<40} {'impl':<26} {'wall':>10} {'ratio':>7} {'gpu':>10} {'ratio':>7} {'peak MB':>9}"
    print(header)
    print("-" * len(header))
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        bench = os.path.basename(path)[len("bench_"):-len(".json")]
        for row in result["rows"]:
            print(f"{bench:<16} {row['case'][:40]:<40} {row['impl'][:26]:<26} {_fmt(row['median_ms']):>10} "
                  f"{_ratio(row.get('ratio')):>7} {_fmt(row.get('gpu_ms')):>10} "
                  f"{_ratio(row.get('gpu_ratio')):>7} {row['peak_mem_mb']:>9.1f}")
        print(f"{'':<16} ({result['device']}, torch {result['torch']}, baseline: {result['baseline']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["."]))
