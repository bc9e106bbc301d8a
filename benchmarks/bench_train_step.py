"""Samples/s of one full CoLLAT training step (forward with all three losses, backward, AdamW):
fused ops vs reference ops vs torch.compile of the reference model, side by side on the same weights
and the same batch, plus peak memory.

GPU: AST-base, CLIP ViT-B-32 text tower, 8 interaction blocks, 10 s clips padded to 1024 frames (1212 audio tokens),
B=32, bf16 autocast, fused AdamW (DESIGN.md section 4: reference 140 samples/s on an H200; target
fused >= 1.3x reference and faster than torch.compile), and the fused step with optimal instead of greedy
token matching (--matching optimal: what the exact assignment costs a whole step). CPU: the tiny default
config, fp32.

    python benchmarks/bench_train_step.py [--quick] [--device cuda] [--batch-size 32]
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from collat.config import load_preset  # noqa: E402
from collat.model import CoLLAT, CoLLATConfig  # noqa: E402


def gpu_config() -> CoLLATConfig:
    return CoLLATConfig(text_encoder="clip:ViT-B-32", audio_size="base", clip_seconds=10.0, target_frames=1024, interaction_depth=8,
                        interaction_heads=8, lambda_cg=0.1, noisy_fraction=1.0)


def make_batch(batch: int, seconds: float, device: str):
    g = torch.Generator().manual_seed(0)
    waves = 0.1 * torch.randn(batch, int(seconds * 16000), generator=g)
    names = ["violin", "snare drum", "church organ", "bird tweet", "telephone ring", "harp", "flute", "piano"]
    texts = [f"This is a sound of {names[i % 8]}, {names[(i + 3) % 8]}, and {names[(i + 5) % 8]}" for i in range(batch)]
    return waves.to(device), texts


def step_fn(model: CoLLAT, optimizer, waves, texts, device: str, amp: bool):
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def step():
        with autocast:
            out = model.compute_losses(waves, texts)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    return step


def main():
    p = harness.parser(__doc__.split("\n\n")[0], "results/bench_train_step.json")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (8 with --quick)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    args = p.parse_args()
    device = harness.devices(args.device)[-1]  # the GPU when there is one
    on_gpu = device.startswith("cuda")
    config = gpu_config() if on_gpu else load_preset("cpu")[0]
    batch = args.batch_size or (8 if args.quick else 32)
    if not on_gpu and args.batch_size is None:
        batch = 4 if args.quick else 8
    iters, warmup = (3, 1) if args.quick else ((20, 3) if on_gpu else (5, 1))
    waves, texts = make_batch(batch, config.clip_seconds, device)

    torch.manual_seed(0)
    base = CoLLAT(config).to(device)
    contenders = {}
    for name in ("reference", "fused", "fused, optimal", "compiled reference"):
        if name == "compiled reference" and args.no_compile:
            continue
        model = copy.deepcopy(base)
        model.set_fused(name.startswith("fused"))
        if name == "fused, optimal":
            model.config.matching = "optimal"
        if name == "compiled reference":
            model.audio = torch.compile(model.audio)
            model.interaction = torch.compile(model.interaction)
            model.text.forward_tokens = torch.compile(model.text.forward_tokens)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, fused=on_gpu)
        contenders[name] = step_fn(model, optimizer, waves, texts, device, amp=on_gpu)

    report = harness.Report("CoLLAT training step", device, baseline="reference")
    case = f"B={batch} tokens={base.audio.num_tokens} N={base.context_length} {config.audio_size}/{config.text_encoder}"
    rows = []
    for name, fn in contenders.items():
        row = harness.measure(case, name, fn, device, warmup=warmup, iters=iters)
        row.extra["samples_per_s"] = batch / (row.median_ms / 1e3)
        rows.append(row)
    report.add(rows)
    report.print()
    for row in rows:
        print(f"{row.impl:<22} {row.extra['samples_per_s']:8.1f} samples/s")
    report.save(args.out)


if __name__ == "__main__":
    main()
