"""Samples/s of one full CoLLAT training step (forward with all three losses, backward, AdamW), side by
side on the same sizes and the same batch, each with wall time per step, GPU time and peak memory:

  reference             the package with its plain-PyTorch reference ops (the baseline)
  fused                 the package with the fused ops (Triton attention and token L1, C++/CUDA matching)
  fused, optimal        the same with optimal instead of greedy token matching
  compiled reference    torch.compile of the reference model's AST, interaction and text tower
  compiled fused        torch.compile of the fused model's AST, interaction and text tower (the Triton
                        ops are triton_ops: Inductor traces into them)
  plain PyTorch (fbank) the docs/design.md §4 anchor, written by hand in benchmarks/plain_step.py:
                        transformers' AST, open_clip's CLIP text tower, the interaction module and the
                        losses (cdist + loop greedy matching) in plain PyTorch, from precomputed fbanks

GPU: AST-base, CLIP ViT-B-32 text tower, 8 interaction blocks, 10 s clips padded to 1024 frames (1212
audio tokens), B=32, bf16 autocast, fused AdamW (docs/design.md §4: the anchor took 228 ms on an H200;
target: fused >= 2x the anchor, the compiled fused step faster still). CPU: a tiny config (micro AST,
1 s clips, 2 blocks, CLIP ViT-B-32 text tower), fp32, to check that every contender runs.

    python benchmarks/bench_train_step.py [--quick] [--device cuda] [--batch-size 32] [--only fused,plain]
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from plain_step import PlainCoLLAT  # noqa: E402

from collat.model import CoLLAT, CoLLATConfig  # noqa: E402
from collat.model.audio import AST_SIZES  # noqa: E402

# Most wanted first: a run cut short by a time limit still has them (the JSON is rewritten after each).
CONTENDERS = ("reference", "fused", "plain PyTorch (fbank)", "compiled fused", "fused, optimal", "compiled reference")


def bench_config(on_gpu: bool) -> CoLLATConfig:
    if on_gpu:
        return CoLLATConfig(text_encoder="clip:ViT-B-32", audio_size="base", clip_seconds=10.0, target_frames=1024,
                            interaction_depth=8, interaction_heads=8, lambda_cg=0.1, noisy_fraction=1.0)
    return CoLLATConfig(text_encoder="clip:ViT-B-32", audio_size="micro", clip_seconds=1.0, interaction_depth=2,
                        interaction_heads=8, lambda_cg=0.1, noisy_fraction=1.0)


def make_batch(batch: int, seconds: float, device: str):
    g = torch.Generator().manual_seed(0)
    waves = 0.1 * torch.randn(batch, int(seconds * 16000), generator=g)
    names = ["violin", "snare drum", "church organ", "bird tweet", "telephone ring", "harp", "flute", "piano"]
    texts = [f"This is a sound of {names[i % 8]}, {names[(i + 3) % 8]}, and {names[(i + 5) % 8]}" for i in range(batch)]
    return waves.to(device), texts


def autocast_for(device: str, amp: bool):
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def package_step(model: CoLLAT, waves, texts, device: str, amp: bool):
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, fused=device.startswith("cuda"))

    def step():
        with autocast_for(device, amp):
            out = model.compute_losses(waves, texts)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    return step


def plain_step(config: CoLLATConfig, base: CoLLAT, waves, texts, device: str, amp: bool):
    """The hand-written step, from fbanks and token ids computed once outside it."""
    model = PlainCoLLAT(AST_SIZES[config.audio_size], base.frontend.target_frames, config.patch_stride,
                        config.interaction_depth, config.interaction_heads, config.text_encoder.split(":", 1)[1]).to(device)
    with torch.no_grad():
        fbank = base.frontend(waves)
        ids, _ = base.text.tokenize(texts)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.startswith("cuda"))
    lambdas = (config.lambda_ct, config.lambda_cg, config.lambda_ut)

    def step():
        with autocast_for(device, amp):
            loss = model.losses(fbank, ids, lambdas, config.noise_std)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def build(name: str, config: CoLLATConfig, base: CoLLAT, waves, texts, device: str, amp: bool):
    if name == "plain PyTorch (fbank)":
        return plain_step(config, base, waves, texts, device, amp)
    model = copy.deepcopy(base)
    model.set_fused("fused" in name)
    if name == "fused, optimal":
        model.config.matching = "optimal"
    if name.startswith("compiled"):
        model.audio = torch.compile(model.audio)
        model.interaction = torch.compile(model.interaction)
        model.text.forward_tokens = torch.compile(model.text.forward_tokens)
    return package_step(model, waves, texts, device, amp)


def main():
    p = harness.parser(__doc__.split("\n\n")[0], "results/bench_train_step.json")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on a GPU (8 with --quick), 4 on CPU (2 with --quick)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    p.add_argument("--iters", type=int, default=None, help="timed steps per contender (default 20 on a GPU)")
    args = p.parse_args()
    device = harness.devices(args.device)[-1]  # the GPU when there is one
    on_gpu = device.startswith("cuda")
    config = bench_config(on_gpu)
    batch = args.batch_size or ((8 if args.quick else 32) if on_gpu else (2 if args.quick else 4))
    iters, warmup = ((3, 2) if args.quick else (20, 3)) if on_gpu else ((1, 1) if args.quick else (5, 1))
    iters = args.iters or iters
    waves, texts = make_batch(batch, config.clip_seconds, device)
    names = [n for n in CONTENDERS if not (args.no_compile and n.startswith("compiled"))]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",")]
        names = [n for n in names if any(n.startswith(w) for w in wanted)]

    torch.manual_seed(0)
    base = CoLLAT(config).to(device)
    report = harness.Report("CoLLAT training step", device, baseline="reference", out=args.out)
    case = f"B={batch} tokens={base.audio.num_tokens} N={base.context_length} {config.audio_size}/{config.text_encoder}"
    for name in names:
        try:
            step = build(name, config, base, waves, texts, device, amp=on_gpu)
            row = harness.measure(case, name, step, device, warmup=warmup, iters=iters)
        except Exception as error:  # one contender failing (e.g. a compile error) must not lose the others
            print(f"  {name}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            continue
        finally:
            step = None
            if on_gpu:
                torch.cuda.empty_cache()
        row.extra["samples_per_s"] = batch / (row.median_ms / 1e3)
        report.add([row])  # rewrites the JSON: a run cut short keeps the contenders measured so far
        print(f"  {name}: {row.median_ms:.1f} ms wall per step", flush=True)
    report.print()
    by_name = {r.impl: r for r in report.rows}
    for row in report.rows:
        line = f"{row.impl:<24} {row.extra['samples_per_s']:8.1f} samples/s"
        if "plain PyTorch (fbank)" in by_name:
            line += f"   {by_name['plain PyTorch (fbank)'].median_ms / row.median_ms:5.2f}x the plain step"
        print(line)
    report.save(args.out)


if __name__ == "__main__":
    main()
