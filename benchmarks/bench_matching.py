"""Benchmark of the matching ops: python benchmarks/bench_matching.py [--quick] [--device cpu|cuda]

Side by side in one run, on the same inputs (N = 77, every row valid: the worst case):
  reference     collat.ops.reference.greedy_match (cdist + a loop of N argmin steps): the baseline
  greedy op     collat.greedy_match (validation + the C++ / CUDA kernel)
  optimal op    collat.optimal_match (exact assignment, C++ / CUDA kernel)
  ..., unchecked  the same with check_lengths=False (no range check of lengths: no host sync on a GPU)
  scipy loop    collat.ops.reference.optimal_match (cdist, then linear_sum_assignment per item)
Ratios are against the reference; the table's extra columns compare optimal with greedy and scipy.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Report, devices, measure, parser  # noqa: E402

from collat.ops import _ext, reference  # noqa: E402
from collat.ops.matching import greedy_match, optimal_match  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _calibrate(fn, device: str, budget_s: float, min_iters: int) -> tuple[int, int]:
    """(warmup, iters) so that a contender takes about budget_s: slow references get few calls.

    Runs fn twice (the first call is the warmup of slow contenders)."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    seconds = max(time.perf_counter() - start, 1e-6)
    iters = int(min(50, max(min_iters, budget_s / seconds)))
    return (0 if seconds > 0.05 else 5), iters


def run(args) -> Report | None:
    batch_sizes = [64, 256] if args.quick else [64, 256, 1024]
    dims = [512] if args.quick else [512, 768]
    budget = 0.3 if args.quick else 1.5
    dtype = getattr(torch, args.dtype)
    N = 77
    report = None
    for device in devices(args.device):
        out = args.out if len(devices(args.device)) == 1 else args.out.replace(".json", f"_{device.split(':')[0]}.json")
        report_dev = Report(f"token matching ({args.metric}, {args.dtype}, N={N})", device, baseline="reference", out=out)
        kernels = {op: _ext.has_kernel(op, device.split(":")[0]) for op in ("greedy_match", "optimal_match")}
        for B in batch_sizes:
            for D in dims:
                gen = torch.Generator().manual_seed(B * 1000 + D)
                pred = torch.randn(B, N, D, generator=gen).to(device, dtype)
                target = torch.randn(B, N, D, generator=gen).to(device, dtype)
                lengths = torch.full((B,), N, dtype=torch.int64, device=device)
                case = f"B={B} D={D}"
                contenders = {
                    "reference": lambda: reference.greedy_match(pred, target, lengths, args.metric),
                    "greedy op": lambda: greedy_match(pred, target, lengths, args.metric),
                    "greedy op, unchecked": lambda: greedy_match(pred, target, lengths, args.metric,
                                                                 check_lengths=False),
                    "optimal op": lambda: optimal_match(pred, target, lengths, args.metric),
                    "optimal op, unchecked": lambda: optimal_match(pred, target, lengths, args.metric,
                                                                   check_lengths=False),
                    "scipy loop": lambda: reference.optimal_match(pred, target, lengths, args.metric),
                }
                rows = []
                for name, fn in contenders.items():
                    warmup, iters = _calibrate(fn, device, budget, min_iters=2 if args.quick else 3)
                    backend = "reference"
                    if kernels["greedy_match" if name.startswith("greedy") else "optimal_match"] and " op" in name:
                        backend = "kernel"
                    rows.append(measure(case, name, fn, device, warmup=warmup, iters=iters, backend=backend))
                by_name = {r.impl: r for r in rows}
                greedy_ms = by_name["greedy op"].median_ms
                for r in rows:
                    r.extra["time_vs_greedy_op"] = r.median_ms / greedy_ms
                by_name["optimal op"].extra["speedup_vs_scipy_loop"] = (
                    by_name["scipy loop"].median_ms / by_name["optimal op"].median_ms
                )
                report_dev.add(rows)
        report_dev.print()
        rows = {(r.case, r.impl): r for r in report_dev.rows}
        for case in dict.fromkeys(r.case for r in report_dev.rows):
            optimal, unchecked = rows[case, "optimal op"], rows[case, "optimal op, unchecked"]
            print(
                f"  {case}: optimal op = {optimal.extra['time_vs_greedy_op']:.2f}x the greedy op's time "
                f"({unchecked.median_ms / rows[case, 'greedy op, unchecked'].median_ms:.2f}x unchecked), "
                f"{optimal.extra['speedup_vs_scipy_loop']:.1f}x faster than the scipy loop"
            )
        if not all(kernels.values()):
            print(f"  note: no compiled kernel for {[k for k, v in kernels.items() if not v]} on {device}: "
                  "those rows ran the reference fallback")
        report_dev.save(out)
        report = report_dev
    return report


def main():
    p = parser(__doc__.splitlines()[0], "results/bench_matching.json")
    p.add_argument("--metric", default="l1", choices=reference.METRICS)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    run(p.parse_args())


if __name__ == "__main__":
    main()
