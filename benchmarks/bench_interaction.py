"""Benchmark the token interaction module forward+backward: the reference module (baseline),
torch.compile of it, the fused path and torch.compile of the fused path (one K/V GEMM for all blocks + Triton cross-attention; on CPU
the attention falls back to SDPA, labelled so). bf16 autocast, as in training.

    python benchmarks/bench_interaction.py          # 8 blocks, D=512, 8 heads, N=77, 1212 audio tokens, B=32
    python benchmarks/bench_interaction.py --quick  # tiny module, few iterations (also on CPU)
"""
from __future__ import annotations

import copy

import torch
from collat.kernels._utils import runs_triton
from harness import Report, measure, parser

from collat.model.interaction import TokenInteraction
from collat.ops import op_set


def main() -> None:
    p = parser(__doc__.splitlines()[0], "results/bench_interaction.json")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--profile", action="store_true", help="print the top kernels of one fused step (CUDA)")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    if on_gpu:
        B, M, N, D, heads, depth = (8, 1212, 77, 512, 8, 8) if args.quick else (32, 1212, 77, 512, 8, 8)
    else:
        B, M, N, D, heads, depth = (2, 97, 13, 64, 4, 2) if args.quick else (4, 300, 77, 256, 4, 4)
    iters = 5 if args.quick else 30

    reference_module = TokenInteraction(D, N, depth=depth, num_heads=heads).to(device)
    fused_module = copy.deepcopy(reference_module)
    fused_module.ops = op_set("fused")
    impls = {"reference": reference_module}
    if not args.no_compile:
        impls["compiled reference"] = torch.compile(copy.deepcopy(reference_module))
    ours = "fused (triton)" if runs_triton(torch.device(device)) else "fused (cpu: SDPA attention)"
    impls[ours] = fused_module
    if not args.no_compile:
        # The attention is a custom op, so compile fuses and schedules everything around it.
        compiled_fused = copy.deepcopy(fused_module)
        impls[f"compiled {ours}"] = torch.compile(compiled_fused)

    audio = torch.randn(B, M, D, device=device, requires_grad=True)
    case = f"depth{depth} D{D} H{heads} N{N} M{M} B{B} bf16-autocast fwd+bwd"
    rows = []
    for name, module in impls.items():
        def step(module=module):
            module.zero_grad(set_to_none=True)
            audio.grad = None
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
                out = module(audio)
            out.float().square().mean().backward()

        rows.append(measure(case, name, step, device, warmup=3, iters=iters))
        if args.profile and on_gpu:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            print(f"--- {name}: top CUDA kernels of one step")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    report = Report("token interaction module", device, baseline="reference", out=args.out)
    report.add(rows)
    report.print()
    report.save(args.out)


if __name__ == "__main__":
    main()
