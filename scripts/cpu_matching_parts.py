"""Where the CPU optimal_match spends its time: the distance matrix alone vs the whole op.

JIT-builds a small extension (about a minute) from the kernels' own header (csrc/matching_cpu.h) whose
one function computes each item's full [L, N] distance matrix exactly as optimal_match does, and
nothing else. Times it next to collat.optimal_match, collat.greedy_match and the scipy loop (the
benchmark's contenders) on the benchmark's inputs, at 1 thread and at every thread. The matrix
alone is a lower bound on the op's time, so it bounds the speedup over the scipy loop that any
solver could reach with these distances.

    python scripts/cpu_matching_parts.py [--batch 256] [--dim 512] [--out benchmarks/results/cpu_matching_parts.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.cpp_extension import load_inline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from collat.ops import reference  # noqa: E402
from collat.ops.matching import greedy_match, optimal_match  # noqa: E402

SOURCE = r"""
#include "matching_cpu.h"

// Every item's full distance matrix, as optimal_match computes it; returns a checksum so that
// nothing is optimised away.
double distances_only(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& lengths) {
  std::atomic<int64_t> sink{0};
  collat::cpu::for_each_item(pred.contiguous(), target.contiguous(), lengths, collat::Metric::L1,
                             [&](int64_t, int64_t, const collat::cpu::PackedItem* item) {
                               if (item == nullptr) return;
                               collat::cpu::full_distances(*item);
                               sink += static_cast<int64_t>(item->s->dist[0]);
                             });
  return static_cast<double>(sink.load());
}
"""


def median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_matching_parts.json"))
    args = p.parse_args()
    ext = load_inline(
        "collat_cpu_matching_parts",
        cpp_sources=[SOURCE],
        functions=["distances_only"],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O3", "-std=c++17", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )
    B, N, D = args.batch, 77, args.dim
    gen = torch.Generator().manual_seed(B * 1000 + D)
    pred = torch.randn(B, N, D, generator=gen)
    target = torch.randn(B, N, D, generator=gen)
    lengths = torch.full((B,), N, dtype=torch.int64)
    rows = []
    all_threads = torch.get_num_threads()
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        times = {
            "distance matrix only": median_ms(lambda: ext.distances_only(pred, target, lengths), 20),
            "optimal op": median_ms(lambda: optimal_match(pred, target, lengths), 20),
            "greedy op": median_ms(lambda: greedy_match(pred, target, lengths), 20),
            "scipy loop": median_ms(lambda: reference.optimal_match(pred, target, lengths), 3),
        }
        for name, ms in times.items():
            rows.append({"threads": threads, "impl": name, "median_ms": ms,
                         "scipy_loop_over_this": times["scipy loop"] / ms})
    torch.set_num_threads(all_threads)
    print(f"B={B} N={N} D={D}, fp32, l1, every row valid")
    print(f"{'threads':>7}  {'contender':<22}{'median ms':>10}  {'scipy loop / this':>17}")
    for r in rows:
        print(f"{r['threads']:>7}  {r['impl']:<22}{r['median_ms']:>10.1f}  {r['scipy_loop_over_this']:>16.1f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"batch": B, "n": N, "dim": D, "metric": "l1", "dtype": "float32",
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
