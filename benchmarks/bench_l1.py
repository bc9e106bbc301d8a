"""Benchmark of token_l1_loss: python benchmarks/bench_l1.py [--quick] [--device cpu|cuda] [--sweep]

Side by side in one run, on the same inputs (N = 77, D = 512, a random full permutation: every row
valid, the most traffic):
  reference       collat.ops.reference.token_l1_loss in eager PyTorch: the baseline
  torch.compile   torch.compile of the reference
  ours            collat.token_l1_loss: the Triton kernels on CUDA; on CPU (no interpreter) the
                  op falls back to the reference, and the table says so
Modes: "fwd" under torch.no_grad (evaluation), "fwd+bwd" = loss, then torch.autograd.grad with
respect to pred (L_ct), and "L_ut fwd+bwd" = identity perm with gradients to pred and target.
Targets (docs/design.md §4, H100/H200): fwd+bwd <= 45 us fp32 and <= 25 us bf16 at B=256.
Every contender gets wall time per call (host issue included), GPU time (back-to-back calls) and peak
memory (benchmarks/harness.py). --profile (CUDA) prints ours' per-kernel GPU times after all timings
(a profiler run right before a timing would distort it). --sweep (CUDA) times fwd+bwd at B=256 for
several launch configurations of the forward kernel.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collat.kernels import token_l1  # noqa: E402
from harness import Report, devices, measure, parser  # noqa: E402

from collat.ops import reference  # noqa: E402
from collat.ops.token_l1 import token_l1_loss  # noqa: E402

N, D = 77, 512


def make_inputs(B: int, dtype: torch.dtype, device: str, identity: bool = False):
    gen = torch.Generator().manual_seed(B)
    pred = torch.randn(B, N, D, generator=gen).to(device, dtype)
    target = torch.randn(B, N, D, generator=gen).to(device, dtype)
    if identity:
        perm = torch.arange(N).expand(B, N).contiguous()
    else:
        perm = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])
    return pred, target, perm.to(device)


def step_fn(loss_fn, pred, target, perm, mode: str):
    """One call of the benchmarked work for a mode."""
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return loss_fn(pred, target, perm)

        return run
    p = pred.detach().requires_grad_(True)
    t = target.detach().requires_grad_(mode == "L_ut fwd+bwd")
    wrt = [p, t] if t.requires_grad else [p]

    def run():
        return torch.autograd.grad(loss_fn(p, t, perm), wrt)

    return run


def kernel_time_us(fn, iters: int = 20, breakdown: dict | None = None) -> float:
    """GPU time of the kernels one call of fn launches, from torch.profiler (nan if unavailable);
    per-kernel times go into breakdown when given."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        if breakdown is not None:
            for e in kernels:
                breakdown[e.name[:40]] = breakdown.get(e.name[:40], 0.0) + e.device_time_total / iters
        return sum(e.device_time_total for e in kernels) / iters
    except Exception as error:  # the profiler is a diagnostic, never a reason to fail the run
        print(f"  (kernel time unavailable: {error})")
        return float("nan")


def run(args) -> None:
    dtypes = [torch.float32, torch.bfloat16]
    modes = ["fwd", "fwd+bwd"] if args.quick else ["fwd", "fwd+bwd", "L_ut fwd+bwd"]
    for device in devices(args.device):
        on_cuda = device.startswith("cuda")
        # A CPU smoke run uses a smaller batch: the reference takes ~0.5 s per call at B=256 there.
        batch_sizes = [256, 1024] if not args.quick else ([256] if on_cuda else [64])
        if not on_cuda:
            os.environ.pop("TRITON_INTERPRET", None)  # time the fallback, not the interpreter
        ours_name = "ours (Triton)" if on_cuda else "ours (ref. fallback)"
        use_compile = on_cuda or not args.quick
        iters = 200 if on_cuda else (3 if args.quick else 20)
        warmup = 10 if on_cuda else 1
        out = args.out if len(devices(args.device)) == 1 else args.out.replace(".json", f"_{device.split(':')[0]}.json")
        report = Report(f"token_l1_loss (N={N}, D={D})", device, baseline="reference", out=out)
        # One compiled graph per (shape, dtype, mode): allow them all rather than falling back to eager.
        torch._dynamo.config.recompile_limit = 64
        compiled = torch.compile(reference.token_l1_loss, dynamic=False) if use_compile else None
        for B in batch_sizes:
            for dtype in dtypes:
                for mode in modes:
                    pred, target, perm = make_inputs(B, dtype, device, identity=mode.startswith("L_ut"))
                    case = f"B={B} {str(dtype).split('.')[-1]} {mode}"
                    contenders = {"reference": reference.token_l1_loss, ours_name: token_l1_loss}
                    if compiled is not None:
                        contenders["torch.compile"] = compiled
                    rows = []
                    for name, loss_fn in contenders.items():
                        fn = step_fn(loss_fn, pred, target, perm, mode)
                        rows.append(measure(case, name, fn, device, warmup=warmup, iters=iters))
                    report.add(rows)
        report.print()
        if on_cuda and args.profile:  # after every timing: the profiler's own overhead then distorts none
            for B in batch_sizes:
                for dtype in dtypes:
                    pred, target, perm = make_inputs(B, dtype, device)
                    kernels: dict = {}
                    total = kernel_time_us(step_fn(token_l1_loss, pred, target, perm, "fwd+bwd"), breakdown=kernels)
                    print(f"  B={B} {str(dtype).split('.')[-1]} fwd+bwd: ours' kernels {total:.1f} us: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in kernels.items()))
        if not on_cuda:
            print("  note: no GPU, so 'ours' ran the PyTorch reference fallback (the Triton kernels need CUDA "
                  "or TRITON_INTERPRET=1); the CPU rows say nothing about the kernels")
            if not use_compile:
                print("  note: --quick on CPU skips torch.compile (its compile time dominates a smoke run)")
        report.save(out)
        if args.sweep and on_cuda:
            sweep(device)


def sweep(device: str) -> None:
    """fwd+bwd at B=256 for several forward launch configurations (the chosen one is CUDA_CONFIG)."""
    default = token_l1.CUDA_CONFIG
    report = Report("token_l1_loss launch-config sweep (B=256, fwd+bwd)", device, baseline="default")
    for dtype in (torch.float32, torch.bfloat16):
        pred, target, perm = make_inputs(256, dtype, device)
        case = str(dtype).split(".")[-1]
        rows = []
        configs = {"default": default}
        for programs_per_sm in (4, 8, 16):
            for tile_bytes in (8192, 16384):
                for num_warps in (4, 8):
                    name = f"p{programs_per_sm} t{tile_bytes // 1024}k w{num_warps}"
                    configs[name] = dataclasses.replace(
                        default, programs_per_sm=programs_per_sm, tile_bytes=tile_bytes, num_warps=num_warps
                    )
        for name, cfg in configs.items():
            token_l1.CUDA_CONFIG = cfg
            try:
                fn = step_fn(token_l1_loss, pred, target, perm, "fwd+bwd")
                rows.append(measure(case, name, fn, device, warmup=10, iters=100))
            finally:
                token_l1.CUDA_CONFIG = default
        report.add(rows)
    report.print()


def main():
    p = parser(__doc__.splitlines()[0], "results/bench_l1.json")
    p.add_argument("--sweep", action="store_true", help="also time launch configurations (CUDA only)")
    p.add_argument("--profile", action="store_true", help="per-kernel GPU times of ours, after the timings (CUDA)")
    run(p.parse_args())


if __name__ == "__main__":
    main()
