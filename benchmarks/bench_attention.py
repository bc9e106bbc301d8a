"""Benchmark cross_attention: naive PyTorch (reference, the baseline), F.scaled_dot_product_attention
(default dispatch and each backend that takes the dtype), torch.compile of the reference, and ours
(Triton on CUDA; on CPU ours is the SDPA fallback, labelled so). Forward (no grad) and forward+backward.

    python benchmarks/bench_attention.py            # B=32 H=8 q77 k1212 d64, bf16 and fp32
    python benchmarks/bench_attention.py --quick    # tiny shapes, few iterations (also on CPU)
    python benchmarks/bench_attention.py --sweep    # time our kernels under several launch configs

Every contender gets wall time per call (host issue included), GPU time (back-to-back calls) and peak
memory (benchmarks/harness.py). fwd+bwd takes the gradients with torch.autograd.grad, so nothing
accumulates into .grad across calls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from collat.kernels import attention
from collat.kernels._utils import runs_triton
from collat.kernels.attention import LaunchConfig
from harness import Report, measure, parser

from collat.ops import reference
from collat.ops.attention import cross_attention

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # older torch
    SDPBackend = sdpa_kernel = None

SDPA_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def sdpa_with(backend_name: str | None):
    def run(q, k, v):
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def contenders(device: str, compile_reference: bool) -> dict:
    ours = "ours (triton)" if runs_triton(torch.device(device)) else "ours (cpu fallback: SDPA)"
    impls = {"reference": reference.cross_attention, "sdpa": sdpa_with(None)}
    if sdpa_kernel is not None:
        for name in SDPA_BACKENDS:
            impls[f"sdpa {name.split('_')[0].lower()}"] = sdpa_with(name)
    if compile_reference:
        impls["compiled reference"] = torch.compile(reference.cross_attention, dynamic=False)
    impls[ours] = cross_attention
    return impls


def make_inputs(B, H, NQ, NK, D, dtype, device, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(device, dtype) for n in (NQ, NK, NK))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def bench_case(report, device, B, H, NQ, NK, D, dtype, impls, iters):
    tag = f"B{B} H{H} q{NQ} k{NK} d{D} {str(dtype).split('.')[-1]}"
    for mode in ("fwd", "fwd+bwd"):
        training = mode == "fwd+bwd"
        q, k, v = make_inputs(B, H, NQ, NK, D, dtype, device, training)
        grad = torch.randn(B, H, NQ, D, device=device, dtype=dtype)
        rows = []
        for name, fn in impls.items():
            if training:
                def call(fn=fn):  # autograd.grad: no .grad accumulation (an extra add per call) in the timing
                    torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
            else:
                def call(fn=fn):
                    with torch.no_grad():
                        fn(q, k, v)
            try:
                call()
            except (RuntimeError, NotImplementedError) as err:  # backend lacks this dtype/shape/device
                print(f"  skip {name} ({mode}, {tag}): {str(err).splitlines()[0][:100]}")
                continue
            rows.append(measure(f"{tag} {mode}", name, call, device, iters=iters))
        report.add(rows)


FWD_SWEEP = [(64, 8, 3), (64, 8, 2), (64, 4, 2), (64, 4, 3), (128, 8, 2), (32, 4, 2), (32, 8, 2)]
BWD_SWEEP = [(64, 8, 2), (64, 8, 1), (64, 4, 2), (32, 8, 2), (32, 4, 2), (128, 8, 2), (16, 4, 2)]


def sweep(device: str, iters: int, shape=(32, 8, 77, 1212, 64)) -> None:
    """At the real shape: our kernels alone under several launch configs and backward key splits."""
    B, H, NQ, NK, D = shape

    def timed(fn):
        try:
            return f"{measure('sweep', '', fn, device, iters=iters).median_ms * 1e3:.1f} us"
        except Exception as err:  # a config the compiler rejects (e.g. out of shared memory)
            return f"failed ({str(err).splitlines()[0][:60]})"

    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).split(".")[-1]
        q, k, v = make_inputs(B, H, NQ, NK, D, dtype, device, False)
        do = torch.randn_like(q)
        out, lse = attention.attention_forward(q, k, v, None)
        print(f"{name}: default forward {attention.forward_config(q)}, backward {attention.backward_config(q)}, "
              f"splits {attention._num_splits(q, NK)}")
        for n, w, s in FWD_SWEEP:
            cfg = LaunchConfig(n, w, s)
            print(f"  fwd {cfg}: {timed(lambda: attention.attention_forward(q, k, v, None, config=cfg))}")
        for n, w, s in BWD_SWEEP:
            cfg = LaunchConfig(n, w, s)
            print(f"  bwd {cfg}: {timed(lambda: attention.attention_backward(do, q, k, v, out, lse, None, config=cfg))}")
        base = attention.backward_config(q) or LaunchConfig(16, 4, 1)
        for splits in (1, 2, 3, 4, 8):
            cfg = LaunchConfig(base.block_n, base.num_warps, base.num_stages, num_splits=splits)
            print(f"  bwd default config, {splits} key splits: "
                  f"{timed(lambda: attention.attention_backward(do, q, k, v, out, lse, None, config=cfg))}")
        print(f"  bwd FA2 split kernels: {timed(lambda: attention.attention_backward(do, q, k, v, out, lse, None, mode='split'))}")
        if dtype == torch.float32:
            for precision in ("ieee", "tf32x3", "tf32"):
                def both(p=precision):
                    o, l = attention.attention_forward(q, k, v, None, fp32_precision=p)
                    attention.attention_backward(do, q, k, v, o, l, None, fp32_precision=p)
                print(f"  fp32_precision={precision} fwd+bwd kernels: {timed(both)}")


def main() -> None:
    p = parser(__doc__.splitlines()[0], "results/bench_attention.json")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--sweep", action="store_true", help="also sweep our launch configs (CUDA only)")
    args = p.parse_args()
    iters = 10 if args.quick else 50
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = Report("cross_attention", device, baseline="reference", out=args.out)
    on_gpu = device.startswith("cuda")
    if on_gpu and not args.quick:
        shapes = [(32, 8, 77, 1212, 64)]
    elif on_gpu:
        shapes = [(8, 8, 77, 1212, 64)]
    else:
        shapes = [(2, 2, 13, 97, 16)] if args.quick else [(4, 8, 77, 1212, 64)]
    impls = contenders(device, compile_reference=not args.no_compile)
    for shape in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            bench_case(report, device, *shape, dtype, impls, iters)
    report.print()
    print("reference = naive PyTorch (collat.ops.reference.cross_attention); sdpa <name> = "
          "F.scaled_dot_product_attention under sdpa_kernel(<backend>); no mask in these cases (flash takes none).")
    report.save(args.out)
    if args.sweep and on_gpu:
        sweep(device, 20)


if __name__ == "__main__":
    main()
