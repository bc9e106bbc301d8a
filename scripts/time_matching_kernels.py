"""Kernel-level timing of the CUDA matching ops on a lent GPU (run by scripts/gpu_check.sh matching).

bench_matching.py times what a user calls (validation, including one host sync for the lengths
check, plus the kernel). This script separates the two: the raw ops torch.ops.collat.greedy_match /
optimal_match timed with CUDA events by triton.testing.do_bench (median, L2 flushed before each call),
the optimal op with its column state in registers (the default for N <= 128), in shared memory
(COLLAT_CUDA_OPTIMAL_SOLVER=shared) and from the plain start (COLLAT_CUDA_OPTIMAL_START=plain: no row
and column reduction of (nearly) square problems; both variables are read on every call), next to
the Python functions (host clock, synchronised, median) and the reference. Prints a table and
writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from collat.ops import reference  # noqa: E402
from collat.ops.matching import greedy_match, optimal_match  # noqa: E402


def kernel_us(fn) -> float:
    return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def wall_us(fn, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def with_env(name: str, value: str, fn):
    """fn, called with the environment variable name (read by the CUDA op on every call) set to value."""
    def call():
        os.environ[name] = value
        try:
            return fn()
        finally:
            os.environ.pop(name, None)
    return call


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/matching_kernels.json")
    args = p.parse_args()
    ops = torch.ops.collat
    N = 77
    # (B, D, metric, dtype, L): every row valid unless L < N.
    cases = [(64, 512, "l1", torch.float32, N), (256, 512, "l1", torch.float32, N),
             (1024, 512, "l1", torch.float32, N), (256, 768, "l1", torch.float32, N),
             (256, 512, "l2", torch.float32, N), (256, 512, "cosine", torch.float32, N),
             (256, 512, "l1", torch.bfloat16, N), (256, 512, "l1", torch.float32, 72),
             (256, 512, "l1", torch.float32, 40)]
    rows = []
    import collat._C as extension
    print(f"device: {torch.cuda.get_device_name()}; extension {extension.__file__}")
    print(f"times in microseconds, medians; N = {N}; 'plain k': the optimal kernel started from zero potentials")
    header = (f"{'case':<34}{'greedy k':>10}{'opt(reg) k':>12}{'opt(smem) k':>12}{'plain k':>9}{'opt/greedy':>11}"
              f"{'greedy py':>11}{'unchecked':>11}{'opt py':>9}{'reference':>11}{'ref/greedy py':>14}")
    print(header)
    for B, D, metric, dtype, L in cases:
        gen = torch.Generator().manual_seed(B * 1000 + D)
        pred = torch.randn(B, N, D, generator=gen).to("cuda", dtype)
        target = torch.randn(B, N, D, generator=gen).to("cuda", dtype)
        lengths = torch.full((B,), L, dtype=torch.int64, device="cuda")
        greedy_k = kernel_us(lambda: ops.greedy_match(pred, target, lengths, metric))
        opt_reg_k = kernel_us(lambda: ops.optimal_match(pred, target, lengths, metric))
        def optimal():
            return ops.optimal_match(pred, target, lengths, metric)

        shared = with_env("COLLAT_CUDA_OPTIMAL_SOLVER", "shared", optimal)
        plain = with_env("COLLAT_CUDA_OPTIMAL_START", "plain", optimal)
        opt_smem_k = kernel_us(shared)
        opt_plain_k = kernel_us(plain)
        greedy_py = wall_us(lambda: greedy_match(pred, target, lengths, metric))
        greedy_unchecked = wall_us(lambda: greedy_match(pred, target, lengths, metric, check_lengths=False))
        opt_py = wall_us(lambda: optimal_match(pred, target, lengths, metric))
        ref = wall_us(lambda: reference.greedy_match(pred, target, lengths, metric), iters=5)
        same = torch.equal(ops.optimal_match(pred, target, lengths, metric), shared())
        row = dict(B=B, N=N, L=L, D=D, metric=metric, dtype=str(dtype).replace("torch.", ""),
                   greedy_kernel_us=greedy_k, optimal_register_kernel_us=opt_reg_k,
                   optimal_shared_kernel_us=opt_smem_k, optimal_plain_start_kernel_us=opt_plain_k,
                   greedy_python_us=greedy_py, greedy_python_unchecked_us=greedy_unchecked,
                   optimal_python_us=opt_py, reference_us=ref,
                   solvers_give_same_perm=same)
        rows.append(row)
        case = f"B={B} D={D} {metric} {row['dtype']}" + ("" if L == N else f" L={L}")
        print(f"{case:<34}{greedy_k:>10.1f}{opt_reg_k:>12.1f}{opt_smem_k:>12.1f}{opt_plain_k:>9.1f}"
              f"{opt_reg_k / greedy_k:>10.2f}x"
              f"{greedy_py:>11.1f}{greedy_unchecked:>11.1f}{opt_py:>9.1f}{ref:>11.0f}{ref / greedy_py:>13.0f}x"
              + ("" if same else "  SOLVERS DIFFER"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
