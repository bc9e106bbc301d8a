"""Workload for compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over every path of the CUDA
matching kernels, on small shapes: vectorised and unaligned/odd-D loads, fp32/bf16/fp16, every metric,
lengths 0..N, the (nearly) square start and the plain one, the register and the shared-memory solver,
N > 128 (shared solver) and an N whose distance matrix spills to the global scratch. Each result is
checked against the CPU op (greedy: the same perm; optimal: the same total cost), so a run that the
sanitizer lets through also has to be right.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --kernel-name kns=match_kernel \
        python scripts/sanitize_matching.py
(run by scripts/gpu_check.sh sanitize)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import collat.ops  # noqa: E402,F401  (registers the ops)
from collat.ops import reference  # noqa: E402


def unaligned(x: torch.Tensor) -> torch.Tensor:
    """x's values in a contiguous tensor whose data pointer is one element past an aligned address."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    return out


def check(name, B, N, D, dtype, metric, lengths, env=None, misalign=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, N, D, generator=g).to(dtype)
    target = torch.randn(B, N, D, generator=g).to(dtype)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    pred_c, target_c = pred.cuda(), target.cuda()
    if misalign:
        pred_c, target_c = unaligned(pred_c), unaligned(target_c)
    os.environ.update(env or {})
    try:
        greedy = torch.ops.collat.greedy_match(pred_c, target_c, lengths.cuda(), metric).cpu()
        optimal = torch.ops.collat.optimal_match(pred_c, target_c, lengths.cuda(), metric).cpu()
        torch.cuda.synchronize()
    finally:
        for k in env or {}:
            os.environ.pop(k)
    greedy_cpu = torch.ops.collat.greedy_match(pred, target, lengths, metric)
    optimal_cpu = torch.ops.collat.optimal_match(pred, target, lengths, metric)
    assert torch.equal(greedy, greedy_cpu), f"{name}: greedy perm differs from the CPU op's"
    got = reference.assignment_cost(pred, target, optimal, metric)
    want = reference.assignment_cost(pred, target, optimal_cpu, metric)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3), f"{name}: optimal cost {got} vs CPU {want}"
    for b in range(B):  # every valid row on a distinct column
        cols = optimal[b, : int(lengths[b])]
        assert cols.unique().numel() == cols.numel(), f"{name}: item {b} repeats a column"
    print(f"ok  {name}")


def main():
    check("fp32 l1 N=77 D=512 L=77,76,72,40,1,0", 6, 77, 512, torch.float32, "l1", [77, 76, 72, 40, 1, 0])
    check("fp32 l1 plain start", 3, 77, 512, torch.float32, "l1", [77, 76, 40],
          env={"COLLAT_CUDA_OPTIMAL_START": "plain"})
    check("fp32 l1 shared-memory solver", 3, 77, 512, torch.float32, "l1", [77, 76, 40],
          env={"COLLAT_CUDA_OPTIMAL_SOLVER": "shared"})
    check("bf16 l2 D=70 (odd D: scalar loads)", 3, 77, 70, torch.bfloat16, "l2", [77, 75, 30])
    check("fp16 cosine unaligned pointers", 3, 77, 64, torch.float16, "cosine", [77, 70, 12], misalign=True)
    check("fp32 l1 unaligned pointers", 2, 33, 48, torch.float32, "l1", [33, 20], misalign=True)
    check("fp32 l1 N=150 (> 128: shared solver)", 2, 150, 40, torch.float32, "l1", [150, 131])
    check("fp32 l2 N=260 (matrix in global scratch)", 2, 260, 24, torch.float32, "l2", [260, 200])
    check("fp32 l1 N=1", 2, 1, 8, torch.float32, "l1", [1, 0])
    check("fp32 l1 N=31", 2, 31, 9, torch.float32, "l1", [31, 29])
    print("all sanitizer cases checked")


if __name__ == "__main__":
    main()
